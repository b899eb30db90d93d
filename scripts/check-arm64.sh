#!/usr/bin/env bash
# make check-arm64: prove the device install on real Debian arm64 userland, under qemu.
#
# For Debian bookworm (Python 3.11, the base of Raspberry Pi OS bookworm) and Debian trixie
# (Python 3.13, the base of the current Raspberry Pi OS), each in turn:
#   1. an arm64 root built with debootstrap and run through qemu-user-static (binfmt_misc is
#      mounted and the qemu-aarch64 handler enabled when missing), cached as a tarball under
#      $INFERD_ARM64_CACHE (default ~/.cache/inferd/arm64; delete a tarball to rebuild it);
#   2. inferd installed into /opt/inferd in that root from the committed lock, as a device does:
#      pip install --require-hashes -r requirements/device.txt, then requirements/build.txt,
#      then the source tree with --no-deps --no-build-isolation. A locked package without a
#      wheel for the target is named; LiteRT (the tflite extra) may be missing, anything else fails;
#   3. end to end, from the host: `inferd run` in the root (chroot, which shares the host's
#      network) serving the demo model, its TFLite twin when LiteRT installed, and magika's
#      file-type model (a third-party ONNX model from the magika wheel on PyPI); the host waits
#      for /v2/health/ready, checks outputs (demo: its golden file; magika: the host's onnxruntime),
#      times 20 infers per model, reads the retained status from a private mosquitto, signs
#      version 2 of the demo model into a TUF repository with inferctl, pushes it and waits
#      until the device serves it and commits it after its trial.
# It prints one table per root and exits non-zero, with a one-line reason, on any failure.
#
# Takes, on a 2-core machine, 5 to 10 minutes per root the first time (debootstrap; cached after)
# and about 5 minutes per root for the install and the run under emulation: about 10 minutes for
# both roots once cached. Needs root on a Debian/Ubuntu machine (it
# installs debootstrap, qemu-user-static, binfmt-support and mosquitto with apt when missing)
# and the package registries. Not part of .ci/run.
#
# The emulated CPU is a Raspberry Pi 4's Cortex-A72 (INFERD_ARM64_CPU=cortex-a76: a Pi 5's), and
# the root sees a matching /proc/cpuinfo: qemu-user passes the host's x86 one through, which
# onnxruntime's CPU detection (cpuinfo) cannot parse and crashes on at import.
#
# Environment: INFERD_ARM64_CACHE (cache folder), INFERD_ARM64_SUITES (default "bookworm trixie"),
# INFERD_ARM64_CPU (cortex-a72 or cortex-a76), INFERD_ARM64_MIRROR (Debian mirror; default: the
# one apt uses here), INFERD_ARM64_KEEP=1 (keep the work folder with the roots and logs).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD

CACHE=${INFERD_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/inferd/arm64}
SUITES=${INFERD_ARM64_SUITES:-bookworm trixie}
CPU=${INFERD_ARM64_CPU:-cortex-a72}
PACKAGES=python3,python3-venv,ca-certificates   # what debootstrap adds to minbase
MAGIKA=magika==1.0.3                             # the third-party model's package, pinned
MAGIKA_MODEL=magika/models/standard_v3_3         # inside its wheel: model.onnx, config.min.json
TFLITE_PACKAGES="ai-edge-litert tflite-runtime"  # locked packages a target may lack a wheel for
HOST_PY=$SRC/.venv/bin/python
INFERCTL=$SRC/.venv/bin/inferctl
IN_ROOT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

PIDS=()     # processes this shell started, stopped by PID on exit
MOUNTS=()   # mount points this shell made, unmounted on exit
REASON=""   # the one-line reason of a failure
MAIN=0      # 1 in the main process (which owns the work folder), 0 in a per-root one
OWN_DIR=""  # a per-root process's folder in the work folder
RESULTS=/dev/null

say() { echo "check-arm64: $*" >&2; }
die() {
    REASON=$*
    exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
record() { echo "$1=$2" >>"$RESULTS"; }   # key=value for the table
forget() {   # forget PID: it was waited for, so its number may be reused: never signal it again
    local keep=() p
    for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}
free_port() {
    "$HOST_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_port() {   # wait_port PORT WHAT PID: until 127.0.0.1:PORT accepts, or the process ends
    local i
    for i in $(seq 100); do
        "$HOST_PY" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2)' \
            "$1" 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || die "$2 exited at start"
        sleep 0.1
    done
    die "$2 is not listening on 127.0.0.1:$1 after 10 s"
}

pids_in() {   # the processes whose root directory is inside folder $1
    local p
    for p in /proc/[0-9]*; do
        case $(readlink "$p/root" 2>/dev/null) in "$1"/*) echo "${p#/proc/}" ;; esac
    done
}

cleanup() {
    local rc=$? pid i m
    trap - ERR
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[i]}
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        m=${MOUNTS[i]}
        mountpoint -q "$m" || continue
        umount -R "$m" 2>/dev/null || umount -R -l "$m" || say "could not unmount $m"
    done
    # anything still running in this root's folder (a daemon's child, say), then whatever an
    # interrupted debootstrap left mounted there
    if [ -n "$OWN_DIR" ]; then
        for pid in $(pids_in "$OWN_DIR"); do kill -KILL "$pid" 2>/dev/null || true; done
        awk -v d="$OWN_DIR/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r |
            while read -r m; do umount -l "$m" || say "could not unmount $m"; done
    fi
    if [ "$rc" -ne 0 ]; then
        [ -n "$REASON" ] || REASON="failed (exit $rc)"
        echo "fail=$REASON" >>"$RESULTS"
    fi
    if [ "$MAIN" = 1 ] && [ -d "${WORK:-}" ]; then
        if grep -q " $WORK/" /proc/self/mounts; then
            say "left $WORK in place: something is still mounted there"
        elif [ "${INFERD_ARM64_KEEP:-0}" = 1 ]; then
            say "work folder kept: $WORK"
        elif [ "$rc" -ne 0 ]; then
            rm -rf --one-file-system "$WORK"/*/root "$WORK"/*/build
            say "logs kept in $WORK"
        else
            rm -rf --one-file-system "$WORK"
        fi
    fi
    [ "$rc" -eq 0 ] || say "$REASON"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'rc=$?; [ -n "$REASON" ] || REASON="line $LINENO: $BASH_COMMAND (exit $rc)"' ERR

# --- the host: packages, binfmt_misc, mirror ---------------------------------------------------

ensure_packages() {
    local need=()
    command -v debootstrap >/dev/null || need+=(debootstrap)
    [ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
    command -v update-binfmts >/dev/null || need+=(binfmt-support)
    [ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
    command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
    [ "${#need[@]}" -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "run as root: debootstrap, chroot and mount need it (missing: ${need[*]})"
    say "installing Debian packages: ${need[*]}"
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } \
        </dev/null >"$WORK/apt.log" 2>&1 || die "apt-get install ${need[*]} failed (see $WORK/apt.log)"
}

ensure_binfmt() {
    local dir=/proc/sys/fs/binfmt_misc handler=/proc/sys/fs/binfmt_misc/qemu-aarch64
    if [ ! -e "$dir/register" ]; then
        mount -t binfmt_misc binfmt_misc "$dir" 2>/dev/null ||
            die "cannot mount binfmt_misc at $dir: arm64 emulation needs it (in a container: --privileged)"
    fi
    if [ ! -e "$handler" ]; then
        # binfmt-support knows qemu-user-static's handler (with the F flag); else register it here
        update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 ||
            printf '%s' ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:FP' \
                >"$dir/register" 2>/dev/null ||
            die "cannot register the qemu-aarch64 binfmt handler"
    fi
    grep -qx enabled "$handler" || echo 1 >"$handler"
    grep -q '^flags:.*F' "$handler" ||
        die "the qemu-aarch64 binfmt handler lacks the F flag, so it cannot run inside a chroot (re-register it: update-binfmts --disable qemu-aarch64, then --enable)"
}

check_emulation() {   # check_emulation ROOT
    chroot "$1" /bin/true 2>/dev/null ||
        die "arm64 emulation does not work: chroot $1 /bin/true failed ($(tr '\n' ' ' </proc/sys/fs/binfmt_misc/qemu-aarch64 | cut -c1-120))"
}

debian_mirror() {   # the Debian mirror apt uses here (deb822 URIs: or a one-line deb entry)
    if [ -n "${INFERD_ARM64_MIRROR:-}" ]; then echo "$INFERD_ARM64_MIRROR"; return; fi
    local uri
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
            2>/dev/null | grep -oE '^[[:space:]]*(URIs:|deb)[^#]*[[:space:]][a-z]+://[^[:space:]]+/debian/?([[:space:]]|$)' |
            grep -oE '[a-z]+://[^[:space:]]+' | head -n1 || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

# --- a root: built once, cached, unpacked fresh for every run ----------------------------------

root_tarball() { echo "$CACHE/debian-$1-arm64-minbase.tar.gz"; }

build_root() {   # build_root SUITE: the cached tarball, built when missing
    local suite=$1 tarball dir t0
    tarball=$(root_tarball "$suite")
    if [ -s "$tarball" ]; then
        record build cached
        return 0
    fi
    dir=$WORK/$suite/build
    say "$suite: building the arm64 root with debootstrap from $MIRROR (about 5 minutes)"
    t0=$(now)
    mkdir -p "$dir" "$CACHE"
    debootstrap --arch=arm64 --variant=minbase --include="$PACKAGES" --foreign \
        "$suite" "$dir" "$MIRROR" >"$WORK/$suite/debootstrap.log" 2>&1 ||
        die "$suite: debootstrap (first stage) failed: $(tail -n1 "$WORK/$suite/debootstrap.log")"
    check_emulation "$dir"
    # The second stage scans the Packages index with perl for every pre-dependency it installs:
    # emulated, that is minutes per scan over trixie's 56 MB (an hour in all). It only looks up
    # the packages the first stage downloaded, so keep just those (done natively, at once).
    local index
    for index in "$dir"/var/lib/apt/lists/*_Packages; do
        awk 'NR == FNR { keep[$1] = 1; next } /^Package: / { on = ($2 in keep) } on' \
            "$dir/debootstrap/debpaths" "$index" >"$index.trimmed"
        mv "$index.trimmed" "$index"
    done
    chroot "$dir" /debootstrap/debootstrap --second-stage >>"$WORK/$suite/debootstrap.log" 2>&1 ||
        die "$suite: debootstrap (second stage, emulated) failed: $(tail -n1 "$WORK/$suite/debootstrap.log")"
    chroot "$dir" apt-get clean
    rm -rf "${dir:?}"/var/lib/apt/lists/*   # the Packages index: apt-get update brings it back
    # --one-file-system: never archive anything mounted inside (there should be nothing)
    tar --numeric-owner --one-file-system -C "$dir" -czf "$tarball.tmp" . &&
        mv "$tarball.tmp" "$tarball"
    rm -rf --one-file-system "$dir"
    record build "$(since "$t0") s"
}

cpuinfo() {   # /proc/cpuinfo of a Raspberry Pi with as many cores as this machine
    local part features model i
    case $CPU in
        cortex-a72) part=0xd08 features="fp asimd evtstrm crc32 cpuid" model="Raspberry Pi 4 Model B Rev 1.5" ;;
        cortex-a76) part=0xd0b model="Raspberry Pi 5 Model B Rev 1.0"
            features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
        *) die "INFERD_ARM64_CPU=$CPU: use cortex-a72 (Pi 4) or cortex-a76 (Pi 5)" ;;
    esac
    for ((i = 0; i < $(nproc --all); i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\n' "$i" "$features"
        printf 'CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: %s\nCPU revision\t: 1\n\n' "$part"
    done
    printf 'Model\t\t: %s\n' "$model"
}

mount_root() {   # /proc (with an arm64 cpuinfo), /dev, /sys of the host inside ROOT, rslave
    local m
    for m in proc dev sys; do
        mount --rbind "/$m" "$1/$m"
        MOUNTS+=("$1/$m")
        mount --make-rslave "$1/$m"
    done
    cpuinfo >"$1/etc/cpuinfo.arm64"
    mount --bind "$1/etc/cpuinfo.arm64" "$1/proc/cpuinfo"
}

# the clean environment of every command in a root (chroot ROOT "${ROOT_ENV[@]}" CMD...)
ROOT_ENV=(/usr/bin/env -i QEMU_CPU="$CPU" HOME=/root PATH="$IN_ROOT_PATH" LANG=C.UTF-8
    PIP_CERT=/etc/ssl/host-ca.pem SSL_CERT_FILE=/etc/ssl/host-ca.pem PIP_DISABLE_PIP_VERSION_CHECK=1
    PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=120 PYTHONUNBUFFERED=1)

in_root() {   # in_root ROOT CMD...: run CMD in ROOT
    local root=$1
    shift
    chroot "$root" "${ROOT_ENV[@]}" "$@"
}

unpack_root() {   # unpack_root SUITE ROOT: a fresh copy of the cached root with this source tree
    local suite=$1 root=$2
    mkdir -p "$root"
    tar --numeric-owner -C "$root" -xzf "$(root_tarball "$suite")"
    check_emulation "$root"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    # the host's trust store: PyPI may be reached through a proxy with its own CA
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/host-ca.pem"
    # the work tree as it is (tracked and new files, not ignored ones such as .venv)
    mkdir -p "$root/opt/inferd-src"
    git ls-files -z --cached --others --exclude-standard |
        tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$root/opt/inferd-src" -xf -
}

# --- the install, from the lock ----------------------------------------------------------------

drop_requirement() {   # drop_requirement NAME FILE: FILE without NAME's entry (name==... and its lines)
    awk -v name="$1" '
        /^[^ #]/ { n = tolower($0); sub(/[=<>!~ ;\[].*/, "", n); gsub(/_/, "-", n); skip = (n == name) }
        !skip' "$2"
}

install_inferd() {   # install_inferd ROOT LOGDIR
    local root=$1 logs=$2 req=/opt/inferd-src/requirements/device.txt missing name pyver try
    local pip=(/opt/inferd/bin/python -m pip install --disable-pip-version-check)
    pyver=$(in_root "$root" python3 -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
    in_root "$root" python3 -m venv /opt/inferd
    for try in 1 2 3; do
        if in_root "$root" "${pip[@]}" --require-hashes -r "$req" >"$logs/pip-device.log" 2>&1; then
            break
        fi
        missing=$(grep -oE 'No matching distribution found for [^ ]+' "$logs/pip-device.log" | head -n1 |
            awk '{print $NF}' || true)
        name=$(echo "${missing%%[=<>!~;]*}" | tr '[:upper:]_' '[:lower:]-')
        [ -n "$name" ] || die "pip install -r requirements/device.txt failed: $(grep -m1 ERROR "$logs/pip-device.log" || tail -n1 "$logs/pip-device.log")"
        case " $TFLITE_PACKAGES " in
            *" $name "*)
                say "tflite: no wheel for $missing ($pyver, aarch64): installing the lock without it, serving ONNX only"
                TFLITE_NOTE="no wheel for $missing ($pyver aarch64)"
                drop_requirement "$name" "$root$req" >"$root/tmp/device-$try.txt"
                req=/tmp/device-$try.txt
                ;;
            *) die "no wheel for $missing ($pyver, aarch64) in requirements/device.txt: the lock does not install on this target" ;;
        esac
        [ "$try" -lt 3 ] || die "pip install -r requirements/device.txt failed after dropping $TFLITE_PACKAGES"
    done
    in_root "$root" "${pip[@]}" --require-hashes -r /opt/inferd-src/requirements/build.txt \
        >"$logs/pip-build.log" 2>&1 ||
        die "pip install -r requirements/build.txt failed: $(grep -m1 ERROR "$logs/pip-build.log" || true)"
    in_root "$root" "${pip[@]}" --no-deps --no-build-isolation /opt/inferd-src >"$logs/pip-inferd.log" 2>&1 ||
        die "pip install of the source tree failed: $(grep -m1 ERROR "$logs/pip-inferd.log" || true)"
    in_root "$root" /opt/inferd/bin/python -m pip check >"$logs/pip-check.log" 2>&1 ||
        die "pip check: $(head -n1 "$logs/pip-check.log")"
}

# --- end to end --------------------------------------------------------------------------------

magika_model() {   # MAGIKA_DIR: the model and config from the magika wheel on PyPI (cached)
    local dest=$CACHE/models/${MAGIKA/==/-}
    MAGIKA_DIR=$dest
    if [ ! -s "$dest/model.onnx" ]; then
        mkdir -p "$CACHE/wheels" "$dest"
        "$HOST_PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$CACHE/wheels" "$MAGIKA" \
            >"$WORK/magika-download.log" 2>&1 || die "pip download $MAGIKA failed (see $WORK/magika-download.log)"
        "$HOST_PY" - "$CACHE/wheels" "${MAGIKA%%==*}-${MAGIKA##*==}" "$MAGIKA_MODEL" "$dest" <<'EOF'
import glob, sys, zipfile
wheels, stem, inner, dest = sys.argv[1:]
(wheel,) = glob.glob(f"{wheels}/{stem}-*.whl")[:1]
with zipfile.ZipFile(wheel) as z:
    for leaf in ("model.onnx", "config.min.json"):
        with open(f"{dest}/{leaf}", "wb") as out:
            out.write(z.read(f"{inner}/{leaf}"))
EOF
    fi
}

write_config() {   # write_config ROOT SUITE API_PORT REPO_PORT WITH_TFLITE
    local root=$1 suite=$2 api=$3 repo=$4 tflite=$5
    mkdir -p "$root/etc/inferd"
    {
        cat <<EOF
device_id: arm64-$suite
groups: [arm64-$suite]
state_dir: /var/lib/inferd
models:
  - name: classifier
    path: /opt/inferd-src/examples/models/demo.onnx
    version: "1"
    labels: [idle, walking, running]
  - name: magika
    path: /opt/models/magika/model.onnx
EOF
        [ "$tflite" = no ] || cat <<EOF
  - name: classifier-tflite
    path: /opt/inferd-src/examples/models/demo.tflite
    runtime: tflite
EOF
        cat <<EOF
api:
  listen: 127.0.0.1:$api
mqtt:
  host: 127.0.0.1
  port: $BROKER_PORT
telemetry:
  metrics_interval_s: 5
updates:
  repository_url: http://127.0.0.1:$repo/
  trusted_root: /etc/inferd/root.json
  trial_window_s: 5
  trial_min_requests: 5
EOF
    } >"$root/etc/inferd/config.yaml"
}

# The host side of the end-to-end run: readiness, infers, status on MQTT, the signed update.
# Prints key=value lines for the table; exits non-zero with the reason on its last line.
PROBE=$(cat <<'EOF'
import argparse, http.client, json, os, statistics, subprocess, sys, threading, time
import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt

p = argparse.ArgumentParser()
for a in ("port", "t0", "pid", "broker", "device", "repo", "inferctl", "models", "magika", "sample"):
    p.add_argument("--" + a, required=True)
p.add_argument("--tflite", action="store_true")
args = p.parse_args()
conn = http.client.HTTPConnection("127.0.0.1", int(args.port), timeout=60)

def fail(reason):
    print(f"reason={reason}", flush=True)
    sys.exit(1)

def call(method, path, body=None):
    global conn
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    except (OSError, http.client.HTTPException, ValueError):
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", int(args.port), timeout=60)
        return 0, None

def alive():
    try:
        with open(f"/proc/{args.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

def infer(model, name, x, datatype):
    return call("POST", f"/v2/models/{model}/infer", {"inputs": [
        {"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}]})

def p50(model, name, rows, datatype):
    times = []
    for i in range(20):
        t = time.perf_counter()
        status, reply = infer(model, name, rows[i % len(rows)][None], datatype)
        times.append((time.perf_counter() - t) * 1000)
        if status != 200:
            fail(f"{model}: infer answered {status}: {reply}")
    return f"{statistics.median(times):.1f} ms"

# 1. start to ready, measured from the host
while call("GET", "/v2/health/ready")[0] != 200:
    if not alive():
        fail("inferd exited before it was ready")
    if time.time() - float(args.t0) > 600:
        fail("inferd not ready after 600 s")
    time.sleep(0.1)
print(f"ready={time.time() - float(args.t0):.1f} s", flush=True)

# 2. the demo model against its golden output, then 20 single-row requests
golden = np.load(f"{args.models}/demo.golden.npz")
status, reply = infer("classifier", "x", golden["x"], "FP32")
if status != 200:
    fail(f"demo infer answered {status}: {reply}")
probs = np.array(reply["outputs"][0]["data"], dtype=np.float32).reshape(golden["probs"].shape)
if not np.allclose(probs, golden["probs"], rtol=1e-5, atol=1e-6):
    fail(f"demo output differs from demo.golden.npz by {np.abs(probs - golden['probs']).max():.3g}")
print(f"demo={p50('classifier', 'x', golden['x'], 'FP32')} (golden matched)", flush=True)
if args.tflite:
    status, reply = infer("classifier-tflite", "x", golden["x"], "FP32")
    probs = np.array(reply["outputs"][0]["data"], dtype=np.float32).reshape(golden["probs"].shape)
    if status != 200 or not np.allclose(probs, golden["probs"], rtol=1e-4, atol=1e-5):
        fail(f"tflite demo: {status}, output differs from demo.golden.npz")
    print(f"tflite_p50={p50('classifier-tflite', 'x', golden['x'], 'FP32')} (golden matched)", flush=True)

# 3. magika's file-type model on a real file (its first and last 1024 bytes, padded with 256),
#    against onnxruntime on the host
config = json.load(open(f"{args.magika}/config.min.json"))
data = open(args.sample, "rb").read()
beg, end = list(data.lstrip()[: config["beg_size"]]), list(data.rstrip()[-config["end_size"]:])
pad = config["padding_token"]
row = beg + [pad] * (config["beg_size"] - len(beg)) + [pad] * (config["end_size"] - len(end)) + end
x = np.array([row], dtype=np.int32)
status, reply = infer("magika", "bytes", x, "INT32")
if status != 200:
    fail(f"magika infer answered {status}: {reply}")
got = np.array(reply["outputs"][0]["data"], dtype=np.float32)
(want,) = ort.InferenceSession(f"{args.magika}/model.onnx").run(None, {"bytes": x})
if not np.allclose(got, want.ravel(), atol=1e-4):
    fail(f"magika output differs from the host's onnxruntime by {np.abs(got - want.ravel()).max():.3g}")
label = config["target_labels_space"][int(got.argmax())]
print(f"magika={p50('magika', 'bytes', x, 'INT32')} ({os.path.basename(args.sample)}: {label},"
      " matches host onnxruntime)", flush=True)

# 4. the retained status on the broker
messages = {}
got_status = threading.Event()
events = []
def on_message(client, userdata, msg):
    payload = json.loads(msg.payload)
    messages[msg.topic] = payload
    if msg.topic.endswith("/events"):
        events.append(payload)
    if msg.topic.endswith("/status") and payload.get("state") == "online":
        got_status.set()
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
client.on_message = on_message
client.connect("127.0.0.1", int(args.broker))
client.subscribe([(f"inferd/{args.device}/status", 1), (f"inferd/{args.device}/events", 1)])
client.loop_start()
if not got_status.wait(60):
    fail(f"no online status retained on inferd/{args.device}/status")
def status_payload():
    return messages[f"inferd/{args.device}/status"]
host = status_payload().get("host", {})
if host.get("arch") != "aarch64":
    fail(f"status says arch {host.get('arch')!r}, not aarch64")
print(f"status=online, arch {host.get('arch')}, python {host.get('python')},"
      f" runtimes {','.join(sorted(host.get('runtimes', {}))) or '-'}", flush=True)

# 5. a signed update: version 2 into the TUF repository, pushed, served and committed
def inferctl(*argv):
    res = subprocess.run([args.inferctl, *argv], capture_output=True, text=True)
    if res.returncode:
        fail(f"inferctl {argv[0]} {argv[1]} failed: {res.stderr.strip().splitlines()[-1:]}")
group = args.device
inferctl("model", "add", args.repo, f"{args.models}/demo-v2.onnx", "--name", "classifier",
         "--version", "2", "--group", group, "--golden", f"{args.models}/demo-v2.golden.npz")
pushed = time.time()
inferctl("push", "--broker", f"127.0.0.1:{args.broker}", "--group", group)
failed, served = 0, None
while time.time() - pushed < 300:
    status, reply = infer("classifier", "x", golden["x"][:1], "FP32")
    failed += status != 200
    if served is None and call("GET", "/v2/models/classifier")[1].get("versions") == ["2"]:
        served = time.time() - pushed
    # how the job ended: the slot's last_update in the status, or the update events
    slots = status_payload().get("models", [])
    last = next((s.get("last_update") for s in slots if s.get("name") == "classifier"), None)
    ended = [e["message"] for e in events if e.get("kind") == "update"
             and e.get("model") in ("classifier", None)
             and any(f"-> {o}" in e["message"] for o in ("committed", "failed", "rolled_back"))]
    if last and last.get("version") == "2" and last.get("outcome") != "committed":
        fail(f"update to version 2 ended {last['outcome']}: {last.get('reason')}")
    if ended and "-> committed" not in ended[-1]:
        fail(f"update to version 2: {ended[-1]}")
    if served is not None and (ended or (last and last.get("version") == "2")):
        break
    time.sleep(0.1)
else:
    fail("version 2 not " + ("committed" if served else "served") + " within 300 s of the push")
print(f"update=yes, version 2 served {served:.1f} s after the push, committed after its trial,"
      f" {failed} failed requests meanwhile", flush=True)
client.loop_stop()
EOF
)

# one root, start to end: runs in its own process (set -e intact), results as key=value lines
check_root() {
    local suite=$1 dir root api_port repo_port t0 pid tflite=no code
    RESULTS=$2
    dir=$WORK/$suite
    OWN_DIR=$dir
    root=$dir/root
    mkdir -p "$dir"
    build_root "$suite"

    say "$suite: installing inferd from the lock under emulation (several minutes)"
    unpack_root "$suite" "$root"
    mount_root "$root"
    record python "$(in_root "$root" python3 -c 'import platform; print(platform.python_version(), platform.machine())')"
    t0=$(now)
    install_inferd "$root" "$dir"
    record install "$(since "$t0") s"
    if in_root "$root" /opt/inferd/bin/python -c 'import ai_edge_litert.interpreter' 2>/dev/null; then
        tflite=yes
        TFLITE_NOTE="ai-edge-litert $(in_root "$root" /opt/inferd/bin/python -c \
            'from importlib.metadata import version; print(version("ai-edge-litert"))')"
    fi
    record tflite "${TFLITE_NOTE:-installed, but ai_edge_litert does not import}"

    say "$suite: end to end: inferd run in the root, requests and a signed update from the host"
    mkdir -p "$root/opt/models/magika"
    cp "$MAGIKA_DIR/model.onnx" "$root/opt/models/magika/"
    "$INFERCTL" repo init "$dir/repo" >"$dir/repo-init.log" 2>&1 || die "inferctl repo init failed"
    mkdir -p "$root/etc/inferd"
    cp "$dir/repo/repository/metadata/1.root.json" "$root/etc/inferd/root.json"
    repo_port=$(free_port)
    "$INFERCTL" repo serve "$dir/repo" --port "$repo_port" >"$dir/repo-serve.log" 2>&1 &
    PIDS+=("$!")
    wait_port "$repo_port" "inferctl repo serve" "$!"
    api_port=$(free_port)
    write_config "$root" "$suite" "$api_port" "$repo_port" "$tflite"
    in_root "$root" /opt/inferd/bin/inferd check-config /etc/inferd/config.yaml >/dev/null ||
        die "inferd check-config rejected the generated config"

    t0=$(now)
    # a simple command, so that $! is the daemon itself (chroot, env and python exec in turn)
    chroot "$root" "${ROOT_ENV[@]}" /opt/inferd/bin/inferd run --config /etc/inferd/config.yaml \
        >"$dir/inferd.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    local flags=()
    [ "$tflite" = no ] || flags+=(--tflite)
    "$HOST_PY" -c "$PROBE" --port "$api_port" --t0 "$t0" --pid "$pid" --broker "$BROKER_PORT" \
        --device "arm64-$suite" --repo "$dir/repo" --inferctl "$INFERCTL" \
        --models "$SRC/examples/models" --magika "$MAGIKA_DIR" --sample "$SRC/README.md" \
        "${flags[@]}" >"$dir/probe.out" 2>"$dir/probe.err" || true
    cat "$dir/probe.out" >>"$RESULTS"
    if grep -q '^reason=' "$dir/probe.out"; then
        say "$suite: inferd log (last lines):"
        tail -n 15 "$dir/inferd.log" >&2
        die "$suite: $(sed -n 's/^reason=//p' "$dir/probe.out")"
    fi
    grep -q '^update=' "$dir/probe.out" || die "$suite: the host probe failed: $(tail -n1 "$dir/probe.err")"

    # a clean stop: SIGTERM, exit 0 within 30 s (the unit's TimeoutStopSec is shorter)
    kill -TERM "$pid"
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && die "$suite: inferd did not stop within 30 s of SIGTERM"
    code=0
    wait "$pid" || code=$?
    forget "$pid"
    [ "$code" -eq 0 ] || die "$suite: inferd exited $code on SIGTERM"
}

print_table() {   # print_table SUITE RESULTS
    local -A r=()
    local k v
    while IFS='=' read -r k v; do [ -n "$k" ] && r[$k]=$v; done <"$2"
    printf '\n%s (Debian arm64, %s under %s)\n' "$1" "$CPU" "$QEMU_VERSION"
    printf '  %-28s %s\n' \
        "python" "${r[python]:--}" \
        "debootstrap build" "${r[build]:--}" \
        "install from the lock" "${r[install]:--}" \
        "tflite" "${r[tflite]:--}" \
        "start to ready" "${r[ready]:--}" \
        "infer p50 demo" "${r[demo]:--}" \
        "infer p50 magika" "${r[magika]:--}"
    [ -z "${r[tflite_p50]:-}" ] || printf '  %-28s %s\n' "infer p50 demo (tflite)" "${r[tflite_p50]}"
    printf '  %-28s %s\n' "status on MQTT" "${r[status]:--}" "update applied" "${r[update]:-no}"
    [ -z "${r[fail]:-}" ] || printf '  %-28s %s\n' "FAILED" "${r[fail]}"
}

# --- main --------------------------------------------------------------------------------------

if [ "${1:-}" = --one-root ]; then
    check_root "$2" "$3"
    exit 0
fi

MAIN=1
[ "$(id -u)" -eq 0 ] || die "run as root (sudo make check-arm64): debootstrap, chroot and mount need it"
WORK=$(mktemp -d /var/tmp/inferd-arm64.XXXXXX)
export WORK CACHE
[ -x "$INFERCTL" ] || bash scripts/setup.sh || die "bash scripts/setup.sh failed (the host's .venv)"
cpuinfo >/dev/null   # INFERD_ARM64_CPU is one it knows
ensure_packages
ensure_binfmt
MIRROR=$(debian_mirror)
QEMU_VERSION=$(qemu-aarch64-static --version | head -n1 | grep -oE 'version [0-9.]+' | sed 's/version /qemu-aarch64-static /')
export MIRROR

for f in requirements/device.txt requirements/build.txt; do
    for i in $(seq 120); do
        [ -s "$f" ] && break
        [ "$i" -gt 1 ] || say "waiting for $f (the lock) to appear"
        sleep 5
    done
    [ -s "$f" ] || die "$f is missing: the lock is not committed (make lock)"
done

magika_model
BROKER_PORT=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$BROKER_PORT" >"$WORK/mosquitto.conf"
"$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
PIDS+=("$!")
wait_port "$BROKER_PORT" mosquitto "$!"
export MAGIKA_DIR BROKER_PORT

failed=()
for suite in $SUITES; do
    t0=$(now)
    bash "$0" --one-root "$suite" "$WORK/$suite.results" || failed+=("$suite")
    say "$suite: done in $(since "$t0") s"
done
for suite in $SUITES; do print_table "$suite" "$WORK/$suite.results"; done
echo
if [ "${#failed[@]}" -gt 0 ]; then
    REASON="FAILED for ${failed[*]}: $(for s in "${failed[@]}"; do sed -n 's/^fail=//p' "$WORK/$s.results"; done | paste -sd';' -)"
    exit 1
fi
say "passed for $SUITES"

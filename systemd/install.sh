#!/usr/bin/env bash
# Install inferd as a systemd service (run as root; `make install` calls this).
#
#   systemd/install.sh [--config FILE] [--trusted-root FILE] [--no-start]
#   systemd/install.sh --uninstall [--purge]
#
# What it does, each step skipped when already done (safe to run again, e.g. to upgrade):
#   - system user and group `inferd` (home /var/lib/inferd, no login shell)
#   - a virtual environment in /opt/inferd with inferd and the extras this machine needs:
#     tflite everywhere; gpu (onnxruntime-gpu) where an NVIDIA driver is loaded; on a Jetson
#     (/etc/nv_tegra_release) onnxruntime-gpu from NVIDIA's Jetson index when --jetson-index
#     is given (PyPI has no JetPack builds)
#   - /etc/inferd/config.yaml (only when absent: a minimal config serving the demo model, or
#     --config FILE) and /etc/inferd/root.json (--trusted-root FILE), readable by group inferd
#   - /etc/systemd/system/inferd.service, plus the GPU drop-in inferd.service.d/gpu.conf
#     (NVIDIA) or jetson.conf (Jetson); then daemon-reload, enable, and start (restart on upgrade)
# --uninstall removes the venv, the unit and the drop-in and keeps /etc/inferd, /var/lib/inferd
# and the user; --purge removes those too.
#
# --root DIR stages everything below DIR instead of / (image builds, tests): no user is created,
# nothing is chowned, systemctl is not called. The venv inside DIR refers to its own path, so a
# staged venv only runs from where it was built.

set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=""
PYTHON=python3
PACKAGE=""
PIP_ARGS=""
CONFIG=""
TRUSTED_ROOT=""
PLATFORM=""
JETSON_INDEX=""
START=1
ACTION=install
PURGE=0

usage() {
    sed -n '2,24s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    cat <<'EOF'
Options:
  --root DIR            stage below DIR (no users, no chown, no systemctl)
  --python PY           interpreter for the virtual environment (default: python3, >= 3.10)
  --package SPEC        what pip installs (default: this source tree with the machine's extras)
  --pip-args "ARGS"     extra pip arguments, e.g. "--no-index --find-links /media/wheels"
  --platform P          cpu, nvidia or jetson (default: detected)
  --jetson-index URL    pip index with onnxruntime-gpu for this JetPack
  --config FILE         config to install when /etc/inferd/config.yaml does not exist
  --trusted-root FILE   the update repository's root.json for /etc/inferd/root.json
  --no-start            install and enable, but do not start or restart the service
  --uninstall [--purge] remove inferd (--purge: also its config, state and user)
EOF
}

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "inferd: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=${2:?--root needs a directory}; shift ;;
        --python) PYTHON=${2:?}; shift ;;
        --package) PACKAGE=${2:?}; shift ;;
        --pip-args) PIP_ARGS=${2?}; shift ;;
        --platform) PLATFORM=${2:?}; shift ;;
        --jetson-index) JETSON_INDEX=${2:?}; shift ;;
        --config) CONFIG=${2:?}; shift ;;
        --trusted-root) TRUSTED_ROOT=${2:?}; shift ;;
        --no-start) START=0 ;;
        --uninstall) ACTION=uninstall ;;
        --purge) PURGE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
    shift
done

if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
    [ "$ROOT" != / ] || ROOT=""
fi
[ -n "$ROOT" ] || [ "$(id -u)" = 0 ] || die "run as root (or stage with --root DIR)"

VENV=$ROOT/opt/inferd
SHARE=$VENV/share
ETC=$ROOT/etc/inferd
UNIT_DIR=$ROOT/etc/systemd/system
UNIT=$UNIT_DIR/inferd.service
DROPIN_DIR=$UNIT_DIR/inferd.service.d
STATE=$ROOT/var/lib/inferd

# systemctl only on the real system and only when systemd is running (not in a chroot/container).
have_systemd() { [ -z "$ROOT" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

uninstall() {
    if have_systemd; then
        systemctl disable --now inferd.service 2>/dev/null || true
    fi
    rm -f "$UNIT" "$DROPIN_DIR/gpu.conf" "$DROPIN_DIR/jetson.conf"
    rmdir "$DROPIN_DIR" 2>/dev/null || true
    if have_systemd; then systemctl daemon-reload; fi
    rm -rf "$VENV"
    say "removed $VENV and the unit"
    if [ "$PURGE" = 1 ]; then
        rm -rf "$ETC" "$STATE" "$ROOT/var/cache/inferd"
        if [ -z "$ROOT" ] && getent passwd inferd >/dev/null; then
            userdel inferd && say "removed the inferd user"
        fi
        say "purged $ETC and $STATE${ROOT:+ (staging: no user to remove)}"
    else
        say "kept $ETC and $STATE (--purge removes them)"
    fi
}

detect_platform() {
    if [ -e "$ROOT/etc/nv_tegra_release" ]; then
        echo jetson
    elif [ -z "$ROOT" ] && [ -e /proc/driver/nvidia/version ]; then
        echo nvidia
    else
        echo cpu
    fi
}

ensure_user() {
    if [ -n "$ROOT" ]; then
        say "staging: not creating the inferd user"
        return
    fi
    if ! getent group inferd >/dev/null; then
        groupadd --system inferd
    fi
    if ! getent passwd inferd >/dev/null; then
        useradd --system --gid inferd --home-dir /var/lib/inferd --no-create-home \
            --shell "$(command -v nologin || echo /usr/sbin/nologin)" \
            --comment "inferd inference daemon" inferd
        say "created system user inferd"
    fi
}

# install -m MODE, owned root:inferd on the real system (the service reads, never writes, these)
put() {
    local mode=$1 src=$2 dst=$3
    install -D -m "$mode" "$src" "$dst"
    [ -n "$ROOT" ] || chown root:inferd "$dst"
}

install_venv() {
    local extras=$1
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$PYTHON is older than Python 3.10"
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
        || die "$PYTHON cannot create virtual environments (Debian: apt-get install python3-venv)"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
        say "created virtual environment $VENV"
    fi
    local pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    local spec
    if [ -n "$PACKAGE" ]; then
        spec=$PACKAGE
        # shellcheck disable=SC2086 # PIP_ARGS is a list of arguments on purpose
        "${pip[@]}" $PIP_ARGS "$spec"
    else
        # The committed lock, every file checked against its sha256: each device of a fleet runs
        # the versions the tests ran, whenever it was installed.
        local lock=$SRC/requirements/device.txt
        [ "$extras" != "${extras/gpu/}" ] && lock=$SRC/requirements/device-gpu.txt
        spec="$SRC (locked: ${lock#"$SRC"/})"
        # shellcheck disable=SC2086
        if ! "${pip[@]}" $PIP_ARGS --require-hashes -r "$lock"; then
            # LiteRT publishes wheels for fewer platforms than the rest; serve ONNX without it.
            say "warning: the locked set did not install; retrying without LiteRT (ai-edge-litert):"
            say "  this device will serve ONNX models only (runtime: tflite is unavailable)"
            local trimmed
            trimmed=$(mktemp)
            awk '/^ai-edge-litert==/ {skip=1; next} skip && /^[^ #]/ {skip=0} !skip' \
                "$lock" >"$trimmed"
            # shellcheck disable=SC2086
            "${pip[@]}" $PIP_ARGS --require-hashes -r "$trimmed" \
                || { rm -f "$trimmed"; die "could not install the locked dependencies from $lock"; }
            rm -f "$trimmed"
        fi
        # shellcheck disable=SC2086
        "${pip[@]}" $PIP_ARGS --require-hashes -r "$SRC/requirements/build.txt"
        # shellcheck disable=SC2086
        "${pip[@]}" $PIP_ARGS --no-deps --no-build-isolation "$SRC"
    fi
    if [ "$PLATFORM" = jetson ] && [ -n "$JETSON_INDEX" ]; then
        # onnxruntime and onnxruntime-gpu install the same module; only the GPU build may stay.
        # (NVIDIA's index is outside the lock: PyPI has no JetPack builds to pin)
        "$VENV/bin/python" -m pip uninstall --quiet --yes onnxruntime onnxruntime-gpu || true
        # shellcheck disable=SC2086
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $PIP_ARGS \
            --index-url "$JETSON_INDEX" --no-deps onnxruntime-gpu
    elif [ "$PLATFORM" = jetson ]; then
        say "Jetson: CPU onnxruntime installed; for CUDA/TensorRT run again with"
        say "  --jetson-index URL: NVIDIA's Jetson AI Lab pip index for your JetPack (.../jp6/cu126)"
    fi
    say "installed $spec into $VENV"
}

install_files() {
    install -D -m 0644 "$SRC/examples/models/demo.onnx" "$SHARE/inferd/models/demo.onnx"
    install -D -m 0644 "$SRC/config.example.yaml" "$SHARE/doc/inferd/config.example.yaml"
    install -D -m 0644 "$SRC/systemd/gpu.conf" "$SHARE/doc/inferd/gpu.conf"
    install -D -m 0644 "$SRC/systemd/jetson.conf" "$SHARE/doc/inferd/jetson.conf"
    [ ! -f "$SRC/README.md" ] || install -D -m 0644 "$SRC/README.md" "$SHARE/doc/inferd/README.md"

    install -d -m 0750 "$ETC"
    [ -n "$ROOT" ] || chown root:inferd "$ETC"
    if [ -f "$ETC/config.yaml" ]; then
        say "kept existing $ETC/config.yaml"
    elif [ -n "$CONFIG" ]; then
        put 0640 "$CONFIG" "$ETC/config.yaml"
        say "installed $CONFIG as $ETC/config.yaml"
    else
        local tmp
        tmp=$(mktemp)
        cat >"$tmp" <<'EOF'
# inferd configuration (written by install.sh). Every key, its default and meaning:
#   /opt/inferd/share/doc/inferd/config.example.yaml
# Check after editing: /opt/inferd/bin/inferd check-config /etc/inferd/config.yaml
# Apply: systemctl reload inferd (log level, telemetry rates) or systemctl restart inferd.
state_dir: /var/lib/inferd
models:
  - name: demo
    path: /opt/inferd/share/inferd/models/demo.onnx
api:
  listen: 127.0.0.1:8080
mqtt:
  host: 127.0.0.1
updates:
  trusted_root: /etc/inferd/root.json
EOF
        put 0640 "$tmp" "$ETC/config.yaml"
        rm -f "$tmp"
        say "wrote a minimal $ETC/config.yaml serving the demo model"
    fi
    if [ -n "$TRUSTED_ROOT" ]; then
        put 0644 "$TRUSTED_ROOT" "$ETC/root.json"
        say "installed trusted root $ETC/root.json"
    elif [ ! -f "$ETC/root.json" ]; then
        say "no $ETC/root.json: signed updates stay off until it is installed (--trusted-root)"
    fi

    install -D -m 0644 "$SRC/systemd/inferd.service" "$UNIT"
    local dropin=""
    case "$PLATFORM" in
        nvidia) dropin=gpu.conf ;;
        jetson) dropin=jetson.conf ;;
    esac
    if [ -n "$dropin" ]; then
        install -D -m 0644 "$SRC/systemd/$dropin" "$DROPIN_DIR/$dropin"
        say "installed GPU drop-in $DROPIN_DIR/$dropin"
    fi
}

start_service() {
    if ! have_systemd; then
        say "systemd not running here (or staging): unit installed, not enabled"
        return
    fi
    systemctl daemon-reload
    systemctl enable inferd.service
    if [ "$START" = 0 ]; then
        say "enabled; start with: systemctl start inferd"
    elif ! "$VENV/bin/inferd" check-config "$ETC/config.yaml"; then
        say "enabled but not started: fix $ETC/config.yaml, then systemctl start inferd"
    elif systemctl is-active --quiet inferd.service; then
        systemctl restart inferd.service
        say "restarted inferd"
    else
        systemctl start inferd.service
        say "started inferd (systemctl status inferd, journalctl -u inferd)"
    fi
}

if [ "$ACTION" = uninstall ]; then
    uninstall
    exit 0
fi
[ -n "$PLATFORM" ] || PLATFORM=$(detect_platform)
case "$PLATFORM" in
    cpu|jetson) EXTRAS=tflite ;;
    nvidia) EXTRAS=tflite,gpu ;;
    *) die "--platform must be cpu, nvidia or jetson" ;;
esac
say "platform $PLATFORM ($(uname -m)), extras [$EXTRAS]"
ensure_user
install_venv "$EXTRAS"
install_files
start_service

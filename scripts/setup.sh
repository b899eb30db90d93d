#!/usr/bin/env bash
# Prepare a checkout: Debian packages when missing (python3-venv, mosquitto, curl, systemd for
# systemd-analyze), a virtual environment in .venv with inferd and its dev/test extras, from the lock.
# Idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null \
  || { echo "inferd needs Python 3.10 or newer (python3 is $(python3 --version 2>&1))" >&2; exit 1; }
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# systemd-analyze verifies the unit and scores its hardening in the tests
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
if [ "${#need_apt[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing Debian packages: ${need_apt[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! { $sudo apt-get update -qq && \
         $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null; } </dev/null
  then
    # Only python3-venv is indispensable; without mosquitto the demo falls back to amqtt.
    python3 -c 'import ensurepip, venv' 2>/dev/null \
      || { echo "cannot install python3-venv; install it and run this again" >&2; exit 1; }
    echo "warning: could not install ${need_apt[*]}; the demo will use amqtt as its broker," \
         "and the tests that start mosquitto will fail" >&2
  fi
fi

# --test (the test command): the real peers some tests run, when missing: a headless Chromium
# (the console page), Prometheus (scraping /metrics) and nats-server (a 3-node MQTT cluster).
# Best effort: a test whose peer is missing skips and says which package it needs.
if [ "${1:-}" = "--test" ]; then
  need_test=()
  [ -x /usr/bin/chromium ] || need_test+=(chromium)
  command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ] || need_test+=(prometheus)
  command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need_test+=(nats-server)
  if [ "${#need_test[@]}" -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing Debian packages for the tests: ${need_test[*]}" >&2
    { DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq && \
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${need_test[@]}" >/dev/null; } </dev/null \
      || echo "warning: could not install ${need_test[*]}; the tests that need them skip" >&2
  fi
fi

# Every package comes from the committed lock (requirements/dev.txt, exported from uv.lock by
# `make lock`), each file checked against its sha256: a clone installs the same versions on any day.
python3 -c 'import sys; sys.exit(0 if sys.version_info < (3, 14) else 1)' \
  || { echo "the lock covers Python 3.10 to 3.13; python3 is $(python3 --version 2>&1)" >&2; exit 1; }
stamp=.venv/.inferd-installed
want="$(cat pyproject.toml requirements/dev.txt | sha256sum | cut -c1-16)"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing inferd and its locked dependencies into .venv" >&2
  log=.venv/pip-install.log
  pip=(.venv/bin/python -m pip --disable-pip-version-check)
  if ! { "${pip[@]}" install --require-hashes -r requirements/dev.txt &&
         "${pip[@]}" install --no-deps --no-build-isolation -e . &&
         "${pip[@]}" check; } </dev/null >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "pip install failed; the whole log is in $log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi

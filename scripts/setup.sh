#!/usr/bin/env bash
# Prepare a checkout: Debian packages when missing (python3-venv, mosquitto, curl, systemd for
# systemd-analyze), a virtual environment in .venv with inferd and its dev/test extras.
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

stamp=.venv/.inferd-installed
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing inferd and its dependencies into .venv" >&2
  log=.venv/pip-install.log
  if ! { .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip &&
         .venv/bin/python -m pip install --disable-pip-version-check \
           -e ".[dev,tflite,quantize,operator]"; } </dev/null >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "pip install failed; the whole log is in $log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi

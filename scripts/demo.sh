#!/usr/bin/env bash
# The demo command: prepare .venv, then run the end-to-end demo (examples/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"

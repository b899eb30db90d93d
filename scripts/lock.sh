#!/usr/bin/env bash
# `make lock`: resolve uv.lock from pyproject.toml for every target (Linux x86_64 and aarch64,
# Python 3.10 to 3.13; see [tool.uv] in pyproject.toml) and export the hashed requirement files
# that pip installs from:
#   requirements/dev.txt     development and tests (scripts/setup.sh)
#   requirements/device.txt  a device: the runtime and LiteRT (systemd/install.sh)
#   requirements/device-gpu.txt  an x86_64 NVIDIA device: onnxruntime-gpu in place of onnxruntime
#   requirements/device-openvino.txt  an x86_64 Intel device: onnxruntime-openvino in its place
#   requirements/build.txt   what building inferd itself needs (setuptools, wheel)
# Keeps the current pins where they still fit; `make lock UPGRADE=1` moves to the newest allowed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
uv=.venv/bin/uv
"$uv" lock ${UPGRADE:+--upgrade}
export_lock() {
    local out=$1; shift
    "$uv" export --quiet --frozen --no-emit-project --no-default-groups "$@" -o "$out"
}
export_lock requirements/dev.txt --group build --extra dev --extra tflite --extra quantize --extra operator
export_lock requirements/device.txt --extra tflite
export_lock requirements/device-gpu.txt --extra tflite --extra gpu --no-emit-package onnxruntime
# onnxruntime-openvino ships the same `onnxruntime` import package, so it cannot sit beside it
export_lock requirements/device-openvino.txt --extra tflite --extra openvino \
    --no-emit-package onnxruntime
export_lock requirements/build.txt --only-group build
git status --short uv.lock requirements/

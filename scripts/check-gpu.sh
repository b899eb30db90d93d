#!/usr/bin/env bash
# `make check-gpu`: run on an NVIDIA GPU host (x86_64) or a Jetson, by a person, not in CI.
#
# This check has not yet run on a GPU. It was written from onnxruntime's TensorRT and CUDA
# execution provider documentation on machines without one; the parts that run without a GPU are
# tested (tests/unit/bench/test_check_gpu.py), and the first run on a GPU is its real test.
#
# It installs the gpu extra from the committed lock (requirements/device-gpu.txt: onnxruntime-gpu
# with its CUDA and cuDNN libraries, nvidia-ml-py) into a venv under ~/.cache/inferd, plus
# TensorRT's libraries from NVIDIA's index (on a Jetson: requirements/device.txt and onnxruntime-gpu
# from --jetson-index URL; JetPack brings CUDA, cuDNN and TensorRT), serves the demo and zoo
# models with [tensorrt, cuda, cpu] and [cuda, cpu], compares them with the CPU, starts the
# TensorRT daemon twice to show the engine cache built then reused, runs the validation gate and a
# hot swap on the GPU, and prints one table. Under 10 minutes; exit 1 on any mismatch, 2 without a
# GPU. Options (after --): --jetson-index URL, --dry-run (print the plan, no GPU needed),
# --no-tensorrt-install, --json. The logic is bench/check_gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m bench.check_gpu "$@"

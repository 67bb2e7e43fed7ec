#!/usr/bin/env bash
# The GPU path in one command, on a machine with an NVIDIA GPU (a few minutes): NVML
# readings, a worker per GPU pinned, models on CUDA, memory freed after an unload and a
# recycle, and tiny_mlp and small_cnn served on the GPU against the model called in-process
# there. Results: bench/results/gpu_check.json. Needs the driver; torch's CUDA build comes
# with `make .venv/.installed TORCH=torch` (PyPI's default build).
set -euo pipefail
cd "$(dirname "$0")/.."
make -s .venv/.installed
exec timeout 300 .venv/bin/python -m bench.gpu_check "$@"

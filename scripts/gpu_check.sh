#!/usr/bin/env bash
# One call on a GPU machine: build this tree for sm_90, run the cuda-marked tests, a GPU `say`
# with the random full-size model, and whatever extra commands are passed as arguments. Logs go to $OUT.
# Usage (device tool, carrying .whl): bash scripts/gpu_check.sh ["extra command" ...]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# Build the working tree as the device tool copied it (its .git is a snapshot that may be older than the files,
# so `git archive HEAD` would build stale code).
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=90 python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import seseme_cli._kernels as k; print('kernels has_cuda', k.has_cuda, 'devices', k.device_count())"
# CUDA_TESTS selects the cuda-marked tests to run (default: all of them).
python3 -m pytest -q -m cuda -p no:cacheprovider ${CUDA_TESTS:-} 2>&1 | tee "$OUT/pytest_cuda.log" | tail -15
for cmd in "$@"; do echo "+ $cmd"; bash -c "$cmd" 2>&1 | tee -a "$OUT/extra.log" | tail -30; done

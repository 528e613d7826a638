#!/usr/bin/env bash
# The measurement set behind BENCHMARKS.md, on a GPU machine after scripts/gpu_check.sh built the tree:
# the frame steps and first audio (`seseme bench`), `say --stream`'s first audio, `seseme batch` on the equal and
# the mixed workload, and (with SERVE=1) the server under load. Results and logs go to $OUT.
# Usage: bash scripts/gpu_measure.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo "+ $*"; local t0=$(date +%s.%N); "$@" 2>&1 | tail -25; python3 -c "import sys,time; print(f\"wall {time.time()-float(sys.argv[1]):.2f} s\")" "$t0"; }
step timeout 240 seseme bench --model random --batch-sizes 1,64,512 --json "$OUT/bench.json"
step timeout 90 seseme say 'Hello there, this is one sentence.' --stream --model random -o /tmp/say.wav
mkdir -p /tmp/eq /tmp/mixed
python3 scripts/make_requests.py /tmp/eq/eq.jsonl 512 > /dev/null
python3 scripts/make_requests.py /tmp/mixed/mixed.jsonl 1024 --mixed > /dev/null
step timeout 120 seseme batch /tmp/eq/eq.jsonl --model random
step timeout 150 seseme batch /tmp/mixed/mixed.jsonl --model random
if [ "${SERVE:-0}" = 1 ]; then step timeout 200 bash scripts/gpu_serve_bench.sh "${LEVELS:-1,64,256,512}" "${SERVE_SECONDS:-12}"; fi

#!/usr/bin/env bash
# The GPU runs that BENCHMARKS.md's "Not yet measured" entry waits for, in three device calls of < 600 s each
# (device tool, carrying .whl; each call builds the tree first through scripts/gpu_check.sh):
#   bash scripts/gpu_pending.sh kernels   the new kernels' cuda tests, the engine on the persistent depth kernel,
#                                         and `seseme bench` with it off and on (batches 1-4) and at every bucket
#   bash scripts/gpu_pending.sh workloads Mimi per slot bucket, then scripts/gpu_measure.sh (say, batch eq/mixed)
#   bash scripts/gpu_pending.sh serve     the server under load (scripts/gpu_serve_bench.sh)
# Results and logs go to $OUT (bench JSON, pytest logs, extra.log).
set -uo pipefail
OUT=${OUT:-/tmp/out}
case "${1:-}" in
  kernels)
    # The changed kernels' tests (the GEMV's PTX is unchanged by the move, BENCHMARKS.md)
    CUDA_TESTS="tests/test_ops_depth_decoder.py tests/test_ops_sampling.py tests/test_ops_attention.py
      tests/test_ops_masked_attention.py tests/test_prefill.py" timeout 560 bash scripts/gpu_check.sh \
      "SESEME_PERSISTENT_DEPTH=1 timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_engine.py" \
      "timeout 60 seseme bench --model random --batch-sizes 1,2,4 --json $OUT/bench_depth_off.json" \
      "SESEME_PERSISTENT_DEPTH=1 timeout 60 seseme bench --model random --batch-sizes 1,2,4 --json $OUT/bench_depth_on.json" \
      "timeout 120 seseme bench --model random --batch-sizes 64,256,320,384,448,512 --json $OUT/bench_buckets.json" ;;
  workloads)
    CUDA_TESTS="tests/test_row_audio.py tests/test_longform.py" timeout 580 bash scripts/gpu_check.sh \
      "timeout 90 python3 scripts/mimi_probe.py 576 --history=125" "timeout 330 bash scripts/gpu_measure.sh" ;;
  serve)
    CUDA_TESTS=tests/test_cli.py timeout 580 bash scripts/gpu_check.sh \
      "timeout 400 bash scripts/gpu_serve_bench.sh 1,64,128,256,384,512 10" ;;
  *) echo "usage: bash scripts/gpu_pending.sh kernels|workloads|serve" >&2; exit 2 ;;
esac
rm -f "$OUT/build.log"  # the device returns at most a few files: keep the results

#!/usr/bin/env bash
# On a GPU machine (after scripts/gpu_check.sh built the tree): start `seseme serve` on the random full-size model,
# load it with scripts/load_test.py at several concurrencies, then SIGTERM it and check that it drains and exits 0.
# Usage: bash scripts/gpu_serve_bench.sh [CONCURRENCY [SECONDS]]; results in $OUT/serve_load.json and serve.log.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
levels=${1:-1,8,64,256,512}
seconds=${2:-15}
seseme serve --model random --port 8011 --max-batch 512 --max-queue 2048 --no-access-log > "$OUT/serve.log" 2>&1 &
server=$!
python3 scripts/load_test.py --url http://127.0.0.1:8011 --concurrency "$levels" --seconds "$seconds" \
  --json "$OUT/serve_load.json" 2>&1 | tail -25
curl -s http://127.0.0.1:8011/metrics | grep -E "^seseme_" | head -30 > "$OUT/serve_metrics.txt"
kill -TERM "$server"
wait "$server"
echo "seseme serve exited with $? after SIGTERM"
tail -5 "$OUT/serve.log"

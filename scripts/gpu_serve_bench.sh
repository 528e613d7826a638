#!/usr/bin/env bash
# On a GPU machine (after scripts/gpu_check.sh built the tree): start `seseme serve` on the random full-size model,
# load it with scripts/load_test.py at several concurrencies, then SIGTERM it and check that it drains and exits 0.
# Usage: [SERVE_ARGS="extra serve flags"] [TAG=name] bash scripts/gpu_serve_bench.sh [CONCURRENCY [SECONDS]];
# results in $OUT/serve_load${TAG}.json and serve${TAG}.log.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
levels=${1:-1,8,64,256,512}
seconds=${2:-15}
tag=${TAG:-}
# shellcheck disable=SC2086  # SERVE_ARGS is a list of flags
seseme serve --model random --port 8011 --max-batch 512 --max-queue 2048 --no-access-log ${SERVE_ARGS:-} \
  > "$OUT/serve$tag.log" 2>&1 &
server=$!
python3 scripts/load_test.py --url http://127.0.0.1:8011 --concurrency "$levels" --seconds "$seconds" \
  --json "$OUT/serve_load$tag.json" 2>&1 | tail -25
curl -s http://127.0.0.1:8011/metrics | grep -E "^seseme_" > "$OUT/serve_metrics$tag.txt"
kill -TERM "$server"
wait "$server"
echo "seseme serve exited with $? after SIGTERM"
tail -5 "$OUT/serve$tag.log"

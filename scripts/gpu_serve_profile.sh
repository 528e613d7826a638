#!/usr/bin/env bash
# On a GPU machine (after scripts/gpu_check.sh built the tree, py-spy among the carried wheels): where the server's
# threads spend their time at N streams. Starts `seseme serve` on the random full-size model, loads it with
# scripts/load_test.py, and meanwhile takes a 5 s py-spy profile (the GIL holder marked) of the engine process
# and then of the HTTP front (both the same process with SERVE_ARGS=--in-process), plus the engine's step-time
# histogram and the queue wait from /metrics.
# Usage: [SERVE_ARGS=...] bash scripts/gpu_serve_profile.sh [N [SECONDS]]; results in $OUT/profile_*.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
n=${1:-512}
seconds=${2:-15}
spy=$(command -v py-spy || echo /tmp/site/bin/py-spy)
# shellcheck disable=SC2086  # SERVE_ARGS is a list of flags
seseme serve --model random --port 8012 --max-batch 512 --max-queue 2048 --no-access-log ${SERVE_ARGS:-} \
  > "$OUT/profile_serve.log" 2>&1 &
server=$!
until curl -sf http://127.0.0.1:8012/health > /dev/null; do sleep 1; done
engine=$(pgrep -P "$server" -f spawn_main | head -1)
engine=${engine:-$server}
python3 scripts/load_test.py --url http://127.0.0.1:8012 --concurrency "$n" --seconds "$seconds" \
  --json /tmp/profile_load.json > "$OUT/profile_load.txt" 2>&1 &
load=$!
sleep $((seconds / 2 - 3))
"$spy" record --pid "$engine" --duration 5 --rate 250 --gil --threads --format raw -o "$OUT/profile_engine.txt" \
  > /tmp/profile_record.log 2>&1
if [ "$engine" != "$server" ]; then
  "$spy" record --pid "$server" --duration 4 --rate 250 --gil --threads --format raw -o "$OUT/profile_front.txt" \
    >> /tmp/profile_record.log 2>&1
fi
wait "$load"
tail -4 "$OUT/profile_load.txt"
curl -s http://127.0.0.1:8012/metrics | grep -E "^seseme_(engine_step_seconds|queue_wait|time_to_first)" \
  > "$OUT/profile_metrics.txt"
grep -E "step_seconds_(sum|count)|queue_wait_seconds_(sum|count)" "$OUT/profile_metrics.txt"
kill -TERM "$server"
wait "$server"

#!/usr/bin/env bash
# On a GPU machine (after scripts/gpu_check.sh built the tree, py-spy among the carried wheels): where the server's
# threads spend their time at N streams. Starts `seseme serve` on the random full-size model, loads it with
# scripts/load_test.py, and meanwhile takes py-spy dumps and a 5 s sampled profile of every thread (the GIL
# holder marked), plus the engine's step-time histogram from /metrics.
# Usage: bash scripts/gpu_serve_profile.sh [N [SECONDS]]; results in $OUT/profile_*.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
n=${1:-512}
seconds=${2:-15}
spy=$(command -v py-spy || echo /tmp/site/bin/py-spy)
seseme serve --model random --port 8012 --max-batch 512 --max-queue 2048 --no-access-log > "$OUT/profile_serve.log" 2>&1 &
server=$!
until curl -sf http://127.0.0.1:8012/health > /dev/null; do sleep 1; done
python3 scripts/load_test.py --url http://127.0.0.1:8012 --concurrency "$n" --seconds "$seconds" \
  --json "$OUT/profile_load.json" > "$OUT/profile_load.txt" 2>&1 &
load=$!
sleep $((seconds / 2 + 1))
"$spy" dump --pid "$server" > "$OUT/profile_dump.txt" 2>&1
"$spy" record --pid "$server" --duration 5 --rate 250 --gil --threads --format raw -o "$OUT/profile_gil.txt" \
  > "$OUT/profile_record.log" 2>&1
"$spy" record --pid "$server" --duration 4 --rate 250 --threads --idle --format raw -o "$OUT/profile_all.txt" \
  >> "$OUT/profile_record.log" 2>&1
wait "$load"
tail -4 "$OUT/profile_load.txt"
curl -s http://127.0.0.1:8012/metrics | grep -E "^seseme_engine_step_seconds" > "$OUT/profile_steps.txt"
cat "$OUT/profile_steps.txt"
kill -TERM "$server"
wait "$server"

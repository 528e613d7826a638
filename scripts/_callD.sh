ls ~/.cache/seseme/*.json 2>/dev/null || { python3 -m seseme_cli tune 2>&1 | tail -2; mkdir -p $OUT/tune_cache && cp ~/.cache/seseme/*.json $OUT/tune_cache/; }
python3 -m seseme_cli bench --compare-baseline --batch-sizes 1,8,32,64,512 --json $OUT/bench_run9.json --plot $OUT/bench_run9.png 2>&1 | tail -16
SESEME_TUNING=off python3 -m seseme_cli bench --batch-sizes 1,64 --json $OUT/bench_run9_off.json 2>&1 | tail -7
python3 scripts/make_requests.py /tmp/rq.jsonl 512 4000 && for i in 1 2; do rm -rf /tmp/bout; python3 -m seseme_cli batch /tmp/rq.jsonl -o /tmp/bout --model random 2>&1 | tail -2; done

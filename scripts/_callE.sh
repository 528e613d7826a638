python3 -m seseme_cli tune 2>&1 | grep -A12 "short_attention\|rope+attention" | head -30
python3 -m seseme_cli tune 2>&1 | tail -1
mkdir -p $OUT/tune_cache && cp ~/.cache/seseme/*.json $OUT/tune_cache/
python3 -m seseme_cli bench --batch-sizes 1,8,32,64,512 --json $OUT/bench_e.json 2>&1 | tail -10

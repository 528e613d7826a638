SESEME_TUNING=off python3 -m seseme_cli bench --batch-sizes 1,64 --json $OUT/bench_off.json 2>&1 | tail -6
python3 -m seseme_cli tune > $OUT/tune.log 2>&1; tail -1 $OUT/tune.log
mkdir -p $OUT/tune_cache && cp ~/.cache/seseme/*.json $OUT/tune_cache/
python3 -m seseme_cli bench --batch-sizes 1,8,32,64,512 --json $OUT/bench_tuned.json 2>&1 | tail -10

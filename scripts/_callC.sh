python3 -m seseme_cli tune 2>&1 | tail -4
mkdir -p $OUT/tune_cache && cp ~/.cache/seseme/*.json $OUT/tune_cache/

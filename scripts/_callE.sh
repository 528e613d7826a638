python3 - <<'PY'
import torch
from seseme_cli import tune
from seseme_cli.config import csm_1b
from seseme_cli.model import rope_inv_freq
d = csm_1b().depth
for n in (1, 64):
    case = tune.short_attention_case(n, d.num_heads, d.num_kv_heads, d.head_dim, d.max_seq_len,
                                     rope_inv_freq(d.head_dim, d.rope_theta, d.rope_scaling).float(), label="x")
    bad = []
    for p in case.candidates:
        try:
            ok = case.check(p)
        except Exception as e:
            ok = f"raised {type(e).__name__}: {str(e).splitlines()[0]}"
        if ok is not True:
            bad.append((p, ok))
    print(f"n={n}: {len(case.candidates) - len(bad)}/{len(case.candidates)} pass; failing: {bad[:4]}")
PY
python3 -m seseme_cli tune > $OUT/tune.log 2>&1; grep -A14 "^short_attention" $OUT/tune.log | head -20; tail -1 $OUT/tune.log
mkdir -p $OUT/tune_cache && cp ~/.cache/seseme/*.json $OUT/tune_cache/
python3 -m seseme_cli bench --batch-sizes 1,8,32,64,512 --json $OUT/bench_e.json 2>&1 | tail -10

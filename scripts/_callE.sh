python3 - <<'PY'
import torch
from seseme_cli import tune
from seseme_cli.config import csm_1b
from seseme_cli.model import rope_inv_freq
d = csm_1b().depth
with torch.inference_mode():
    case = tune.short_attention_case(1, d.num_heads, d.num_kv_heads, d.head_dim, d.max_seq_len,
                                     rope_inv_freq(d.head_dim, d.rope_theta, d.rope_scaling).float(), label="x")
    r = tune.tune_case(case)
print(r.to_dict())
print(r.rejected_why[:5])
PY

"""GPU: the fp8 GEMV against the bf16 GEMV at every projection shape of a frame, for choosing fp8's defaults and
engine.frame.FP8_MAX_N. Usage: python scripts/fp8_gemv_sweep.py [--batch-sizes 1,2,4,8] [--json out.json]

Per (rows n, shape): the bf16 op as the engine runs it (its default, and the shipped/cached tuned config where
there is one), the fp8 op with default_fp8_config, and the fastest of a sweep of fp8 GEMV configs. Timing and
checks are `seseme tune`'s (tools/tune.py): CUDA graphs of 32 calls, weights rotated through 3x the L2, every
candidate checked against float64 first. Last, per batch size, the sum of the per-call times over one frame's
calls (isolated kernels: programmatic dependent launch overlaps neighbours in a real frame, so this is an upper
bound on the projections' share, for comparing bf16 with fp8, not a frame time).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from seseme_cli.engine.tuning import load_tuning, tuned_config
from seseme_cli.model.checkpoints import load_checkpoint
from seseme_cli.ops.linear import linear_ref, swiglu_linear_ref
from seseme_cli.ops.linear_config import LinearConfig
from seseme_cli.ops.linear_fp8 import (_fp8_config_error, default_fp8_config, dequantize_fp8, linear_fp8,
                                       quantize_fp8, swiglu_linear_fp8)
from seseme_cli.ops.rmsnorm import rms_norm_ref
from seseme_cli.tools.tune import tune_case
from seseme_cli.tools.tune_cases import Case, _copies, _randn, linear_case, max_err


def fp8_case(n, m, k, swiglu, residual, norm, label) -> Case:
    g = torch.Generator(device="cuda").manual_seed(n * 7919 + m * 31 + k)
    rows = 2 * m if swiglu else m
    ws = [quantize_fp8(_randn(rows, k, scale=k**-0.5, g=g)) for _ in range(_copies(rows * k))]
    x = _randn(n, k, g=g) + 0.1
    r = _randn(n, m, g=g) if residual else None
    out = torch.empty(n, m, device="cuda", dtype=torch.bfloat16)
    fused = dict(norm_weight=_randn(k, g=g) + 1.0, norm_eps=1e-5, norm_out=torch.empty_like(x)) if norm else {}
    xn = rms_norm_ref(x, fused["norm_weight"], 1e-5) if norm else x
    w0 = dequantize_fp8(*ws[0])
    y = xn.double() @ w0.double().T
    gold = torch.nn.functional.silu(y[:, :m]) * y[:, m:] if swiglu else y + (0 if r is None else r.double())
    wb = w0.bfloat16()
    ref = swiglu_linear_ref(xn, wb) if swiglu else linear_ref(xn, wb, residual=r)
    bound = 2 * max_err(ref, gold) + 4 * torch.finfo(torch.float32).eps * gold.abs().max().item()
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    seen = {default_fp8_config(n, m, k, swiglu, sms=sms)}
    cands = [{}]
    for w, rr, s, u in itertools.product((2, 4, 8), (1, 2, 4), (1, 2, 4, 8), (2, 4, 8)):
        cfg = LinearConfig("gemv", w, rr, s, u, 3)
        if cfg not in seen and _fp8_config_error(cfg, n, m, k, swiglu) is None:
            seen.add(cfg)
            cands.append({"config": cfg})

    def launch(p, i):
        w8, sc = ws[i % len(ws)]
        if swiglu:
            swiglu_linear_fp8(x, w8, sc, out, **fused, **p)
        else:
            linear_fp8(x, w8, sc, out, r, **fused, **p)

    def check(p):
        out.fill_(float("nan"))
        launch(p, 0)
        return bool(torch.isfinite(out).all()) and max_err(out, gold) <= bound

    return Case("linear_fp8", (n, m, k, int(swiglu)), label, cands, launch, check)


def frame_calls(cfg, b):
    """(label, n, m, k, swiglu, residual, norm, calls per frame) of a frame's projections at batch b."""
    bb, dd, V = cfg.backbone, cfg.depth, cfg.audio_vocab_size
    K = cfg.num_codebooks
    out = []
    for n, t, name, reps in ((b, bb, "backbone", bb.num_layers), (2 * b, dd, "depth step 0", dd.num_layers),
                             (b, dd, "depth", dd.num_layers * (K - 2))):
        H, Hkv, hd = t.num_heads, t.num_kv_heads, t.head_dim
        out += [(f"{name} qkv", n, (H + 2 * Hkv) * hd, t.dim, False, False, True, reps),
                (f"{name} o", n, t.dim, H * hd, False, True, False, reps),
                (f"{name} gate_up", n, t.ffn_dim, t.dim, True, False, True, reps),
                (f"{name} down", n, t.dim, t.ffn_dim, False, True, False, reps)]
    out += [("codebook-0 head", b, V, bb.dim, False, False, False, 1), ("projection", b, dd.dim, bb.dim, False, False, False, 1),
            ("audio head", b, V, dd.dim, False, False, True, K - 1)]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,2,4,8")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cfg = load_checkpoint("random").config
    tuning = load_tuning(torch.device("cuda"))
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    cache, rows, totals = {}, [], {}
    for b in sizes:
        tot = dict(bf16_default=0.0, bf16_tuned=0.0, fp8_default=0.0, fp8_best=0.0)
        for label, n, m, k, sw, res, norm, reps in frame_calls(cfg, b):
            if n > 8:
                continue  # the fp8 GEMV takes up to 8 rows; above, both formats run the same bf16 kernels
            key = (n, m, k, sw, res, norm)
            if key not in cache:
                with torch.inference_mode():
                    bcase = linear_case(n, m, k, sw, res, label, norm=norm)
                    tuned = tuned_config(tuning, "linear", n, m, k, sw)
                    bcase.candidates = [{}] + ([tuned] if tuned else [])
                    bres = tune_case(bcase)
                    del bcase
                    fres = tune_case(fp8_case(n, m, k, sw, res, norm, label))
                torch.cuda.empty_cache()
                cache[key] = dict(label=label, n=n, m=m, k=k, swiglu=sw, bf16_default_us=bres.default_us,
                                  bf16_tuned_us=bres.tuned_us, fp8_default_us=fres.default_us,
                                  fp8_best_us=fres.tuned_us, fp8_best=str(fres.params.get("config", "default")),
                                  fp8_rejected=fres.rejected)
                c = cache[key]
                print(f"n={n:2d} {label:22s} ({m:5d},{k:5d}{' swiglu' if sw else ''}): bf16 {c['bf16_default_us']:7.2f} "
                      f"(tuned {c['bf16_tuned_us']:7.2f}) us | fp8 {c['fp8_default_us']:7.2f} (best {c['fp8_best_us']:7.2f}: "
                      f"{c['fp8_best']}) us", flush=True)
                rows.append(c)
            c = cache[key]
            for name in tot:
                tot[name] += reps * c[f"{name}_us"] / 1e3
        totals[b] = tot
        print(f"batch {b}: sum over a frame's projections (ms, isolated calls): "
              + ", ".join(f"{k} {v:.2f}" for k, v in tot.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "shapes": rows, "frame_sums_ms": totals}, f, indent=2)


if __name__ == "__main__":
    main()

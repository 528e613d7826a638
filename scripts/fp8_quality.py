"""What fp8 (e4m3, per-channel) weights do to the model's output, measured against the unquantized engine.

Usage: python scripts/fp8_quality.py [--model tiny-random|random] [--device cpu|cuda] [--frames 8]
       [--rows 8] [--sample-frames 100] [--json out.json]

Engines on the same loaded weights: A (weights as loaded; bf16 on a GPU, fp32 on a CPU), B (weights="fp8", same
dtype) and a yardstick Y for the size of plain bf16 rounding: on a GPU the fp32 reference model, on a CPU the
engine in bf16.
1. Teacher-forced logits: A generates `frames` frames (temperature 0.9, top-k 50); A, B and Y are then fed those
   same codes and their logits compared per codebook: max |diff|, relative L2 error, KL(p_A || p_B) of the
   softmax at temperature 1, total variation between the distributions the sampler draws from (temperature 0.9,
   top-50), top-1 agreement and the overlap of the top-50 sets.
2. Sampled codes: A and B each generate `sample_frames` frames for `rows` rows (one seed per row, the same seeds
   for both), free-running; per codebook, the total variation between the two code histograms, against the
   finite-sample floor: A with other seeds against A. Also: how many codes B draws equal to A's (same seeds and
   Philox streams: equal until the logits differ enough to flip a draw, after which the frames part).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch

from seseme_cli.api import build_model, load_csm_1b_optimized
from seseme_cli.engine import Engine
from seseme_cli.engine.frame import TeacherForcing
from seseme_cli.model.checkpoints import load_checkpoint
from seseme_cli.tools.bench import bench_text

TEMPERATURE, TOPK = 0.9, 50


def teacher_forced_engine(engine, tokens, mask, forced):
    engine.set_row(0, tokens, mask, TEMPERATURE, TOPK, 0)
    out = []
    for frame in forced.to(engine.device):
        teacher = TeacherForcing(frame[:, None])
        engine.step_teacher_forced(1, teacher)
        out.append(torch.stack([l[0] for l in teacher.logits]))
    return torch.stack(out).float().cpu()  # (frames, K, vocab)


@torch.inference_mode()
def teacher_forced_reference(model, tokens, mask, forced):
    K = forced.shape[1]
    model.setup_caches(1)
    device = model.c0_head.weight.device
    tok, msk = tokens[None].to(device), mask[None].to(device)
    pos = torch.arange(tokens.shape[0], device=device)[None]
    out = []
    for frame in forced.to(device):
        hidden = model.backbone_hidden(tok, msk, pos)
        out.append(torch.cat([model.c0_head(hidden)[:, None], model.depth_logits(hidden, frame[None, : K - 1])], 1))
        tok = torch.cat([frame, frame.new_zeros(1)])[None, None]
        msk = torch.zeros_like(tok, dtype=torch.bool)
        msk[..., :K] = True
        pos = pos[:, -1:] + 1
    model.setup_caches(0)
    return torch.cat(out).float().cpu()


def sampling_probs(logits):
    """The distribution the sampler draws from: temperature, top-k (ties at the k-th value kept), softmax."""
    scaled = logits / TEMPERATURE
    kth = torch.topk(scaled, TOPK, dim=-1).values[..., -1:]
    return torch.softmax(scaled.masked_fill(scaled < kth, float("-inf")), dim=-1)


def logit_metrics(a, b):
    """a, b: (frames, K, vocab) fp32. Per-codebook means over frames, then summarised over codebooks."""
    pa, lpa, lpb = torch.softmax(a, -1), torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (pa * (lpa - lpb)).sum(-1)  # (frames, K)
    tv = 0.5 * (sampling_probs(a) - sampling_probs(b)).abs().sum(-1)
    top1 = (a.argmax(-1) == b.argmax(-1)).float()
    ta, tb = torch.topk(a, TOPK, -1).indices, torch.topk(b, TOPK, -1).indices
    overlap = (ta[..., :, None] == tb[..., None, :]).any(-1).float().mean(-1)
    rel = (a - b).norm(dim=-1) / a.norm(dim=-1)
    per_cb = {"max_abs_diff": (a - b).abs().amax(dim=(0, 2)), "rel_l2": rel.mean(0), "kl": kl.mean(0),
              "tv_sampling": tv.mean(0), "top1_agree": top1.mean(0), "top50_overlap": overlap.mean(0)}
    return {
        "logit_scale (mean std of A's logits)": float(a.std(-1).mean()),
        **{f"{name} (mean over codebooks)": float(v.mean()) for name, v in per_cb.items()},
        "max_abs_diff (max)": float(per_cb["max_abs_diff"].max()),
        "kl (max codebook)": float(per_cb["kl"].max()),
        "top1_agree (min codebook)": float(per_cb["top1_agree"].min()),
        "codebook 0: kl / top1": [float(per_cb["kl"][0]), float(per_cb["top1_agree"][0])],
    }


@torch.inference_mode()
def sample(engine, tokens, mask, rows, frames, seed0):
    for r in range(rows):
        engine.set_row(r, tokens, mask, TEMPERATURE, TOPK, seed0 + r)
    return torch.stack([engine.step(rows)[:rows].clone() for _ in range(frames)], 1).cpu()  # (rows, frames, K)


def histogram_tv(a, b, vocab):
    """Mean over codebooks of the total variation between the code histograms of a and b (rows, frames, K)."""
    K = a.shape[-1]
    tvs = []
    for k in range(K):
        ha = torch.bincount(a[..., k].flatten(), minlength=vocab).double()
        hb = torch.bincount(b[..., k].flatten(), minlength=vocab).double()
        tvs.append(0.5 * float((ha / ha.sum() - hb / hb.sum()).abs().sum()))
    return statistics.mean(tvs), max(tvs)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--frames", type=int, default=8, help="teacher-forced frames")
    p.add_argument("--rows", type=int, default=8, help="rows (seeds) for the sampled-code histograms")
    p.add_argument("--sample-frames", type=int, default=100)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    tts = load_csm_1b_optimized(args.model, device=str(device))  # A's model: bf16 on a GPU, fp32 on a CPU
    dtype, graphs = tts.dtype, tts.uses_graphs
    tokens, mask = tts.build_prompt(bench_text(tts), 0)
    vocab = tts.config.audio_vocab_size
    model_b = copy.deepcopy(tts.model)
    if device.type == "cuda":
        yard_name = "fp32 reference model (unquantized) vs A: plain bf16 rounding"
        yard_model = build_model(load_checkpoint(args.model, 0), device, torch.float32)
    else:
        yard_name = "engine in bf16 (unquantized) vs A: plain bf16 rounding"
        yard_model = copy.deepcopy(tts.model).to(torch.bfloat16)

    a = Engine(tts.model, args.rows, use_graphs=graphs, weights="bf16")
    with torch.inference_mode():
        a.set_row(0, tokens, mask, TEMPERATURE, TOPK, 1234)
        forced = torch.stack([a.step(1)[0].clone() for _ in range(args.frames)]).cpu()
    logits_a = teacher_forced_engine(a, tokens, mask, forced)
    codes_a = sample(a, tokens, mask, args.rows, args.sample_frames, 0)
    codes_a2 = sample(a, tokens, mask, args.rows, args.sample_frames, 10_000)
    del a

    b = Engine(model_b, args.rows, use_graphs=graphs, weights="fp8")
    logits_b = teacher_forced_engine(b, tokens, mask, forced)
    codes_b = sample(b, tokens, mask, args.rows, args.sample_frames, 0)
    del b

    if device.type == "cuda":
        logits_y = teacher_forced_reference(yard_model, tokens, mask, forced)
    else:
        y = Engine(yard_model, 1, use_graphs=False)
        logits_y = teacher_forced_engine(y, tokens, mask, forced)

    tv_ab, tv_ab_max = histogram_tv(codes_a, codes_b, vocab)
    tv_aa, tv_aa_max = histogram_tv(codes_a, codes_a2, vocab)
    same = (codes_a == codes_b).float()
    first_diff = [int((~same[r].bool().all(-1)).nonzero()[0]) if not same[r].bool().all() else args.sample_frames
                  for r in range(args.rows)]
    report = {
        "model": tts.description, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "prompt_frames": int(tokens.shape[0]), "teacher_forced_frames": args.frames,
        "fp8 vs A (teacher-forced logits)": logit_metrics(logits_a, logits_b),
        f"yardstick: {yard_name}": logit_metrics(logits_a, logits_y),
        "sampled codes": {
            "rows x frames": [args.rows, args.sample_frames],
            "histogram TV fp8 vs A, same seeds (mean, max over codebooks)": [tv_ab, tv_ab_max],
            "histogram TV A vs A, other seeds: sampling-noise floor (mean, max)": [tv_aa, tv_aa_max],
            "codes equal to A's with the same seeds": float(same.mean()),
            "first frame that differs, per row": first_diff,
        },
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

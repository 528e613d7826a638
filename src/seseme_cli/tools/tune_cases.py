"""What `seseme tune` measures: the candidate launch parameters of each op, and one Case per distinct op call
of a frame (engine/frame.py), with inputs of the model's shapes and a check against the op's reference or its
kernels' yardstick. tune.py times the cases and keeps the fastest."""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from seseme_cli.model.config import CsmConfig
from seseme_cli.engine import frame as engine_frame
from seseme_cli.model.reference import rope_inv_freq
from seseme_cli.ops import attention as A
from seseme_cli.ops.linear import linear, linear_ref, swiglu_linear, swiglu_linear_ref
from seseme_cli.ops.linear_config import LinearConfig, config_error, default_config, linear_workspace_bytes
from seseme_cli.ops.rmsnorm import rms_norm_ref
from seseme_cli.ops.sampling import sample_topk_philox, sample_topk_philox_ref
from seseme_cli.ops.short_attention import SHORT_MAX_THREADS, rope_append_attention, short_attention_fits

DTYPE = torch.bfloat16
MMA_SPLITS = (1, 2, 3, 4, 6, 8, 12, 16)  # not every 1..16: neighbours differ by less than the noise
# When the linear ops take the pre-norm (norm_weight=, fused into the GEMV), the frame calls qkv and gate_up
# with it, so those are timed with it: a config without the fused path pays a separate rms_norm launch.
FUSED_NORM = "norm_weight" in inspect.signature(linear).parameters


@dataclass
class Case:
    """One op at one shape: how to run it with given keyword arguments, and how to check the result."""

    op: str
    shape: tuple
    label: str
    candidates: list[dict]  # candidates[0] == {}: the op's default
    launch: Callable[[dict, int], None]  # one call with these kwargs on input copy i
    check: Callable[[dict], bool]  # one call on copy 0, compared with the reference


# --- candidates -----------------------------------------------------------------------------------------------

def linear_candidates(n: int, m: int, k: int, swiglu: bool) -> list[dict]:
    """{} (the default) then every other config the kernels take for this shape."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count \
        if torch.cuda.is_available() else 132
    seen = {default_config(n, m, k, swiglu, split_ok=True, sms=sms)}
    configs = [LinearConfig("torch")]
    configs += [LinearConfig("gemv", w, r, s, u, 3) for w, r, s, u in
                itertools.product((1, 2, 4, 8), (1, 2, 4), (1, 2, 4, 8), (2, 4, 8))]
    # Up to n = 4 the GEMV wins (cuda/NOTES.md): there the MMA kernel is sampled more coarsely, which keeps
    # `--quick` (n = 1, 2) under a minute.
    splits, stages = (MMA_SPLITS, (2, 3, 4)) if n > 4 else ((1, 2, 4, 8, 16), (3, 4))
    configs += [LinearConfig("mma", w, r, s, 8, st) for w, r, s, st in
                itertools.product((1, 2, 4, 8), (1, 2, 4), splits, stages)]
    out = [{}]
    for cfg in configs:
        if cfg not in seen and config_error(cfg, n, m, k, swiglu) is None:
            seen.add(cfg)
            out.append({"config": cfg})
    return out


def attention_candidates(heads: int, kv_heads: int, cache_len: int) -> list[dict]:
    splits = sorted({s for s in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if s <= A.max_num_splits(cache_len)})
    keys = [None] + [k for k in A.KEYS_PER_ITER if k <= A.max_keys_per_iter(heads, kv_heads)]
    out = [{}]
    for s, t, kk in itertools.product(splits, (None, 32, 64, 128, 256), keys):
        p = {"num_splits": s, **({"threads": t} if t else {}), **({"keys_per_iter": kk} if kk else {})}
        out.append(p)
    return out


def short_attention_candidates(heads: int, kv_heads: int) -> list[dict]:
    rep = heads // kv_heads
    per_block = [None] + [h for h in range(1, rep + 1) if rep % h == 0]
    out = [{}]
    for h, t in itertools.product(per_block, (None, 32, 64, 128, 256)):
        if (h or t) and (t or 0) <= SHORT_MAX_THREADS:
            out.append({**({"heads_per_block": h} if h else {}), **({"threads": t} if t else {})})
    return out


def threads_candidates(most: int) -> list[dict]:
    return [{}] + [{"threads": t} for t in (32, 64, 128, 256, 512, 1024) if t <= most]


# --- cases ----------------------------------------------------------------------------------------------------

def _copies(nbytes: int) -> int:
    """Input copies to rotate through so that a graph's calls stream from HBM, not L2 (as in a frame)."""
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20)
    return max(1, min(32, math.ceil(3 * l2 / max(nbytes, 1))))


def _randn(*shape, scale=1.0, g=None):
    return (torch.randn(*shape, device="cuda", generator=g) * scale).to(DTYPE)


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def linear_case(n: int, m: int, k: int, swiglu: bool, residual: bool, label: str, norm: bool = False) -> Case:
    g = torch.Generator(device="cuda").manual_seed(n * 7919 + m * 31 + k)
    rows = 2 * m if swiglu else m
    ws = [_randn(rows, k, scale=k**-0.5, g=g) for _ in range(_copies(rows * k * 2))]
    x = _randn(n, k, g=g) + 0.1
    r = _randn(n, m, g=g) if residual else None
    out = torch.empty(n, m, device="cuda", dtype=DTYPE)
    fused = {}
    if norm and FUSED_NORM:
        fused = dict(norm_weight=_randn(k, g=g) + 1.0, norm_eps=1e-5, norm_out=torch.empty_like(x))
    cands = linear_candidates(n, m, k, swiglu)
    workspace = torch.zeros(max(16, *(linear_workspace_bytes(n, m, k, swiglu, p.get("config"), device="cuda")
                                      for p in cands)), device="cuda", dtype=torch.uint8)
    xn = rms_norm_ref(x, fused["norm_weight"], 1e-5) if fused else x  # the norm rounds like the model's
    y = xn.double() @ ws[0].double().T
    gold = torch.nn.functional.silu(y[:, :m]) * y[:, m:] if swiglu else y + (0 if r is None else r.double())
    ref = swiglu_linear_ref(x, ws[0], **fused) if swiglu else linear_ref(x, ws[0], residual=r, **fused)
    bound = 2 * max_err(ref, gold) + 4 * torch.finfo(torch.float32).eps * gold.abs().max().item()

    def launch(p, i):
        w = ws[i % len(ws)]
        if swiglu:
            swiglu_linear(x, w, out, workspace=workspace, **fused, **p)
        else:
            linear(x, w, out, r, workspace=workspace, **fused, **p)

    def check(p):
        out.fill_(float("nan"))
        launch(p, 0)
        return bool(torch.isfinite(out).all()) and max_err(out, gold) <= bound

    return Case("linear", (n, m, k, int(swiglu)), label, cands, launch, check)


def attention_case(n: int, heads: int, kv_heads: int, hd: int, cache_len: int, label: str) -> Case:
    g = torch.Generator(device="cuda").manual_seed(n * 131 + cache_len)
    shape = (n, cache_len, kv_heads, hd)
    caches = [(_randn(*shape, g=g), _randn(*shape, g=g)) for _ in range(_copies(2 * math.prod(shape) * 2))]
    q = _randn(n, heads, hd, g=g)
    out = torch.empty_like(q)
    rows = torch.arange(n, device="cuda", dtype=torch.int32)
    # Timed at a short, a middle and a full cache: the split count is fixed per graph while lengths grow.
    spans = sorted({max(1, cache_len // 16), max(1, cache_len // 4), cache_len})
    lengths = [torch.full((n,), L, device="cuda", dtype=torch.int32) for L in spans]
    mixed = torch.randint(1, cache_len + 1, (n,), device="cuda", generator=g, dtype=torch.int32)
    ws = A.attention_workspace(n, heads, hd, A.max_num_splits(cache_len), "cuda")
    ref = A.decode_attention_ref(q, *caches[0], rows, mixed, torch.empty_like(q)).double()
    floor = 1e-5 * caches[0][1].double().abs().max().item()

    def launch(p, i):
        k_cache, v_cache = caches[i % len(caches)]
        A.decode_attention(q, k_cache, v_cache, rows, lengths[i % len(lengths)], out, workspace=ws, **p)

    def check(p):  # the kernel and the fp32 reference are at most one rounding apart (test_ops_attention)
        out.fill_(float("nan"))
        A.decode_attention(q, *caches[0], rows, mixed, out, workspace=ws, **p)
        tol = 2 * torch.finfo(DTYPE).eps * ref.abs() + floor
        return bool(torch.isfinite(out).all()) and bool(((out.double() - ref).abs() <= tol).all())

    return Case("attention", (n, heads, kv_heads, hd, cache_len), label,
                attention_candidates(heads, kv_heads, cache_len), launch, check)


def short_attention_case(n: int, heads: int, kv_heads: int, hd: int, cache_len: int, inv_freq: torch.Tensor,
                         label: str) -> Case:
    """The depth decoder's one-token steps: RoPE + append + attention in one kernel, timed at an early, a middle
    and the last position (a graph's consecutive calls use different cache copies: the kernel reads the older
    slots before it waits for the call before it)."""
    inv_freq = inv_freq.to("cuda")
    g = torch.Generator(device="cuda").manual_seed(n * 29 + cache_len)
    shape = (n, cache_len, kv_heads, hd)
    caches = [(_randn(*shape, g=g), _randn(*shape, g=g)) for _ in range(max(2, _copies(2 * math.prod(shape) * 2)))]
    qkv = _randn(n, (heads + 2 * kv_heads) * hd, g=g)
    rows = torch.arange(n, device="cuda", dtype=torch.int32)
    spans = sorted({min(2, cache_len - 1), cache_len // 2, cache_len - 1})
    positions = [torch.full((n,), p, device="cuda", dtype=torch.long) for p in spans]
    lengths = [(p + 1).int() for p in positions]
    out = torch.empty(n, heads, hd, device="cuda", dtype=DTYPE)

    def launch(p, i):
        k_cache, v_cache = caches[i % len(caches)]
        j = i % len(spans)
        rope_append_attention(qkv, positions[j], rows, lengths[j], inv_freq, k_cache, v_cache, out, **p)

    pristine = caches[0][0].clone(), caches[0][1].clone()  # the timed calls write slots of every copy

    def run_on_copy_0(p):  # every candidate starts from the same caches
        k_cache, v_cache = pristine[0].clone(), pristine[1].clone()
        result = torch.full_like(out, float("nan"))
        rope_append_attention(qkv, positions[-1], rows, lengths[-1], inv_freq, k_cache, v_cache, result, **p)
        return result

    # The yardstick of the kernel's tests (test_ops_attention): the two kernels it replaces, rope_append then
    # decode_attention, within 2 eps (relative) plus a small floor. (Its torch reference rounds q differently.)
    k_cache, v_cache = pristine[0].clone(), pristine[1].clone()
    q = torch.empty_like(out)
    A.rope_append(qkv, positions[-1], rows, inv_freq, k_cache, v_cache, q)
    two = A.decode_attention(q, k_cache, v_cache, rows, lengths[-1], torch.empty_like(q)).double()
    tol = 2 * torch.finfo(DTYPE).eps * two.abs() + 1e-5 * (caches[0][1].double().abs().max().item()
                                                           + qkv.double().abs().max().item())
    default = run_on_copy_0({})

    def check(p):  # the launch shape must not change the result beyond that
        got = run_on_copy_0(p)
        return bool(torch.isfinite(got).all()) and (torch.equal(got, default)
                                                    or bool(((got.double() - two).abs() <= tol).all()))

    return Case("short_attention", (n, heads, kv_heads, hd, cache_len), label,
                short_attention_candidates(heads, kv_heads), launch, check)


def rope_case(n: int, heads: int, kv_heads: int, hd: int, cache_len: int, inv_freq: torch.Tensor, label: str) -> Case:
    inv_freq = inv_freq.to("cuda")
    g = torch.Generator(device="cuda").manual_seed(n * 17 + hd)
    qkv = _randn(n, (heads + 2 * kv_heads) * hd, g=g)
    positions = torch.randint(0, cache_len, (n,), device="cuda", generator=g)
    rows = torch.arange(n, device="cuda")
    k_cache, v_cache = (torch.zeros(n, cache_len, kv_heads, hd, device="cuda", dtype=DTYPE) for _ in range(2))
    q_out = torch.empty(n, heads, hd, device="cuda", dtype=DTYPE)
    # float64 "gold": the reference's arithmetic on exact inputs; the kernel may err at most 2x the bf16 reference
    gk, gv = (torch.zeros(n, cache_len, kv_heads, hd, device="cuda", dtype=torch.float64) for _ in range(2))
    gold = A.rope_append_ref(qkv.double(), positions, rows, inv_freq, gk, gv, torch.empty_like(q_out, dtype=torch.float64))
    rk, rv = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    ref = A.rope_append_ref(qkv, positions, rows, inv_freq, rk, rv, torch.empty_like(q_out))
    at = (rows, positions)
    floor = 4 * torch.finfo(torch.float32).eps * qkv.double().abs().max().item()
    bound_q, bound_k = 2 * max_err(ref, gold) + floor, 2 * max_err(rk[at], gk[at]) + floor

    def launch(p, i):
        A.rope_append(qkv, positions, rows, inv_freq, k_cache, v_cache, q_out, **p)

    def check(p):
        q_out.fill_(float("nan"))
        launch(p, 0)
        return max_err(q_out, gold) <= bound_q and max_err(k_cache[at], gk[at]) <= bound_k

    return Case("rope", (n, heads, kv_heads, hd), label, threads_candidates(A.ROPE_MAX_THREADS), launch, check)


def sampling_case(n: int, vocab: int, label: str) -> Case:
    g = torch.Generator(device="cuda").manual_seed(n)
    logits = _randn(n, vocab, scale=3.0, g=g)
    temperature = torch.full((n,), 0.9, device="cuda")
    topk = torch.full((n,), 50, device="cuda", dtype=torch.int32)
    seeds = torch.arange(n, device="cuda", dtype=torch.int64) + 12345
    counters = torch.full((n,), 7, device="cuda", dtype=torch.int64)
    out = torch.empty(n, device="cuda", dtype=torch.int64)
    ref = sample_topk_philox_ref(logits, temperature, topk, seeds, counters, 3)
    default = sample_topk_philox(logits, temperature, topk, seeds, counters, 3).clone()

    def launch(p, i):
        sample_topk_philox(logits, temperature, topk, seeds, counters, 3, out, **p)

    def check(p):  # the draw must not depend on the launch shape: equal to the reference (or, at a logf
        out.fill_(-1)  # near-tie where the default kernel already differs from it, equal to the default)
        launch(p, 0)
        return bool(((out == ref) | (out == default)).all())

    return Case("sampling", (n, vocab), label, threads_candidates(1024), launch, check)


def frame_cases(cfg: CsmConfig, batch_sizes: list[int]) -> list[tuple[str, tuple, str, Callable[[], Case]]]:
    """(op, shape, label, make case) of every distinct op call a frame makes at these batch sizes
    (engine/frame.py). Cases are made one at a time by `run` (each holds a few hundred MB of inputs). Calls
    with more than 64 rows run the reference in the engine and are skipped."""
    bb, dd, V = cfg.backbone, cfg.depth, cfg.audio_vocab_size
    specs, seen = [], set()

    def add(op, shape, label, make, *args, **kwargs):
        if (op, shape) not in seen:
            seen.add((op, shape))
            specs.append((op, shape, label, functools.partial(make, *args, label=label, **kwargs)))

    for b in batch_sizes:
        for n, t, name in ((b, bb, "backbone"), (b, dd, "depth"), (2 * b, dd, "depth step 0")):
            if n > 64:
                continue
            H, Hkv, hd, S = t.num_heads, t.num_kv_heads, t.head_dim, t.max_seq_len
            for m, k, sw, res, what in (((H + 2 * Hkv) * hd, t.dim, False, False, "qkv"), (t.dim, H * hd, False, True, "o"),
                                        (t.ffn_dim, t.dim, True, False, "gate_up"), (t.dim, t.ffn_dim, False, True, "down")):
                add("linear", (n, m, k, int(sw)), f"{name} {what}", linear_case, n, m, k, sw, res,
                    norm=what in ("qkv", "gate_up"))
            inv_freq = rope_inv_freq(hd, t.rope_theta, t.rope_scaling).float()
            if name == "depth" and engine_frame.FUSED_SHORT_ATTENTION and short_attention_fits(H, Hkv, hd, S):
                # the one-token depth steps run the fused kernel (engine/frame.py run_stack)
                add("short_attention", (n, H, Hkv, hd, S), f"{name} rope+attention", short_attention_case, n, H,
                    Hkv, hd, S, inv_freq)
                continue
            add("rope", (n, H, Hkv, hd), f"{name} rope", rope_case, n, H, Hkv, hd, S, inv_freq)
            add("attention", (n, H, Hkv, hd, S), f"{name} attention", attention_case, n, H, Hkv, hd, S)
        if b <= 64:
            add("linear", (b, V, bb.dim, 0), "codebook-0 head", linear_case, b, V, bb.dim, False, False)
            add("linear", (b, V, dd.dim, 0), "audio head", linear_case, b, V, dd.dim, False, False)
            add("linear", (b, dd.dim, bb.dim, 0), "projection", linear_case, b, dd.dim, bb.dim, False, False)
            add("sampling", (b, V), "top-k sampling", sampling_case, b, V)
    return specs

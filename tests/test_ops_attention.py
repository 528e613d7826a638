"""RoPE + KV-cache append and decode attention.

CPU: the references against independent float64 formulas and against the reference model's own code path
(`Transformer` -> `Attention`, same q, same cache contents), argument checks, the split-count policy.
GPU (cuda): the kernels on awkward shapes against float64, with error <= 2x the reference's (fp32 math rounded
once to the storage dtype) + a small floor; NaN-poisoned outputs and cache slots the op must not read; untouched
memory compared bit for bit; every launch configuration the dispatcher or an autotuner may pick; CUDA-graph
capture + replay; no allocations with preallocated buffers.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_allocates_nothing
from seseme_cli.model.config import RopeScaling, TransformerConfig
from seseme_cli.ops.kernels import has_cuda_kernels, kernels_module
from seseme_cli.model.reference import Transformer, rope_inv_freq
from seseme_cli.ops import attention as A
from seseme_cli.ops.attention import (
    attention_workspace,
    decode_attention,
    decode_attention_ref,
    default_num_splits,
    max_keys_per_iter,
    max_num_splits,
    rope_append,
    rope_append_ref,
    workspace_floats,
)
from seseme_cli.ops import short_attention as SA
from seseme_cli.ops.short_attention import rope_append_attention, short_attention_fits

SCALING = RopeScaling.from_torchtune(32, 8192)  # CSM-1B's Llama-3 scaling
HEAD_SHAPES = [(32, 8, 64), (8, 2, 128), (4, 4, 16), (6, 2, 8)]  # backbone, depth decoder, MHA, rep 3 / hd 8


def bits(t):
    """Bit pattern, so NaN-poisoned memory compares equal to itself."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- formulas


def rope_gold(qkv, positions, inv_freq, H, Hkv, hd):
    """float64 rotation of every q and k head (angle = fp32 position * inv_freq, as the model defines it)."""
    x = qkv.double().view(qkv.shape[0], H + 2 * Hkv, hd)
    theta = (positions.float().unsqueeze(-1) * inv_freq.float()).double().unsqueeze(1)  # (N, 1, hd/2)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    rot = torch.cat((x1 * theta.cos() - x2 * theta.sin(), x2 * theta.cos() + x1 * theta.sin()), dim=-1)
    return rot[:, :H], rot[:, H : H + Hkv], x[:, H + Hkv :]


def attention_gold(q, k_cache, v_cache, cache_rows, lengths, scale=None):
    """float64, one query head at a time with an explicit KV-head map and explicit exp / sum."""
    N, H, hd = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    scale = hd**-0.5 if scale is None else scale
    rows = cache_rows.long()
    L = lengths.long().clamp(0, S)
    valid = torch.arange(S, device=q.device).unsqueeze(0) < L.unsqueeze(1)  # (N, S)
    out = torch.zeros(N, H, hd, dtype=torch.float64, device=q.device)
    for h in range(H):
        g = h // (H // Hkv)
        k = torch.where(valid[..., None], k_cache[rows, :, g].double(), 0.0)  # (N, S, hd)
        v = torch.where(valid[..., None], v_cache[rows, :, g].double(), 0.0)
        s = torch.einsum("nd,nsd->ns", q[:, h].double(), k) * scale
        s = torch.where(valid, s, -math.inf)
        e = torch.where(valid, torch.exp(s - s.max(-1, keepdim=True).values.clamp(min=-1e300)), 0.0)
        total = e.sum(-1, keepdim=True)
        out[:, h] = torch.where(total > 0, torch.einsum("ns,nsd->nd", e, v) / total.clamp(min=1e-300), 0.0)
    return out


def unique_slots(N, B, S, g):
    """N distinct (cache row, position) pairs, so no two rows write one slot; rows do share cache rows.
    Row 0 writes the last position of cache row 0 and row 1 (if any) position 0 of the same cache row."""
    first = torch.tensor([S - 1, 0])
    rest = torch.randperm(B * S, generator=g)
    rest = rest[(rest != S - 1) & (rest != 0)]
    slots = torch.cat((first, rest))[:N]
    return (slots // S), (slots % S)


# ---------------------------------------------------------------------------------------------- CPU


def test_module_constants_match_python():
    k = kernels_module()
    if k is None:
        pytest.skip("kernels module not built")
    assert k.attention_max_splits == A.MAX_SPLITS
    assert k.attention_max_threads == A.ATTENTION_MAX_THREADS
    assert k.rope_max_threads == A.ROPE_MAX_THREADS
    assert k.attention_max_head_dim == A.MAX_HEAD_DIM == k.rope_max_head_dim
    assert k.attention_max_rep_times_keys == A.MAX_REP_TIMES_KEYS
    assert k.attention_default_keys_per_iter == A.DEFAULT_KEYS_PER_ITER
    assert k.short_attention_max_len == SA.SHORT_MAX_LEN
    assert k.short_attention_max_head_dim == SA.SHORT_MAX_HEAD_DIM


@pytest.mark.parametrize("H,Hkv,hd", [(4, 2, 16), (3, 1, 6), (2, 2, 8)])
def test_rope_ref_matches_float64(H, Hkv, hd):
    g = gen(H * 100 + hd)
    N, B, S = 7, 3, 40
    qkv = torch.randn(N, (H + 2 * Hkv) * hd, generator=g)
    rows, positions = unique_slots(N, B, S, g)
    inv_freq = rope_inv_freq(hd, 500_000.0, SCALING)
    k_cache, v_cache = torch.randn(B, S, Hkv, hd, generator=g), torch.randn(B, S, Hkv, hd, generator=g)
    k0, v0 = k_cache.clone(), v_cache.clone()
    q_out = torch.full((N, H, hd), float("nan"))
    assert rope_append_ref(qkv, positions, rows.int(), inv_freq, k_cache, v_cache, q_out) is q_out
    gq, gk, gv = rope_gold(qkv, positions, inv_freq, H, Hkv, hd)
    torch.testing.assert_close(q_out.double(), gq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_cache[rows, positions].double(), gk, rtol=1e-6, atol=1e-6)
    assert torch.equal(v_cache[rows, positions].double(), gv)
    written = torch.zeros(B, S, dtype=torch.bool)
    written[rows, positions] = True
    assert torch.equal(k_cache[~written], k0[~written]) and torch.equal(v_cache[~written], v0[~written])


def test_attention_ref_matches_float64():
    g = gen(1)
    N, H, Hkv, hd, B, S = 6, 6, 2, 8, 3, 21
    q = torch.randn(N, H, hd, generator=g) * 2
    k_cache, v_cache = torch.randn(B, S, Hkv, hd, generator=g), torch.randn(B, S, Hkv, hd, generator=g)
    rows = torch.tensor([0, 0, 2, 1, 2, 0])
    lengths = torch.tensor([1, S, 5, 0, 13, 40], dtype=torch.int32)  # 0 -> zeros, 40 -> clamped to S
    for n in range(N):  # poison everything the rows must not read (slots >= the longest length per row)
        longest = max(min(int(lengths[i]), S) for i in range(N) if rows[i] == rows[n])
        k_cache[rows[n], longest:] = float("nan")
        v_cache[rows[n], longest:] = float("nan")
    k_cache[1], v_cache[1] = float("nan"), float("nan")  # row 3 has length 0: reads nothing at all
    out = torch.full_like(q, float("nan"))
    assert decode_attention_ref(q, k_cache, v_cache, rows, lengths, out, scale=0.3) is out
    gold = attention_gold(q, k_cache, v_cache, rows, lengths, scale=0.3)
    torch.testing.assert_close(out.double(), gold, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[3], torch.zeros(H, hd))


def tiny_config(hd, max_seq_len):
    return TransformerConfig(num_layers=1, dim=32, num_heads=4, num_kv_heads=2, head_dim=hd, ffn_dim=64,
                             max_seq_len=max_seq_len, rope_scaling=SCALING)


@pytest.mark.parametrize("T", [1, 2], ids=["backbone-step", "depth-first-step"])
def test_refs_match_model_attention(monkeypatch, T):
    """rope_append_ref gives the model's q and cache contents bit for bit; decode_attention_ref agrees with the
    model's SDPA (both against float64)."""
    torch.manual_seed(0)
    cfg = tiny_config(hd=16 if T == 1 else 8, max_seq_len=64 if T == 1 else 33)
    model = Transformer(cfg).to(torch.bfloat16)
    model.reset_buffers("cpu")  # inv_freq back to fp32, as the loaders leave it
    B = 3
    model.setup_cache(B + 1, "cpu", torch.bfloat16)
    attn = model.layers[0].attn
    g = gen(2)
    attn.k_cache.copy_(torch.randn(attn.k_cache.shape, generator=g))
    attn.v_cache.copy_(torch.randn(attn.v_cache.shape, generator=g))
    k0, v0 = attn.k_cache.clone(), attn.v_cache.clone()

    x = torch.randn(B, T, cfg.dim, generator=g).bfloat16()
    cache_rows = torch.tensor([2, 0, 3])
    if T == 1:
        positions = torch.tensor([[5], [0], [63]])
    else:
        positions = torch.tensor([[0, 1]]).expand(B, 2)

    seen = {}
    monkeypatch.setattr(model.layers[0].attn, "forward", _spy(attn.forward, seen))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa_spy(q, k, v, attn_mask=None, **kw):
        seen["q"], seen["mask"] = q, attn_mask
        seen["out"] = sdpa(q, k, v, attn_mask=attn_mask, **kw)
        return seen["out"]

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa_spy)
    with torch.no_grad():
        model(x, positions, cache_rows)
        xa = seen["x"]
        qkv = torch.cat((attn.q_proj(xa), attn.k_proj(xa), attn.v_proj(xa)), dim=-1).reshape(B * T, -1)

    H, hd = cfg.num_heads, cfg.head_dim
    n = B * T
    rows = cache_rows.repeat_interleave(T)
    pos = positions.reshape(-1)
    k_cache, v_cache = k0.clone(), v0.clone()
    q_out = torch.empty(n, H, hd, dtype=torch.bfloat16)
    rope_append_ref(qkv, pos, rows, model.inv_freq, k_cache, v_cache, q_out)
    assert torch.equal(q_out.view(B, T, H, hd).transpose(1, 2), seen["q"])
    assert torch.equal(k_cache, attn.k_cache) and torch.equal(v_cache, attn.v_cache)

    out = torch.empty_like(q_out)
    decode_attention_ref(q_out, k_cache, v_cache, rows, (pos + 1).int(), out)
    gold = attention_gold(q_out, k_cache, v_cache, rows, pos + 1)
    model_out = seen["out"].transpose(1, 2).reshape(n, H, hd)
    top = gold.abs().max().item()
    assert max_err(out, gold) <= 2**-9 * top  # one bf16 rounding of fp32 math
    assert max_err(model_out, gold) <= 2**-6 * top  # SDPA in bf16 on the CPU: a few roundings
    assert max_err(out, model_out) <= 2**-6 * top


def _spy(forward, seen):
    def wrapped(x, *args, **kw):
        seen["x"] = x
        return forward(x, *args, **kw)

    return wrapped


def test_dispatch_on_cpu_uses_references():
    g = gen(3)
    N, H, Hkv, hd, B, S = 4, 4, 2, 16, 2, 10
    qkv = torch.randn(N, (H + 2 * Hkv) * hd, generator=g).bfloat16()
    rows, positions = unique_slots(N, B, S, g)
    inv_freq = rope_inv_freq(hd, 500_000.0, SCALING)
    caches = [torch.randn(B, S, Hkv, hd, generator=g).bfloat16() for _ in range(2)]
    caches += [c.clone() for c in caches]
    q1, q2 = torch.empty(N, H, hd, dtype=torch.bfloat16), torch.empty(N, H, hd, dtype=torch.bfloat16)
    rope_append(qkv, positions, rows, inv_freq, caches[0], caches[1], q1, threads=64)
    rope_append_ref(qkv, positions, rows, inv_freq, caches[2], caches[3], q2)
    assert torch.equal(q1, q2) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    lengths = (positions + 1).int()
    o1, o2 = torch.empty_like(q1), torch.empty_like(q1)
    decode_attention(q1, caches[0], caches[1], rows, lengths, o1, num_splits=3, threads=64, keys_per_iter=2)
    decode_attention_ref(q1, caches[0], caches[1], rows, lengths, o2)
    assert torch.equal(o1, o2)


def test_fused_short_attention_on_cpu_is_its_two_references():
    g = gen(4)
    N, H, Hkv, hd, B, S = 3, 8, 2, 16, 5, 12
    qkv = torch.randn(N, (H + 2 * Hkv) * hd, generator=g).bfloat16()
    rows = torch.tensor([4, 0, 2])
    positions = torch.tensor([0, 11, 5])
    lengths = torch.tensor([1, 12, 3], dtype=torch.int32)  # the last row does not attend to its new slot
    inv_freq = rope_inv_freq(hd, 500_000.0, SCALING)
    k0, v0 = torch.randn(B, S, Hkv, hd, generator=g).bfloat16(), torch.randn(B, S, Hkv, hd, generator=g).bfloat16()
    k1, v1, k2, v2 = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    out = torch.empty(N, H, hd, dtype=torch.bfloat16)
    assert rope_append_attention(qkv, positions, rows, lengths, inv_freq, k1, v1, out, heads_per_block=2,
                                 threads=64) is out
    q = torch.empty_like(out)
    rope_append_ref(qkv, positions, rows, inv_freq, k2, v2, q)
    expect = decode_attention_ref(q, k2, v2, rows, lengths, torch.empty_like(out))
    assert torch.equal(out, expect) and torch.equal(k1, k2) and torch.equal(v1, v2)
    with pytest.raises(ValueError, match="heads_per_block must be None or divide 4"):
        rope_append_attention(qkv, positions, rows, lengths, inv_freq, k1, v1, out, heads_per_block=3)
    with pytest.raises(ValueError, match="threads"):
        rope_append_attention(qkv, positions, rows, lengths, inv_freq, k1, v1, out, threads=48)
    assert short_attention_fits(8, 2, 128, 33) and short_attention_fits(32, 8, 64, 64)
    assert not short_attention_fits(32, 8, 64, 2048) and not short_attention_fits(8, 2, 8, 33)
    assert not short_attention_fits(16, 1, 64, 33)  # 16 query heads per KV head


def test_split_policy(monkeypatch):
    monkeypatch.setattr(A, "_sm_count", lambda device: 132)
    assert max_num_splits(33) == 1 and max_num_splits(128) == 1 and max_num_splits(2048) == 32
    assert max_num_splits(1 << 20) == A.MAX_SPLITS
    assert default_num_splits(128, 8, 2, 33, "cuda") == 1  # depth decoder: one pass
    assert default_num_splits(1, 32, 8, 2048, "cuda") == 32  # backbone, batch 1: 256 blocks
    assert default_num_splits(16, 32, 8, 2048, "cuda") == 3
    assert default_num_splits(64, 32, 8, 2048, "cuda") == 1
    for n in range(1, 130):
        assert 1 <= default_num_splits(n, 32, 8, 2048, "cuda") <= max_num_splits(2048)
    assert max_keys_per_iter(32, 8) == 8 and max_keys_per_iter(6, 2) == 8 and max_keys_per_iter(16, 1) == 4
    ws = attention_workspace(8, 32, 64, 2048, "cpu")  # max_splits clamped to MAX_SPLITS
    assert ws.dtype == torch.float32 and ws.numel() == workspace_floats(8, 32, 64, A.MAX_SPLITS) == 64 * 8 * 32 * 66


def test_readable_errors():
    g = gen(4)
    N, H, Hkv, hd, B, S = 3, 4, 2, 16, 2, 8
    qkv = torch.randn(N, (H + 2 * Hkv) * hd, generator=g)
    pos, rows = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0])
    inv = torch.ones(hd // 2)
    kc, vc, q = torch.zeros(B, S, Hkv, hd), torch.zeros(B, S, Hkv, hd), torch.zeros(N, H, hd)
    ok = dict(qkv=qkv, positions=pos, cache_rows=rows, inv_freq=inv, k_cache=kc, v_cache=vc, q_out=q)
    bad_rope = [
        (dict(qkv=qkv[:, :-1]), "qkv must be"),
        (dict(positions=pos.float()), "positions must be"),
        (dict(cache_rows=rows[:2]), "cache_rows must be"),
        (dict(inv_freq=inv[:3]), "inv_freq must be"),
        (dict(v_cache=vc[:1]), "one shape"),
        (dict(q_out=q.double()), "q_out is"),
        (dict(q_out=torch.zeros(N, 3, hd)), "multiple of"),
        (dict(k_cache=torch.zeros(B, S, Hkv, 5), v_cache=torch.zeros(B, S, Hkv, 5)), "even head_dim"),
    ]
    for change, msg in bad_rope:
        with pytest.raises(ValueError, match=msg):
            rope_append(**{**ok, **change})
    for threads in (0, 48, 2048, True, 64.0):
        with pytest.raises(ValueError, match="threads"):
            rope_append(**ok, threads=threads)

    lengths = torch.tensor([1, 2, 3], dtype=torch.int32)
    ok = dict(q=q, k_cache=kc, v_cache=vc, cache_rows=rows, lengths=lengths, out=torch.zeros_like(q))
    bad_attn = [
        (dict(q=torch.zeros(N, 3, hd)), "multiple of"),
        (dict(out=torch.zeros(N, H, hd).bfloat16()), "out is"),
        (dict(out=torch.zeros(N + 1, H, hd)), "out must be"),
        (dict(lengths=lengths.float()), "lengths must be"),
        (dict(workspace=torch.zeros(10, dtype=torch.float64)), "workspace must be"),
        (dict(num_splits=0), "num_splits"),
        (dict(num_splits=A.MAX_SPLITS + 1), "num_splits"),
        (dict(num_splits=2.0), "num_splits"),
        (dict(threads=512), "threads"),
        (dict(threads=33), "threads"),
        (dict(keys_per_iter=3), "keys_per_iter"),
        (dict(keys_per_iter=16), "keys_per_iter"),
        (dict(scale=float("nan")), "scale"),
    ]
    for change, msg in bad_attn:
        with pytest.raises(ValueError, match=msg):
            decode_attention(**{**ok, **change})
    with pytest.raises(ValueError, match="keys_per_iter"):  # 8 heads per block: at most 4 keys per iteration
        decode_attention(**{**ok, "q": torch.zeros(N, 16, hd), "out": torch.zeros(N, 16, hd)}, keys_per_iter=8)


def test_binding_checks_without_launch():
    """The C++ layer's own checks fire before any launch (so this runs on a machine without a GPU too)."""
    k = kernels_module()
    if k is None:
        pytest.skip("kernels module not built")
    bf16 = k.dtype_codes["bfloat16"]
    good = dict(out=16, q=16, k_cache=16, v_cache=16, cache_rows=16, cache_rows_int32=True, lengths=16,
                lengths_int32=True, workspace=16, workspace_floats=10**9, rows=1, heads=32, kv_heads=8,
                head_dim=64, cache_batch=1, cache_len=2048, scale=0.125, num_splits=4, threads=0, keys_per_iter=0,
                dtype=bf16, stream=0)
    cases = [
        (dict(dtype=k.dtype_codes["float32"]), "bfloat16 or float16"),
        (dict(heads=30), "multiple of kv_heads"),
        (dict(head_dim=60), "multiple of 8"),
        (dict(head_dim=264), "multiple of 8"),
        (dict(num_splits=65), "num_splits"),
        (dict(threads=288), "threads"),
        (dict(keys_per_iter=3), "keys_per_iter"),
        (dict(heads=64, kv_heads=8, keys_per_iter=8), "keys_per_iter"),
        (dict(q=8), "16-byte aligned"),
        (dict(workspace_floats=100), "splits need"),
        (dict(workspace=0), "workspace"),
        (dict(rows=70000), "65535"),
        (dict(scale=float("inf")), "finite"),
        (dict(cache_len=0), "cache must"),
    ]
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            k.decode_attention(**{**good, **change})
    good = dict(q_out=16, k_cache=16, v_cache=16, qkv=16, positions=16, positions_int32=False, cache_rows=16,
                cache_rows_int32=False, inv_freq=16, rows=1, heads=32, kv_heads=8, head_dim=64, cache_batch=1,
                cache_len=2048, dtype=bf16, threads=0, stream=0)
    cases = [
        (dict(head_dim=7), "even"),
        (dict(head_dim=258), "even"),
        (dict(threads=100), "threads"),
        (dict(positions=4), "positions pointer"),
        (dict(qkv=0), "non-null"),
        (dict(dtype=9), "dtype code"),
    ]
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            k.rope_append(**{**good, **change})


# ---------------------------------------------------------------------------------------------- GPU

needs_kernels = pytest.mark.skipif(not has_cuda_kernels(), reason="needs a GPU and the CUDA-built kernels")
DTYPES = [torch.bfloat16, torch.float16]


def rope_case(N, H, Hkv, hd, S, dtype, seed, pos_dtype=torch.int64, row_dtype=torch.int32):
    g = gen(seed)
    B = N // 2 + 2
    qkv = (torch.randn(N, (H + 2 * Hkv) * hd, generator=g) * 2).to("cuda", dtype)
    rows, positions = unique_slots(N, B, S, g)
    inv_freq = rope_inv_freq(hd, 500_000.0, SCALING).cuda()
    k_cache = torch.randn(B, S, Hkv, hd, generator=g).to("cuda", dtype)
    v_cache = torch.randn(B, S, Hkv, hd, generator=g).to("cuda", dtype)
    return qkv, positions.to("cuda", pos_dtype), rows.to("cuda", row_dtype), inv_freq, k_cache, v_cache


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("S", [33, 2048])
@pytest.mark.parametrize("H,Hkv,hd", HEAD_SHAPES + [(2, 1, 6), (4, 2, 12), (4, 1, 256)])
@pytest.mark.parametrize("N", [1, 2, 3, 17, 64, 128])
def test_rope_kernel(N, H, Hkv, hd, S, dtype):
    qkv, pos, rows, inv_freq, k_cache, v_cache = rope_case(N, H, Hkv, hd, S, dtype, seed=N * 7 + hd + S)
    k0, v0 = k_cache.clone(), v_cache.clone()
    q_out = torch.full((N, H, hd), float("nan"), device="cuda", dtype=dtype)
    assert A._rope_kernel_applies(qkv, pos, rows, inv_freq, k_cache, v_cache, q_out)
    for threads in (None, 32, 1024):
        q_out.fill_(float("nan"))
        k_cache.copy_(k0)
        v_cache.copy_(v0)
        assert rope_append(qkv, pos, rows, inv_freq, k_cache, v_cache, q_out, threads=threads) is q_out
        check_rope_result(qkv, pos, rows, inv_freq, k0, v0, k_cache, v_cache, q_out)


def check_rope_result(qkv, pos, rows, inv_freq, k0, v0, k_cache, v_cache, q_out):
    rq = torch.empty_like(q_out)
    rope_append_ref(qkv, pos, rows, inv_freq, k0.clone(), v0.clone(), rq)
    gq, _, _ = rope_gold(qkv, pos, inv_freq, q_out.shape[1], k0.shape[2], k0.shape[3])
    floor = 4 * torch.finfo(torch.float32).eps * qkv.double().abs().max().item()
    assert torch.isfinite(q_out).all()
    assert max_err(q_out, gq) <= 2 * max_err(rq, gq) + floor
    check_rope_caches(qkv, pos, rows, inv_freq, k0, v0, k_cache, v_cache, q_out.shape[1])


def check_rope_caches(qkv, pos, rows, inv_freq, k0, v0, k_cache, v_cache, H):
    """The slots rope_append writes, against float64; every other slot untouched."""
    Hkv, hd = k0.shape[2], k0.shape[3]
    rk, rv = k0.clone(), v0.clone()
    rope_append_ref(qkv, pos, rows, inv_freq, rk, rv, torch.empty(qkv.shape[0], H, hd, device=qkv.device,
                                                                    dtype=qkv.dtype))
    _, gk, gv = rope_gold(qkv, pos, inv_freq, H, Hkv, hd)
    r, p = rows.long(), pos.long()
    floor = 4 * torch.finfo(torch.float32).eps * qkv.double().abs().max().item()
    assert max_err(k_cache[r, p], gk) <= 2 * max_err(rk[r, p], gk) + floor
    assert torch.equal(bits(v_cache[r, p]), bits(gv.to(qkv.dtype)))  # v is copied, not rounded
    written = torch.zeros(k0.shape[:2], dtype=torch.bool, device="cuda")
    written[r, p] = True
    assert torch.equal(bits(k_cache[~written]), bits(k0[~written]))
    assert torch.equal(bits(v_cache[~written]), bits(v0[~written]))


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_rope_kernel_unaligned_and_int32_positions(dtype):
    # qkv one element into its buffer: the kernel must drop to its scalar path (hd % 8 == 0 notwithstanding).
    N, H, Hkv, hd, S = 5, 8, 2, 64, 40
    qkv, pos, rows, inv_freq, k_cache, v_cache = rope_case(N, H, Hkv, hd, S, dtype, seed=5,
                                                           pos_dtype=torch.int32, row_dtype=torch.int64)
    buf = torch.empty(qkv.numel() + 1, device="cuda", dtype=dtype)
    shifted = buf[1:].view(qkv.shape)
    shifted.copy_(qkv)
    assert shifted.data_ptr() % 16 != 0
    k0, v0 = k_cache.clone(), v_cache.clone()
    q_out = torch.full((N, H, hd), float("nan"), device="cuda", dtype=dtype)
    rope_append(shifted, pos, rows, inv_freq, k_cache, v_cache, q_out)
    check_rope_result(shifted, pos, rows, inv_freq, k0, v0, k_cache, v_cache, q_out)


@pytest.mark.cuda
@needs_kernels
def test_rope_kernel_out_of_range_writes_no_cache():
    N, H, Hkv, hd, S = 4, 4, 2, 16, 10
    qkv, pos, rows, inv_freq, k_cache, v_cache = rope_case(N, H, Hkv, hd, S, torch.bfloat16, seed=6)
    pos = torch.tensor([S, -1, 3, 2], device="cuda")
    rows = torch.tensor([0, 0, k_cache.shape[0], -1], device="cuda", dtype=torch.int32)
    k0, v0 = k_cache.clone(), v_cache.clone()
    q_out = torch.full((N, H, hd), float("nan"), device="cuda", dtype=torch.bfloat16)
    rope_append(qkv, pos, rows, inv_freq, k_cache, v_cache, q_out)
    assert torch.equal(k_cache, k0) and torch.equal(v_cache, v0)
    assert torch.isfinite(q_out).all()


def attention_case(N, H, Hkv, hd, S, dtype, seed):
    """Inputs with rows sharing cache rows, lengths incl. 1, S, odd and split-boundary values, and NaN in every
    cache slot no row may read (beyond the longest length of the rows on that cache row, and unused rows)."""
    g = gen(seed)
    B = N // 2 + 2
    q = (torch.randn(N, H, hd, generator=g) * 1.5).to("cuda", dtype)
    k_cache = torch.randn(B, S, Hkv, hd, generator=g).to(dtype)
    v_cache = (torch.randn(B, S, Hkv, hd, generator=g) * 2).to(dtype)
    rows = torch.randint(0, B - 1, (N,), generator=g)  # row B - 1 is never read
    lengths = torch.randint(1, S + 1, (N,), generator=g)
    special = [1, S, 2, S - 1, 63, 64, 65, 127, 129, 1023, 1025, 31, 33, 17]
    for i, L in enumerate(special[: N]):
        lengths[i] = min(L, S)
    if N > 2:
        rows[2] = rows[0]
    longest = torch.zeros(B, dtype=torch.long)
    longest.scatter_reduce_(0, rows, lengths, reduce="amax")
    beyond = torch.arange(S).unsqueeze(0) >= longest.unsqueeze(1)  # (B, S)
    k_cache[beyond] = float("nan")
    v_cache[beyond] = float("nan")
    return q, k_cache.cuda(), v_cache.cuda(), rows.to("cuda", torch.int32), lengths.to("cuda", torch.int32)


def launch_configs(N, H, Hkv, S):
    """(num_splits, threads, keys_per_iter) to test: the dispatcher's default (None) and every split count it
    may pick for this cache length, plus every thread / key count an autotuner may set."""
    most = max_keys_per_iter(H, Hkv)
    splits = sorted({1, 2, 3, 5, 8, 13, 32, max_num_splits(S), A.MAX_SPLITS}
                    | {default_num_splits(n, H, Hkv, S, "cuda") for n in (1, 2, 4, 8, 16, 32, 64, 128, N)})
    configs = [(None, None, None)] + [(s, None, None) for s in splits]
    for threads in (32, 64, 96, 128, 256):
        for keys in [k for k in A.KEYS_PER_ITER if k <= most]:
            configs.append((1, threads, keys))
            configs.append((7, threads, keys))
    return configs


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("S", [33, 2048])
@pytest.mark.parametrize("H,Hkv,hd", HEAD_SHAPES)
@pytest.mark.parametrize("N", [1, 2, 3, 17, 64, 128])
def test_attention_kernel(N, H, Hkv, hd, S, dtype):
    q, k_cache, v_cache, rows, lengths = attention_case(N, H, Hkv, hd, S, dtype, seed=N * 31 + hd + S)
    kb, vb, qb = bits(k_cache).clone(), bits(v_cache).clone(), bits(q).clone()
    gold = attention_gold(q, k_cache, v_cache, rows, lengths)
    ref = decode_attention_ref(q, k_cache, v_cache, rows, lengths, torch.empty_like(q))
    err_ref = max_err(ref, gold)
    vmax = torch.nan_to_num(v_cache.double(), nan=0.0).abs().max().item()
    floor = 1e-5 * vmax  # fp32 summation-order noise, far below one bf16/fp16 ulp of the outputs
    rtol = 2 * torch.finfo(dtype).eps  # kernel vs reference: at most one rounding apart
    ws = attention_workspace(N, H, hd, A.MAX_SPLITS, "cuda")
    out = torch.empty_like(q)
    assert A._attention_kernel_applies(q, k_cache, v_cache, rows, lengths, out, ws)
    for num_splits, threads, keys in launch_configs(N, H, Hkv, S):
        out.fill_(float("nan"))
        ws.fill_(float("nan"))  # stale partials must not matter
        decode_attention(q, k_cache, v_cache, rows, lengths, out, workspace=ws, num_splits=num_splits,
                         threads=threads, keys_per_iter=keys)
        cfg = f"num_splits={num_splits} threads={threads} keys_per_iter={keys}"
        assert torch.isfinite(out).all(), cfg
        err = max_err(out, gold)
        assert err <= 2 * err_ref + floor, f"{cfg}: error {err:.3g} vs reference {err_ref:.3g}"
        assert ((out.double() - ref.double()).abs() <= rtol * ref.double().abs() + floor).all(), cfg
    assert torch.equal(bits(k_cache), kb) and torch.equal(bits(v_cache), vb) and torch.equal(bits(q), qb)


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("lengths_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("num_splits", [1, 4])
def test_attention_kernel_empty_and_clamped_rows(num_splits, lengths_dtype):
    # length 0 or negative -> zeros; length > S -> S; cache row out of range -> treated as length 0.
    N, H, Hkv, hd, S = 6, 8, 2, 128, 300
    q, k_cache, v_cache, rows, _ = attention_case(N, H, Hkv, hd, S, torch.bfloat16, seed=9)
    k_cache, v_cache = torch.nan_to_num(k_cache), torch.nan_to_num(v_cache)
    lengths = torch.tensor([0, -5, S + 7, 10, 10, 1], device="cuda", dtype=lengths_dtype)
    rows = torch.tensor([0, 1, 0, k_cache.shape[0], -1, 1], device="cuda", dtype=torch.int64)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k_cache, v_cache, rows, lengths, out, num_splits=num_splits)
    assert torch.equal(out[[0, 1, 3, 4]], torch.zeros_like(out[[0, 1, 3, 4]]))
    ok = [2, 5]
    ref = decode_attention_ref(q[ok], k_cache, v_cache, rows[ok], lengths[ok], torch.empty_like(q[ok]))
    gold = attention_gold(q[ok], k_cache, v_cache, rows[ok], lengths[ok])
    assert max_err(out[ok], gold) <= 2 * max_err(ref, gold) + 1e-5 * v_cache.double().abs().max().item()


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("num_splits", [1, 4])
def test_attention_kernel_propagates_nan_in_read_slots(num_splits):
    # A NaN the row does read (slot < length) poisons the heads of that KV head, as in the reference.
    N, H, Hkv, hd, S = 3, 8, 2, 64, 500
    q, k_cache, v_cache, rows, lengths = attention_case(N, H, Hkv, hd, S, torch.bfloat16, seed=13)
    rows = torch.tensor([0, 1, 1], device="cuda", dtype=torch.int32)
    lengths = torch.tensor([400, 300, 450], device="cuda", dtype=torch.int32)
    k_cache, v_cache = torch.nan_to_num(k_cache), torch.nan_to_num(v_cache)
    k_cache[1, 350, 1, 5] = float("nan")  # read by row 2 only (row 1 stops at 300), KV head 1 = heads 4..7
    out = torch.empty_like(q)
    decode_attention(q, k_cache, v_cache, rows, lengths, out, num_splits=num_splits)
    ref = decode_attention_ref(q, k_cache, v_cache, rows, lengths, torch.empty_like(q))
    assert torch.isnan(out[2, 4:]).all() and torch.isnan(ref[2, 4:]).all()
    assert torch.isfinite(out[:2]).all() and torch.isfinite(out[2, :4]).all()


@pytest.mark.cuda
@needs_kernels
def test_attention_workspace_capacity():
    # An explicit num_splits beyond the workspace is an error; the default is capped by it instead.
    N, H, Hkv, hd, S = 2, 32, 8, 64, 2048
    q, k_cache, v_cache, rows, lengths = attention_case(N, H, Hkv, hd, S, torch.bfloat16, seed=12)
    small = attention_workspace(N, H, hd, 2, "cuda")
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match="workspace holds 2 splits"):
        decode_attention(q, k_cache, v_cache, rows, lengths, out, workspace=small, num_splits=8)
    assert default_num_splits(N, H, Hkv, S, "cuda") > 2
    out.fill_(float("nan"))
    decode_attention(q, k_cache, v_cache, rows, lengths, out, workspace=small)  # runs with 2 splits
    gold = attention_gold(q, k_cache, v_cache, rows, lengths)
    ref = decode_attention_ref(q, k_cache, v_cache, rows, lengths, torch.empty_like(q))
    vmax = torch.nan_to_num(v_cache.double(), nan=0.0).abs().max().item()
    assert max_err(out, gold) <= 2 * max_err(ref, gold) + 1e-5 * vmax


@pytest.mark.cuda
@needs_kernels
def test_attention_dispatch_falls_back_to_reference():
    N, H, Hkv, S = 3, 4, 2, 20
    for hd, dtype, shift in ((12, torch.bfloat16, 0), (16, torch.float32, 0), (16, torch.bfloat16, 1)):
        q, k_cache, v_cache, rows, lengths = attention_case(N, H, Hkv, hd, S, dtype, seed=hd)
        if shift:  # contiguous but not 16-byte aligned
            buf = torch.empty(q.numel() + shift, device="cuda", dtype=dtype)
            buf[shift:].copy_(q.flatten())
            q = buf[shift:].view(q.shape)
        out = torch.empty_like(q)
        assert not A._attention_kernel_applies(q, k_cache, v_cache, rows, lengths, out, None)
        decode_attention(q, k_cache, v_cache, rows, lengths, out)
        expect = decode_attention_ref(q, k_cache, v_cache, rows, lengths, torch.empty_like(q))
        assert torch.equal(out, expect)


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("H,Hkv,hd,S", [(32, 8, 64, 2048), (8, 2, 128, 33)], ids=["backbone", "depth"])
def test_graph_capture_and_no_allocations(H, Hkv, hd, S):
    N, B = 3, 4
    dtype = torch.bfloat16
    g = gen(10)
    qkv = torch.randn(N, (H + 2 * Hkv) * hd, generator=g).to("cuda", dtype)
    inv_freq = rope_inv_freq(hd, 500_000.0, SCALING).cuda()
    k_cache = torch.randn(B, S, Hkv, hd, generator=g).to("cuda", dtype)
    v_cache = torch.randn(B, S, Hkv, hd, generator=g).to("cuda", dtype)
    rows = torch.tensor([1, 3, 1], device="cuda", dtype=torch.int32)
    positions = torch.tensor([S // 2, S - 1, 0], device="cuda")
    lengths = (positions + 1).int()
    q, out = torch.empty(N, H, hd, device="cuda", dtype=dtype), torch.empty(N, H, hd, device="cuda", dtype=dtype)
    ws = attention_workspace(N, H, hd, max_num_splits(S), "cuda")
    if S > 128:
        assert default_num_splits(N, H, Hkv, S, "cuda") > 1  # the capture covers the combine kernel too

    def step():
        rope_append(qkv, positions, rows, inv_freq, k_cache, v_cache, q)
        decode_attention(q, k_cache, v_cache, rows, lengths, out, workspace=ws)

    assert_allocates_nothing(step, repeats=1, warm_up_on_side_stream=True)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # New inputs in place, then the same step eagerly on copies and by replay on the originals.
    qkv.copy_(torch.randn(qkv.shape, generator=g).to("cuda", dtype))
    positions.copy_(torch.tensor([S // 3, 1, S - 2]))
    lengths.copy_(positions + 1)
    k_copy, v_copy = k_cache.clone(), v_cache.clone()
    q_e, out_e = torch.empty_like(q), torch.empty_like(out)
    rope_append(qkv, positions, rows, inv_freq, k_copy, v_copy, q_e)
    decode_attention(q_e, k_copy, v_copy, rows, lengths, out_e, workspace=ws)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(q, q_e) and torch.equal(out, out_e)  # same kernels, same launch: bit for bit
    assert torch.equal(k_cache, k_copy) and torch.equal(v_cache, v_copy)
    gold = attention_gold(q, k_cache, v_cache, rows, lengths)
    ref = decode_attention_ref(q, k_cache, v_cache, rows, lengths, torch.empty_like(q))
    assert max_err(out, gold) <= 2 * max_err(ref, gold) + 1e-5 * v_cache.double().abs().max().item()


# ---------------------------------------------------------------------------------------------- fused, short caches

SHORT_HEAD_SHAPES = [(8, 2, 128), (32, 8, 64), (4, 4, 16), (6, 2, 32), (8, 1, 48)]


def short_case(N, H, Hkv, hd, S, dtype, seed):
    """Rows on distinct cache rows (one unused), positions anywhere in [0, S), lengths mostly position + 1 but
    also shorter (the new slot not attended), longer (cached slots beyond it) and clamped; NaN in every slot
    no row may read (beyond its length, except the one it writes)."""
    g = gen(seed)
    B = N + 1
    qkv = (torch.randn(N, (H + 2 * Hkv) * hd, generator=g) * 2).to(dtype)
    rows = torch.randperm(B, generator=g)[:N]
    positions = torch.randint(0, S, (N,), generator=g)
    positions[0] = S - 1
    lengths = positions + 1
    for i, delta in zip(range(1, N), (0, -1, 2, S + 5, 0, 1)):
        lengths[i] = max(0, min(S, int(positions[i]) + 1 + delta)) if delta != S + 5 else S + 5
    k_cache = torch.randn(B, S, Hkv, hd, generator=g).to(dtype)
    v_cache = (torch.randn(B, S, Hkv, hd, generator=g) * 2).to(dtype)
    read = torch.zeros(B, S, dtype=torch.bool)
    for r, L in zip(rows.tolist(), lengths.clamp(0, S).tolist()):
        read[r, :L] = True
    k_cache[~read] = float("nan")
    v_cache[~read] = float("nan")
    inv_freq = rope_inv_freq(hd, 500_000.0, SCALING).cuda()
    return (qkv.cuda(), positions.cuda(), rows.to("cuda", torch.int32), lengths.to("cuda", torch.int32), inv_freq,
            k_cache.cuda(), v_cache.cuda())


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("S", [1, 33, 64])
@pytest.mark.parametrize("H,Hkv,hd", SHORT_HEAD_SHAPES)
@pytest.mark.parametrize("N", [1, 2, 3, 7, 17, 64, 130])
def test_fused_short_attention_kernel(N, H, Hkv, hd, S, dtype):
    case = short_case(N, H, Hkv, hd, S, dtype, seed=N * 13 + hd + S)
    qkv, pos, rows, lengths, inv_freq, k0, v0 = case
    # The rotation and the cache writes must be rope_append's kernel's, bit for bit (that kernel is checked against
    # float64 above); the attention is then checked against float64 on those rounded q and caches, with the
    # reference's error on the same inputs as the yardstick. (Against a float64 gold of the whole op, the kernel
    # and the reference both carry one q/k rounding of similar size, so their max errors compare by chance.)
    tk, tv = k0.clone(), v0.clone()
    q2 = torch.empty(N, H, hd, device="cuda", dtype=dtype)
    rope_append(qkv, pos, rows, inv_freq, tk, tv, q2)
    two = decode_attention(q2, tk, tv, rows, lengths, torch.empty_like(q2))
    gold = attention_gold(q2, tk, tv, rows, lengths)
    ref = decode_attention_ref(q2, tk, tv, rows, lengths, torch.empty_like(q2))
    err_ref = max_err(ref, gold)
    vmax = torch.nan_to_num(v0.double(), nan=0.0).abs().max().item() + qkv.double().abs().max().item()
    floor = 1e-5 * vmax
    rtol = 2 * torch.finfo(dtype).eps
    out = torch.empty(N, H, hd, device="cuda", dtype=dtype)
    assert SA._short_kernel_applies(qkv, pos, rows, lengths, inv_freq, k0, v0, out)
    rep = H // Hkv
    for hpb in [None] + [d for d in range(1, rep + 1) if rep % d == 0]:
        for threads in (None, 32, 256):
            k_cache, v_cache = k0.clone(), v0.clone()
            out.fill_(float("nan"))
            rope_append_attention(qkv, pos, rows, lengths, inv_freq, k_cache, v_cache, out, heads_per_block=hpb,
                                  threads=threads)
            cfg = f"heads_per_block={hpb} threads={threads}"
            assert torch.isfinite(out).all(), cfg
            err = max_err(out, gold)
            assert err <= 2 * err_ref + floor, f"{cfg}: error {err:.3g} vs reference {err_ref:.3g}"
            assert ((out.double() - two.double()).abs() <= rtol * two.double().abs() + floor).all(), cfg
            assert torch.equal(bits(k_cache), bits(tk)) and torch.equal(bits(v_cache), bits(tv)), cfg


@pytest.mark.cuda
@needs_kernels
def test_fused_short_attention_out_of_range_rows_and_positions():
    N, H, Hkv, hd, S = 4, 8, 2, 32, 10
    qkv, _, _, _, inv_freq, k_cache, v_cache = short_case(N, H, Hkv, hd, S, torch.bfloat16, seed=9)
    k_cache, v_cache = torch.nan_to_num(k_cache), torch.nan_to_num(v_cache)
    B = k_cache.shape[0]
    rows = torch.tensor([B, -1, 0, 1], device="cuda", dtype=torch.int32)
    pos = torch.tensor([2, 2, S, -1], device="cuda")
    lengths = torch.tensor([3, 3, 4, 5], device="cuda", dtype=torch.int32)
    k0, v0 = k_cache.clone(), v_cache.clone()
    out = torch.full((N, H, hd), float("nan"), device="cuda", dtype=torch.bfloat16)
    rope_append_attention(qkv, pos, rows, lengths, inv_freq, k_cache, v_cache, out)
    assert torch.equal(k_cache, k0) and torch.equal(v_cache, v0)  # nothing written
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))  # no cache row: L = 0
    q = torch.empty_like(out)
    rope_append(qkv, pos, rows, inv_freq, k0.clone(), v0.clone(), q)
    expect = decode_attention(q[2:], k0, v0, rows[2:], lengths[2:], torch.empty_like(q[2:]))
    assert torch.allclose(out[2:].float(), expect.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.cuda
@needs_kernels
def test_fused_short_attention_graph_capture_and_no_allocations():
    N, H, Hkv, hd, S = 3, 8, 2, 128, 33
    qkv, pos, rows, lengths, inv_freq, k_cache, v_cache = short_case(N, H, Hkv, hd, S, torch.bfloat16, seed=11)
    k_cache, v_cache = torch.nan_to_num(k_cache), torch.nan_to_num(v_cache)
    out = torch.empty(N, H, hd, device="cuda", dtype=torch.bfloat16)
    producer = torch.empty_like(qkv)

    def step():  # qkv comes from the kernel right before, as in the engine
        producer.copy_(qkv)
        rope_append_attention(producer, pos, rows, lengths, inv_freq, k_cache, v_cache, out)

    assert_allocates_nothing(step, repeats=1, warm_up_on_side_stream=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    qkv.copy_(torch.randn(qkv.shape, generator=gen(12)).to("cuda", torch.bfloat16))
    k_copy, v_copy = k_cache.clone(), v_cache.clone()
    expect = rope_append_attention(qkv, pos, rows, lengths, inv_freq, k_copy, v_copy, torch.empty_like(out))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expect) and torch.equal(k_cache, k_copy) and torch.equal(v_cache, v_copy)

"""The persistent depth decoder (ops.depth_decoder): argument checks on CPU; on GPU the kernel against its PyTorch
reference on random stacks of awkward shapes (odd vocabularies, dims that leave partial weight chunks, rows that
share a weight row across warps, grids of the minimum size), step by step under teacher forcing, and its draws
against the reference sampler on its own logits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from seseme_cli.ops.depth_decoder import depth_steps, depth_steps_ref, kernel_applies
from seseme_cli.ops.kernels import has_cuda_kernels
from seseme_cli.ops.sampling import sample_topk_philox_ref

cuda = pytest.mark.skipif(not has_cuda_kernels(), reason="needs a GPU and the CUDA-built kernels")


def random_stack(*, layers, dim, heads, kv_heads, head_dim, ffn, vocab, K, cache_len, cache_batch, dtype, device,
                 seed=0):
    """A depth stack, heads and embedding table with activations of order one (weights ~ N(0, 1/k))."""
    g = torch.Generator().manual_seed(seed)

    def w(rows, k):
        return (torch.randn(rows, k, generator=g) / k ** 0.5).to(device, dtype)

    def norm(k):
        return (1 + 0.1 * torch.randn(k, generator=g)).to(device, dtype)

    q, kv = heads * head_dim, kv_heads * head_dim
    stack = SimpleNamespace(
        layers=[SimpleNamespace(attn_norm=norm(dim), wqkv=w(q + 2 * kv, dim), wo=w(dim, q), mlp_norm=norm(dim),
                                w_gate_up=w(2 * ffn, dim), w_down=w(dim, ffn),
                                k_cache=torch.zeros(cache_batch, cache_len, kv_heads, head_dim, device=device,
                                                    dtype=dtype),
                                v_cache=torch.zeros(cache_batch, cache_len, kv_heads, head_dim, device=device,
                                                    dtype=dtype))
                for _ in range(layers)],
        norm=norm(dim),
        inv_freq=(1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)).to(device),
        eps=1e-5,
    )
    # The heads as the engine keeps them: views of storage padded by a few vocab rows (strided between heads).
    padded = torch.randn(K - 1, vocab + 5, dim, generator=g) / dim ** 0.5
    heads_t = padded.to(device, dtype)[:, :vocab]
    embed = torch.randn(K * vocab, dim, generator=g).to(device, dtype)
    for layer in stack.layers:  # slots 0 and 1 as depth step 0 would have left them
        for cache in (layer.k_cache, layer.v_cache):
            cache[:, :2] = torch.randn(cache[:, :2].shape, generator=g).to(device, dtype)
    return stack, heads_t, embed


def call_args(stack, n, K, vocab, dim, heads, head_dim, ffn, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    q, kv = heads * head_dim, stack.layers[0].k_cache.shape[2] * head_dim
    return dict(
        h=torch.randn(n, dim, generator=g).to(device, dtype),
        codes=torch.full((K, n + 1), -1, dtype=torch.long, device=device),
        temperature=torch.linspace(0.7, 1.1, n).to(device),
        topk=torch.tensor([50, 1, 0, 7][:n], dtype=torch.int32, device=device),
        seeds=torch.arange(n, dtype=torch.long, device=device) + 11,
        counters=torch.arange(n, dtype=torch.long, device=device) * 3,
        qkv=torch.empty(n + 1, q + 2 * kv, device=device, dtype=dtype),
        attn=torch.empty(n + 1, heads, head_dim, device=device, dtype=dtype),
        act=torch.empty(n + 1, ffn, device=device, dtype=dtype),
        logits=torch.full((K, n, vocab), float("nan"), device=device, dtype=dtype),
        barrier=torch.zeros(2, dtype=torch.int32, device=device),
    )


def clone_state(stack, args):
    stack2 = SimpleNamespace(**vars(stack))
    stack2.layers = [SimpleNamespace(**vars(l)) for l in stack.layers]
    for l in stack2.layers:
        l.k_cache, l.v_cache = l.k_cache.clone(), l.v_cache.clone()
    return stack2, {k: v.clone() for k, v in args.items()}


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_bad_arguments_are_value_errors_naming_them():
    shape = dict(layers=1, dim=32, heads=4, kv_heads=2, head_dim=16, ffn=64, vocab=50, K=6, cache_len=8,
                 cache_batch=2, dtype=torch.float32, device="cpu")
    stack, heads, embed = random_stack(**shape)
    args = call_args(stack, 2, 6, 50, 32, 4, 16, 64, "cpu", torch.float32)
    rest = {k: v for k, v in args.items() if k not in ("h", "codes", "temperature", "topk", "seeds", "counters")}
    positional = [args["h"], args["codes"], args["temperature"], args["topk"], args["seeds"], args["counters"]]
    with pytest.raises(ValueError, match="first_step"):
        depth_steps(stack, heads, embed, *positional, 0, **rest)
    with pytest.raises(ValueError, match="embed"):
        depth_steps(stack, heads, embed[:-1], *positional, 2, **rest)
    with pytest.raises(ValueError, match="topk"):
        depth_steps(stack, heads, embed, *positional[:3], args["topk"].long(), *positional[4:], 2, **rest)
    with pytest.raises(ValueError, match="barrier"):
        depth_steps(stack, heads, embed, *positional, 2, **{**rest, "barrier": torch.zeros(3, dtype=torch.int32)})
    with pytest.raises(ValueError, match="logits"):
        depth_steps(stack, heads, embed, *positional, 2, **{**rest, "logits": rest["logits"][:, :1]})
    # Scratch shaped for another stack: the kernel would take its widths for the weights' (a 2-D attn, a wider act)
    with pytest.raises(ValueError, match="attn"):
        depth_steps(stack, heads, embed, *positional, 2, **{**rest, "attn": rest["attn"].flatten(1)})
    with pytest.raises(ValueError, match="act"):
        depth_steps(stack, heads, embed, *positional, 2, **{**rest, "act": torch.zeros(2, 72)})
    with pytest.raises(ValueError, match="qkv"):
        depth_steps(stack, heads, embed, *positional, 2, **{**rest, "qkv": rest["qkv"].double()})


def test_on_cpu_the_reference_runs_and_writes_only_the_steps_asked():
    shape = dict(layers=2, dim=32, heads=4, kv_heads=2, head_dim=16, ffn=64, vocab=50, K=6, cache_len=8,
                 cache_batch=3, dtype=torch.float32, device="cpu")
    stack, heads, embed = random_stack(**shape)
    args = call_args(stack, 2, 6, 50, 32, 4, 16, 64, "cpu", torch.float32)
    assert not kernel_applies(stack, heads, embed, args["h"], args["codes"], 3, args["logits"], None)
    depth_steps(stack, heads, embed, args["h"], args["codes"], args["temperature"], args["topk"], args["seeds"],
                args["counters"], 3, **{k: args[k] for k in ("qkv", "attn", "act", "logits", "barrier")})
    codes = args["codes"]
    assert (codes[:3] == -1).all() and (codes[3:, :2] >= 0).all() and (codes[3:, :2] < 50).all()
    assert (codes[:, 2] == -1).all()  # a column past the rows is not touched
    assert torch.isnan(args["logits"][:3]).all() and not torch.isnan(args["logits"][3:]).any()
    # the caches' slots 3..5 were written for the two rows, not for the third cache row
    assert stack.layers[0].k_cache[:2, 3:6].abs().sum(dim=(-1, -2)).gt(0).all()
    assert not stack.layers[0].k_cache[2, 3:].any()


SHAPES = [
    # (layers, dim, heads, kv_heads, head_dim, ffn, vocab, K, n, blocks)
    (2, 200, 6, 2, 32, 328, 777, 7, 1, None),   # partial weight chunks, odd vocab, 3 query heads per KV head
    (1, 200, 6, 2, 32, 4096, 333, 5, 3, None),  # the down projection split across 4 warps of a block
    (3, 96, 4, 4, 16, 200, 2051, 9, 4, 16),     # the smallest grid (heads x rows blocks): several passes per phase
    (4, 1024, 8, 2, 128, 8192, 2051, 32, 2, None),  # CSM-1B's depth decoder
]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layers,dim,heads,kv_heads,head_dim,ffn,vocab,K,n,blocks", SHAPES)
def test_kernel_matches_reference_step_by_step_under_teacher_forcing(layers, dim, heads, kv_heads, head_dim, ffn,
                                                                     vocab, K, n, blocks, dtype):
    stack, heads_t, embed = random_stack(layers=layers, dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                         ffn=ffn, vocab=vocab, K=K, cache_len=K + 1, cache_batch=n + 1, dtype=dtype,
                                         device="cuda")
    args = call_args(stack, n, K, vocab, dim, heads, head_dim, ffn, "cuda", dtype)
    forced = torch.randint(0, vocab, (K, n + 2), generator=torch.Generator().manual_seed(5)).cuda()
    ref_stack, ref_args = clone_state(stack, args)
    assert kernel_applies(stack, heads_t, embed, args["h"], args["codes"], 2, args["logits"], forced)

    def run(fn, st, a):
        fn(st, heads_t, embed, a["h"], a["codes"], a["temperature"], a["topk"], a["seeds"], a["counters"], 2,
           qkv=a["qkv"], attn=a["attn"], act=a["act"], logits=a["logits"], barrier=a["barrier"], forced=forced,
           blocks=blocks)

    with torch.no_grad():
        run(depth_steps, stack, args)
        run(depth_steps_ref, ref_stack, ref_args)
    torch.cuda.synchronize()
    errors = [rel_err(args["logits"][i], ref_args["logits"][i]) for i in range(2, K)]
    print(f"per-step logits, kernel vs reference ({dtype}): max relative error {max(errors):.2e}")
    assert max(errors) < (2e-2 if dtype == torch.bfloat16 else 4e-3)
    assert torch.equal(args["codes"][2:, :n], forced[2:, :n]) and (args["codes"][:2] == -1).all()
    assert (args["codes"][:, n] == -1).all()
    assert int(args["barrier"][0]) == 0  # the arrival count is left zero (the generation word moves on)
    for layer, ref_layer in zip(stack.layers, ref_stack.layers):
        for cache, ref_cache in ((layer.k_cache, ref_layer.k_cache), (layer.v_cache, ref_layer.v_cache)):
            assert rel_err(cache[:n, 2:K], ref_cache[:n, 2:K]) < 2e-2
            assert torch.equal(cache[n:], ref_cache[n:]) and torch.equal(cache[:, K:], ref_cache[:, K:])


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("n", [1, 2, 4])
def test_the_kernels_draws_are_the_reference_samplers_on_its_own_logits(n):
    # Without forcing, every code is the draw of ops.sampling's reference on the logits the kernel wrote for that
    # step (per-row settings: top-k 50, greedy, all, 7), and each next step's input is that code's embedding; a
    # second launch with the same state, its logits in one (n, V) buffer as the engine passes them, gives the same
    # codes (no race between blocks).
    K, vocab, dim = 12, 2051, 256
    stack, heads_t, embed = random_stack(layers=2, dim=dim, heads=8, kv_heads=2, head_dim=32, ffn=512, vocab=vocab,
                                         K=K, cache_len=K + 1, cache_batch=n, dtype=torch.bfloat16, device="cuda")
    args = call_args(stack, n, K, vocab, dim, 8, 32, 512, "cuda", torch.bfloat16)
    again_stack, again = clone_state(stack, args)
    again["logits"] = again["logits"][0].clone()  # (n, V): every step's logits in turn
    with torch.no_grad():
        for st, a in ((stack, args), (again_stack, again)):
            depth_steps(st, heads_t, embed, a["h"], a["codes"], a["temperature"], a["topk"], a["seeds"],
                        a["counters"], 2, qkv=a["qkv"], attn=a["attn"], act=a["act"], logits=a["logits"],
                        barrier=a["barrier"])
    for i in range(2, K):
        expected = sample_topk_philox_ref(args["logits"][i], args["temperature"], args["topk"], args["seeds"],
                                          args["counters"], i)
        assert torch.equal(args["codes"][i, :n], expected), f"step {i}"
    assert torch.equal(args["codes"], again["codes"])
    assert not torch.isnan(args["logits"][2:]).any()

"""Decode linear layers: references against float64 on CPU; every kernel variant against float64 on GPU, with
the error of PyTorch's own computation in the same dtype as the yardstick."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_allocates_nothing
from seseme_cli.ops.kernels import has_cuda_kernels, kernels_module
from seseme_cli.ops.linear import _kernel_applies, linear, linear_ref, norm_fuses, swiglu_linear, swiglu_linear_ref
from seseme_cli.ops.linear_config import (LinearConfig, config_error, default_config, linear_workspace,
                                          linear_workspace_bytes)
from seseme_cli.ops.rmsnorm import rms_norm, rms_norm_ref

# (m, k) of every linear layer in CSM-1B: backbone qkv, o, gate_up, down, codebook-0 head, projection;
# depth decoder qkv, o, gate_up, down, audio head.
MODEL_SHAPES = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (2051, 2048), (1024, 2048),
                (1536, 1024), (1024, 1024), (16384, 1024), (1024, 8192), (2051, 1024)]
NS = [1, 2, 3, 5, 8, 9, 16, 17, 33, 64]
# awkward (m, k): 1 row, 7 rows, m not a tile multiple, k not a multiple of 64 (or of 256 for the GEMV steps)
SHAPES = [(1, 8), (7, 64), (1000, 1000), (2051, 1024), (3072, 2048), (1, 2048), (7, 1000), (1000, 8), (2051, 64)]
DTYPES = [torch.bfloat16, torch.float16]


def make(n, m, k, dtype, device, seed=0, residual=False, swiglu=False):
    """Random, never-zero inputs with O(1) outputs (drawn on the device: fast)."""
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(generator=g, device=device)
    x = torch.randn(n, k, **kw) + 0.1
    w = torch.randn(2 * m if swiglu else m, k, **kw) / k**0.5
    r = torch.randn(n, m, **kw) if residual else None
    to = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return to(x), to(w), to(r)


def gold(x, w, residual=None, swiglu=False):
    """float64 on the inputs' device."""
    y = x.double() @ w.double().T
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up
    return y if residual is None else y + residual.double()


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("n,m,k", [(1, 7, 8), (5, 33, 1000), (3, 1, 20)])
def test_reference_matches_float64(n, m, k, with_residual):
    x, w, r = make(n, m, k, torch.float64, "cpu", residual=with_residual)
    torch.testing.assert_close(linear_ref(x, w, residual=r), gold(x, w, r), rtol=1e-12, atol=1e-12)
    x, w, r = make(n, m, k, torch.float32, "cpu", residual=with_residual)
    torch.testing.assert_close(linear_ref(x, w, residual=r).double(), gold(x, w, r), rtol=1e-5, atol=1e-5)
    x, w, _ = make(n, m, k, torch.float32, "cpu", swiglu=True)
    torch.testing.assert_close(swiglu_linear_ref(x, w).double(), gold(x, w, swiglu=True), rtol=1e-5, atol=1e-5)


def test_reference_bf16_rounds_like_the_model():
    # The model computes x + o_proj(h) and act(gate(h)) * up(h), each op rounded to bf16.
    x, w, r = make(4, 64, 128, torch.bfloat16, "cpu", residual=True)
    assert torch.equal(linear_ref(x, w, residual=r), r + F.linear(x, w))
    x, w, _ = make(4, 64, 128, torch.bfloat16, "cpu", swiglu=True)
    assert torch.equal(swiglu_linear_ref(x, w), F.silu(F.linear(x, w[:64])) * F.linear(x, w[64:]))
    ref = swiglu_linear_ref(x, w)
    assert max_err(ref, gold(x, w, swiglu=True)) <= 4 * 2**-8 * gold(x, w, swiglu=True).abs().max()


def test_dispatch_on_cpu_uses_reference_and_out_buffers():
    x, w, r = make(3, 64, 128, torch.bfloat16, "cpu", residual=True)
    assert torch.equal(linear(x, w), linear_ref(x, w))
    out = torch.full((3, 64), float("nan"), dtype=torch.bfloat16)
    assert linear(x, w, out, r) is out and torch.equal(out, linear_ref(x, w, residual=r))
    expect = linear_ref(x, w, residual=r)
    assert linear(x, w, out=r, residual=r) is r and torch.equal(r, expect)  # in place
    y = linear(x.view(3, 1, 128), w)  # leading dims are kept
    assert y.shape == (3, 1, 64) and torch.equal(y.view(3, 64), linear_ref(x, w))
    xs, ws, _ = make(2, 32, 128, torch.bfloat16, "cpu", swiglu=True)
    out = torch.empty(2, 32, dtype=torch.bfloat16)
    assert swiglu_linear(xs, ws, out) is out and torch.equal(out, swiglu_linear_ref(xs, ws))
    assert linear(x[:0], w).shape == (0, 64)


def test_readable_errors():
    x, w, r = make(3, 64, 128, torch.bfloat16, "cpu", residual=True)
    with pytest.raises(ValueError, match="weight"):
        linear(x, w[:, :64])
    with pytest.raises(ValueError, match="weight is"):
        linear(x, w.float())
    with pytest.raises(ValueError, match="residual must be"):
        linear(x, w, residual=r[:2])
    with pytest.raises(ValueError, match="out must be"):
        linear(x, w, out=torch.empty(3, 63, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        linear(x, w, out=torch.empty(3, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="even number of rows"):
        swiglu_linear(x, w[:63])
    buf = torch.empty(3 * 128 + 3 * 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="must not overlap x"):
        linear(buf[: 3 * 128].view(3, 128), w, out=buf[100 : 100 + 192].view(3, 64))
    res = torch.randn(4 * 64).bfloat16()
    with pytest.raises(ValueError, match="residual itself"):
        linear(x, w, out=res[:192].view(3, 64), residual=res[64:].view(3, 64))
    with pytest.raises(ValueError, match="GEMV kernel takes n <= 8"):
        linear(torch.randn(9, 128).bfloat16(), w, config=LinearConfig("gemv"))
    with pytest.raises(ValueError, match="k must be a multiple of 8"):
        linear(torch.randn(3, 12).bfloat16(), torch.randn(5, 12).bfloat16(), config=LinearConfig())
    with pytest.raises(ValueError, match="unknown config fields"):
        linear(x, w, config={"warp": 4})
    with pytest.raises(ValueError, match="config must be"):
        linear(x, w, config=(0, 4, 1, 1, 8, 3))
    with pytest.raises(ValueError, match="workspace must be"):
        linear(x, w, workspace=torch.zeros(64, dtype=torch.uint8)[::2])


@pytest.mark.parametrize("n,cfg,swiglu,match", [
    (4, LinearConfig("gemv", warps=3), False, "warps must be"),
    (4, LinearConfig("gemv", warps=16), False, "warps must be"),
    (4, LinearConfig("gemv", rows=3), False, "GEMV rows"),
    (4, LinearConfig("gemv", unroll=16), False, "unroll"),
    (4, LinearConfig("gemv", rows=4, unroll=8), False, "loads in flight"),
    (4, LinearConfig("gemv", rows=2, unroll=8), True, "loads in flight"),
    (4, LinearConfig("gemv", warps=4, split_k=8), False, "split_k"),
    (4, LinearConfig("gemv", warps=4, split_k=3), False, "split_k"),
    (40, LinearConfig("mma", rows=1), True, "swiglu needs rows >= 2"),
    (40, LinearConfig("mma", rows=3), False, "MMA rows"),
    (40, LinearConfig("mma", rows=4), False, "accumulators"),
    (40, LinearConfig("mma", stages=5), False, "stages"),
    (40, LinearConfig("mma", split_k=17), False, "split_k"),
    (40, LinearConfig("mma", split_k=0), False, "split_k"),
    (65, LinearConfig("mma"), False, "n <= 64"),
    (4, LinearConfig("mma", warps=8, rows=4, stages=4), False, "shared memory"),
    (4, LinearConfig("conv"), False, "kernel must be"),
    (4, LinearConfig("torch"), True, "no SwiGLU"),
])
def test_invalid_configs_raise(n, cfg, swiglu, match):
    x, w, _ = make(n, 64, 128, torch.bfloat16, "cpu", swiglu=swiglu)
    for op in ((swiglu_linear, swiglu_linear_ref) if swiglu else (linear, linear_ref)):
        with pytest.raises(ValueError, match=match):
            op(x, w, config=cfg)


@pytest.mark.parametrize("swiglu", [False, True])
def test_default_configs_are_valid(swiglu):
    for (m, k), n, split_ok in itertools.product(MODEL_SHAPES + SHAPES, range(1, 65), (False, True)):
        if swiglu:
            m = m // 2 if m > 1 else 1
        cfg = default_config(n, m, k, swiglu, split_ok=split_ok)
        if k % 8:
            continue
        cfg.check(n, m, k, swiglu)
        assert cfg.kernel == "gemv" if n <= 4 else cfg.kernel in ("mma", "torch") if n > 8 else True
        assert cfg.kernel != "torch" or (n > 8 and not swiglu and m % 64 == 0)
        if not split_ok:
            assert linear_workspace_bytes(n, m, k, swiglu, cfg) == 0


def test_workspace_sizes():
    assert linear_workspace_bytes(1, 2048, 2048) == 0  # GEMV never needs one
    cfg = LinearConfig("mma", warps=4, rows=2, split_k=4, stages=3)
    # 16 row tiles x 4 slices x (128 threads x 2 tiles x 8 n8-tiles x 4 floats) + the counters
    assert linear_workspace_bytes(64, 2048, 2048, config=cfg) == 8192 * 4 + 16 * 4 * 128 * 2 * 8 * 4 * 4
    assert linear_workspace_bytes(64, 2048, 64, config=cfg) == 0  # one chunk of k: nothing to split
    assert linear_workspace_bytes(16, 2048, 8192) > 0  # the default with a workspace splits small m
    assert linear_workspace_bytes(16, 8192, 2048, swiglu=True) == 0  # enough row tiles
    ws = linear_workspace(16, 2048, 8192, device="cpu")
    assert ws.dtype == torch.uint8 and ws.numel() == linear_workspace_bytes(16, 2048, 8192) and not ws.any()


def all_configs(n, swiglu):
    """A sweep of launch parameters covering every compiled kernel variant that can take n rows."""
    if n <= 8:
        for rows, unroll, (warps, split) in itertools.product(
                (1, 2, 4), (2, 4, 8), ((1, 1), (2, 2), (4, 1), (4, 4), (8, 2), (8, 8))):
            yield LinearConfig("gemv", warps=warps, rows=rows, split_k=split, unroll=unroll)
    for rows, warps, stages, split in itertools.product((1, 2, 4), (1, 2, 4, 8), (2, 3, 4), (1, 3, 16)):
        yield LinearConfig("mma", warps=warps, rows=rows, split_k=split, stages=stages)
    if not swiglu:
        yield LinearConfig("torch")


@pytest.mark.skipif(kernels_module() is None, reason="the compiled module is not built")
def test_config_rules_match_the_binding():
    k_mod = kernels_module()
    count = 0
    for (m, k), n, swiglu in itertools.product([(1, 8), (1000, 1000), (2048, 8192), (7, 12), (300000, 64)],
                                               (1, 3, 8, 9, 33, 64, 65), (False, True)):
        for cfg in itertools.chain(all_configs(min(n, 8), swiglu), all_configs(n, swiglu)):
            if cfg.kernel == "torch":
                continue
            py_err = config_error(cfg, n, m, k, swiglu)
            cpp_err = k_mod.linear_config_error(n, m, k, swiglu, *cfg.codes())
            assert (py_err is None) == (cpp_err is None), (cfg, n, m, k, swiglu, py_err, cpp_err)
            assert linear_workspace_bytes(n, m, k, swiglu, cfg) == k_mod.linear_workspace_bytes(
                n, m, k, swiglu, *cfg.codes())
            count += py_err is None
    assert count > 1000


# ---------------------------------------------------------------------------------------------- GPU

cuda = pytest.mark.skipif(not has_cuda_kernels(), reason="needs a GPU and the CUDA-built kernels")


class Problem:
    """Fresh random inputs on the GPU, their float64 result and the error of PyTorch's own computation."""

    def __init__(self, n, m, k, dtype, seed, residual=False, swiglu=False):
        self.n, self.m, self.k, self.dtype, self.swiglu = n, m, k, dtype, swiglu
        self.x, self.w, self.r = make(n, m, k, dtype, "cuda", seed=seed, residual=residual, swiglu=swiglu)
        self.gold = gold(self.x, self.w, self.r, swiglu)
        ref = swiglu_linear_ref(self.x, self.w) if swiglu else linear_ref(self.x, self.w, residual=self.r)
        self.ref_err = max_err(ref, self.gold)
        self.floor = 4 * torch.finfo(torch.float32).eps * self.gold.abs().max().item()

    def check(self, config=None, workspace=None, inplace=False):
        """Run the kernel into a NaN-poisoned output (or in place on a copy of the residual); its error must be
        at most 2x PyTorch's plus a floor of a few fp32 ulps. Returns the output."""
        assert _kernel_applies(self.x, self.w, None, self.r)
        if inplace:
            out = self.r.clone()
            got = linear(self.x, self.w, out=out, residual=out, config=config, workspace=workspace)
        else:
            out = torch.full((self.n, self.m), float("nan"), dtype=self.dtype, device="cuda")
            if self.swiglu:
                got = swiglu_linear(self.x, self.w, out, config=config, workspace=workspace)
            else:
                got = linear(self.x, self.w, out, self.r, config=config, workspace=workspace)
        assert got is out
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), "the kernel left elements unwritten (NaN) or overflowed"
        err = max_err(out, self.gold)
        assert err <= 2 * self.ref_err + self.floor, f"kernel error {err:.3g} vs torch {self.ref_err:.3g}"
        return out


def check_kernel(n, m, k, dtype, seed, residual_mode="none", swiglu=False, config=None, workspace=None):
    p = Problem(n, m, k, dtype, seed, residual=residual_mode != "none", swiglu=swiglu)
    return p.check(config, workspace, inplace=residual_mode == "inplace")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["none", "residual", "inplace", "swiglu"])
@pytest.mark.parametrize("m,k", SHAPES)
@pytest.mark.parametrize("n", NS)
def test_kernel_default_config(n, m, k, mode, dtype):
    swiglu = mode == "swiglu"
    seed = n * 1_000_003 + m * 1009 + k
    check_kernel(n, m, k, dtype, seed, "none" if swiglu else mode, swiglu)
    if n > 8:  # with a workspace the default may split K
        ws = linear_workspace(n, m, k, swiglu, device="cuda")
        check_kernel(n, m, k, dtype, seed + 1, "none" if swiglu else mode, swiglu, workspace=ws)
        assert not ws[: 8192 * 4].any(), "split-K left a tile counter non-zero"


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("swiglu", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9, 16, 17, 33, 64])
def test_kernel_every_config(n, swiglu, dtype):
    # m = 1000: a partial last tile for every tile size; k = 1000: 125 packs, a partial chunk of 64 k and of
    # every GEMV step. A second, larger problem with the real k.
    ws = torch.zeros(64 << 20, dtype=torch.uint8, device="cuda")  # one workspace for everything below
    failures, ran = [], 0
    for i, (m, k) in enumerate([(1000, 1000), (2051, 2048)]):
        problem = Problem(n, m, k, dtype, seed=n * 10 + i, residual=not swiglu, swiglu=swiglu)
        for cfg in all_configs(n, swiglu):
            if config_error(cfg, n, m, k, swiglu) is not None:
                continue
            try:
                problem.check(cfg, ws, inplace=not swiglu and ran % 2 == 1)
            except AssertionError as e:
                failures.append(f"{cfg} m={m} k={k}: {e}")
            ran += 1
    assert ran > 0
    assert not failures, f"{len(failures)} of {ran} configs failed:\n" + "\n".join(failures[:20])
    assert not ws[: 8192 * 4].any(), "split-K left a tile counter non-zero"


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("n", [1, 4, 8, 16, 64])
def test_kernel_model_shapes(n):
    for i, (m, k) in enumerate(MODEL_SHAPES):
        swiglu = m == 16384
        mm = m // 2 if swiglu else m
        check_kernel(n, mm, k, torch.bfloat16, i, "none" if swiglu else "inplace", swiglu,
                     workspace=linear_workspace(n, mm, k, swiglu, device="cuda"))


@pytest.mark.cuda
@cuda
def test_fallbacks_to_reference():
    g = torch.Generator().manual_seed(5)
    # k % 8 != 0, x not 16-byte aligned, fp32: the reference runs, with the same result (n > 64 into an out is one
    # cuBLAS call instead, rounded once: test_above_the_kernels_rows_one_gemm_into_out_with_the_residual_in_place)
    cases = []
    x, w, r = make(3, 100, 1001, torch.bfloat16, "cuda", residual=True)
    cases.append((x, w, r))
    buf = torch.randn(4 * 1024 + 1, generator=g).bfloat16().cuda()
    x_unaligned = buf[1:].view(4, 1024)
    cases.append((x_unaligned, make(4, 50, 1024, torch.bfloat16, "cuda")[1], None))
    cases.append(make(3, 100, 1024, torch.float32, "cuda", residual=True))
    for x, w, r in cases:
        assert not _kernel_applies(x, w, None, r)
        out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype, device="cuda")
        linear(x, w, out, r)
        assert torch.equal(out, linear_ref(x, w, residual=r))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,f,k", [(65, 96, 1024), (200, 8192, 2048), (512, 8192, 1024)])
def test_swiglu_above_the_kernels_rows_in_one_gemm(n, f, k, dtype):
    # n > 64: no kernel; one cuBLAS GEMM for gate and up, silu and product into out (ops.linear._swiglu_one_gemm).
    x, w, _ = make(n, f, k, dtype, "cuda", seed=n, swiglu=True)
    assert not _kernel_applies(x, w, None, None)
    out = torch.full((n, f), float("nan"), dtype=dtype, device="cuda")
    assert swiglu_linear(x, w, out) is out
    ref = swiglu_linear_ref(x, w)
    xd, wd = x.double(), w.double()
    gold = F.silu(xd @ wd[:f].T) * (xd @ wd[f:].T)
    assert max_err(out, gold) <= 2 * max_err(ref, gold) + 1e-6


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("n", [65, 512])
def test_above_the_kernels_rows_one_gemm_into_out_with_the_residual_in_place(n):
    # n > 64: cuBLAS into out (ops.linear._cublas_linear): without a residual, with one, and with out = residual
    # (the engine's "h = h + W x"), which the GEMM updates in place, rounded once.
    x, w, r = make(n, 2056, 1024, torch.bfloat16, "cuda", seed=n, residual=True)
    assert not _kernel_applies(x, w, None, r)
    gold = x.double() @ w.double().T
    out = torch.full((n, 2056), float("nan"), dtype=torch.bfloat16, device="cuda")
    assert linear(x, w, out) is out
    assert max_err(out, gold) <= 2 * max_err(F.linear(x, w), gold) + 1e-6
    assert linear(x, w, out, residual=r) is out
    assert max_err(out, gold + r.double()) <= 2 * max_err(linear_ref(x, w, residual=r), gold + r.double()) + 1e-6
    h = r.clone()
    assert linear(x, w, h, residual=h) is h
    assert torch.equal(h, out)


@pytest.mark.cuda
@cuda
def test_batched_leading_dims_and_empty():
    x, w, r = make(6, 300, 512, torch.bfloat16, "cuda", residual=True)
    y = linear(x.view(2, 3, 512), w, residual=r.view(2, 3, 300))
    assert y.shape == (2, 3, 300)
    torch.testing.assert_close(y.view(6, 300), linear_ref(x, w, residual=r), rtol=2**-7, atol=2e-2)
    assert linear(x[:0], w).shape == (0, 300)


@pytest.mark.cuda
@cuda
def test_split_k_needs_a_workspace():
    x, w, _ = make(16, 2048, 2048, torch.bfloat16, "cuda")
    cfg = LinearConfig("mma", warps=4, rows=2, split_k=8, stages=4)
    with pytest.raises(ValueError, match="workspace"):
        linear(x, w, config=cfg)
    with pytest.raises(ValueError, match="workspace"):
        linear(x, w, config=cfg, workspace=torch.zeros(1024, dtype=torch.uint8, device="cuda"))


@pytest.mark.cuda
@cuda
def test_split_k_is_deterministic_and_workspace_is_shared():
    ws = torch.zeros(16 << 20, dtype=torch.uint8, device="cuda")
    problems = [(16, 2048, 2048, False), (64, 1024, 8192, False), (9, 1000, 1000, True), (33, 2051, 1024, False)]
    firsts = []
    for rep in range(3):
        for i, (n, m, k, swiglu) in enumerate(problems):
            x, w, _ = make(n, m, k, torch.bfloat16, "cuda", seed=i, swiglu=swiglu)
            cfg = LinearConfig("mma", warps=2, rows=2, split_k=16, stages=3)
            y = (swiglu_linear if swiglu else linear)(x, w, config=cfg, workspace=ws)
            if rep == 0:
                firsts.append(y)
                expect = gold(x, w, swiglu=swiglu)
                ref = (swiglu_linear_ref if swiglu else linear_ref)(x, w)
                assert max_err(y, expect) <= 2 * max_err(ref, expect) + 1e-6
            else:
                assert torch.equal(y, firsts[i])  # same bits, whichever block finished last
    assert not ws[: 8192 * 4].any()


def _graph_problems():
    x1, w1, r1 = make(1, 2048, 2048, torch.bfloat16, "cuda", seed=1, residual=True)
    x2, w2, _ = make(16, 1024, 8192, torch.bfloat16, "cuda", seed=2)
    x3, w3, _ = make(4, 1024, 1024, torch.bfloat16, "cuda", seed=3, swiglu=True)
    x4, w4, _ = make(64, 2048, 2048, torch.bfloat16, "cuda", seed=4, swiglu=True)
    x5, w5, r5 = make(32, 1024, 1024, torch.bfloat16, "cuda", seed=5, residual=True)
    nbytes = max(linear_workspace_bytes(16, 1024, 8192, device="cuda"),
                 linear_workspace_bytes(64, 2048, 2048, True, device="cuda"))
    ws = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    outs = [torch.empty(n, m, dtype=torch.bfloat16, device="cuda")
            for n, m in ((1, 2048), (16, 1024), (4, 1024), (64, 2048), (32, 1024))]
    assert default_config(32, 1024, 1024).kernel == "torch"  # cuBLAS into out is in the mix

    def step():
        linear(x1, w1, outs[0], r1)
        linear(x2, w2, outs[1], workspace=ws)
        swiglu_linear(x3, w3, outs[2])
        swiglu_linear(x4, w4, outs[3], workspace=ws)
        linear(x5, w5, outs[4], r5)

    return step, outs, [x1, x2, x3, x4, x5], ws


@pytest.mark.cuda
@cuda
def test_no_allocation_with_preallocated_buffers():
    step, outs, _, ws = _graph_problems()
    assert ws.numel() > 16  # the split-K path is in the mix
    assert_allocates_nothing(step, repeats=5)


def assert_graph_replays_eager(step, outs, xs):
    """Capture `step` (already warmed up, outputs `outs` holding its eager result), replay it into NaN-poisoned
    outputs: equal to eager; then with new inputs copied into `xs`: equal to an eager run on them."""
    eager = [o.clone() for o in outs]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for o in outs:
        o.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for o, e in zip(outs, eager):
        assert torch.equal(o, e)
    for x in xs:  # new inputs in the same buffers: the replay must see them
        x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    replayed = [o.clone() for o in outs]
    step()
    torch.cuda.synchronize()
    for o, e in zip(outs, replayed):
        assert torch.equal(o, e)


@pytest.mark.cuda
@cuda
def test_cuda_graph_capture_and_replay():
    step, outs, xs, _ = _graph_problems()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (attribute setup) outside capture, on a side stream as torch advises
        step()
    torch.cuda.current_stream().wait_stream(side)
    assert_graph_replays_eager(step, outs, xs)


# ---------------------------------------------------------------------------------------------- fused RMSNorm

EPS = 1e-5


def make_norm(n, k, dtype, device, seed=0):
    """x with a non-zero mean and varied row scales (the norm must matter), and a norm weight around 1."""
    g = torch.Generator(device=device).manual_seed(seed + 7)
    x = (torch.randn(n, k, generator=g, device=device) + 0.3) * torch.linspace(0.5, 8, n, device=device)[:, None]
    nw = 1 + 0.5 * torch.randn(k, generator=g, device=device)
    return x.to(dtype), nw.to(dtype)


def gold_norm(x, nw, eps=EPS):
    """rms_norm in float64."""
    xd = x.double()
    return nw.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("mode", ["plain", "residual", "swiglu"])
@pytest.mark.parametrize("n,m,k", [(1, 7, 8), (5, 33, 1000), (3, 1, 24)])
def test_norm_reference_matches_float64(n, m, k, mode):
    swiglu = mode == "swiglu"
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-5)):  # the norm runs in fp32 (as the model)
        x, w, r = make(n, m, k, dtype, "cpu", residual=mode == "residual", swiglu=swiglu)
        x, nw = make_norm(n, k, dtype, "cpu")
        buf = torch.full_like(x, float("nan"))
        if swiglu:
            got = swiglu_linear_ref(x, w, norm_weight=nw, norm_eps=EPS, norm_out=buf)
        else:
            got = linear_ref(x, w, residual=r, norm_weight=nw, norm_eps=EPS, norm_out=buf)
        expect = gold(gold_norm(x, nw), w.double(), None if r is None else r.double(), swiglu)
        torch.testing.assert_close(got.double(), expect, rtol=tol, atol=tol)
        torch.testing.assert_close(buf.double(), gold_norm(x, nw), rtol=tol, atol=tol)


def test_norm_reference_is_rms_norm_ref_then_linear_bf16():
    x, w, r = make(4, 64, 128, torch.bfloat16, "cpu", residual=True)
    x, nw = make_norm(4, 128, torch.bfloat16, "cpu")
    xn = rms_norm_ref(x, nw, 1e-6)
    buf = torch.empty_like(x)
    assert torch.equal(linear_ref(x, w, residual=r, norm_weight=nw, norm_eps=1e-6, norm_out=buf),
                       linear_ref(xn, w, residual=r))
    assert torch.equal(buf, xn)
    _, ws, _ = make(4, 32, 128, torch.bfloat16, "cpu", swiglu=True)
    assert torch.equal(swiglu_linear_ref(x, ws, norm_weight=nw, norm_eps=1e-6, norm_out=buf),
                       swiglu_linear_ref(xn, ws))
    # the dispatcher on CPU: the unfused path, norm_out written, nothing else allocated for it
    buf2 = torch.full_like(x, float("nan"))
    out = torch.empty(4, 64, dtype=torch.bfloat16)
    assert linear(x, w, out, r, norm_weight=nw, norm_eps=1e-6, norm_out=buf2) is out
    assert torch.equal(out, linear_ref(xn, w, residual=r)) and torch.equal(buf2, xn)
    assert torch.equal(swiglu_linear(x.view(2, 2, 128), ws, norm_weight=nw, norm_eps=1e-6,
                                     norm_out=buf2.view(2, 2, 128)).view(4, 32), swiglu_linear_ref(xn, ws))


def test_norm_argument_errors():
    x, w, r = make(3, 64, 128, torch.bfloat16, "cpu", residual=True)
    _, nw = make_norm(3, 128, torch.bfloat16, "cpu")
    buf = torch.empty_like(x)
    for op in (linear, linear_ref, swiglu_linear, swiglu_linear_ref):
        with pytest.raises(ValueError, match="needs norm_out"):
            op(x, w, norm_weight=nw)
        with pytest.raises(ValueError, match="norm_out must be"):
            op(x, w, norm_weight=nw, norm_out=torch.empty(3, 64, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="norm_out must be"):
            op(x, w, norm_weight=nw, norm_out=torch.empty(3, 128, dtype=torch.float16))
        with pytest.raises(ValueError, match="norm_out must be"):
            op(x, w, norm_weight=nw, norm_out=torch.empty(1, 3, 128, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="norm_weight must be"):
            op(x, w, norm_weight=nw[:64], norm_out=buf)
        with pytest.raises(ValueError, match="norm_weight must be"):
            op(x, w, norm_weight=nw.float(), norm_out=buf)
        with pytest.raises(ValueError, match="without norm_weight"):
            op(x, w, norm_out=buf)
        with pytest.raises(ValueError, match="norm_out must not overlap x"):
            op(x, w, norm_weight=nw, norm_out=x)
    big = torch.zeros(3 * 128 + 3 * 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="norm_out must not overlap residual"):
        linear(x, w, residual=big[:192].view(3, 64), norm_weight=nw, norm_out=big[100:484].view(3, 128))


class NormProblem:
    """Fused norm + projection against float64 of (the reference's normalised x) @ W."""

    def __init__(self, n, m, k, dtype, seed, residual=False, swiglu=False):
        self.n, self.m, self.k, self.dtype, self.swiglu = n, m, k, dtype, swiglu
        _, self.w, self.r = make(n, m, k, dtype, "cuda", seed=seed, residual=residual, swiglu=swiglu)
        self.x, self.nw = make_norm(n, k, dtype, "cuda", seed)
        self.xn = rms_norm_ref(self.x, self.nw, EPS)
        self.gold = gold(self.xn, self.w, self.r, swiglu)
        ref = self.call(self.xn, ref=True)
        self.ref_err = max_err(ref, self.gold)
        self.floor = 4 * torch.finfo(torch.float32).eps * self.gold.abs().max().item()

    def call(self, x, config=None, out=None, norm_out=None, ref=False, fused=False):
        kw = dict(norm_weight=self.nw, norm_eps=EPS, norm_out=norm_out) if fused else {}
        if self.swiglu:
            return (swiglu_linear_ref if ref else swiglu_linear)(x, self.w, out, config=config, **kw)
        return (linear_ref if ref else linear)(x, self.w, out, self.r, config=config, **kw)

    def check(self, config=None):
        out = torch.full((self.n, self.m), float("nan"), dtype=self.dtype, device="cuda")
        norm_out = torch.full_like(self.x, float("nan"))
        x_before = self.x.clone()
        assert self.call(self.x, config, out, norm_out, fused=True) is out
        torch.cuda.synchronize()
        assert torch.equal(self.x, x_before)
        assert torch.isfinite(out).all(), "the kernel left elements unwritten (NaN) or overflowed"
        err = max_err(out, self.gold)
        assert err <= 2 * self.ref_err + self.floor, f"fused error {err:.3g} vs torch {self.ref_err:.3g}"
        cfg = config or default_config(self.n, self.m, self.k, self.swiglu, split_ok=False)
        # the same kernel and config on rms_norm's output: the same bits wherever the normalised x matches
        unfused = self.call(rms_norm(self.x, self.nw, EPS), cfg)
        same = (out == unfused).double().mean().item()
        if self.n > 8 or cfg.kernel != "gemv":  # unfused path: norm_out written, results identical
            assert torch.equal(norm_out, rms_norm(self.x, self.nw, EPS)) and torch.equal(out, unfused)
        else:  # the row sums of squares add up in another order: a normalised element can differ by one ulp
            assert same >= (0.98 if self.dtype == torch.bfloat16 else 0.9), f"only {same:.4f} equal rms_norm + linear"
            assert max_err(out, unfused) <= 2 * self.ref_err + self.floor
        return out


NORM_SHAPES = [(1, 8), (7, 64), (1000, 1000), (2051, 1024), (3072, 2048), (1536, 1024), (5, 8200)]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["plain", "residual", "swiglu"])
@pytest.mark.parametrize("m,k", NORM_SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 64])
def test_norm_fused_default_config(n, m, k, mode, dtype):
    NormProblem(n, m, k, dtype, seed=n * 7919 + m + k, residual=mode == "residual", swiglu=mode == "swiglu").check()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("k", [1024, 2048, 1000])
def test_norm_fused_normalised_x_is_rms_norm(n, k, dtype):
    # With W = I the fused kernel returns its normalised x itself (one non-zero product per output, exact).
    x, nw = make_norm(n, k, dtype, "cuda", seed=n + k)
    eye = torch.eye(k, dtype=dtype, device="cuda")
    got = linear(x, eye, norm_weight=nw, norm_eps=EPS, norm_out=torch.empty_like(x))
    for expect in (rms_norm(x, nw, EPS), rms_norm_ref(x, nw, EPS)):
        diff = got != expect
        frac = diff.double().mean().item()
        assert frac <= 2e-3, f"{frac:.5f} of the normalised elements differ"
        if diff.any():  # and those by one ulp of the storage type
            ulp = torch.finfo(dtype).eps * expect[diff].double().abs()
            assert ((got[diff].double() - expect[diff].double()).abs() <= 1.01 * ulp).all()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("swiglu", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_norm_fused_every_gemv_config(n, swiglu, dtype):
    failures, ran = [], 0
    for i, (m, k) in enumerate([(1000, 1000), (300, 2056)]):
        p = NormProblem(n, m, k, dtype, seed=n * 10 + i, residual=not swiglu, swiglu=swiglu)
        for cfg in all_configs(n, swiglu):
            if cfg.kernel != "gemv" or config_error(cfg, n, m, k, swiglu) is not None:
                continue
            try:
                p.check(cfg)
            except AssertionError as e:
                failures.append(f"{cfg} m={m} k={k}: {e}")
            ran += 1
    assert ran > 0
    assert not failures, f"{len(failures)} of {ran} configs failed:\n" + "\n".join(failures[:20])


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_norm_fused_model_shapes(n):
    for i, (m, k, swiglu) in enumerate([(3072, 2048, False), (8192, 2048, True), (1536, 1024, False),
                                        (8192, 1024, True)]):
        NormProblem(n, m, k, torch.bfloat16, seed=i, swiglu=swiglu).check()


@pytest.mark.cuda
@cuda
def test_norm_unaligned_weight_and_mma_config_take_the_unfused_path():
    p = NormProblem(4, 1000, 1024, torch.bfloat16, seed=3)
    p.check(LinearConfig("mma", warps=4, rows=1))
    buf = torch.empty(1025, dtype=torch.bfloat16, device="cuda")
    nw = buf[1:]
    nw.copy_(p.nw)
    assert not norm_fuses(p.x, nw)
    p.nw = nw
    p.check()


def _norm_graph_problems():
    shapes = [(1, 3072, 2048, False), (1, 8192, 2048, True), (8, 1536, 1024, False), (3, 8192, 1024, True),
              (16, 1024, 1024, False)]
    probs, outs, norm_outs = [], [], []
    for i, (n, m, k, swiglu) in enumerate(shapes):
        probs.append(NormProblem(n, m, k, torch.bfloat16, seed=40 + i, swiglu=swiglu))
        outs.append(torch.empty(n, m, dtype=torch.bfloat16, device="cuda"))
        norm_outs.append(torch.empty(n, k, dtype=torch.bfloat16, device="cuda"))

    def step():
        for p, o, no in zip(probs, outs, norm_outs):
            p.call(p.x, out=o, norm_out=no, fused=True)

    return step, outs, [p.x for p in probs]


@pytest.mark.cuda
@cuda
def test_norm_no_allocation_and_cuda_graph():
    step, outs, xs = _norm_graph_problems()
    assert_allocates_nothing(step, warm_up_on_side_stream=True)
    assert_graph_replays_eager(step, outs, xs)

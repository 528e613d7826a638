"""Weight-only fp8 projections (ops.linear_fp8): the quantizer and the references on CPU; the fp8 GEMV kernel against
float64 on GPU, with the error of PyTorch's bf16 computation on the dequantized weight as the yardstick."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_allocates_nothing
from seseme_cli.ops.kernels import has_cuda_kernels, kernels_module
from seseme_cli.ops.linear import linear_ref, swiglu_linear_ref
from seseme_cli.ops.linear_config import LinearConfig
from seseme_cli.ops.linear_fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    _fp8_config_error,
    _kernel_applies,
    default_fp8_config,
    dequantize_fp8,
    linear_fp8,
    linear_fp8_ref,
    quantize_fp8,
    swiglu_linear_fp8,
    swiglu_linear_fp8_ref,
)
from seseme_cli.ops.rmsnorm import rms_norm_ref

# (m, k) of CSM-1B's projections (as in test_ops_linear) and awkward ones: 1 row, 7 rows, m not a multiple of any
# row group, k an odd multiple of 16 (a partial last GEMV step for every unroll), k = 16.
MODEL_SHAPES = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (2051, 2048), (1024, 2048),
                (1536, 1024), (1024, 1024), (16384, 1024), (1024, 8192), (2051, 1024)]
SHAPES = [(1, 16), (7, 48), (1000, 1008), (2051, 1024), (33, 2064), (3072, 2048), (5, 16 * 129)]


def make(n, m, k, device, seed=0, residual=False, swiglu=False, dtype=torch.bfloat16):
    """x, quantized weight (w8, scale) with rows of different magnitudes, residual (or None)."""
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(generator=g, device=device)
    rows = 2 * m if swiglu else m
    x = (torch.randn(n, k, **kw) + 0.1).to(dtype)
    w = torch.randn(rows, k, **kw) / k**0.5 * torch.exp(torch.randn(rows, 1, **kw))
    w8, scale = quantize_fp8(w)
    r = torch.randn(n, m, **kw).to(dtype) if residual else None
    return x, w8, scale, r


def gold(x, w8, scale, residual=None, swiglu=False):
    """float64 on the dequantized weight."""
    y = x.double() @ (w8.double() * scale.double()[:, None]).T
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up
    return y if residual is None else y + residual.double()


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------- CPU


def test_quantize_per_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 100, generator=g) * torch.logspace(-3, 2, 37)[:, None]
    w[5] = 0  # an all-zero row
    w8, scale = quantize_fp8(w)
    assert w8.dtype == FP8_DTYPE and w8.shape == w.shape and scale.dtype == torch.float32 and scale.shape == (37,)
    amax = w.abs().amax(dim=1)
    nz = amax > 0
    torch.testing.assert_close(scale[nz], amax[nz] / FP8_MAX)
    assert scale[5] == 1 and not w8[5].float().any()
    q = w8.float()
    assert torch.isfinite(q).all() and q.abs().max() <= FP8_MAX
    assert torch.equal(q.abs().amax(dim=1)[nz], torch.full((int(nz.sum()),), FP8_MAX))  # the max maps to 448
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals, absolute <= half the smallest subnormal step
    back = dequantize_fp8(w8, scale)
    bound = torch.maximum(w.abs() * 2**-4, scale[:, None] * 2**-10)
    assert ((back - w).abs() <= bound * (1 + 1e-6)).all()
    # leading dims: the depth heads (heads, vocab, dim) quantize per (head, row), as their 2-D slices do
    w3 = torch.randn(3, 11, 64, generator=g)
    w8_3, s3 = quantize_fp8(w3)
    assert s3.shape == (3, 11)
    for i in range(3):
        a, b = quantize_fp8(w3[i])
        assert torch.equal(w8_3[i].view(torch.uint8), a.view(torch.uint8)) and torch.equal(s3[i], b)
    # bf16 input: the scale comes from the bf16 values
    wb = w.bfloat16()
    torch.testing.assert_close(quantize_fp8(wb)[1][nz], wb.float().abs().amax(dim=1)[nz] / FP8_MAX)


def test_quantize_rows_commute_with_concatenation():
    # The engine quantizes fused matrices (q;k;v, gate;up); the reference model quantizes each: same numbers.
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 32, generator=g), torch.randn(4, 32, generator=g)
    w8, s = quantize_fp8(torch.cat([a, b]))
    (a8, sa), (b8, sb) = quantize_fp8(a), quantize_fp8(b)
    assert torch.equal(w8.view(torch.uint8), torch.cat([a8, b8]).view(torch.uint8))
    assert torch.equal(s, torch.cat([sa, sb]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,m,k", [(1, 7, 16), (5, 33, 1008), (3, 1, 24)])
def test_references_match_float64(n, m, k, dtype):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-7)
    x, w8, s, r = make(n, m, k, "cpu", residual=True, dtype=dtype)
    for res in (None, r):
        y = linear_fp8_ref(x, w8, s, residual=res)
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), gold(x, w8, s, res), **tol)
    x, w8, s, _ = make(n, m, k, "cpu", swiglu=True, dtype=dtype)
    torch.testing.assert_close(swiglu_linear_fp8_ref(x, w8, s).double(), gold(x, w8, s, swiglu=True), **tol)


def test_reference_rounds_once_and_equals_the_dequantized_linear():
    x, w8, s, r = make(4, 64, 128, "cpu", residual=True)
    w = dequantize_fp8(w8, s)  # fp32
    expect = (x.float() @ w.T + r.float()).bfloat16()
    assert torch.equal(linear_fp8_ref(x, w8, s, residual=r), expect)
    # fp32 x: exactly ops.linear's reference on the dequantized fp32 weight (the CPU engine relies on it)
    xf, rf = x.float(), r.float()
    assert torch.equal(linear_fp8_ref(xf, w8, s, residual=rf), linear_ref(xf, w, residual=rf))
    x2, w82, s2, _ = make(4, 32, 128, "cpu", swiglu=True)
    torch.testing.assert_close(swiglu_linear_fp8_ref(x2.float(), w82, s2),
                               swiglu_linear_ref(x2.float(), dequantize_fp8(w82, s2)), rtol=1e-6, atol=1e-6)


def test_fused_norm_reference():
    x, w8, s, _ = make(3, 40, 64, "cpu")
    nw = (torch.rand(64) + 0.5).bfloat16()
    xn = torch.empty_like(x)
    y = linear_fp8_ref(x, w8, s, norm_weight=nw, norm_eps=1e-5, norm_out=xn)
    assert torch.equal(xn, rms_norm_ref(x, nw, 1e-5))
    assert torch.equal(y, linear_fp8_ref(rms_norm_ref(x, nw, 1e-5), w8, s))
    # the dispatcher on CPU: the same, through ops.rmsnorm
    xn2 = torch.empty_like(x)
    assert torch.equal(linear_fp8(x, w8, s, norm_weight=nw, norm_eps=1e-5, norm_out=xn2), y)


def test_dispatch_on_cpu_uses_reference_and_out_buffers():
    x, w8, s, r = make(3, 64, 128, "cpu", residual=True)
    assert not _kernel_applies(x, w8, s, None, r)
    assert torch.equal(linear_fp8(x, w8, s), linear_fp8_ref(x, w8, s))
    out = torch.full((3, 64), float("nan"), dtype=torch.bfloat16)
    assert linear_fp8(x, w8, s, out, r) is out and torch.equal(out, linear_fp8_ref(x, w8, s, residual=r))
    expect = linear_fp8_ref(x, w8, s, residual=r)
    assert linear_fp8(x, w8, s, out=r, residual=r) is r and torch.equal(r, expect)  # in place
    y = linear_fp8(x.view(3, 1, 128), w8, s)
    assert y.shape == (3, 1, 64) and torch.equal(y.view(3, 64), linear_fp8_ref(x, w8, s))
    xs, ws, ss, _ = make(2, 32, 128, "cpu", swiglu=True)
    out = torch.empty(2, 32, dtype=torch.bfloat16)
    assert swiglu_linear_fp8(xs, ws, ss, out) is out and torch.equal(out, swiglu_linear_fp8_ref(xs, ws, ss))
    assert linear_fp8(x[:0], w8, s).shape == (0, 64)


def test_readable_errors():
    x, w8, s, r = make(3, 64, 128, "cpu", residual=True)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        linear_fp8(x, w8.float(), s)
    with pytest.raises(ValueError, match="scale must be"):
        linear_fp8(x, w8, s[:10])
    with pytest.raises(ValueError, match="scale must be"):
        linear_fp8(x, w8, s.double())
    with pytest.raises(ValueError, match="weight"):
        linear_fp8(x, w8[:, :64], s)
    with pytest.raises(ValueError, match="residual must be"):
        linear_fp8(x, w8, s, residual=r[:2])
    with pytest.raises(ValueError, match="out must be"):
        linear_fp8(x, w8, s, out=torch.empty(3, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="even number of rows"):
        swiglu_linear_fp8(x, w8[:63], s[:63])
    with pytest.raises(ValueError, match="only the GEMV"):
        linear_fp8(x, w8, s, config=LinearConfig("mma"))
    with pytest.raises(ValueError, match="n <= 8"):
        linear_fp8(torch.randn(9, 128).bfloat16(), w8, s, config=LinearConfig("gemv"))
    x24, w24, s24, _ = make(2, 8, 24, "cpu")
    with pytest.raises(ValueError, match="multiple of 16"):
        linear_fp8(x24, w24, s24, config=LinearConfig("gemv"))
    with pytest.raises(ValueError, match="norm_weight needs norm_out"):
        linear_fp8(x, w8, s, norm_weight=torch.ones(128, dtype=torch.bfloat16))


@pytest.mark.parametrize("swiglu", [False, True])
def test_default_configs_are_valid(swiglu):
    for (m, k), n in itertools.product(MODEL_SHAPES + SHAPES, range(1, 9)):
        if swiglu:
            m = max(1, m // 2)
        cfg = default_fp8_config(n, m, k, swiglu)
        assert cfg.kernel == "gemv" and _fp8_config_error(cfg, n, m, k, swiglu) is None, (n, m, k, cfg)


@pytest.mark.skipif(kernels_module() is None or not hasattr(kernels_module(), "linear_fp8_config_error"),
                    reason="the compiled module is not built (or predates fp8)")
def test_config_rules_match_the_binding():
    k_mod = kernels_module()
    for (m, k), n, swiglu, kernel, rows, unroll, (warps, split) in itertools.product(
            [(1, 16), (1000, 1008), (7, 24), (2048, 8192)], (1, 3, 8, 9), (False, True), ("gemv", "mma"),
            (1, 2, 4), (2, 4, 8), ((1, 1), (4, 2), (8, 8), (4, 8))):
        cfg = LinearConfig(kernel, warps=warps, rows=rows, split_k=split, unroll=unroll)
        py_err = _fp8_config_error(cfg, n, m, k, swiglu)
        cpp_err = k_mod.linear_fp8_config_error(n, m, k, swiglu, *cfg.codes())
        assert (py_err is None) == (cpp_err is None), (cfg, n, m, k, swiglu, py_err, cpp_err)


# ---------------------------------------------------------------------------------------------- GPU

needs_kernels = pytest.mark.skipif(not has_cuda_kernels() or not hasattr(kernels_module(), "linear_fp8"),
                                   reason="needs a GPU and the CUDA-built kernels (with linear_fp8)")


class Problem:
    """Random bf16 x and fp8 weights on the GPU, the float64 result on the dequantized weight, and the error of
    PyTorch's bf16 computation on the dequantized weight rounded to bf16 (what the bf16 path would compute)."""

    def __init__(self, n, m, k, seed, residual=False, swiglu=False, norm=False):
        self.n, self.m, self.k, self.swiglu = n, m, k, swiglu
        self.x, self.w8, self.s, self.r = make(n, m, k, "cuda", seed=seed, residual=residual, swiglu=swiglu)
        self.norm = None
        x = self.x
        if norm:
            g = torch.Generator(device="cuda").manual_seed(seed + 7)
            self.norm = (torch.rand(k, generator=g, device="cuda") + 0.5).bfloat16()
            x = rms_norm_ref(self.x, self.norm, 1e-5)  # the kernel normalises with the reference's two roundings
        self.gold = gold(x, self.w8, self.s, self.r, swiglu)
        wb = dequantize_fp8(self.w8, self.s, torch.bfloat16)
        ref = swiglu_linear_ref(x, wb) if swiglu else linear_ref(x, wb, residual=self.r)
        self.ref_err = max_err(ref, self.gold)
        self.floor = 4 * torch.finfo(torch.float32).eps * self.gold.abs().max().item()

    def check(self, config=None, inplace=False):
        assert _kernel_applies(self.x, self.w8, self.s, None, self.r)
        norm = {} if self.norm is None else dict(norm_weight=self.norm, norm_eps=1e-5, norm_out=torch.empty_like(self.x))
        if inplace:
            out = self.r.clone()
            got = linear_fp8(self.x, self.w8, self.s, out=out, residual=out, config=config, **norm)
        else:
            out = torch.full((self.n, self.m), float("nan"), dtype=torch.bfloat16, device="cuda")
            if self.swiglu:
                got = swiglu_linear_fp8(self.x, self.w8, self.s, out, config=config, **norm)
            else:
                got = linear_fp8(self.x, self.w8, self.s, out, self.r, config=config, **norm)
        assert got is out
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), "the kernel left elements unwritten (NaN) or overflowed"
        err = max_err(out, self.gold)
        assert err <= 2 * self.ref_err + self.floor, f"kernel error {err:.3g} vs torch bf16 {self.ref_err:.3g}"
        return out


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("mode", ["none", "residual", "inplace", "swiglu", "norm", "swiglu_norm"])
@pytest.mark.parametrize("m,k", SHAPES)
@pytest.mark.parametrize("n", range(1, 9))
def test_kernel_default_config(n, m, k, mode):
    swiglu = mode.startswith("swiglu")
    p = Problem(n, m, k, seed=n * 1_000_003 + m * 1009 + k, residual=mode in ("residual", "inplace"), swiglu=swiglu,
                norm=mode.endswith("norm"))
    p.check(inplace=mode == "inplace")


def all_configs():
    for rows, unroll, (warps, split) in itertools.product(
            (1, 2, 4), (2, 4, 8), ((1, 1), (2, 2), (4, 1), (4, 4), (8, 2), (8, 8))):
        yield LinearConfig("gemv", warps=warps, rows=rows, split_k=split, unroll=unroll)


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("mode", ["plain", "swiglu", "norm"])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_kernel_every_config(n, mode):
    # m = 1000: a partial row group for every rows and warps; k = 1008: 63 packs, a partial step for every unroll.
    swiglu, failures, ran = mode == "swiglu", [], 0
    for i, (m, k) in enumerate([(1000, 1008), (2051, 2048)]):
        p = Problem(n, m, k, seed=n * 10 + i, residual=mode == "plain", swiglu=swiglu, norm=mode == "norm")
        for cfg in all_configs():
            if _fp8_config_error(cfg, n, m, k, swiglu) is not None:
                continue
            try:
                p.check(cfg, inplace=mode == "plain" and ran % 2 == 1)
            except AssertionError as e:
                failures.append(f"{cfg} m={m} k={k}: {e}")
            ran += 1
    assert ran > 0
    assert not failures, f"{len(failures)} of {ran} configs failed:\n" + "\n".join(failures[:20])


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("n", [1, 4, 8])
def test_kernel_model_shapes(n):
    for i, (m, k) in enumerate(MODEL_SHAPES):
        swiglu = m == 16384
        Problem(n, m // 2 if swiglu else m, k, seed=i, residual=not swiglu, swiglu=swiglu).check(inplace=not swiglu)


@pytest.mark.cuda
@needs_kernels
def test_kernel_allocates_nothing_and_captures():
    x, w8, s, r = make(2, 3072, 2048, "cuda", residual=True)
    out = torch.empty_like(r)
    xn, nw = torch.empty_like(x), torch.ones(2048, dtype=torch.bfloat16, device="cuda")
    step = lambda: linear_fp8(x, w8, s, out=out, norm_weight=nw, norm_eps=1e-5, norm_out=xn)  # noqa: E731
    assert_allocates_nothing(step, warm_up_on_side_stream=True)
    expect = out.clone()
    out.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expect)


@pytest.mark.cuda
@needs_kernels
def test_fallbacks_to_reference_on_gpu():
    # k % 16 == 8, fp16 x, n > 8: the reference runs, with its result
    cases = [make(3, 100, 1000, "cuda", residual=True), make(3, 100, 1024, "cuda", residual=True, dtype=torch.float16),
             make(9, 100, 1024, "cuda", residual=True)]
    for x, w8, s, r in cases:
        assert not _kernel_applies(x, w8, s, None, r)
        out = torch.full((x.shape[0], w8.shape[0]), float("nan"), dtype=x.dtype, device="cuda")
        linear_fp8(x, w8, s, out, r)
        assert torch.equal(out, linear_fp8_ref(x, w8, s, residual=r))

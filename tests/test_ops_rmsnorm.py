"""RMSNorm (+ fused residual add): reference against float64 math on CPU, kernel against the reference on GPU."""

from __future__ import annotations

import importlib

import pytest
import torch

from seseme_cli.ops.kernels import has_cuda_kernels
from seseme_cli.ops import rms_norm, rms_norm_ref
from seseme_cli.ops.rmsnorm import _kernel_applies

EPS = 1e-5
ROWS = [1, 3, 17, 129]
DIMS = [7, 64, 1000, 1024, 2048, 2051]  # odd, small, not %8, and the two model widths, 2048 + 3
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def golden(x, weight, eps, residual=None):
    """Independent float64 formula: out = w * s / sqrt(mean(s^2) + eps), s = x (+ residual)."""
    s = x.double() if residual is None else x.double() + residual.double()
    return weight.double() * s / torch.sqrt((s * s).mean(-1, keepdim=True) + eps)


def make_inputs(rows, dim, dtype, device, seed=0, residual=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g) * 3 + 0.5
    w = torch.rand(dim, generator=g) + 0.5
    r = torch.randn(rows, dim, generator=g) if residual else None
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return to(x), to(w), to(r)


# ---------------------------------------------------------------------------------------------- CPU


def test_kernels_module_imports():
    k = importlib.import_module("seseme_cli._kernels")
    assert isinstance(k.has_cuda, bool)
    assert isinstance(k.version, str)
    assert k.device_count() >= 0
    assert set(k.dtype_codes) == {"float32", "float16", "bfloat16"}
    if not k.has_cuda:
        with pytest.raises(RuntimeError, match="without CUDA"):
            k.rms_norm(0, 0, 0, 0, 0, 1, 8, EPS, 0, 0)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dim", [7, 1024])
def test_reference_matches_float64(dim, with_residual):
    x, w, r = make_inputs(5, dim, torch.float32, "cpu", residual=with_residual)
    got = rms_norm_ref(x, w, EPS, r)
    out = got[0] if with_residual else got
    torch.testing.assert_close(out.double(), golden(x, w, EPS, r), rtol=2e-6, atol=2e-6)
    if with_residual:
        assert torch.equal(got[1], x + r)


def test_reference_bf16_rounds_like_transformers():
    # bf16: s rounded to bf16, normalised in fp32, rounded to bf16, then multiplied by weight in bf16.
    x, w, r = make_inputs(4, 64, torch.bfloat16, "cpu")
    out, new_r = rms_norm_ref(x, w, EPS, r)
    s = (x.double() + r.double()).bfloat16()
    assert torch.equal(new_r, s)
    normed = (s.double() / torch.sqrt((s.double() ** 2).mean(-1, keepdim=True) + EPS)).bfloat16()
    expect = (w.double() * normed.double()).bfloat16()
    # fp32 vs fp64 normalisation can flip a rounding: allow one bf16 ulp.
    torch.testing.assert_close(out, expect, rtol=2**-7, atol=0)


def test_dispatch_on_cpu_uses_reference():
    x, w, r = make_inputs(3, 64, torch.float32, "cpu")
    assert torch.equal(rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS))
    out, new_r = rms_norm(x.view(3, 1, 64), w, EPS, r.view(3, 1, 64))
    assert out.shape == (3, 1, 64) and torch.equal(new_r, (x + r).view(3, 1, 64))


def test_out_buffers_on_reference_path():
    x, w, r = make_inputs(3, 64, torch.bfloat16, "cpu")
    out, res_out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    got_out, got_res = rms_norm(x, w, EPS, r, out=out, residual_out=res_out)
    assert got_out is out and got_res is res_out
    expect_out, expect_res = rms_norm_ref(x, w, EPS, r)
    assert torch.equal(out, expect_out) and torch.equal(res_out, expect_res)
    r_copy = r.clone()
    rms_norm(x, w, EPS, r, out=out, residual_out=r)  # in-place residual update
    assert torch.equal(r, x + r_copy)


def test_readable_errors():
    x, w, r = make_inputs(3, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, w[:32], EPS)
    with pytest.raises(ValueError, match="residual must be"):
        rms_norm(x, w, EPS, r[:2])
    with pytest.raises(ValueError, match="residual must be"):
        rms_norm(x, w, EPS, r.double())
    with pytest.raises(ValueError, match="out must be"):
        rms_norm(x, w, EPS, out=torch.empty(3, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="without residual"):
        rms_norm(x, w, EPS, residual_out=torch.empty_like(x))
    with pytest.raises(ValueError, match="dim > 0"):
        rms_norm(torch.ones(()), w, EPS)


# ---------------------------------------------------------------------------------------------- GPU

cuda = pytest.mark.skipif(not has_cuda_kernels(), reason="needs a GPU and the CUDA-built kernels")


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("rows", ROWS)
def test_kernel_matches_reference(rows, dim, with_residual, dtype):
    x, w, r = make_inputs(rows, dim, dtype, "cuda", seed=rows * 10007 + dim, residual=with_residual)
    # Poison the outputs so an element the kernel never writes fails the test.
    out = torch.full_like(x, float("nan"))
    new_r = torch.full_like(x, float("nan")) if with_residual else None
    assert _kernel_applies(x, w, r, out, new_r)
    rms_norm(x, w, EPS, r, out=out, residual_out=new_r)
    torch.cuda.synchronize()

    gold = golden(x, w, EPS, r)
    ref = rms_norm_ref(x, w, EPS, r)
    ref_out = ref[0] if with_residual else ref
    # The same math in PyTorch at the same precision sets how much rounding error is fair (for bf16
    # inputs that is the bf16 PyTorch computation); the floor covers a few fp32 ulps of the output.
    floor = 4 * torch.finfo(torch.float32).eps * gold.abs().max().item()
    assert torch.isfinite(out).all()
    assert max_err(out, gold) <= 2 * max_err(ref_out, gold) + floor
    if with_residual:
        assert torch.equal(new_r, x + r)  # one rounding of an fp32 sum, same as torch's add


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_dispatch_unaligned_and_batched(dtype):
    # Views one element into their buffers: contiguous, but not 16-byte aligned, so the kernel must take
    # its scalar path although dim % 8 == 0. Also a (batch, seq, dim) input through the public dispatcher.
    shape, dim = (4, 2, 1024), 1024
    g = torch.Generator().manual_seed(11)
    bufs = [torch.randn(8 * dim + 1, generator=g).to("cuda", dtype) for _ in range(2)]
    x, r = (b[1:].view(shape) for b in bufs)
    w = (torch.rand(dim + 1, generator=g) + 0.5).to("cuda", dtype)[1:]
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    assert _kernel_applies(x, w, r, None, None)  # the public function really takes the kernel here
    out, new_r = rms_norm(x, w, EPS, r)
    ref_out, ref_r = rms_norm_ref(x, w, EPS, r)
    assert out.shape == shape and torch.equal(new_r, ref_r)
    torch.testing.assert_close(out, ref_out, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.cuda
@cuda
def test_kernel_in_place_residual():
    # Pre-norm blocks update the residual stream in place: residual_out may alias residual.
    x, w, r = make_inputs(17, 2048, torch.bfloat16, "cuda", seed=3)
    expect_out, expect_r = rms_norm_ref(x, w, EPS, r)
    out = torch.full_like(x, float("nan"))
    rms_norm(x, w, EPS, r, out=out, residual_out=r)
    assert torch.equal(r, expect_r)
    torch.testing.assert_close(out, expect_out, rtol=2**-7, atol=1e-6)


@pytest.mark.cuda
@cuda
def test_kernel_empty_input():
    x, w, r = make_inputs(1, 64, torch.bfloat16, "cuda")
    out, new_r = rms_norm(x[:0], w, EPS, r[:0])
    assert out.shape == (0, 64) and new_r.shape == (0, 64)

"""ops.masked_attention (Mimi's few-query attention under a boolean mask): the reference equals PyTorch's attention,
the kernel equals an fp64 reference on awkward shapes, strides and masks, and Mimi's captured decode runs on it
(cuda-marked tests need a GPU)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seseme_cli.ops.kernels import has_cuda_kernels
from seseme_cli.ops.masked_attention import masked_attention, masked_attention_applies, masked_attention_ref

gpu = pytest.mark.skipif(not has_cuda_kernels(), reason="needs the CUDA kernels and a GPU")


def inputs(B, H, T, C, D, device="cpu", seed=0, mask_heads=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, C, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, C, D, generator=g, dtype=dtype)
    mask = torch.rand(B, mask_heads, T, C, generator=g) < 0.7
    return q.to(device), k.to(device), v.to(device), mask.to(device)


def test_the_reference_is_pytorchs_attention_and_a_query_without_keys_gets_zeros():
    q, k, v, mask = inputs(3, 2, 2, 11, 8)
    mask[:, :, :, 0] = True  # every query has a key: PyTorch's attention is defined
    torch.testing.assert_close(masked_attention_ref(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, mask))
    torch.testing.assert_close(masked_attention_ref(q, k, v, mask, 0.3),
                               F.scaled_dot_product_attention(q, k, v, mask, scale=0.3))
    mask[1, :, 0] = False
    out = masked_attention_ref(q, k, v, mask)
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0])) and torch.isfinite(out).all()


def unattended_rows_hold_nan(k, v, mask):
    """k and v with NaN in every key row that no query of its (batch, head) attends, and the same with zeros."""
    B, H, C = k.shape[0], k.shape[1], k.shape[2]
    unread = ~mask.expand(B, H, mask.shape[2], C).any(dim=2).unsqueeze(-1)
    assert unread.any() and not unread.all()
    return k.masked_fill(unread, float("nan")), v.masked_fill(unread, float("nan")), k.masked_fill(unread, 0), \
        v.masked_fill(unread, 0)


def test_the_reference_never_reads_a_key_no_query_attends():
    """An unfilled ring slot may hold anything: NaN there changes nothing, while a NaN in an attended row shows."""
    q, k, v, mask = inputs(3, 2, 2, 40, 16, seed=5)
    mask[:, :, :, 20:] = False  # the ring's second half is unfilled
    mask[0, :2, 0, 0] = True
    nan_k, nan_v, zero_k, zero_v = unattended_rows_hold_nan(k, v, mask)
    out = masked_attention_ref(q, nan_k, nan_v, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, masked_attention_ref(q, zero_k, zero_v, mask), rtol=0, atol=0)
    nan_v[0, 0, 0] = float("nan")  # a row that query 0 attends
    assert not torch.isfinite(masked_attention_ref(q, nan_k, nan_v, mask)[0, 0, 0]).any()
    nan_k[0, 1, 0] = float("nan")  # a key that query 0 of head 1 attends: its scores, then its softmax, are NaN
    assert torch.isnan(masked_attention_ref(q, nan_k, zero_v, mask)[0, 1, 0]).all()  # as the kernel gives it


def test_on_the_cpu_the_op_is_its_reference_and_writes_out():
    q, k, v, mask = inputs(2, 3, 4, 9, 32)
    out = torch.full((2, 3, 4, 32), float("nan"))
    assert masked_attention(q, k, v, mask, out=out) is out
    torch.testing.assert_close(out, masked_attention_ref(q, k, v, mask), rtol=0, atol=0)


@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "k": a["k"][:, :, :, :4]}, "k and v must be"),
    (lambda a: {**a, "v": a["v"].double()}, "one floating dtype"),
    (lambda a: {**a, "mask": a["mask"].float()}, "must be bool"),
    (lambda a: {**a, "mask": a["mask"][:, :, :, :3]}, "does not broadcast"),
    (lambda a: {**a, "q": a["q"][0]}, "must be 4-D"),
    (lambda a: {**a, "out": torch.empty(1, 1, 1, 1)}, "out must be"),
])
def test_bad_arguments_are_named(change, match):
    q, k, v, mask = inputs(2, 2, 2, 5, 8)
    args = change({"q": q, "k": k, "v": v, "mask": mask, "out": None})
    with pytest.raises(ValueError, match=match):
        masked_attention(args["q"], args["k"], args["v"], args["mask"], out=args["out"])


# --- the kernel ----------------------------------------------------------------------------------------------

SHAPES = [  # (B, H, T, C, D): Mimi's own (2 steps over 250 slots, 8 heads of 64) and awkward ones
    (5, 8, 2, 250, 64), (1, 1, 1, 1, 32), (3, 2, 3, 7, 128), (17, 3, 4, 1000, 64), (2, 5, 1, 33, 32),
    (64, 8, 2, 250, 64), (1, 2, 4, 1024, 128),
]


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("B,H,T,C,D", SHAPES)
@pytest.mark.parametrize("mask_heads", [1, "all"])
def test_kernel_matches_an_fp64_reference(B, H, T, C, D, mask_heads):
    q, k, v, mask = inputs(B, H, T, C, D, "cuda", seed=B * C + T, mask_heads=H if mask_heads == "all" else 1)
    mask[0, :, 0] = False  # one query with no key at all: zeros
    if C > 3:
        mask[-1, :, -1, :-3] = False  # one that attends only the last keys
    assert masked_attention_applies(q, k, v, mask, torch.empty_like(q))
    out = masked_attention(q, k, v, mask, scale=0.17 if D == 32 else None)
    expected = masked_attention_ref(q.double(), k.double(), v.double(), mask, scale=0.17 if D == 32 else None)
    assert out.dtype == torch.float32 and out.shape == (B, H, T, D)
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-5)
    assert torch.equal(out[0, :, 0], torch.zeros_like(out[0, :, 0]))


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("B,H,T,C,D", [(5, 8, 2, 250, 64), (3, 2, 3, 37, 128), (2, 3, 4, 1000, 32)])
def test_kernel_skips_the_rows_no_query_attends(B, H, T, C, D):
    """A stream's ring is partly filled (keys beyond its audio masked, whole rows and scattered ones): the kernel
    does not read those rows, so NaN there gives the result of zeros, equal to the fp64 reference."""
    q, k, v, mask = inputs(B, H, T, C, D, "cuda", seed=C + D, mask_heads=H)
    mask[:, :, :, C // 3:] &= torch.rand(B, H, 1, C - C // 3, device="cuda") < 0.2  # mostly unfilled tail
    nan_k, nan_v, zero_k, zero_v = unattended_rows_hold_nan(k, v, mask)
    out = masked_attention(q, nan_k, nan_v, mask)
    assert torch.isfinite(out).all()
    expected = masked_attention_ref(q.double(), zero_k.double(), zero_v.double(), mask)
    torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.cuda
@gpu
def test_kernel_takes_strided_views_like_moshis():
    """moshi hands over q as a view of the fused projection ("b t (p h d) -> p b h t d") and k, v as the ring
    cache's halves; the op's own output is laid out (B, T, H, D), so moshi's next rearrange is a view."""
    B, T, H, D, C = 6, 2, 8, 64, 250
    g = torch.Generator(device="cuda").manual_seed(3)
    projected = torch.randn(B, T, 3 * H * D, device="cuda", generator=g)
    q = projected.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)[0]
    cache = torch.randn(2, B + 3, H, C, D, device="cuda", generator=g).narrow(1, 0, B)  # a slot bucket's view
    k, v = cache[0], cache[1]
    mask = (torch.rand(B, 1, T, C, device="cuda", generator=g) < 0.5)
    mask[..., 0] = True
    out = masked_attention(q, k, v, mask)
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, mask), rtol=1e-4, atol=1e-5)
    written = torch.empty_like(q.contiguous())
    assert masked_attention(q, k, v, mask, out=written) is written
    torch.testing.assert_close(written, out, rtol=0, atol=0)


@pytest.mark.cuda
@gpu
def test_what_the_kernel_does_not_take_goes_to_the_reference():
    q, k, v, mask = inputs(2, 2, 2, 20, 48, "cuda")  # head dim 48
    assert not masked_attention_applies(q, k, v, mask, torch.empty_like(q))
    torch.testing.assert_close(masked_attention(q, k, v, mask), masked_attention_ref(q, k, v, mask))
    q, k, v, mask = inputs(2, 2, 5, 20, 64, "cuda")  # 5 queries
    assert not masked_attention_applies(q, k, v, mask, torch.empty_like(q))
    q, k, v, mask = inputs(2, 2, 2, 20, 64, "cuda", dtype=torch.bfloat16)
    assert not masked_attention_applies(q, k, v, mask, torch.empty_like(q))


@pytest.mark.cuda
@gpu
def test_mimis_captured_decode_runs_on_the_kernel_and_sounds_the_same(monkeypatch):
    """The full-size random Mimi's graphed streaming decode with its attention on the kernel, against the same
    decode on PyTorch's attention (SESEME_MIMI_ATTENTION=torch): the same samples up to fp32 rounding."""
    from seseme_cli.audio.codec import MimiCodec
    from seseme_cli.audio.rows import streaming_decoder

    codec = MimiCodec.random("full", seed=1, device="cuda")
    slots, frames = 5, 6
    codes = torch.from_numpy(np.random.default_rng(0).integers(0, 2048, (slots, 32, frames))).cuda()
    audio = {}
    for mode in ("kernel", "torch"):
        monkeypatch.setenv("SESEME_MIMI_ATTENTION", mode)
        with streaming_decoder(codec, slots, 1) as (decode, graphed):
            assert graphed and decode.kernel_attention == (mode == "kernel")
            audio[mode] = torch.cat([decode(codes[:, :, i : i + 1], None, None) for i in range(frames)], dim=1)
            torch.cuda.synchronize()
    reference = audio["torch"]
    assert (audio["kernel"] - reference).abs().max() <= 1e-3 * reference.abs().max()

"""Audio-embedding gather-sum: the reference against CsmModel.embed_frames on CPU, the kernel against float64
on GPU (error at most 2x that of the same sum done by PyTorch in the storage dtype)."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_allocates_nothing
from seseme_cli.model.config import tiny
from seseme_cli.ops.kernels import has_cuda_kernels, kernels_module
from seseme_cli.model.reference import CsmModel
from seseme_cli.ops.embedding import _kernel_applies, embed_codes, embed_codes_ref

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
VOCAB = 2051


def golden(codes, table, vocab):
    """The sum in float64 (exact for these few terms up to one final rounding)."""
    idx = codes.long() + torch.arange(codes.shape[1], device=codes.device) * vocab
    return table[idx].double().sum(dim=1).cpu()


def make_inputs(n, k, dim, dtype, device, vocab=VOCAB, seed=0, code_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    table = (torch.randn(k * vocab, dim, generator=g) * 0.5 + 0.1).to(device=device, dtype=dtype)
    codes = torch.randint(0, vocab, (n, k), generator=g).to(device=device, dtype=code_dtype)
    if n and vocab > 1:  # the edges of the range
        codes[0, 0] = vocab - 1
        codes[-1, -1] = 0
    return codes, table


# ---------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_matches_model_embed_frames(dtype):
    torch.manual_seed(0)
    model = CsmModel(tiny()).to(dtype)
    K, V = model.cfg.num_codebooks, model.cfg.audio_vocab_size
    g = torch.Generator().manual_seed(1)
    tokens = torch.cat([torch.randint(0, V, (2, 3, K), generator=g),
                        torch.randint(0, model.cfg.text_vocab_size, (2, 3, 1), generator=g)], dim=-1)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[..., -1] = False  # audio frames: the text column is masked out
    with torch.no_grad():
        expect = model.embed_frames(tokens, mask).reshape(6, -1)
        got = embed_codes_ref(tokens[..., :K].reshape(6, K), model.audio_embed.weight, None, V)
    assert got.dtype == dtype and got.shape == expect.shape
    gold = golden(tokens[..., :K].reshape(6, K), model.audio_embed.weight, V)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.double(), gold, rtol=1e-6, atol=1e-6)
    else:  # both sum in fp32 and round once to bf16; a different summation order may flip that rounding
        torch.testing.assert_close(got, expect, rtol=2**-7, atol=1e-6)  # one bf16 ulp
        assert (got.double() - gold).abs().max() <= (expect.double() - gold).abs().max() * 2 + 1e-6


def test_reference_int32_codes_and_out():
    codes, table = make_inputs(4, 32, 16, torch.bfloat16, "cpu", seed=2)
    out = torch.full((4, 16), float("nan"), dtype=torch.bfloat16)
    got = embed_codes(codes.int(), table, out, VOCAB)
    assert got is out
    assert torch.equal(out, embed_codes_ref(codes, table, None, VOCAB))
    torch.testing.assert_close(out.double(), golden(codes, table, VOCAB), rtol=2**-8, atol=1e-6)


def test_reference_single_codebook_slice():
    # The depth decoder embeds one code of codebook i with the table slice of that codebook.
    codes, table = make_inputs(3, 32, 8, torch.float32, "cpu", seed=3)
    i = 5
    got = embed_codes_ref(codes[:, i:i + 1], table[i * VOCAB:(i + 1) * VOCAB], None, VOCAB)
    assert torch.equal(got, table[codes[:, i] + i * VOCAB])


def test_reference_rejects_out_of_range_codes():
    codes, table = make_inputs(3, 4, 8, torch.float32, "cpu", seed=4)
    for bad in (-1, VOCAB):
        c = codes.clone()
        c[1, 2] = bad
        with pytest.raises(ValueError, match=f"code {bad} outside"):
            embed_codes(c, table, None, VOCAB)


def test_dispatch_on_cpu_and_empty():
    codes, table = make_inputs(3, 4, 8, torch.float32, "cpu", seed=5)
    assert not _kernel_applies(codes, table, None)
    assert torch.equal(embed_codes(codes, table, None, VOCAB), embed_codes_ref(codes, table, None, VOCAB))
    assert embed_codes(codes[:0], table, None, VOCAB).shape == (0, 8)


def test_readable_errors():
    codes, table = make_inputs(3, 4, 8, torch.float32, "cpu", seed=6)
    with pytest.raises(ValueError, match="codes must be"):
        embed_codes(codes[0], table, None, VOCAB)
    with pytest.raises(ValueError, match="codes must be"):
        embed_codes(codes.float(), table, None, VOCAB)
    with pytest.raises(ValueError, match="table must be"):
        embed_codes(codes, table[:-1], None, VOCAB)
    with pytest.raises(ValueError, match="out must be"):
        embed_codes(codes, table, torch.empty(3, 8, dtype=torch.float16), VOCAB)
    with pytest.raises(ValueError, match="vocab_size"):
        embed_codes(codes, table, None, 0)
    for bad in (0, 48, 512, True):
        with pytest.raises(ValueError, match="threads"):
            embed_codes(codes, table, None, VOCAB, threads=bad)


def test_binding_checks_arguments():
    k = kernels_module()
    if k is None or not hasattr(k, "embed_codes"):
        pytest.skip("kernels module not built")
    ok = dict(out=16, codes=16, codes_int32=False, table=16, rows=1, num_codebooks=32, vocab=VOCAB, dim=2048,
              dtype=2, threads=0, stream=0)
    for key, bad, msg in (("num_codebooks", 0, "num_codebooks"), ("num_codebooks", 257, "num_codebooks"),
                          ("vocab", 0, "vocab"), ("dim", 0, "dim"), ("threads", 512, "threads"),
                          ("dtype", 9, "dtype code"), ("codes", 12, "codes"), ("table", 0, "non-null")):
        with pytest.raises(ValueError, match=msg):
            k.embed_codes(**{**ok, key: bad})


# ---------------------------------------------------------------------------------------------- GPU

cuda = pytest.mark.skipif(not has_cuda_kernels(), reason="needs a GPU and the CUDA-built kernels")


def max_err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item() if a.numel() else 0.0


def check_against_golden(out, codes, table, vocab):
    gold = golden(codes, table, vocab)
    torch_sum = embed_codes_ref(codes, table, None, vocab)  # PyTorch's gather + sum in the storage dtype
    floor = 4 * torch.finfo(torch.float32).eps * max(gold.abs().max().item(), 1.0)
    assert torch.isfinite(out).all()
    assert max_err(out, gold) <= 2 * max_err(torch_sum, gold) + floor


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("code_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [2048, 1024, 64, 7, 2056])
@pytest.mark.parametrize("k", [32, 1, 5, 17])
@pytest.mark.parametrize("n", [1, 3, 64, 128])
def test_kernel_matches_golden(n, k, dim, dtype, code_dtype):
    vocab = VOCAB if k * VOCAB * dim <= 2**23 else 257  # keep the tables small; the vocab size is just an offset
    codes, table = make_inputs(n, k, dim, dtype, "cuda", vocab=vocab, seed=n * 31 + k * 7 + dim, code_dtype=code_dtype)
    out = torch.full((n, dim), float("nan"), dtype=dtype, device="cuda")  # poisoned
    assert _kernel_applies(codes, table, out)
    embed_codes(codes, table, out, vocab)
    check_against_golden(out, codes, table, vocab)


@pytest.mark.cuda
@cuda
def test_kernel_csm_shape():
    # CSM-1B's real table: 32 codebooks x 2051 codes x 2048, bf16, a full batch.
    codes, table = make_inputs(128, 32, 2048, torch.bfloat16, "cuda", seed=12)
    out = torch.full((128, 2048), float("nan"), dtype=torch.bfloat16, device="cuda")
    embed_codes(codes, table, out, VOCAB)
    check_against_golden(out, codes, table, VOCAB)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("threads", [None, 32, 64, 128, 256])
def test_kernel_threads_and_determinism(threads):
    codes, table = make_inputs(5, 32, 2048, torch.bfloat16, "cuda", vocab=257, seed=8)
    out = embed_codes(codes, table, None, 257, threads=threads)
    check_against_golden(out, codes, table, 257)
    # fixed summation order: every launch size gives the same bits
    assert torch.equal(out, embed_codes(codes, table, None, 257))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_unaligned_views(dtype):
    # Table and out one element into their buffers: contiguous but not 16-byte aligned, so the kernel must
    # take its scalar path although dim % 8 == 0.
    n, k, dim = 4, 32, 1024
    codes, table = make_inputs(n, k, dim, dtype, "cuda", vocab=257, seed=9)
    table_buf = torch.empty(table.numel() + 1, dtype=dtype, device="cuda")
    table_buf[1:] = table.flatten()
    table_view = table_buf[1:].view(table.shape)
    out_buf = torch.full((n * dim + 1,), float("nan"), dtype=dtype, device="cuda")
    out = out_buf[1:].view(n, dim)
    assert table_view.data_ptr() % 16 != 0 and _kernel_applies(codes, table_view, out)
    embed_codes(codes, table_view, out, 257)
    check_against_golden(out, codes, table, 257)


@pytest.mark.cuda
@cuda
def test_kernel_clamps_out_of_range_codes():
    codes, table = make_inputs(3, 32, 256, torch.float32, "cuda", seed=10)
    bad = codes.clone()
    bad[0, 3], bad[1, 31], bad[2, 0] = -5, VOCAB, 10**12
    out = embed_codes(bad, table, None, VOCAB)
    torch.testing.assert_close(out, embed_codes_ref(bad.clamp(0, VOCAB - 1), table, None, VOCAB), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@cuda
def test_kernel_cuda_graph_and_no_allocations():
    n, k, dim, vocab = 8, 32, 2048, 257
    codes, table = make_inputs(n, k, dim, torch.bfloat16, "cuda", vocab=vocab, seed=11)
    out = torch.empty(n, dim, dtype=torch.bfloat16, device="cuda")
    # No allocation at all on the kernel path with out given (not even from the caching allocator).
    assert_allocates_nothing(lambda: embed_codes(codes, table, out, vocab))

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        embed_codes(codes, table, out, vocab)
    codes.copy_(torch.randint(0, vocab, codes.shape, device="cuda"))  # the next frame's codes, in place
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check_against_golden(out, codes, table, vocab)

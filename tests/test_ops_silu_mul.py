"""ops.silu_mul (the SwiGLU product after the one gate+up GEMM above 64 rows): the reference rounds as the
two-GEMM reference MLP does, the kernel equals the reference on awkward shapes, dtypes and alignments, writes only
`out`, and runs inside a CUDA graph without allocating (cuda-marked tests need a GPU)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_allocates_nothing

from seseme_cli.ops.kernels import has_cuda_kernels
from seseme_cli.ops.linear import swiglu_linear_ref
from seseme_cli.ops.silu_mul import silu_mul, silu_mul_applies, silu_mul_ref

gpu = pytest.mark.skipif(not has_cuda_kernels(), reason="needs the CUDA kernels and a GPU")


def gate_up(rows, f, dtype=torch.bfloat16, device="cpu", seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(rows, 2 * f, generator=g)).to(dtype).to(device)


def test_the_reference_is_silu_of_gate_times_up_rounded_like_the_reference_mlp():
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    w = torch.randn(2 * 24, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y = F.linear(x, w)  # what the one GEMM gives: cat(gate, up) per row
    assert torch.equal(silu_mul_ref(y), swiglu_linear_ref(x, w))
    assert torch.equal(silu_mul_ref(y), F.silu(y[:, :24]) * y[:, 24:])


def test_on_the_cpu_the_op_is_its_reference_and_writes_out():
    y = gate_up(7, 12)
    out = torch.full((7, 12), float("nan"), dtype=torch.bfloat16)
    assert silu_mul(y, out) is out
    assert torch.equal(out, silu_mul_ref(y))
    assert not silu_mul_applies(y, out)


@pytest.mark.parametrize("shape, message", [((4, 7), "gate_up must be"), ((2, 3, 4), "gate_up must be")])
def test_bad_arguments_name_what_does_not_fit(shape, message):
    with pytest.raises(ValueError, match=message):
        silu_mul(torch.zeros(shape))
    with pytest.raises(ValueError, match="out must be"):
        silu_mul(torch.zeros(4, 8), out=torch.zeros(4, 5))


def ulps_apart(a, b):
    """Elementwise distance in units of the dtype's last place (as integers of the same bit pattern)."""
    bits, magnitude = {torch.bfloat16: (torch.int16, 0x7FFF), torch.float16: (torch.int16, 0x7FFF),
                       torch.float32: (torch.int32, 0x7FFFFFFF)}[a.dtype]

    def ordered(t):  # sign and magnitude -> one increasing integer line (-0 and +0 both 0)
        i = t.view(bits).long()
        return torch.where(i < 0, -(i & magnitude), i)

    return (ordered(a) - ordered(b)).abs()


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows, f", [(1, 8), (3, 24), (65, 1000), (130, 2048), (513, 8192), (7, 5)])
def test_the_kernel_equals_the_reference(dtype, rows, f):
    y = gate_up(rows, f, dtype, "cuda", seed=rows + f)
    assert silu_mul_applies(y, torch.empty(rows, f, dtype=dtype, device="cuda"))
    out = torch.full((rows, f), float("nan"), dtype=dtype, device="cuda")
    silu_mul(y, out)
    ref = silu_mul_ref(y)
    # The same fp32 formula, rounded at the same two points; expf may differ from PyTorch's in the last fp32 bit,
    # which moves a rounding by one unit of the dtype now and then.
    apart = ulps_apart(out, ref)
    assert apart.max() <= 1, apart.max()
    assert (apart == 0).float().mean() > 0.99
    assert torch.isfinite(out).all()


@pytest.mark.cuda
@gpu
def test_the_kernel_takes_unaligned_rows_and_writes_nothing_outside_out():
    # f not a multiple of the 16-byte pack, and buffers that start 2 bytes into an allocation: the scalar path.
    base = gate_up(9, 13, torch.bfloat16, "cuda").flatten()
    y = torch.cat([base[:1], base])[1:].view(9, 26)  # a copy with the data one element in
    store = torch.full((9 * 13 + 2,), 7.0, dtype=torch.bfloat16, device="cuda")
    out = store[1:-1].view(9, 13)
    assert out.data_ptr() % 16 != 0
    silu_mul(y, out)
    assert ulps_apart(out, silu_mul_ref(y)).max() <= 1
    assert store[0].item() == 7.0 and store[-1].item() == 7.0


@pytest.mark.cuda
@gpu
def test_the_kernel_runs_in_a_cuda_graph_without_allocating():
    y = gate_up(512, 8192, torch.bfloat16, "cuda")
    out = torch.empty(512, 8192, dtype=torch.bfloat16, device="cuda")
    assert_allocates_nothing(lambda: silu_mul(y, out), warm_up_on_side_stream=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        silu_mul(y, out)
    out.zero_()
    y.copy_(gate_up(512, 8192, torch.bfloat16, "cuda", seed=5))
    graph.replay()
    torch.cuda.synchronize()
    assert ulps_apart(out, silu_mul_ref(y)).max() <= 1

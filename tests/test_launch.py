"""Programmatic dependent launch (cuda/launch.cuh): the next kernel starts before the current one ends, and its
wait_for_inputs() holds it until the current one has finished, eagerly and inside a CUDA graph."""

import pytest
import torch

from seseme_cli.kernels import has_cuda_kernels, pdl_probe

pytestmark = pytest.mark.cuda


@pytest.fixture
def device():
    if not has_cuda_kernels():
        pytest.skip("needs the CUDA kernels and a GPU")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0 or later")
    return torch.device("cuda")


@pytest.mark.parametrize("in_graph", [False, True], ids=["stream", "graph"])
def test_next_kernel_starts_early_and_waits(device, in_graph):
    # On a created stream: kernels on the legacy default stream do not overlap (measured on an H100), and the
    # engine's graphs are captured and replayed on created streams anyway.
    with torch.cuda.stream(torch.cuda.Stream(device)):
        times = pdl_probe(device, spin_ns=50_000, in_graph=in_graph)
    assert times["second_start"] < times["first_end"], times  # launched while the first still ran
    assert times["second_after_wait"] >= times["first_end"], times  # and waited for it


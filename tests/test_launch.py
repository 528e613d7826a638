"""Programmatic dependent launch (cuda/launch.cuh): the next kernel starts before the current one ends, and its
wait_for_inputs() holds it until the current one has finished, eagerly and inside a CUDA graph."""

import pytest
import torch

from seseme_cli.ops.kernels import has_cuda_kernels, pdl_probe

pytestmark = pytest.mark.cuda


@pytest.fixture
def device():
    if not has_cuda_kernels():
        pytest.skip("needs the CUDA kernels and a GPU")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0 or later")
    return torch.device("cuda")


def test_in_a_graph_the_next_kernel_starts_early_and_waits(device):
    times = pdl_probe(device, spin_ns=50_000, in_graph=True)
    assert times["second_start"] < times["first_end"], times  # launched while the first still ran
    assert times["second_after_wait"] >= times["first_end"], times  # and waited for it


def test_launched_eagerly_the_next_kernel_waits(device):
    # Eager launches (the prefill) did not overlap on an H100 (driver 580): the second kernel started ~4 us
    # after the first ended, on the default stream and on a created one. Only the ordering is required.
    times = pdl_probe(device, spin_ns=50_000, in_graph=False)
    assert times["second_after_wait"] >= times["first_end"], times


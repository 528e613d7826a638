"""Guarded access to the compiled module `seseme_cli._kernels`.

The module may be missing (a source tree that was never built), built without CUDA, or unusable on this
machine (no GPU, or a driver older than the CUDA runtime it was linked with). Everything in `ops` asks
`has_cuda_kernels()` and falls back to its plain-PyTorch reference otherwise.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

try:
    from seseme_cli import _kernels as _module
except ImportError as exc:  # not built, or built for another Python
    _module = None
    import_error: ImportError | None = exc
else:
    import_error = None


def kernels_module() -> ModuleType | None:
    """The compiled module, or None if it could not be imported (see `import_error`)."""
    return _module


@functools.cache
def has_cuda_kernels() -> bool:
    """True when the CUDA kernels can run here: module built with CUDA, torch sees a GPU, and so does
    the module's own (static) CUDA runtime, which needs a driver at least as new as itself."""
    return (
        _module is not None
        and bool(_module.has_cuda)
        and torch.cuda.is_available()
        and _module.device_count() > 0
    )


# torch's own raw-handle getter (what its compiled kernels use) costs 0.1 us against 3.4 us for
# torch.cuda.current_stream(i).cuda_stream, which builds a Stream object; same value.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream_handle(device_index: int) -> int:
    """The raw handle of torch's current CUDA stream on a device, so kernels order with torch's work."""
    if _raw_stream is not None:
        return _raw_stream(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


@functools.cache
def dtype_code(dtype: torch.dtype) -> int:
    """The module's code for a storage dtype; ValueError for dtypes the kernels do not take."""
    codes = _module.dtype_codes if _module is not None else {}
    name = str(dtype).removeprefix("torch.")
    if name not in codes:
        raise ValueError(f"no kernel dtype code for {dtype}; supported: {sorted(codes)}")
    return codes[name]


def pdl_probe(device: torch.device, spin_ns: int = 20_000, in_graph: bool = False) -> dict[str, int]:
    """Whether programmatic dependent launch overlaps two kernels here (cuda/pdl_probe.cuh): run the probe
    eagerly or as a captured CUDA graph and return the second kernel's start and the first one's end, in
    global-timer nanoseconds. `second_start < first_end` means PDL works."""
    times = torch.zeros(3, dtype=torch.int64, device=device)
    index = times.device.index or 0
    if in_graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _module.pdl_probe(times.data_ptr(), spin_ns, stream_handle(index))
        graph.replay()
    else:
        _module.pdl_probe(times.data_ptr(), spin_ns, stream_handle(index))
    first_end, second_start, second_after_wait = times.tolist()
    return {"first_end": first_end, "second_start": second_start, "second_after_wait": second_after_wait}


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' memory spans (first to last element) intersect: the ops' out-argument checks."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()

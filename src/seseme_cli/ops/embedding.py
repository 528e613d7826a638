"""Audio-embedding gather-sum: the backbone input of an audio frame is the sum of its codes' embeddings.

    out[n] = sum_k table[codes[n, k] + k * vocab_size]      (fp32 accumulation, one rounding to table's dtype)

`embed_codes` runs the CUDA kernel (cuda/embedding.cu) when it can, `embed_codes_ref` is the same in plain
PyTorch and equals `CsmModel.embed_frames` for an all-audio frame (up to summation order). The depth decoder's
one-code steps use it too, with K = 1 and the table slice of that codebook.

Codes outside [0, vocab_size) are a caller bug. The reference raises ValueError (a host sync on CUDA, skipped
while a CUDA graph is being captured); the kernel clamps each code into range, so it never reads outside the
table, and stays free of host syncs.
"""

from __future__ import annotations

import torch

from seseme_cli.ops.kernels import dtype_code, has_cuda_kernels, kernels_module, stream_handle
from seseme_cli.ops.sampling import check_threads

Tensor = torch.Tensor

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CODE_DTYPES = (torch.int64, torch.int32)
MAX_CODEBOOKS = 256  # kEmbedMaxCodebooks
MAX_THREADS = 256  # kEmbedMaxThreads


def embed_codes(
    codes: Tensor,
    table: Tensor,
    out: Tensor | None,
    vocab_size: int,
    *,
    threads: int | None = None,
) -> Tensor:
    """Sum each row's code embeddings.

    codes (N, K) int64 or int32, each in [0, vocab_size); table (K * vocab_size, D) bf16/fp16/fp32, codebook k's
    rows at k * vocab_size; out: (N, D) in table's dtype, written and returned, or None to allocate. With `out`
    given the kernel path allocates nothing and never syncs the host.
    threads: threads per block for the kernel (a multiple of 32 in [32, 256]; None = default), for autotuning.

    The kernel runs for contiguous CUDA tensors (K <= MAX_CODEBOOKS) outside autograd; anything else goes to
    `embed_codes_ref`, which gives the same result up to summation order (or raises on out-of-range codes,
    which the kernel clamps).
    """
    _check_args(codes, table, out, vocab_size, threads)
    if not _kernel_applies(codes, table, out):
        return embed_codes_ref(codes, table, out, vocab_size, threads=threads)
    if out is None:
        out = torch.empty(codes.shape[0], table.shape[1], dtype=table.dtype, device=table.device)
    _launch(codes, table, out, vocab_size, threads)
    return out


def embed_codes_ref(
    codes: Tensor,
    table: Tensor,
    out: Tensor | None,
    vocab_size: int,
    *,
    threads: int | None = None,
) -> Tensor:
    """`embed_codes` in plain PyTorch; same signature. Raises ValueError for codes outside [0, vocab_size)
    (except while capturing a CUDA graph, where checking would need a host sync). `threads` is only checked."""
    _check_args(codes, table, out, vocab_size, threads)
    capturing = codes.is_cuda and torch.cuda.is_current_stream_capturing()
    if codes.numel() and not capturing and bool(((codes < 0) | (codes >= vocab_size)).any()):
        bad = codes[(codes < 0) | (codes >= vocab_size)][0].item()
        raise ValueError(f"embed_codes: code {bad} outside [0, {vocab_size})")
    offsets = torch.arange(codes.shape[1], device=codes.device, dtype=torch.int64) * vocab_size
    summed = table[codes.long() + offsets].float().sum(dim=1).to(table.dtype)
    return summed if out is None else out.copy_(summed)


def _check_args(codes: Tensor, table: Tensor, out: Tensor | None, vocab_size: int, threads: int | None) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"embed_codes: vocab_size must be a positive int, got {vocab_size!r}")
    if codes.dim() != 2 or codes.shape[1] == 0 or codes.dtype not in CODE_DTYPES:
        raise ValueError(
            f"embed_codes: codes must be (N, K) int64 or int32 with K > 0, got {tuple(codes.shape)} {codes.dtype}"
        )
    rows = codes.shape[1] * vocab_size
    if table.dim() != 2 or table.shape[0] != rows or table.shape[1] == 0:
        raise ValueError(
            f"embed_codes: table must be (K * vocab_size, D) = ({rows}, D) with D > 0, got {tuple(table.shape)}"
        )
    if table.device != codes.device:
        raise ValueError(f"embed_codes: table is on {table.device}, codes on {codes.device}")
    shape = (codes.shape[0], table.shape[1])
    if out is not None and (out.shape != shape or out.dtype != table.dtype or out.device != table.device):
        raise ValueError(
            f"embed_codes: out must be {shape} {table.dtype} on {table.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    check_threads("embed_codes", threads, MAX_THREADS)


def _kernel_applies(codes: Tensor, table: Tensor, out: Tensor | None) -> bool:
    return (
        table.is_cuda
        and table.dtype in KERNEL_DTYPES
        and codes.shape[1] <= MAX_CODEBOOKS
        and all(t.is_contiguous() for t in (codes, table, out) if t is not None)
        and not (torch.is_grad_enabled() and table.requires_grad)  # the kernel has no backward
        and has_cuda_kernels()
    )


def _launch(codes: Tensor, table: Tensor, out: Tensor, vocab_size: int, threads: int | None) -> None:
    """The launch itself, arguments already checked."""
    if codes.shape[0] == 0:
        return  # empty tensors may have null data pointers; there is nothing to do
    index = table.device.index
    args = (
        out.data_ptr(),
        codes.data_ptr(),
        codes.dtype == torch.int32,
        table.data_ptr(),
        codes.shape[0],
        codes.shape[1],
        vocab_size,
        table.shape[1],
        dtype_code(table.dtype),
        threads or 0,
        stream_handle(index),
    )
    if index == torch.cuda.current_device():
        kernels_module().embed_codes(*args)
    else:
        with torch.cuda.device(index):  # the launch goes to the current device's context
            kernels_module().embed_codes(*args)

"""Temperature + top-k sampling with a counter-based RNG: one code per row of logits, no host sync.

`sample_topk_philox` runs the fused CUDA kernel (cuda/sampling.cu) when it can; `sample_topk_philox_ref`
is the same computation in plain PyTorch, on CPU or GPU, and the two agree bit for bit (up to `logf` rounding
at near-ties of the race). Per row r:

    temperature[r] <= 0 or topk[r] == 1:  argmax of the raw logits (first index among exact ties)
    otherwise: keep every logit >= the k-th largest (ties at the k-th value stay in; k <= 0 or k >= V keeps
               all), and return  argmax over kept i of  l_i / T - log(E_i),  E_i = -log(U_i)

An exponential race (Gumbel-max): index i wins with probability softmax(l / T)_i over the kept set, the same
distribution as `seseme_cli.model.reference.sample_topk` and the original CSM. U_i comes from Philox4x32-10
(Random123) with key (seed lo, seed hi) and counter (i // 4, codebook, counter lo, counter hi), output word
i % 4 mapped to ((u >> 8) + 1) * 2^-24 in (0, 1]. So a draw depends only on its row's logits, settings, seed,
frame counter and codebook: never on batch position, and the RNG state is two device tensors that the engine
advances itself (once per frame), which a CUDA graph replays faithfully. A race key that comes out NaN (a -inf
logit meeting U = 1) counts as -inf. NaN logits give an unspecified index.

With `embed_table` and `embed_out`, row r of embed_out also receives row picked[r] of embed_table: the engine's
depth decoder takes the projected embedding of the code just drawn as its next input, and the kernel writes it
in the same launch.
"""

from __future__ import annotations

import torch

from seseme_cli.ops.kernels import dtype_code, has_cuda_kernels, kernels_module, stream_handle

Tensor = torch.Tensor

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_VOCAB = 8192  # the kernel's shared-memory row (kSampleMaxVocab); larger rows go to the reference
MAX_THREADS = 1024

# Random123's Philox4x32 multipliers and Weyl key increments.
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_MASK32 = 0xFFFFFFFF


def sample_topk_philox(
    logits: Tensor,
    temperature: Tensor,
    topk: Tensor,
    seeds: Tensor,
    counters: Tensor,
    codebook: int,
    out: Tensor | None = None,
    *,
    threads: int | None = None,
    embed_table: Tensor | None = None,
    embed_out: Tensor | None = None,
) -> Tensor:
    """Draw one index per row of logits (see the module docstring for the exact rule).

    logits (N, V) bf16/fp16/fp32 (rows may be strided, elements contiguous); temperature (N,) fp32;
    topk (N,) int32; seeds (N,) int64; counters (N,) int64 (the row's frame counter); codebook: int in
    [0, 2^32) (0..31 in CSM: which of the frame's draws this is); out: optional (N,) int64, written and
    returned. With `out` given the kernel path allocates nothing and never syncs the host.
    threads: threads per block for the kernel (a multiple of 32 in [32, 1024]; None = one Philox group of 4
    entries per thread), for autotuning; the result does not depend on it.
    embed_table (V, D) and embed_out (N, D), both or neither, same dtype (rows may be strided, elements
    contiguous): embed_out[r] = embed_table[picked[r]].

    The kernel runs for CUDA tensors with V <= MAX_VOCAB and contiguous 1-D settings (and embedding rows of a
    multiple of 16 bytes at 16-byte aligned addresses); anything else goes to `sample_topk_philox_ref`, which
    gives the same result.
    """
    _check_args(logits, temperature, topk, seeds, counters, codebook, out, threads, embed_table, embed_out)
    if not _kernel_applies(logits, temperature, topk, seeds, counters, out, embed_table, embed_out):
        return sample_topk_philox_ref(logits, temperature, topk, seeds, counters, codebook, out, threads=threads,
                                      embed_table=embed_table, embed_out=embed_out)
    if out is None:
        out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    _launch(logits, temperature, topk, seeds, counters, codebook, out, threads, embed_table, embed_out)
    return out


def sample_topk_philox_ref(
    logits: Tensor,
    temperature: Tensor,
    topk: Tensor,
    seeds: Tensor,
    counters: Tensor,
    codebook: int,
    out: Tensor | None = None,
    *,
    threads: int | None = None,
    embed_table: Tensor | None = None,
    embed_out: Tensor | None = None,
) -> Tensor:
    """`sample_topk_philox` in plain PyTorch (any device, vectorised over rows, no host sync); same signature
    and result. `threads` is checked and otherwise ignored."""
    _check_args(logits, temperature, topk, seeds, counters, codebook, out, threads, embed_table, embed_out)
    uniform = philox_uniform_ref(seeds, counters, codebook, logits.shape[1])
    picked = race_pick_ref(logits, temperature, topk, uniform)
    if embed_table is not None:
        embed_out.copy_(embed_table[picked])
    return picked if out is None else out.copy_(picked)


def race_pick_ref(logits: Tensor, temperature: Tensor, topk: Tensor, uniform: Tensor) -> Tensor:
    """The sampling rule given the uniforms U (N, V) in (0, 1]: greedy rows take the argmax, the others the
    exponential race over their top-k set. Split out so tests can feed chosen U (e.g. U = 1: E = 0, an
    infinite race key)."""
    n, vocab = logits.shape
    lf = logits.float()
    greedy = ~(temperature > 0) | (topk == 1)
    k = topk.long()
    k = torch.where((k <= 0) | (k >= vocab), torch.full_like(k, vocab), k)
    kth = lf.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
    keep = lf >= kth
    # The kernel computes these the same way, op by op in fp32 (true division, two logs).
    race = lf / temperature.unsqueeze(1) - torch.log(-torch.log(uniform))
    # NaN only from a -inf logit meeting E = 0 (U = 1): such an entry must not win.
    race = race.masked_fill(~keep | race.isnan(), float("-inf"))
    return torch.where(greedy, lf.argmax(dim=-1), race.argmax(dim=-1))


def philox_uniform_ref(seeds: Tensor, counters: Tensor, codebook: int, vocab: int) -> Tensor:
    """U (N, vocab) fp32 in (0, 1]: entry i of row r is word i % 4 of Philox4x32-10 with
    counter (i // 4, codebook, counters[r] lo, hi) and key (seeds[r] lo, hi), as ((u >> 8) + 1) * 2^-24."""
    groups = (vocab + 3) // 4
    seed = seeds.to(torch.int64).unsqueeze(1)
    counter = counters.to(torch.int64).unsqueeze(1)
    words = philox4x32_10_ref(
        (torch.arange(groups, dtype=torch.int64, device=seeds.device).unsqueeze(0), codebook,
         counter & _MASK32, (counter >> 32) & _MASK32),
        (seed & _MASK32, (seed >> 32) & _MASK32),
    )
    words = torch.stack(torch.broadcast_tensors(*words), dim=-1).reshape(seeds.shape[0], 4 * groups)[:, :vocab]
    return ((words >> 8) + 1).to(torch.float32) * 2.0**-24  # < 2^25: exact in fp32


def philox4x32_10_ref(counter: tuple, key: tuple) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 (Random123) on int64 tensors holding 32-bit words (python ints are accepted too);
    broadcasts; returns the 4 output words. Nothing overflows int64 (see `_mulhilo32`)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + PHILOX_W[0]) & _MASK32, (k1 + PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo32(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _mulhilo32(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of a * m, a a 32-bit word in int64, m a 32-bit constant: a is split in 16-bit
    halves so that every partial product stays below 2^49."""
    t = (a >> 16) * m  # < 2^48
    s = ((t & 0xFFFF) << 16) + (a & 0xFFFF) * m  # < 2^32 + 2^48
    return (t >> 16) + (s >> 32), s & _MASK32


def _check_args(logits, temperature, topk, seeds, counters, codebook, out, threads, embed_table=None,
                embed_out=None) -> None:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"sample_topk_philox: logits must be (N, V) with V > 0, got shape {tuple(logits.shape)}")
    n, device = logits.shape[0], logits.device
    for name, t, dtype in (("temperature", temperature, torch.float32), ("topk", topk, torch.int32),
                           ("seeds", seeds, torch.int64), ("counters", counters, torch.int64),
                           ("out", out, torch.int64)):
        if t is not None and (t.shape != (n,) or t.dtype != dtype or t.device != device):
            raise ValueError(
                f"sample_topk_philox: {name} must be ({n},) {dtype} on {device}, "
                f"got {tuple(t.shape)} {t.dtype} on {t.device}"
            )
    if isinstance(codebook, bool) or not isinstance(codebook, int) or not 0 <= codebook <= _MASK32:
        raise ValueError(f"sample_topk_philox: codebook must be a python int in [0, 2^32), got {codebook!r}")
    check_threads("sample_topk_philox", threads, MAX_THREADS)
    if (embed_table is None) != (embed_out is None):
        raise ValueError("sample_topk_philox: give embed_table and embed_out together, or neither")
    if embed_table is not None:
        vocab = logits.shape[1]
        if (embed_table.dim() != 2 or embed_table.shape[0] != vocab or embed_out.shape != (n, embed_table.shape[1])
                or embed_out.dtype != embed_table.dtype or embed_table.device != device or embed_out.device != device):
            raise ValueError(
                f"sample_topk_philox: embed_table must be ({vocab}, D) and embed_out ({n}, D), one dtype, on {device}; "
                f"got {tuple(embed_table.shape)} {embed_table.dtype} on {embed_table.device} and "
                f"{tuple(embed_out.shape)} {embed_out.dtype} on {embed_out.device}"
            )


def check_threads(op: str, threads: int | None, max_threads: int) -> None:
    """The launch-size knob of a kernel: None, or a multiple of 32 in [32, max_threads]."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads % 32 or not 32 <= threads <= max_threads:
        raise ValueError(f"{op}: threads must be None or a multiple of 32 in [32, {max_threads}], got {threads!r}")


def _embedding_fits(embed_table, embed_out) -> bool:
    """The kernel copies embedding rows in 16-byte words."""
    if embed_table is None:
        return True
    row_bytes = embed_table.shape[1] * embed_table.element_size()
    return (
        row_bytes % 16 == 0
        and all(t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
                for t in (embed_table, embed_out))
        and (embed_out.shape[0] <= 1 or embed_out.stride(0) >= embed_out.shape[1])
    )


def _kernel_applies(logits, temperature, topk, seeds, counters, out, embed_table=None, embed_out=None) -> bool:
    return (
        _embedding_fits(embed_table, embed_out)
        and logits.is_cuda
        and logits.dtype in KERNEL_DTYPES
        and logits.shape[1] <= MAX_VOCAB
        and (logits.stride(1) == 1 or logits.shape[1] == 1)
        and (logits.stride(0) >= logits.shape[1] or logits.shape[0] <= 1)
        and all(t.is_contiguous() for t in (temperature, topk, seeds, counters, out) if t is not None)
        and has_cuda_kernels()
    )


def _launch(logits, temperature, topk, seeds, counters, codebook, out, threads, embed_table=None,
            embed_out=None) -> None:
    """The launch itself, arguments already checked; paid once per codebook per frame outside graphs."""
    n, vocab = logits.shape
    if n == 0:
        return  # empty tensors may have null data pointers; there is nothing to do
    index = logits.device.index
    args = (
        out.data_ptr(),
        logits.data_ptr(),
        n,
        vocab,
        logits.stride(0) if n > 1 else vocab,
        temperature.data_ptr(),
        topk.data_ptr(),
        seeds.data_ptr(),
        counters.data_ptr(),
        codebook,
        dtype_code(logits.dtype),
        threads or 0,
        stream_handle(index),
    )
    if embed_table is not None:
        esize = embed_table.element_size()
        args += (embed_table.data_ptr(), embed_out.data_ptr(), embed_table.shape[1] * esize,
                 embed_out.stride(0) * esize)
    if index == torch.cuda.current_device():
        kernels_module().sample_topk_philox(*args)
    else:
        with torch.cuda.device(index):  # the launch goes to the current device's context
            kernels_module().sample_topk_philox(*args)

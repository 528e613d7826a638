"""Launch configs of the linear kernels (ops.linear, ops.linear_fp8): what a config is, which configs the kernels
accept (the same rules as cuda/linear.cuh), the built-in choice per shape, and the split-K workspace a config needs.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

GEMV_MAX_N = 8
MMA_MAX_N = 64
MAX_COUNTERS = 8192  # int32 tile counters at the start of a split-K workspace (cuda/linear.cuh)
KERNELS = ("gemv", "mma", "torch")


@dataclass(frozen=True)
class LinearConfig:
    """Launch parameters of the linear kernels.

    kernel: "gemv" (n <= 8, CUDA cores), "mma" (n <= 64, tensor cores) or "torch" (cuBLAS through torch.mm /
        torch.addmm into `out`, one rounding like ours; no SwiGLU; other fields ignored): cuBLAS is faster
        than "mma" for plain layers at n > 16 with m a multiple of 64.
    warps: warps per block (1, 2, 4, 8).
    rows: gemv: output rows per warp (1, 2, 4); mma: 16-row weight tiles per warp (1, 2, 4; >= 2 for swiglu;
        rows * padded_n / 8 <= 16, padded_n in 8, 16, 32, 64).
    split_k: gemv: warps of a block splitting K of one row group, a power of two dividing warps (no workspace);
        mma: blocks splitting K, 1..16 (> 1 needs a workspace).
    unroll: gemv: 16-byte weight loads in flight per weight row and lane (2, 4, 8; rows * unroll, doubled for
        swiglu, <= 16). Ignored by mma.
    stages: mma: cp.async pipeline depth (2, 3, 4; shared memory stages * (warps*16*rows + padded_n) * 128 bytes
        <= 227 KB). Ignored by gemv.
    """

    kernel: str = "gemv"
    warps: int = 4
    rows: int = 1
    split_k: int = 1
    unroll: int = 8
    stages: int = 3

    def check(self, n: int, m: int, k: int, swiglu: bool = False) -> None:
        """ValueError unless the kernels can run this config for x (n, k), m output columns (f for swiglu)."""
        err = config_error(self, n, m, k, swiglu)
        if err is not None:
            raise ValueError(f"linear: config {self} cannot run n={n}, m={m}, k={k}, swiglu={swiglu}: {err}")

    def codes(self) -> tuple[int, int, int, int, int, int]:
        """(kernel, warps, rows, split_k, unroll, stages) as the binding takes them (gemv and mma only)."""
        return (KERNELS.index(self.kernel), self.warps, self.rows, self.split_k, self.unroll, self.stages)


def _mma_npad(n: int) -> int:
    return 8 if n <= 8 else 16 if n <= 16 else 32 if n <= 32 else 64


def _pow2_upto(v: int, hi: int) -> bool:
    return isinstance(v, int) and 1 <= v <= hi and v & (v - 1) == 0


def _mma_grid(m: int, k: int, swiglu: bool, cfg: LinearConfig) -> tuple[int, int]:
    """(row tiles, K slices) as the launcher makes them; every slice gets >= 1 chunk of 64 k."""
    rows_out = cfg.warps * 16 * cfg.rows // (2 if swiglu else 1)
    tiles = -(-m // rows_out)
    nchunks = -(-k // 64)
    per_split = -(-nchunks // cfg.split_k)
    return tiles, -(-nchunks // per_split)


def config_error(cfg: LinearConfig, n: int, m: int, k: int, swiglu: bool) -> str | None:
    """The rules of linearconfig_error in cuda/linear.cuh (a test holds the two equal)."""
    if n < 1 or m < 1 or k < 1:
        return "n, m and k must be >= 1"
    if m > 2**30 - 1 or k > 2**31 - 1 or n * k > 2**31 - 1 or n * m > 2**31 - 1:
        return "sizes too large for 32-bit indexing"
    if k % 8:
        return "k must be a multiple of 8 for the kernels"
    if cfg.kernel == "torch":
        return "the torch (cuBLAS) kernel has no SwiGLU epilogue" if swiglu else None
    if not _pow2_upto(cfg.warps, 8):
        return "warps must be 1, 2, 4 or 8"
    if cfg.kernel == "gemv":
        if n > GEMV_MAX_N:
            return f"the GEMV kernel takes n <= {GEMV_MAX_N}"
        if not _pow2_upto(cfg.rows, 4):
            return "GEMV rows (output rows per warp) must be 1, 2 or 4"
        if cfg.unroll not in (2, 4, 8):
            return "GEMV unroll must be 2, 4 or 8"
        if cfg.rows * cfg.unroll * (2 if swiglu else 1) > 16:
            return "GEMV rows * unroll (* 2 for swiglu) must be <= 16 (loads in flight per lane)"
        if not _pow2_upto(cfg.split_k, 8) or cfg.warps % cfg.split_k:
            return "GEMV split_k must be a power of two dividing warps"
        return None
    if cfg.kernel == "mma":
        if n > MMA_MAX_N:
            return f"the MMA kernel takes n <= {MMA_MAX_N}"
        if not _pow2_upto(cfg.rows, 4):
            return "MMA rows (16-row tiles per warp) must be 1, 2 or 4"
        if swiglu and cfg.rows < 2:
            return "MMA with swiglu needs rows >= 2 (gate and up tiles per warp)"
        if cfg.rows * _mma_npad(n) > 128:
            return "MMA rows * padded n / 8 must be <= 16 (accumulators)"
        if cfg.stages not in (2, 3, 4):
            return "MMA stages must be 2, 3 or 4"
        if not (isinstance(cfg.split_k, int) and 1 <= cfg.split_k <= 16):
            return "MMA split_k must be in 1..16"
        if cfg.stages * (cfg.warps * 16 * cfg.rows + _mma_npad(n)) * 128 > 227 * 1024:
            return "MMA config needs more than 227 KB of shared memory"
        tiles, splits = _mma_grid(m, k, swiglu, cfg)
        if splits > 1 and tiles > MAX_COUNTERS:
            return "too many row tiles for split-K"
        return None
    return f"kernel must be one of {KERNELS}"


def as_config(config: LinearConfig | dict | None) -> LinearConfig | None:
    if config is None or isinstance(config, LinearConfig):
        return config
    if isinstance(config, dict):
        names = {f.name for f in dataclasses.fields(LinearConfig)}
        unknown = set(config) - names
        if unknown:
            raise ValueError(f"linear: unknown config fields {sorted(unknown)}; known: {sorted(names)}")
        return LinearConfig(**config)
    raise ValueError(f"linear: config must be a LinearConfig, a dict or None, got {type(config).__name__}")


def gemv_config(n: int, m: int, packs: int, swiglu: bool, short_rows: bool, sms: int) -> LinearConfig:
    """The GEMV's rule for x (n, k) and m output rows whose weight rows are `packs` 16-byte loads long (bf16:
    k / 8, fp8: k / 16); short_rows: rows short enough for 4 loads in flight per lane rather than 8."""
    rows = 1 if n == 1 or (swiglu and n == 2) else 2
    unroll = 2 if rows > 1 else 4 if swiglu or short_rows else 8  # 4-8 weight loads in flight per lane
    while unroll > 2 and 32 * unroll > packs:  # a step of 32 * unroll packs should not run past the row
        unroll //= 2
    chunks = -(-packs // (32 * unroll))
    row_warps = -(-m // rows)
    split = 1
    while split < 8 and 2 * split <= chunks and row_warps * split < 12 * sms:
        split *= 2
    return LinearConfig("gemv", warps=max(4, split), rows=rows, split_k=split, unroll=unroll, stages=3)


@functools.lru_cache(maxsize=4096)
def default_config(n: int, m: int, k: int, swiglu: bool = False, *, split_ok: bool = True,
                   sms: int = 132) -> LinearConfig:
    """The built-in launch config for x (n, k) and m output columns (f for swiglu) on a GPU with `sms`
    multiprocessors. split_ok=False: no config that needs a workspace. For n > 64 (the reference runs)
    and k % 8 != 0 it still returns a config, which the dispatcher does not use.

    Rules read off a sweep of every config over the model's shapes on an H100 (CUDA graphs, weights streamed
    from HBM): the GEMV wins up to n = 4, and to n = 8 for plain layers with k <= 2048; the MMA kernel wants
    small row tiles (one 16-row tile per warp, 32-64 rows per block) and K split until there are ~2-4 blocks
    per SM; SwiGLU layers (m = 8192) have enough row tiles without splitting. cuBLAS matches or beats the MMA kernel
    on plain layers from n = 17 on (from n = 9 for k <= 2048), except for odd m (2051), where it is slow.
    """
    if n <= 4 or (n <= GEMV_MAX_N and k <= 2048 and not swiglu):
        return gemv_config(n, m, k // 8, swiglu, short_rows=k <= 2048, sms=sms)
    if not swiglu and m % 64 == 0 and (n > 16 or k <= 2048):
        return LinearConfig("torch")
    npad = _mma_npad(min(n, MMA_MAX_N))
    warps = 2 if n <= 16 else 4
    rows = 2 if swiglu else 1
    tiles = -(-m // (warps * 16 * rows // (2 if swiglu else 1)))
    split = 1
    if split_ok and not swiglu:
        target = (4 if n <= 16 else 2) * sms
        split = max(1, min(16, -(-k // 64) // 2, round(target / tiles)))
    stages = 4
    while stages > 2 and stages * (warps * 16 * rows + npad) * 128 > 227 * 1024:
        stages -= 1
    return LinearConfig("mma", warps=warps, rows=rows, split_k=split, unroll=8, stages=stages)


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device | str | None) -> int:
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return 132
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def linear_workspace_bytes(n: int, m: int, k: int, swiglu: bool = False, config: LinearConfig | dict | None = None,
                           *, device: torch.device | str | None = None) -> int:
    """Bytes of workspace the kernel needs for this problem: for `config`, or for the default config with a
    workspace on `device`. 0 when the config does not split K."""
    cfg = as_config(config) or default_config(n, m, k, swiglu, sms=sm_count(device))
    return workspace_bytes(n, m, k, swiglu, cfg)


@functools.lru_cache(maxsize=4096)
def workspace_bytes(n: int, m: int, k: int, swiglu: bool, cfg: LinearConfig) -> int:
    if cfg.kernel != "mma" or config_error(cfg, n, m, k, swiglu) is not None:
        return 0  # gemv and torch need none
    tiles, splits = _mma_grid(m, k, swiglu, cfg)
    if splits <= 1:
        return 0
    return MAX_COUNTERS * 4 + splits * tiles * (cfg.warps * 32 * cfg.rows * _mma_npad(n) // 2) * 4


def linear_workspace(n: int, m: int, k: int, swiglu: bool = False, config: LinearConfig | dict | None = None,
                     *, device: torch.device | str = "cuda") -> Tensor:
    """A zeroed workspace (uint8) big enough for this problem; allocate it outside graph capture. For several
    shapes, allocate once with the max of their linear_workspace_bytes and pass the same buffer to all."""
    nbytes = linear_workspace_bytes(n, m, k, swiglu, config, device=device)
    return torch.zeros(max(nbytes, 16), dtype=torch.uint8, device=device)

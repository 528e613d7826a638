"""The GPU engine: static memory, one CUDA graph per batch bucket, prefill, and the frame loop.

`Engine(model, max_batch)` allocates everything once (KV caches, activations, workspaces), packs the weights
and captures `run_frame` for each bucket (1, 2, 4, ... 128, then every 64 rows, and max_batch). A request's
prompt is prefilled into its cache row by the engine's kernels (prefill.py: the prompts of a step replay one
padded graph, or run eagerly when they are more rows than a chunk); from then on every frame is one graph
replay. The caller copies finished frames to the host without waiting.
"""

from __future__ import annotations

import logging

import torch

from seseme_cli.model.reference import CsmModel
from seseme_cli.engine.tuning import load_tuning
from seseme_cli.engine.frame import DepthSchedule, FrameBuffers, run_frame
from seseme_cli.engine.pack import pack, weight_format
from seseme_cli.engine.prefill import Prefill, chunk_rows_for, pack_prompts

log = logging.getLogger("seseme")


def bytes_per_row(cfg, dtype: torch.dtype) -> int:
    """GPU memory one batch row costs: its KV caches plus its activations (a generous estimate)."""
    size = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for t in (cfg.backbone, cfg.depth):
        total += 2 * t.num_layers * t.max_seq_len * t.num_kv_heads * t.head_dim * size  # K and V caches
        total += 2 * (6 * t.dim + 3 * t.num_heads * t.head_dim + t.ffn_dim) * size  # activations (x2: depth step 0)
        total += 2 * t.num_heads * t.head_dim * 4 * 64  # split-KV workspace, fp32
    return total + 2 * cfg.audio_vocab_size * size


def check_batch_fits(cfg, dtype: torch.dtype, device, batch_size: int, reserve_bytes: int = 1 << 30,
                     free_bytes: int | None = None) -> None:
    """Raise InputError naming the largest batch that fits when `batch_size` does not (free_bytes: the GPU's
    free memory, read from the device when not given)."""
    from seseme_cli.errors import InputError

    free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
    per_row = bytes_per_row(cfg, dtype)
    largest = max(0, int((free - reserve_bytes) // per_row))
    if batch_size > largest:
        raise InputError(
            f"batch size {batch_size} does not fit in GPU memory ({free / 1e9:.1f} GB free, about "
            f"{per_row / 1e6:.0f} MB per row): the largest that fits is {largest}"
        )


BUCKET_STEP = 64  # above 128 rows, the batch buckets are this many rows apart


def bucket_sizes(max_batch: int) -> list[int]:
    """The batch sizes that get a frame graph (a step runs the smallest that holds its rows): powers of two up
    to 128, then every BUCKET_STEP rows, and max_batch. Up to ~128 rows a frame costs about the same whatever
    its rows; above, it grows in proportion (H100, BENCHMARKS.md run 6: 12.25 ms at 128 rows, 15.31 at 256,
    21.29 at 512), so buckets that doubled there made a server at 300 streams pay for 512 rows every step."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size = size * 2 if size < 128 else size + BUCKET_STEP
    return sizes + [max_batch]


class Engine:
    def __init__(self, model: CsmModel, max_batch: int, use_graphs: bool = True, weights: str | None = None):
        """weights: "bf16" (as loaded) or "fp8" (engine.pack: e4m3 projections for the GEMV); None: the model's
        current format (fp8 once an engine quantized it)."""
        self.model = model
        self.cfg = model.cfg
        self.device = model.c0_head.weight.device
        self.max_batch = max_batch
        if self.device.type == "cuda":
            check_batch_fits(self.cfg, model.c0_head.weight.dtype, self.device, max_batch)
        model.setup_caches(max_batch)
        self.weights = pack(model, weights or weight_format(model))
        self.tuning = load_tuning(self.device)  # this GPU's `seseme tune` cache (logged), or None: defaults
        self.buf = FrameBuffers(self.cfg, max_batch, self.device, model.c0_head.weight.dtype, self.tuning)
        self.prefill = Prefill(model, self.weights.backbone, self.tuning, self.buf.linear_workspace,
                               chunk_rows_for(max_batch))
        self.buckets = bucket_sizes(max_batch)
        self.schedules = {b: DepthSchedule(b, self.cfg.num_codebooks, self.device) for b in self.buckets}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if use_graphs:
            self._capture_all()

    # --- graphs ------------------------------------------------------------------------------------------

    def _capture_all(self) -> None:
        try:
            # The largest first, all in its memory pool: a frame's few temporaries then fit in memory the pool
            # already holds (the graphs are replayed one at a time, their outputs in static buffers), so finer
            # buckets cost capture time, not memory.
            pool = None
            for b in sorted(self.buckets, reverse=True):
                self.graphs[b] = self._capture(b, pool)
                pool = self.graphs[b].pool()
            self.graphs = dict(sorted(self.graphs.items()))
            with torch.inference_mode():
                self.prefill.capture()  # the prompts admitted in a step (time to first audio, host time under load)
        except RuntimeError as err:  # capture is an optimisation: run eagerly if the driver refuses it
            log.warning("CUDA graph capture failed (%s); running frames eagerly (slower)", str(err).splitlines()[0])
            self.graphs.clear()
            self.prefill.graphs = {}

    @torch.inference_mode()
    def _capture(self, b: int, pool=None) -> torch.cuda.CUDAGraph:
        # Warm up on a side stream (first launches load modules), then capture. The warm-up frames write
        # garbage at the rows' current positions; set_row rewrites every row's state before it is used.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            run_frame(self.weights, self.buf, self.schedules[b], b)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            run_frame(self.weights, self.buf, self.schedules[b], b)
        return graph

    def bucket_for(self, n: int) -> int:
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"{n} rows requested; this engine was set up for 1..{self.max_batch}")
        return next(b for b in self.buckets if b >= n)

    # --- requests ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def set_row(self, row: int, tokens: torch.Tensor, mask: torch.Tensor, temperature: float, topk: int, seed: int,
                start: int = 0) -> None:
        """Prefill a prompt (T, K+1) into cache row `row` from cache position `start` (the slots before it are
        kept: the frames before this prompt's): frames 0..T-2 into the caches, frame T-1 becomes the input of the
        row's first graph step."""
        self.set_rows([(row, tokens, mask, temperature, topk, seed, start)])

    @torch.inference_mode()
    def set_rows(self, requests) -> None:
        """`set_row` for many rows at once: [(row, tokens, mask, temperature, topk, seed[, start]), ...], each row
        at most once. All prompts are prefilled together through the engine's kernels (`self.prefill`), one query
        row per frame; up to a chunk of rows replays a captured graph padded to the next of prefill.GRAPH_ROWS,
        more run eagerly in chunks, nothing padded.
        ValueError for a bad request (see prefill.pack_prompts)."""
        if not requests:
            return
        prompts = pack_prompts(requests, self.cfg.num_codebooks, self.max_batch, self.cfg.max_seq_len, self.device)
        buf, rows = self.buf, prompts.rows
        buf.backbone.h[rows] = self.prefill(prompts)  # the first graph step's input
        buf.positions[rows] = prompts.last
        buf.lengths[rows] = (prompts.last + 1).int()
        buf.temperature[rows] = prompts.temperature
        buf.topk[rows] = prompts.topk
        buf.seeds[rows] = prompts.seeds
        buf.counters[rows] = 0

    @torch.inference_mode()
    def step_teacher_forced(self, n: int, teacher) -> torch.Tensor:
        """An eager frame whose codes are forced (tests compare its logits with the reference model's)."""
        b = self.bucket_for(n)
        run_frame(self.weights, self.buf, self.schedules[b], b, teacher)
        return self.buf.frame_codes[:b]

    @torch.inference_mode()
    def step(self, n: int) -> torch.Tensor:
        """One frame for rows 0..n-1 (rows up to the bucket size run too and are ignored).
        Returns a view of the frame's codes (bucket, K) on the GPU, valid until the next step."""
        b = self.bucket_for(n)
        if b in self.graphs:
            self.graphs[b].replay()
        else:
            run_frame(self.weights, self.buf, self.schedules[b], b)
        return self.buf.frame_codes[:b]

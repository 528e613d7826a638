"""The GPU engine: static memory, one CUDA graph per batch bucket, eager prefill, and the frame loop.

`Engine(model, max_batch)` allocates everything once (KV caches, activations, workspaces), packs the weights
and captures `run_frame` for each bucket (1, 2, 4, ... max_batch). A request's prompt is prefilled eagerly
into its cache row by the reference model (same weights, same caches); from then on every frame is one graph
replay. Finished frames are copied to pinned host memory without waiting; the host looks at them (EOS) only
every few frames, so the GPU never idles on the CPU.
"""

from __future__ import annotations

import logging

import torch

from ..model import CsmModel
from .frame import DepthSchedule, FrameBuffers, run_frame
from .pack import pack

log = logging.getLogger("seseme")

EOS_CHECK_EVERY = 8


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [1 << i for i in range(max_batch.bit_length()) if (1 << i) < max_batch]
    return sizes + [max_batch]


class Engine:
    def __init__(self, model: CsmModel, max_batch: int, use_graphs: bool = True):
        self.model = model
        self.cfg = model.cfg
        self.device = model.c0_head.weight.device
        self.max_batch = max_batch
        model.setup_caches(max_batch)
        self.weights = pack(model)
        self.buf = FrameBuffers(self.cfg, max_batch, self.device, model.c0_head.weight.dtype)
        self.buckets = bucket_sizes(max_batch)
        self.schedules = {b: DepthSchedule(b, self.cfg.num_codebooks, self.device) for b in self.buckets}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if use_graphs:
            self._capture_all()

    # --- graphs ------------------------------------------------------------------------------------------

    def _capture_all(self) -> None:
        try:
            for b in self.buckets:
                self.graphs[b] = self._capture(b)
        except RuntimeError as err:  # capture is an optimisation: run eagerly if the driver refuses it
            log.warning("CUDA graph capture failed (%s); running frames eagerly (slower)", str(err).splitlines()[0])
            self.graphs.clear()

    @torch.inference_mode()
    def _capture(self, b: int) -> torch.cuda.CUDAGraph:
        # Warm up on a side stream (first launches load modules), then capture. The warm-up frames write
        # garbage at the rows' current positions; set_row rewrites every row's state before it is used.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            run_frame(self.weights, self.buf, self.schedules[b], b)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run_frame(self.weights, self.buf, self.schedules[b], b)
        return graph

    def bucket_for(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    # --- requests ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def set_row(self, row: int, tokens: torch.Tensor, mask: torch.Tensor, temperature: float, topk: int, seed: int) -> None:
        """Prefill a prompt (T, K+1) into cache row `row`: frames 0..T-2 eagerly, frame T-1 becomes the
        input of the row's first graph step."""
        model, buf = self.model, self.buf
        T = tokens.shape[0]
        x = model.embed_frames(tokens[None].to(self.device), mask[None].to(self.device)).to(buf.emb.dtype)
        if T > 1:
            positions = torch.arange(T - 1, device=self.device)[None]
            model.backbone(x[:, :-1], positions, cache_rows=torch.tensor([row], device=self.device))
        buf.emb[row] = x[0, -1]
        buf.positions[row] = T - 1
        buf.lengths[row] = T
        buf.temperature[row] = float(temperature)
        buf.topk[row] = 1 if temperature <= 0 else int(topk)
        buf.seeds[row] = int(seed)
        buf.counters[row] = 0

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


class FrameCollector:
    """Copies each step's codes to pinned host memory without blocking; `frames()` syncs on demand."""

    def __init__(self, engine: Engine, max_frames: int, rows: int):
        self.engine = engine
        self.rows = rows
        K = engine.cfg.num_codebooks
        self.host = torch.empty(max_frames, rows, K, dtype=torch.long, pin_memory=True)
        self.done = torch.cuda.Event()
        self.count = 0

    def add(self, codes: torch.Tensor) -> None:
        self.host[self.count].copy_(codes[: self.rows], non_blocking=True)
        self.count += 1
        self.done.record()

    def frames(self) -> torch.Tensor:
        self.done.synchronize()
        return self.host[: self.count]


@torch.inference_mode()
def engine_generate(engine: Engine, tokens, mask, max_frames: int, temperature: float, topk: int, seed: int) -> torch.Tensor:
    """One request on row 0: codes (frames, K) on the CPU, stopping before the first all-zero frame."""
    engine.set_row(0, tokens, mask, temperature, topk, seed)
    collector = FrameCollector(engine, max_frames, rows=1)
    checked = 0
    for i in range(max_frames):
        collector.add(engine.step(1))
        if (i + 1) % EOS_CHECK_EVERY == 0 or i + 1 == max_frames:
            frames = collector.frames()[:, 0]
            eos = (frames[checked:] == 0).all(dim=1).nonzero()
            if len(eos):
                return frames[: checked + int(eos[0])].clone()
            checked = i + 1
    return collector.frames()[:, 0].clone()

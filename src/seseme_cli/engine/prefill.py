"""Prompt prefill through the engine's own kernels: every prompt frame but the last is one query row.

A prompt of T frames for cache row r becomes T-1 rows at positions 0..T-2, all reading and writing cache row r,
each attending to slots 0..position. `run_stack` appends a layer's K/V for all rows before any row of that layer
attends, so the rows of one prompt see each other causally. The prompts of several requests are concatenated
as rows; a batch longer than a chunk runs as successive chunks in order, and a later chunk attends to the cache
entries the earlier ones wrote. A request's last frame is only embedded: it is the input of the row's first
frame step. This replaces an eager reference-model prefill that was launch bound (a 40-frame prompt: ~860
launches, 16.6 ms of host time for 2.9 ms of GPU time on an H100) with ~10 launches per layer.

What a prefill reads from the host goes to the device as one int64 tensor (pinned on CUDA): one copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seseme_cli.model.reference import CsmModel
from seseme_cli.ops.linear_config import linear_workspace_bytes
from seseme_cli.engine.tuning import tuned_config
from seseme_cli.engine.frame import StackBuffers, run_stack
from seseme_cli.engine.pack import StackWeights

Tensor = torch.Tensor

# Rows per chunk. Up to 64 rows the linear layers run our kernels into the static buffers; above, cuBLAS through
# the ops' reference path (a few temporaries from the caching allocator). A chunk costs ~130 (<= 64 rows) to ~270
# launches of host time whatever its length, and at 256 rows the host is the bottleneck: 512 prompts of 58 frames
# (29,184 rows) took 1.20 s in chunks of 256 rows (1.0 s of it host time for 0.27 s of GPU time), 0.37 s in
# chunks of 1024 and 0.25 s in chunks of 2048 (H100, scripts/decode_probe.py). Memory grows with the chunk: at
# CSM-1B's shapes ~37 KB of bf16 activations and ~270 KB of split-KV workspace per row (StackBuffers sizes it for
# the most splits any row count may use). So an engine for one request keeps small chunks (its prompt is one
# chunk anyway) and an engine for many rows, which prefills many prompts at once, gets big ones.
CHUNK_ROWS = 256
MAX_CHUNK_ROWS = 2048
# The prompts admitted in one step, up to this many prefill rows in all (and no more prompts than rows),
# replay a CUDA graph padded to the next of these sizes that the engine's chunk holds. Eager, a prefill is launch
# bound: one 39-frame prompt is ~100 launches, 4.9 ms of host time while the GPU needs ~1 ms (H200, BENCHMARKS.md
# run 13); that is most of the time to first audio at N = 1, and under load (a server admitting a few prompts every
# step) it held the GIL for ~20% of the time at 512 streams (py-spy, run 15). From 64 rows, where the GPU time
# starts to count, the sizes grow by at most 1.5x, so a padded replay does at most half as much work again.
GRAPH_ROWS = (8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def chunk_rows_for(max_batch: int) -> int:
    """Prefill chunk for an engine of `max_batch` rows: 4 rows per batch row, within [CHUNK_ROWS, MAX_CHUNK_ROWS]."""
    return min(MAX_CHUNK_ROWS, max(CHUNK_ROWS, 4 * max_batch))


@dataclass
class Prompts:
    """Requests packed for the prefill: device tensors, and host numbers so the prefill loop never syncs.

    Frame rows: every request's frames but its last, request after request (num_prefill rows), then the last
    frame of each request, in request order (R rows)."""

    tokens: Tensor  # (num_prefill + R, K + 1) int64
    mask: Tensor  # (num_prefill + R, K + 1) bool
    positions: Tensor  # (num_prefill,) int64: a prefill row's position in its prompt
    cache_rows: Tensor  # (num_prefill,) int64
    lengths: Tensor  # (num_prefill,) int64: positions + 1 (causal)
    rows: Tensor  # (R,) int64: each request's cache row
    last: Tensor  # (R,) int64: position of each request's last frame, T - 1
    temperature: Tensor  # (R,) float32
    topk: Tensor  # (R,) int32 (1 where temperature <= 0: greedy)
    seeds: Tensor  # (R,) int64
    frames: tuple[int, ...]  # T of each request

    @property
    def num_prefill(self) -> int:
        return sum(self.frames) - len(self.frames)


def pack_prompts(requests, num_codebooks: int, num_rows: int, max_seq_len: int, device) -> Prompts:
    """[(row, tokens (T, K+1), mask (T, K+1), temperature, topk, seed[, start]), ...] -> Prompts on `device`.
    `start` (default 0): the cache position of the prompt's first frame; the row's cache slots before it are kept
    (they hold the frames before these, e.g. a long text's earlier chunks) and the prompt's rows attend to them.

    ValueError for a malformed request, a row outside [0, num_rows) or given twice, or start + T outside
    [1, max_seq_len] (the kernels would silently skip an out-of-range cache slot)."""
    if not requests:
        raise ValueError("pack_prompts: no requests")
    width = num_codebooks + 1
    rows, tokens, masks, temps, topks, seeds, starts = [], [], [], [], [], [], []
    for row, t, m, temperature, topk, seed, *start in requests:
        start = int(start[0]) if start else 0
        if t.dim() != 2 or t.shape[1] != width or m.shape != t.shape:
            raise ValueError(f"prompt for row {row}: tokens and mask must be (T, {width}), "
                             f"got {tuple(t.shape)} and {tuple(m.shape)}")
        if start < 0 or not 1 <= start + t.shape[0] <= max_seq_len:
            raise ValueError(f"prompt for row {row}: {t.shape[0]} frames from position {start}; positions "
                             f"0..{max_seq_len - 1} fit the context window")
        if not 0 <= row < num_rows or row in rows:
            raise ValueError(f"row {row}: rows must be distinct and in [0, {num_rows})")
        rows.append(int(row))
        starts.append(start)
        tokens.append(t.to("cpu", torch.long))
        masks.append(m.to("cpu", torch.long))
        temps.append(float(temperature))
        topks.append(1 if temperature <= 0 else int(topk))
        seeds.append(int(seed))
    frames = [t.shape[0] for t in tokens]
    pre = torch.tensor([T - 1 for T in frames])
    positions = torch.cat([torch.arange(start, start + T - 1) for start, T in zip(starts, frames)])
    parts = [
        torch.cat([t[:-1] for t in tokens] + [t[-1:] for t in tokens]).flatten(),
        torch.cat([m[:-1] for m in masks] + [m[-1:] for m in masks]).flatten(),
        positions,
        torch.repeat_interleave(torch.tensor(rows), pre),
        positions + 1,
        torch.tensor(rows),
        pre + torch.tensor(starts),  # the last frame's position
        torch.tensor(topks),
        torch.tensor(seeds),
        torch.tensor(temps, dtype=torch.float64).view(torch.int64),  # the bits travel in the int64 tensor
    ]
    device = torch.device(device)
    host = torch.empty(sum(p.numel() for p in parts), dtype=torch.long, pin_memory=device.type == "cuda")
    torch.cat(parts, out=host)
    tok, msk, pos, crow, lens, rws, last, topk_, seed_, temp = host.to(device, non_blocking=True).split(
        [p.numel() for p in parts])
    return Prompts(tokens=tok.view(-1, width), mask=msk.view(-1, width).bool(), positions=pos, cache_rows=crow,
                   lengths=lens, rows=rws, last=last, temperature=temp.view(torch.float64).float(), topk=topk_.int(),
                   seeds=seed_, frames=tuple(frames))


def prefill_workspace_bytes(weights: StackWeights, rows: int, tuning=None, device=None) -> int:
    """Split-K workspace the stack's linear layers need at every row count 1..rows (tuned configs included)."""
    layer = weights.layers[0]
    dim, ffn = layer.wqkv.shape[1], layer.w_down.shape[1]
    shapes = ((layer.wqkv.shape[0], dim, False), (dim, layer.wo.shape[1], False), (ffn, dim, True), (dim, ffn, False))
    return max(linear_workspace_bytes(n, m, k, swiglu, tuned_config(tuning, "linear", n, m, k, swiglu).get("config"),
                                      device=device)
               for n in range(1, rows + 1) for m, k, swiglu in shapes)


class Prefill:
    """Static buffers for chunks of `chunk_rows` backbone rows; call it with Prompts to fill the KV caches."""

    def __init__(self, model: CsmModel, weights: StackWeights, tuning=None, shared_workspace: Tensor | None = None,
                 chunk_rows: int = CHUNK_ROWS):
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        p = model.c0_head.weight
        self.model, self.weights, self.tuning, self.chunk_rows = model, weights, tuning, chunk_rows
        self.graphs: dict[int, _PrefillGraph] = {}  # prefill rows -> graph (capture())
        self.buf = StackBuffers(model.cfg.backbone, chunk_rows, p.device, p.dtype)
        # The frames' zeroed split-K workspace serves here too (same stream, left zeroed by every call) when it
        # is big enough for the chunk's row counts; else one of our own.
        need = max(prefill_workspace_bytes(weights, chunk_rows, tuning, p.device), 16)
        if shared_workspace is not None and shared_workspace.numel() * shared_workspace.element_size() >= need:
            self.workspace = shared_workspace
        else:
            self.workspace = torch.zeros(need, device=p.device, dtype=torch.uint8)

    def __call__(self, prompts: Prompts) -> Tensor:
        """Write every prefill row's K/V (all layers) into its cache row; return the last frames' embeddings
        (R, dim), in the engine's dtype. Prompts that fit a captured graph replay it."""
        graph = self._graph_for(prompts)
        if graph is not None:
            return graph(prompts)
        P = prompts.num_prefill
        for start in range(0, max(P, 1), self.chunk_rows):
            end = min(start + self.chunk_rows, P)
            stop = end if end < P else prompts.tokens.shape[0]  # the final chunk embeds the last frames too
            x = self._chunk(prompts.tokens[start:stop], prompts.mask[start:stop], prompts.positions[start:end],
                            prompts.lengths[start:end], prompts.cache_rows[start:end], end - start)
        return x

    def _chunk(self, tokens, mask, positions, lengths, cache_rows, n: int) -> Tensor:
        """n prefill rows (tokens' first n frames) through the stack; returns the embeddings of the frames after
        them (the last frames, for the final chunk)."""
        x = self.model.embed_frames(tokens[None], mask[None])[0]
        if n:
            self.buf.h[:n].copy_(x[:n])
            run_stack(self.weights, self.buf, n, positions, lengths, cache_rows, self.workspace, self.tuning)
        return x[n:].to(self.buf.h.dtype)

    # --- the prompts of one step as a CUDA graph --------------------------------------------------------------

    def capture(self) -> None:
        """Capture the prefill for each of GRAPH_ROWS that a chunk holds (CUDA only), the largest first, all in
        its memory pool (they are replayed one at a time, and each keeps its output). The warm-ups write K/V
        into cache slot 0 of row 0: a row's own prefill rewrites its slots before it reads them, as after the
        frame graphs' warm-up."""
        graphs, pool = {}, None
        for rows in sorted((r for r in GRAPH_ROWS if r <= self.chunk_rows), reverse=True):
            graphs[rows] = graph = _PrefillGraph(self, rows, self.buf.h.device, pool)
            pool = graph.graph.pool()
        self.graphs = dict(sorted(graphs.items()))  # smallest first: _graph_for takes the first that fits

    def _graph_for(self, prompts: Prompts):
        P, R = prompts.num_prefill, len(prompts.frames)
        if not self.graphs or P == 0:
            return None
        return next((g for rows, g in self.graphs.items() if rows >= P and g.max_prompts >= R), None)


class _PrefillGraph:
    """The prefill of up to `rows` prefill rows of up to `rows` prompts, replayed from a CUDA graph over static
    inputs. Fewer rows are padded with copies of the last prefill row: each writes the same K/V into the same
    cache slot again (same token, position and row), and their outputs are dropped; so are the embeddings of
    the last-frame slots that no prompt fills."""

    def __init__(self, prefill: Prefill, rows: int, device, pool=None):
        width = prefill.model.cfg.num_codebooks + 1
        self.rows, self.max_prompts = rows, rows
        # The prefill rows, then the prompts' last frames.
        self.tokens = torch.zeros(rows + self.max_prompts, width, dtype=torch.long, device=device)
        self.mask = torch.zeros(rows + self.max_prompts, width, dtype=torch.bool, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.lengths = torch.ones(rows, dtype=torch.long, device=device)
        self.cache_rows = torch.zeros(rows, dtype=torch.long, device=device)
        args = (self.tokens, self.mask, self.positions, self.lengths, self.cache_rows, rows)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: modules load and the caching allocator sizes its blocks
            prefill._chunk(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = prefill._chunk(*args)

    def __call__(self, prompts: Prompts) -> Tensor:
        P, R = prompts.num_prefill, len(prompts.frames)
        pad = self.rows - P
        for static, given in ((self.tokens, prompts.tokens), (self.mask, prompts.mask)):
            static[:P].copy_(given[:P])
            static[P:self.rows].copy_(given[P - 1 : P].expand(pad, -1))
            static[self.rows : self.rows + R].copy_(given[P:])
        for static, given in ((self.positions, prompts.positions), (self.lengths, prompts.lengths),
                              (self.cache_rows, prompts.cache_rows)):
            static[:P].copy_(given)
            static[P:].copy_(given[P - 1 :].expand(pad))
        self.graph.replay()
        return self.out[:R]

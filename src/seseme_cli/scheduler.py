"""Continuous batching: many SpeechJobs generate together on the engine's cache rows.

Each row holds one generation with its own prompt length, position, sampling settings, seed and frame limit.
Every round runs k frames for rows 0..n-1 (n = highest busy row + 1), copies their codes to the host without
waiting, syncs once, and then per row: drops frames from the first all-zero frame on (EOS), and when a row's
generation is over (EOS or limit) it starts the job's next chunk (long-form) or the next job, at once. A
finished row never waits for the slowest one.

An optional `audio` sink (row_audio.RowAudio) is told, every round, what each busy row produced: the frames,
how many of them count, and whether the row's stream of frames goes on (the same job's next chunk) or starts
over (a new job), so it can decode the rows while they generate. It hears of a round before any job that ended
in that round is reported finished.

Rows that are idle still run (a frame runs for the whole batch bucket) and advance their positions; the
scheduler tracks every row's position on the host and re-parks an idle row on a one-frame dummy prompt before
it could write past the end of its KV cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import SesemeError
from .generator import EOS_CHECK_EVERY
from .longform import SpeechJob

CHECK_EVERY = EOS_CHECK_EVERY  # frames between host syncs: EOS tests, refills


@dataclass
class Work:
    """A job to schedule, with the sampling settings of all its generations; `key` identifies it to the caller."""

    key: object
    job: SpeechJob
    temperature: float
    topk: int


@dataclass
class _Row:
    work: Work
    limit: int  # frames this generation may produce
    pieces: list[np.ndarray] = field(default_factory=list)
    produced: int = 0

    @property
    def remaining(self) -> int:
        return self.limit - self.produced


@dataclass
class Stats:
    frames: int = 0  # useful frames generated
    started: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


class Scheduler:
    def __init__(self, engine, check_every: int = CHECK_EVERY, audio=None):
        self.engine = engine
        self.audio = audio
        self.window = engine.cfg.max_seq_len
        self.K = engine.cfg.num_codebooks
        self.B = engine.max_batch
        self.check_every = check_every
        self.rows: list[_Row | None] = [None] * self.B
        self.positions = [0] * self.B  # host copy of each row's next write position
        pinned = engine.device.type == "cuda"
        self.host = torch.empty(check_every, self.B, self.K, dtype=torch.long, pin_memory=pinned)
        self.event = torch.cuda.Event() if pinned else None
        self.stats = Stats()
        dummy = torch.zeros(1, self.K + 1, dtype=torch.long)
        self._park_prompt = (dummy, dummy.bool())
        # Rows to (re)start, by row: prefilled together right before the next frames (Engine.set_rows).
        self._pending: dict[int, tuple] = {}
        self._fresh: set[int] = set()  # rows given a new job since the last round (their audio starts over)
        for row in range(self.B):
            self._park(row)

    def _park(self, row: int) -> None:
        tokens, mask = self._park_prompt
        self._pending[row] = (row, tokens, mask, 0.0, 1, 0)
        self.positions[row] = 0

    def _flush(self) -> None:
        if self._pending:
            self.engine.set_rows(list(self._pending.values()))
            self._pending.clear()

    def _start(self, row: int, work: Work, on_finished, on_failed) -> None:
        """Put the job's next generation on `row`; when it has none left, hand the job back."""
        try:
            gen = work.job.next_generation()
        except SesemeError as e:  # e.g. a prompt that no longer fits the window
            self.rows[row] = None
            on_failed(work, e)
            return
        if gen is None:
            self.rows[row] = None
            on_finished(work)
            return
        self._pending[row] = (row, gen.tokens, gen.mask, work.temperature, work.topk, gen.seed)
        self.positions[row] = gen.tokens.shape[0] - 1
        if self.rows[row] is None or self.rows[row].work is not work:
            self._fresh.add(row)
        self.rows[row] = _Row(work, gen.max_frames)

    def run(self, works, on_finished, on_failed, on_round=None) -> None:
        """Generate every Work from the iterator `works` (pulled lazily, as rows free up). Calls
        on_finished(work) when a job is complete, on_failed(work, error) when it cannot go on, and
        on_round(stats) after every round."""
        source, exhausted = iter(works), False
        while True:
            for row in range(self.B):
                while self.rows[row] is None and not exhausted:
                    work = next(source, None)
                    if work is None:
                        exhausted = True
                    else:
                        self._start(row, work, on_finished, on_failed)
            busy = [r for r in range(self.B) if self.rows[r] is not None]
            if not busy:
                return
            self._round(busy, on_finished, on_failed)
            if on_round:
                on_round(self.stats)

    @torch.inference_mode()
    def _round(self, busy: list[int], on_finished, on_failed) -> None:
        n = busy[-1] + 1
        bucket = self.engine.bucket_for(n)
        k = min(self.check_every, min(self.rows[r].remaining for r in busy))
        for row in range(bucket):
            if self.rows[row] is None and self.positions[row] + k > self.window:
                self._park(row)
        self._flush()
        fresh, self._fresh = self._fresh, set()
        pinned = self.event is not None
        for i in range(k):
            self.host[i, :n].copy_(self.engine.step(n)[:n], non_blocking=pinned)
        if pinned:
            self.event.record()
            self.event.synchronize()
        for row in range(bucket):
            self.positions[row] += k
        frames = self.host[:k, :n].numpy()
        is_eos = (frames == 0).all(axis=2)  # (k, n)
        first_eos = np.where(is_eos.any(axis=0), is_eos.argmax(axis=0), k)
        works = {row: self.rows[row].work for row in busy}
        taken, reports = {}, []  # reports: callbacks held back until the audio sink has this round
        finished = lambda work: reports.append(lambda: on_finished(work))  # noqa: E731
        failed = lambda work, e: reports.append(lambda: on_failed(work, e))  # noqa: E731
        for row in busy:
            taken[row] = self._collect(row, frames[:, row], int(first_eos[row]), finished, failed)
        if self.audio is not None:
            goes_on = {row: self.rows[row] is not None and self.rows[row].work is works[row] for row in busy}
            self.audio.round(frames.copy(), [(row, works[row], taken[row], goes_on[row]) for row in busy], fresh)
        for report in reports:
            report()

    def _collect(self, row: int, frames: np.ndarray, eos: int, on_finished, on_failed) -> int:
        """Keep the row's frames up to EOS or its limit; when its generation is over, start the next. Returns
        how many of the frames were kept."""
        state = self.rows[row]
        take = min(eos, state.remaining)
        if take:
            state.pieces.append(frames[:take].copy())
            state.produced += take
            self.stats.frames += take
        if eos == len(frames) and state.remaining > 0:
            return take
        codes = np.concatenate(state.pieces) if state.pieces else np.zeros((0, self.K), dtype=np.int64)
        state.work.job.finish(torch.from_numpy(codes))
        self._start(row, state.work, on_finished, on_failed)
        return take

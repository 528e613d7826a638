"""The engine loop: `add_request(req) -> handle`, `step()`, `abort(handle)`, on the frame engine's cache rows.

Every front end drives this one loop: `tts.generate` / `tts.stream` (one row), `seseme batch` (many rows, fed
from a file), `seseme bench`, and the server (a thread that calls `step()` forever while HTTP requests come and
go). One `step()`:
1. takes the requests that arrived and the aborts asked for (both thread-safe), and frees aborted rows;
2. prefills the long texts' next chunks that are waiting (oldest first), then admits waiting requests into free
   rows, first come first served: context audio is encoded, the first text chunk's prompt built; while rows
   generate, both stay within `prefill_rows_per_step` prompt rows a step (what does not fit waits for the next
   step, its prompt kept), and all the step's prompts are prefilled together right before the frame;
3. runs one frame for every busy row (one CUDA graph replay on a GPU) and copies its codes to pinned host memory
   without waiting;
4. reads the *previous* frame's codes (its copy finished while this frame ran: the host never waits for the frame
   it just queued, unless a new listener waits for its first frame while few rows run) and, per row: keeps the
   frame, or ends the generation at an all-zero frame (the original's end of speech, dropped) or at the frame limit;
   a long text's next chunk is queued for step 2 in the same row, with the spoken chunks as context (the row's
   cache already holds them, so only the new text is prefilled; the row runs on meanwhile, its frames dropped);
   a finished request frees its row;
5. now and then hands the new frames to the audio decoder (engine.audio_rounds: one decoder slot per request,
   rounds when some request has enough frames for its next chunk; a listener's chunks grow 1, 1, 2, 4, ... frames).
A row that ended runs one frame more (the one already queued); its codes are ignored. Idle rows inside the batch
bucket run too; they are re-parked on a one-frame prompt before they could pass the end of their KV cache.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from seseme_cli.engine.audio_rounds import CHUNK_FRAMES
from seseme_cli.engine.handle import ABORTED, FAILED, FINISHED, RUNNING, RequestHandle
from seseme_cli.errors import InputError, SesemeError
from seseme_cli.speech.longform import SpeechJob
from seseme_cli.speech.prompt import PromptBuilder
from seseme_cli.speech.request import SpeechRequest

ADMIT_EVERY = 4  # steps a request nobody listens to may wait so that admissions share one prefill
SYNC_FIRST_FRAME_ROWS = 64  # busy rows up to which a step waits for a new listener's first frame


class QueueFull(SesemeError):
    """The waiting queue is at its limit: try again later."""


@dataclass
class StepOutput:
    """What one step made known: new frames per request ((n, K) int64 numpy), and the requests that ended."""

    frames: dict = field(default_factory=dict)
    finished: list = field(default_factory=list)


@dataclass
class Stats:
    frames: int = 0  # useful frames generated
    steps: int = 0
    last_step_s: float = 0.0  # host time of the last step() (with the lagged read, about one frame's GPU time)
    started: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


class _Row:
    """A request on a cache row: its plan, the current generation's frame limit and frames, its audio slot."""

    def __init__(self, handle: RequestHandle, job: SpeechJob):
        self.handle, self.job, self.slot = handle, job, None
        self.generation = 0  # bumped when a generation ends: a frame queued before that is not this one's
        self.limit = 0
        self.pieces: list[np.ndarray] = []
        self.audio: list[np.ndarray] = []  # frames not yet handed to the audio decoder
        self.audio_started = False
        self.audio_due = 0  # new frames that make this request's next audio round due (its chunk size)
        self.awaiting = None  # a long text's next generation, waiting for room in a step's prefill (its frames
        # meanwhile are not its own: the row still runs inside the batch, its codes are dropped)


class SpeechEngine:
    """The loop over `tts`'s frame engine (`tts.setup_caches(max_batch)` first). `decode_audio`: decode each
    request's audio as it generates (else handles get codes only); `pcm16`: decode to int16 samples;
    `max_waiting`: add_request raises QueueFull beyond this many waiting requests (None: no limit);
    `prefill_rows_per_step`: while rows are generating, a step admits new prompts up to this many prefill rows
    (counting those already queued for its prefill) (default: one prefill chunk, about one step's GPU time at the engine's size), so that a burst of arrivals
    never stalls the running streams for long; into an idle engine everything goes at once."""

    def __init__(self, tts, decode_audio: bool = True, pcm16: bool = False, max_waiting: int | None = None,
                 first_chunk_frames: int = 1, chunk_frames: int = CHUNK_FRAMES, audio_slots: int | None = None,
                 prefill_rows_per_step: int | None = None):
        self.tts = tts
        self.runner = tts.engine
        self.cfg = tts.config
        self.B, self.K, self.window = self.runner.max_batch, self.cfg.num_codebooks, self.cfg.max_seq_len
        self.prompts = PromptBuilder(tts.tokenizer, tts.config)
        self.max_waiting = max_waiting
        self.prefill_rows_per_step = prefill_rows_per_step or self.runner.prefill.chunk_rows
        self.stats = Stats()
        self.rows: list[_Row | None] = [None] * self.B
        self.positions = [0] * self.B  # host copy of each row's next write position
        self.waiting: collections.deque[RequestHandle] = collections.deque()
        self._arrivals: list[RequestHandle] = []
        self._aborts: list[RequestHandle] = []
        self._live: set[RequestHandle] = set()  # every handle not known to be over (fail_all ends them)
        self._lock = threading.Lock()
        self.wakeup = threading.Event()  # set by add_request/abort, for a thread that waits while idle
        self._pending: dict[int, tuple] = {}  # row -> prefill request, flushed right before the next frame
        self._admit_wait = 0  # steps the waiting requests have had free rows but no prefill
        self._continuing: collections.deque = collections.deque()  # (row, state): next chunks waiting for the prefill
        pinned = self.runner.device.type == "cuda"
        self._pinned = pinned
        self._host = [torch.zeros(self.B, self.K, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._events = [torch.cuda.Event() if pinned else None for _ in range(2)]
        self._inflight: collections.deque = collections.deque()  # (ring slot, n, [(row, state, generation)])
        self._launches = 0
        self._audio_due = False  # some request has its next chunk's frames (set as frames are read)
        # Audio: one decoder slot per request being decoded. A few more slots than rows, so that a row whose
        # request ended can take the next one before the old request's last frames are decoded.
        self.audio = None
        if decode_audio:
            from seseme_cli.engine.audio_rounds import AudioRounds

            self.audio = AudioRounds(tts.codec, audio_slots or (self.B + max(2, self.B // 8)), pcm16,
                                     first_chunk_frames, chunk_frames)
        dummy = torch.zeros(1, self.K + 1, dtype=torch.long)
        self._park_prompt = (dummy, dummy.bool())
        # A long text's next chunk prefills only what its row's cache does not hold yet (speech.longform); off,
        # each chunk's whole prompt is prefilled (the comparison the tests make).
        self.resume_chunks = True
        for row in range(self.B):
            self._park(row)

    # --- the public interface ----------------------------------------------------------------------------------

    def add_request(self, request: SpeechRequest, request_id: str | None = None, on_event=None,
                    keep_audio: bool = True, low_latency: bool = False) -> RequestHandle:
        """Queue a request; thread-safe. Raises QueueFull when `max_waiting` requests are already waiting.
        `low_latency`: someone is listening (a stream): its first frame is read without the one-frame lag and
        decoded at once, in a small first chunk; otherwise its audio goes out with the regular rounds."""
        if not isinstance(request, SpeechRequest):
            raise InputError(f"add_request takes a SpeechRequest, got {type(request).__name__}")
        handle = RequestHandle(request, request_id, on_event, keep_audio, low_latency)
        with self._lock:
            if self.max_waiting is not None and len(self.waiting) + len(self._arrivals) >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are already waiting")
            self._arrivals.append(handle)
            if len(self._live) > 4 * self.B + 64:
                self._live = {h for h in self._live if not h.done}
            self._live.add(handle)
        self.wakeup.set()
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Stop a request: its row is freed at the start of the next step; thread-safe, idempotent."""
        with self._lock:
            if not handle.done and not handle.abort_requested:
                handle.abort_requested = True
                self._aborts.append(handle)
        self.wakeup.set()

    @property
    def active_rows(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting) + len(self._arrivals)

    def has_work(self) -> bool:
        return bool(self._arrivals or self._aborts or self.waiting or self.active_rows or self._inflight
                    or (self.audio is not None and self.audio.pending(r for r in self.rows if r is not None)))

    def step(self) -> StepOutput:
        """Advance every busy row by one frame (see the module docstring); returns what became known. If the
        step fails (a bug, the GPU out of memory), every request still in the engine fails with it."""
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                out = self._step()
            self.stats.last_step_s = time.perf_counter() - start
            return out
        except BaseException as e:
            self.fail_all(f"the engine failed: {type(e).__name__}: {e}")
            raise

    def fail_all(self, error: str) -> None:
        """End every request not over yet as failed (after a crash: no handle may wait forever)."""
        with self._lock:
            handles, self._live, self._arrivals = list(self._live), set(), []
        self.waiting.clear()
        if self.audio is not None:  # the requests' decoder slots are free again
            self.audio.reclaim([r for r in self.rows if r is not None])
        self.rows = [None] * self.B
        self._inflight, self._pending, self._continuing = collections.deque(), {}, collections.deque()
        for row in range(self.B):  # every row starts over from a one-frame prompt
            self._park(row)
        for handle in handles:
            handle.deliver_end(FAILED, error)

    def _step(self) -> StepOutput:
        out = StepOutput()
        self._take_arrivals()
        self._continue()
        self._admit(out)
        busy = [r for r in range(self.B) if self.rows[r] is not None]
        if busy:
            self._launch(busy)
        # A listener waiting for its first frame gets it now, not one frame later (time to first audio), while few
        # rows run: the wait leaves the GPU idle during this step's host work, and under load a new listener
        # arrives nearly every step, so waiting would cost every stream that much at every step.
        waiting_first = len(busy) <= SYNC_FIRST_FRAME_ROWS and any(
            self.rows[r].handle.low_latency and self.rows[r].handle.frames == 0 for r in busy)
        while self._inflight and (len(self._inflight) > 1 or not busy or waiting_first):
            self._process(self._inflight.popleft(), out)
        idle = not any(self.rows) and not self._inflight
        self._audio_round(force=idle)
        self.stats.steps += 1
        return out

    def drain(self, on_step=None) -> None:
        """Step until every request has ended (and its audio is decoded); `on_step(output)` after each step."""
        while self.has_work():
            out = self.step()
            if on_step is not None:
                on_step(out)
        if self.audio is not None:
            try:
                self.audio.sync()
            except BaseException as e:
                self.fail_all(f"the audio decoder failed: {type(e).__name__}: {e}")
                raise

    def run_forever(self, stop: threading.Event, on_step=None) -> None:
        """Step while there is work, sleep while there is none, until `stop` is set. A server stops taking
        requests first, so what is left when `stop` is set has ended or is aborted by `close()`."""
        while not stop.is_set():
            if not self.has_work():
                self.wakeup.wait(0.1)
                self.wakeup.clear()
                continue
            out = self.step()
            if on_step is not None:
                on_step(out)

    @property
    def broken(self) -> bool:
        """The audio thread died (its error failed every request): this loop cannot run again."""
        return self.audio is not None and self.audio.error is not None

    def close(self) -> None:
        """Abort what is left and stop the audio thread."""
        if self.broken:
            self.fail_all(f"the audio decoder failed: {self.audio.error}")
            self.audio.close_broken()
            return
        with self._lock:
            left = [*self._arrivals, *self.waiting, *(r.handle for r in self.rows if r is not None)]
        for handle in left:
            self.abort(handle)
        with torch.inference_mode():
            while self.has_work():
                self.step()
        if self.audio is not None:
            self.audio.close()

    # --- admission -----------------------------------------------------------------------------------------

    def _take_arrivals(self) -> None:
        with self._lock:
            arrivals, self._arrivals = self._arrivals, []
            aborts, self._aborts = self._aborts, []
        self.waiting.extend(arrivals)
        for handle in aborts:
            self._abort_now(handle)

    def _abort_now(self, handle: RequestHandle) -> None:
        if handle in self.waiting:
            self.waiting.remove(handle)
            handle.deliver_end(ABORTED, "aborted")
            return
        for row, state in enumerate(self.rows):
            if state is not None and state.handle is handle:
                self._end_request(row, state, ABORTED, "aborted")
                return

    def _continue(self) -> None:
        """Prefill the long texts' next chunks, oldest first, within the step's prefill budget (these rows' streams
        have audio in hand: each was generated faster than real time). When a cohort of long requests admitted
        together reaches its chunk limits in one step, their next prompts (each with the spoken chunk as context,
        ~150-400 rows) came to tens of thousands of rows in one prefill: a step of 100+ ms that stalled every
        stream. One chunk always goes (so each step makes progress), and so does a row whose idle frames are about
        to reach the end of its cache."""
        if not self._continuing:
            return
        rows = self._queued_prefill_rows()
        waiting: collections.deque = collections.deque()
        for row, state in self._continuing:
            if self.rows[row] is not state or state.awaiting is None:  # aborted or failed meanwhile
                continue
            need = self._prefill_rows(state.awaiting)
            if rows and rows + need > self.prefill_rows_per_step and self.positions[row] + 3 < self.window:
                waiting.append((row, state))
                continue
            gen, state.awaiting = state.awaiting, None
            self._start_generation(row, state, gen)
            rows += need
        self._continuing = waiting

    def _queued_prefill_rows(self) -> int:
        """Prefill rows already queued for this step's prefill (next chunks, parked rows, admitted prompts)."""
        return sum(tokens.shape[0] - 1 for _, tokens, *_ in self._pending.values())

    def _admit_now(self, free: list[int]) -> bool:
        """Whether to prefill waiting requests this step. A prefill is one graph replay (or eager pass) whose
        host cost hardly depends on how many prompts it holds, and the frame waits for it: so requests nobody
        listens to are gathered for up to ADMIT_EVERY steps (or until a good share of the rows is free), while a
        listener's request, or any request into an idle engine, goes in at once."""
        if not self.waiting or not free:
            self._admit_wait = 0
            return False
        self._admit_wait += 1
        return (len(free) == self.B or self._admit_wait >= ADMIT_EVERY or len(free) >= max(1, self.B // 8)
                or any(h.low_latency for h in itertools.islice(self.waiting, len(free))))

    def _admit(self, out: StepOutput) -> None:
        # The common step has nobody waiting: no scan of the rows then (512 rows, every 20 ms).
        free = [r for r in range(self.B) if self.rows[r] is None] if self.waiting else []
        if not self._admit_now(free):
            return
        self._admit_wait = 0
        budget = self.prefill_rows_per_step if len(free) < self.B else None  # None: nobody would wait for it
        # The rows this step's prefill already holds (a long text's next chunks, parked rows) count against the
        # budget too; and the budget is not overshot: past one prefill chunk the prefill leaves its captured graphs
        # for the eager path, launch-bound and holding the GIL for tens of milliseconds (py-spy at 512 streams,
        # BENCHMARKS.md run 17). Only a step with nothing else to prefill takes one prompt of any size.
        rows = self._queued_prefill_rows()
        while (self.waiting and free and (self.audio is None or self.audio.has_free_slot)
               and (budget is None or rows < budget)):
            handle = self.waiting.popleft()
            try:
                job, gen = handle.prepared or self._prepare(handle)
            except SesemeError as e:  # this request's input (context audio, a prompt over the window): it alone fails
                handle.deliver_end(FAILED, " ".join(str(e).split()), e)
                out.finished.append(handle)
                continue
            if budget is not None and rows and rows + self._prefill_rows(gen) > budget:
                handle.prepared = (job, gen)  # first in line at the next step, its context already encoded
                self.waiting.appendleft(handle)
                break
            handle.prepared = None
            row = free.pop(0)
            state = _Row(handle, job)
            if self.audio is not None:
                self.audio.start(state)
            handle.status, handle.started, handle.chunks_total = RUNNING, time.perf_counter(), len(job.chunks)
            self.rows[row] = state
            self._start_generation(row, state, gen)
            rows += self._prefill_rows(gen)

    def _prepare(self, handle: RequestHandle):
        """A waiting request's job (its context encoded) and first generation (its prompt)."""
        job = SpeechJob(handle.request, self.tts.encode_context(handle.request.context), self.prompts)
        return job, job.next_generation()

    def _prefill_rows(self, gen) -> int:
        return gen.prefill_rows if self.resume_chunks else gen.tokens.shape[0] - 1

    def _start_generation(self, row: int, state: _Row, gen) -> None:
        sampling = state.handle.request.sampling
        # A long text's next chunk stays in the row of the one before, whose cache holds most of its prompt.
        start = gen.cached if self.resume_chunks else 0
        self._pending[row] = (row, gen.tokens[start:], gen.mask[start:], sampling.temperature, sampling.topk,
                              gen.seed, start)
        self.positions[row] = gen.tokens.shape[0] - 1
        state.limit, state.pieces = gen.max_frames, []

    def _park(self, row: int) -> None:
        tokens, mask = self._park_prompt
        self._pending[row] = (row, tokens, mask, 0.0, 1, 0)
        self.positions[row] = 0

    # --- frames --------------------------------------------------------------------------------------------

    def _launch(self, busy: list[int]) -> None:
        n = busy[-1] + 1
        bucket = self.runner.bucket_for(n)
        for row in range(bucket):  # idle rows run too: keep them inside their cache (2: this frame and the lagged one)
            if self.rows[row] is None and self.positions[row] + 2 >= self.window:
                self._park(row)
        if self._pending:
            self.runner.set_rows(list(self._pending.values()))
            self._pending.clear()
        ring = self._launches % 2
        self._launches += 1
        codes = self.runner.step(n)
        self._host[ring][:n].copy_(codes[:n], non_blocking=self._pinned)
        if self._pinned:
            self._events[ring].record()
        for row in range(bucket):
            self.positions[row] += 1
        self._inflight.append((ring, n, [(r, self.rows[r], self.rows[r].generation) for r in busy
                                         if self.rows[r].awaiting is None]))

    def _process(self, item, out: StepOutput) -> None:
        ring, n, snapshot = item
        if self._pinned:
            self._events[ring].synchronize()
        frames = self._host[ring][:n].numpy().copy()
        eos = (frames == 0).all(axis=1).tolist()  # lists: indexing numpy per row is what a 512-row step costs
        rows, kept, audio = list(frames), 0, self.audio is not None
        for row, state, generation in snapshot:
            if self.rows[row] is not state or state.generation != generation:
                continue  # the lagged frame of a generation that already ended
            if eos[row]:
                self._end_generation(row, state, out)
                continue
            frame, handle = rows[row], state.handle
            state.pieces.append(frame)
            if not handle.frames:
                handle.first_frame = time.perf_counter()
            handle.frames += 1
            kept += 1
            if audio:
                state.audio.append(frame)
                if len(state.audio) >= state.audio_due:
                    self._audio_due = True
            out.frames.setdefault(handle, []).append(frame)
            if len(state.pieces) >= state.limit:
                self._end_generation(row, state, out)
        self.stats.frames += kept

    def _end_generation(self, row: int, state: _Row, out: StepOutput) -> None:
        job, handle = state.job, state.handle
        # (K,) rows: one concatenate, ~4x quicker than np.stack's per-array Python (engine.audio_rounds)
        codes = np.concatenate(state.pieces).reshape(-1, self.K) if state.pieces else np.zeros((0, self.K), np.int64)
        job.finish(torch.from_numpy(codes))
        state.generation += 1
        handle.chunks_done = job.chunk_index
        try:
            gen = job.next_generation()
        except SesemeError as e:  # e.g. a later chunk's prompt no longer fits the window
            self._end_request(row, state, FAILED, " ".join(str(e).split()), e)
            out.finished.append(handle)
            return
        if gen is not None:  # the next chunk: prefilled at the next step, within its budget (_continue)
            state.awaiting = gen
            self._continuing.append((row, state))
            return
        job.warn_if_truncated()
        handle.codes, handle.truncated = job.codes(self.K), job.truncated
        self._end_request(row, state, FINISHED, None)
        out.finished.append(handle)

    def _end_request(self, row: int, state: _Row, status: str, error: str | None, exception=None) -> None:
        """Free the row now; the handle ends once its last audio is decoded (at once without audio)."""
        self.rows[row] = None
        self._pending.pop(row, None)
        state.generation += 1
        if status != FINISHED:
            state.audio = []  # nobody wants the rest of a failed or aborted request's audio
        if self.audio is None:
            state.handle.deliver_end(status, error, exception)
        else:
            self.audio.end(state, status, error, exception)

    # --- audio ---------------------------------------------------------------------------------------------

    def _audio_round(self, force: bool) -> None:
        if self.audio is not None:
            due, self._audio_due = self._audio_due, False
            self.audio.round([r for r in self.rows if r is not None], force or due, max_endings=self.B)

    def set_chunking(self, first_chunk_frames: int, chunk_frames: int) -> None:
        """Listeners' first chunk and the chunk size the chunks grow to, in frames (see engine.audio_rounds)."""
        if self.audio is not None:
            self.audio.first_chunk_frames, self.audio.chunk_frames = first_chunk_frames, chunk_frames

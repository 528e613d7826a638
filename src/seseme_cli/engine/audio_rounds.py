"""The engine loop's side of per-request audio: decoder slots, when an audio round is due, and the requests that
ended and wait for their last round.

Each request being decoded holds one slot of the audio decoder (audio.rows.RowAudio: Mimi streaming, in its own
thread), the lowest free one (a heap: a round decodes the slots up to the highest one in use). A round goes when
some request has enough new frames for its next chunk; every round takes every request's new frames (a round's
cost is per frame decoded, for all slots in its bucket, so fewer rounds would save nothing on the GPU). A listener's
first chunk is `first_chunk_frames`; each later one is as long as all the audio sent before it, up to `chunk_frames`
(1, 1, 2, 4, 8, 8, ...): it then arrives before the audio already sent has played out as long as a frame takes less
than its 80 ms to generate, give or take a decode (doubling after the first frame, 1, 2, 4, needs twice real
time: at 256 streams half of them stalled on their second chunk, BENCHMARKS.md run 15; a fixed 8-frame chunk
after a 1-frame start needs ~8x). A request nobody listens to goes in `chunk_frames` chunks.

What a round decodes is handed to its request by the same schedule, not per round: under load the requests are at
every phase of their chunks, some request is due at every step, and a round then takes one frame from each of
them. Handed on per round, that is an event per request per step (512 per step at full load, each a wake-up of
an HTTP response: tens of milliseconds of Python per step holding the GIL the engine needs,
`scripts/loop_host_probe.py --staggered`); gathered to each request's chunk size, about one in eight.
"""

from __future__ import annotations

import heapq

import numpy as np

from seseme_cli.audio.rows import RowAudio
from seseme_cli.engine.handle import FINISHED

CHUNK_FRAMES = 8  # a round's frames once a request's chunks have grown
SYNC_FIRST_CHUNK_ROWS = 8  # busy rows up to which a listener's first chunk is decoded before the next frame


class AudioRounds:
    """`slots` decoder slots for the requests of an engine loop. A request's state (the loop's row state) carries
    `slot`, `audio` (frames not yet handed to the decoder), `audio_started`, `audio_due` and `handle`; `start`
    adds `audio_taken` and what the decoder thread keeps of it (`unsent` samples, `sent_samples`, `send_due`)."""

    def __init__(self, codec, slots: int, pcm16: bool, first_chunk_frames: int = 1, chunk_frames: int = CHUNK_FRAMES):
        self.first_chunk_frames, self.chunk_frames = first_chunk_frames, chunk_frames
        self.decoder = RowAudio(codec, slots, self._on_piece, pcm16=pcm16)
        self.K, self.frame_size = codec.num_codebooks, codec.frame_size
        self.free = list(range(slots))  # a heap
        self.endings: list[tuple] = []  # (state, status, error, exception): over, waiting for their last round

    # --- slots -------------------------------------------------------------------------------------------------

    @property
    def has_free_slot(self) -> bool:
        return bool(self.free)

    def start(self, state) -> None:
        """A request starts: its slot, and the size of its first chunk."""
        state.slot = heapq.heappop(self.free)
        state.audio_due = self.first_chunk_frames if state.handle.low_latency else self.chunk_frames
        # The decoder thread's side: decoded samples not handed on yet, and how many make the next chunk.
        state.audio_taken = 0  # frames handed to the decoder so far
        state.unsent, state.unsent_samples, state.sent_samples = [], 0, 0
        state.send_due = state.audio_due * self.frame_size

    def end(self, state, status: str, error: str | None, exception) -> None:
        """A request is over: its handle ends once its last frames are decoded."""
        self.endings.append((state, status, error, exception))

    def reclaim(self, states) -> None:
        """After a crash: the slots of these requests, and of those that were ending, are free again (their
        handles are failed by the loop)."""
        self.free.extend([s.slot for s in states] + [ending[0].slot for ending in self.endings])
        heapq.heapify(self.free)
        self.endings = []

    # --- rounds ------------------------------------------------------------------------------------------------

    def pending(self, states) -> bool:  # states: any iterable
        return bool(self.endings) or any(s.audio for s in states)

    def round(self, active, force: bool, max_endings: int) -> None:
        """Hand the new frames of the `active` requests (and the ending ones) to the decoder if a round is due:
        `force` (the loop saw a request reach its `audio_due`, or it is idle) or `max_endings` ending requests."""
        if not (force or len(self.endings) >= max_endings):
            return
        first = len(active) <= SYNC_FIRST_CHUNK_ROWS and any(
            s.handle.low_latency and not s.audio_started and len(s.audio) >= self.first_chunk_frames for s in active)
        ending = self.endings
        rows = [(state, True) for state in active] + [(ending[0], False) for ending in ending]
        k = max((len(state.audio) for state, _ in rows), default=0)
        if k:
            width = max(state.slot for state, _ in rows) + 1
            frames = np.zeros((k, width, self.K), dtype=np.int64)
            listed, fresh = [], set()
            by_kept: dict[int, tuple[list, list]] = {}  # kept -> (slots, frames): one numpy copy per group
            for state, goes_on in rows:
                kept = len(state.audio)
                if kept:
                    slots, pieces = by_kept.setdefault(kept, ([], []))
                    slots.append(state.slot)
                    pieces.extend(state.audio)
                    if not state.audio_started:
                        fresh.add(state.slot)
                        state.audio_started = True
                    state.audio_taken += kept
                    state.audio_due = min(self.chunk_frames, max(state.audio_due, state.audio_taken))
                listed.append((state.slot, state, kept, goes_on))
                state.audio = []
            for kept, (slots, pieces) in by_kept.items():  # pieces: each slot's kept frames in turn
                # (K,) rows: one concatenate, ~4x quicker than np.stack's per-array Python (with the same call at
                # a generation's end, ~15% of a 512-row step's host time in py-spy, scripts/loop_host_probe.py)
                frames[:kept, slots] = np.concatenate(pieces).reshape(len(slots), kept, self.K).transpose(1, 0, 2)
            self.decoder.round(frames, listed, fresh)
            if first:
                # A listener's first chunk: decode it with the GPU and the GIL to itself (the next frames would
                # queue their kernels ahead of the decode's and hold the GIL for their launches). Costs the other
                # rows one decode of every slot, once per listener: only worth it while few rows run (under load
                # new listeners come every step, and the wait would stall every stream each time).
                self.decoder.sync()
        for state, status, error, exception in ending:
            self.decoder.end(state, self._finisher(state, status, error, exception))
            heapq.heappush(self.free, state.slot)
        self.endings = []

    def sync(self) -> None:
        self.decoder.sync()

    @property
    def error(self) -> BaseException | None:
        return self.decoder.error

    def close(self) -> None:
        self.decoder.close()

    def close_broken(self) -> None:
        """Stop the decoder's thread after it failed (its error has ended every request)."""
        self.decoder.items.put(None)
        self.decoder.thread.join()

    # --- the decoder thread: a round's samples, gathered to each request's chunks -----------------------------

    def _on_piece(self, state, samples: np.ndarray) -> None:
        if state.handle.done:
            return
        state.unsent.append(samples)
        state.unsent_samples += len(samples)
        if state.unsent_samples >= state.send_due:
            self._send(state)
            state.send_due = min(self.chunk_frames * self.frame_size, max(state.send_due, state.sent_samples))

    @staticmethod
    def _send(state) -> None:
        pieces = state.unsent
        state.sent_samples += state.unsent_samples
        state.unsent, state.unsent_samples = [], 0
        state.handle.deliver_audio(pieces[0] if len(pieces) == 1 else np.concatenate(pieces))

    def _finisher(self, state, status: str, error: str | None, exception):
        def finish(special: int) -> None:
            if state.unsent and status == FINISHED and not state.handle.done:  # the last, short chunk
                self._send(state)
            state.unsent = []  # a failed or aborted request's rest is wanted by nobody
            state.handle.special = special
            state.handle.deliver_end(status, error, exception)

        return finish

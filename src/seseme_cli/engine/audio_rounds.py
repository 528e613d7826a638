"""The engine loop's side of per-request audio: decoder slots, when an audio round is due, and the requests that
ended and wait for their last round.

Each request being decoded holds one slot of the audio decoder (audio.rows.RowAudio: Mimi streaming, in its own
thread), the lowest free one (a heap: a round decodes the slots up to the highest one in use). A round goes when
some request has enough new frames for its next chunk; every round takes every request's new frames (a round's
cost is per frame decoded, for all slots in its bucket, so fewer rounds would save nothing on the GPU). A listener's
chunks grow 1, 2, 4, ... up to `chunk_frames` frames: each arrives before the audio already sent has played out as
long as the engine runs at least about twice real time (a fixed 8-frame chunk after a 1-frame start leaves a gap
of ~7 frames' generation); a request nobody listens to goes in `chunk_frames` chunks.
"""

from __future__ import annotations

import heapq

import numpy as np

from seseme_cli.audio.rows import RowAudio

CHUNK_FRAMES = 8  # a round's frames once a request's chunks have grown
SYNC_FIRST_CHUNK_ROWS = 8  # busy rows up to which a listener's first chunk is decoded before the next frame


class AudioRounds:
    """`slots` decoder slots for the requests of an engine loop. A request's state (the loop's row state) carries
    `slot`, `audio` (frames not yet handed to the decoder), `audio_started`, `audio_due` and `handle`."""

    def __init__(self, codec, slots: int, pcm16: bool, first_chunk_frames: int = 1, chunk_frames: int = CHUNK_FRAMES):
        self.first_chunk_frames, self.chunk_frames = first_chunk_frames, chunk_frames
        self.decoder = RowAudio(codec, slots, self._on_piece, pcm16=pcm16)
        self.K = codec.num_codebooks
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
        """Hand the new frames of the `active` requests (and the ending ones) to the decoder if a round is due
        (or `force`: the loop is idle). `max_endings`: this many ending requests make a round due."""
        first = any(s.handle.low_latency and not s.audio_started and len(s.audio) >= self.first_chunk_frames
                    for s in active)
        due = any(len(s.audio) >= s.audio_due for s in active) or len(self.endings) >= max_endings
        if not (force or first or due):
            return
        ending = self.endings
        rows = [(state, True) for state in active] + [(ending[0], False) for ending in ending]
        k = max((len(state.audio) for state, _ in rows), default=0)
        if k:
            width = max(state.slot for state, _ in rows) + 1
            frames = np.zeros((k, width, self.K), dtype=np.int64)
            listed, fresh = [], set()
            for state, goes_on in rows:
                kept = len(state.audio)
                if kept:
                    frames[:kept, state.slot] = np.stack(state.audio)
                    if not state.audio_started:
                        fresh.add(state.slot)
                        state.audio_started = True
                    state.audio_due = min(self.chunk_frames, 2 * state.audio_due)
                listed.append((state.slot, state, kept, goes_on))
                state.audio = []
            self.decoder.round(frames, listed, fresh)
            if first and len(active) <= SYNC_FIRST_CHUNK_ROWS:
                # A listener's first chunk: decode it with the GPU and the GIL to itself (the next frames would
                # queue their kernels ahead of the decode's and hold the GIL for their launches). Costs the other
                # rows one decode of every slot, once per listener: only worth it while few rows run (under load
                # new listeners come every step, and the wait would stall every stream each time).
                self.decoder.sync()
        for state, status, error, exception in ending:
            self.decoder.end(state, _finisher(state, status, error, exception))
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

    @staticmethod
    def _on_piece(state, samples: np.ndarray) -> None:
        if not state.handle.done:
            state.handle.deliver_audio(samples)


def _finisher(state, status: str, error: str | None, exception):
    def finish(special: int) -> None:
        state.handle.special = special
        state.handle.deliver_end(status, error, exception)

    return finish

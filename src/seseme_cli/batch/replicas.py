"""`seseme batch --gpus N`: the same run spread over N engine replicas (replicas.cluster: Ray actors, one GPU each).

This process keeps everything that makes a run safe to kill and to run again, exactly as on one GPU: the plan, the
manifest (appended here alone, one flushed line per request) and the Writer (each output's temp file made as its
request is handed out, renamed into place once its audio is back). Replicas only turn requests into audio.

Work stealing, not a fixed split: the requests wait here, longest first, and each replica is handed small lots
whenever it has room (its rows plus a quarter more waiting, so that a row that frees is taken at once); a replica
that finishes early takes more, so mixed lengths end together. Each replica has one `exchange` call out at a
time, which hands in its new lot and brings back whatever ended. A replica that dies (RayActorError) or whose
engine gives up has its unfinished requests handed to the others, at most MAX_ATTEMPTS times each. A request is
recorded once, when its file is written or its failure is known: nothing is lost, nothing recorded twice.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from dataclasses import replace

from seseme_cli.batch.manifest import Manifest, Request
from seseme_cli.batch.run import BatchRun, BatchSettings, Tally, Writer, all_wav, longest_first, writer_threads
from seseme_cli.engine.loop import Stats
from seseme_cli.errors import SesemeError
from seseme_cli.replicas.cluster import Cluster, ReplicaSpec, task_error
from seseme_cli.replicas.replica import BatchItem

log = logging.getLogger("seseme")

MAX_ATTEMPTS = 3  # replicas a request may lose (die while it was on them) before it is recorded as failed
WAIT_S = 0.25  # an exchange with nothing ended comes back after this long (progress; idle replicas ask again)
PROGRESS_S = 0.1


class ReplicaRun(BatchRun):
    """BatchRun over `spec.count` replicas. `on_ready(infos)` is called once they are set up (the CLI warns about
    random weights then); `cluster` is there while the run runs (a test kills one of its actors)."""

    def __init__(self, spec: ReplicaSpec, manifest: Manifest, settings: BatchSettings, progress=None, on_ready=None):
        super().__init__(None, manifest, settings, progress)
        self.spec, self.on_ready = spec, on_ready
        self.cluster: Cluster | None = None

    def run(self, requests: list[Request]) -> Tally:
        self.tally.total, self.tally.replicas = len(requests), self.spec.count
        started = time.perf_counter()
        self.cluster = Cluster(self.spec)
        writer = None
        try:
            infos = self.cluster.setup(rows=self.settings.batch_size, todo=math.ceil(len(requests) / self.spec.count),
                                       pcm16=all_wav(requests))
            if self.on_ready is not None:
                self.on_ready(infos)
            writer = Writer(infos[0], self.tally, self.record, writer_threads(requests))
            self.stats = Stats()
            self.tally.setup_s = self.stats.started - started
            self.tally.batch_size = infos[0].rows
            _Schedule(self, infos, writer, longest_first(requests)).run()
        finally:
            try:
                if writer is not None:
                    writer.close()
            finally:
                self.cluster.close()
        return self.tally


class _Schedule:
    """The hand-out loop of one run: which replica holds which request (by its place in `requests`)."""

    def __init__(self, run: ReplicaRun, infos, writer: Writer, requests: list[Request]):
        self.run_, self.writer, self.requests = run, writer, requests
        self.actors = dict(enumerate(run.cluster.actors))  # the replicas still alive
        self.room = {info.index: info.rows + max(1, info.rows // 4) for info in infos}
        self.source = collections.deque(range(len(requests)))  # longest first
        self.held: dict[int, dict[int, Request]] = {r: {} for r in self.actors}
        self.attempts: collections.Counter = collections.Counter()
        self.prepared: set[int] = set()
        self.frames: dict[int, int] = {}
        self.calls: dict = {}  # ObjectRef of an exchange -> its replica

    def run(self) -> None:
        import ray

        reported = 0.0
        while self.source or any(self.held.values()):
            busy = set(self.calls.values())
            for r in self.actors:
                if r not in busy:
                    self.calls[self.actors[r].exchange.remote(self._lot(r), WAIT_S)] = r
            done, _ = ray.wait(list(self.calls), num_returns=1, timeout=PROGRESS_S)
            for ref in done:
                r = self.calls.pop(ref)
                try:
                    reply = ray.get(ref)
                except ray.exceptions.RayError as e:  # the replica died (killed, out of memory, a crash)
                    self._lost(r, task_error(e))
                    continue
                self._take(r, reply)
            if time.perf_counter() - reported > PROGRESS_S:
                self.run_.stats.frames = sum(self.frames.values())
                self.run_.progress(self.run_.tally, self.run_.stats)
                reported = time.perf_counter()
        self.run_.stats.frames = sum(self.frames.values())

    def _lot(self, r: int) -> list[BatchItem]:
        """As many waiting requests as replica r has room for."""
        items = []
        while self.source and len(self.held[r]) < self.room[r]:
            key = self.source.popleft()
            req = self.requests[key]
            self.held[r][key] = req
            if key not in self.prepared:  # a retried request keeps the temp file made the first time
                self.prepared.add(key)
                self.writer.prepare(req)
            context = [replace(turn, audio=turn.audio.absolute()) for turn in req.context]
            items.append(BatchItem(key, req.name, req.speech, context))
        return items

    def _take(self, r: int, reply) -> None:
        for result in reply.results:
            req = self.held[r].pop(result.key)
            self.run_.ended(req, self.writer, result.pieces, result.special, result.truncated, result.error)
        self.frames[r] = reply.frames
        if reply.error is not None:  # its engine gave up: what it still held will not end there
            self._lost(r, reply.error)

    def _lost(self, r: int, why: str) -> None:
        """Replica r is gone: its unfinished requests go back to the front of the queue (or fail, the third time)."""
        import ray

        actor, held = self.actors.pop(r), self.held.pop(r)
        with contextlib.suppress(Exception):
            ray.kill(actor)
        log.warning("engine replica %d is gone (%s); its %d unfinished requests go to the %d others", r,
                    " ".join(why.split()), len(held), len(self.actors))
        tally = self.run_.tally
        for key in sorted(held, reverse=True):  # back in front, still longest first
            self.attempts[key] += 1
            if self.attempts[key] >= MAX_ATTEMPTS or not self.actors:
                self.run_.ended(held[key], self.writer, None, error=f"its engine replica died while generating it, "
                                f"{self.attempts[key]} time(s) (the last: {' '.join(why.split())})")
            else:
                self.source.appendleft(key)
                with tally.lock:
                    tally.retried += 1
        if not self.actors:
            raise SesemeError(f"every engine replica is gone (the last: {' '.join(why.split())}); "
                              f"{len(self.source)} requests were not started: run the batch again for them")

"""`seseme serve --gpus N`: one HTTP front over N engine replicas (replicas.cluster: Ray actors, one GPU each).

The front is the single-engine service with its engine thread replaced: here that thread starts Ray and the
replicas (each loads the model, builds its engine and warms it up; all at once), turns the service ready once
every replica is, then polls their numbers for /metrics. `submit` routes a request to the least-loaded live
replica (fewest requests routed there and not ended yet: its busy rows plus its queue; ties in turn) and streams
the request's events back from the replica's `speak` generator; an abort (a client that went away, a drain that
ran out of time) is sent to the replica. The limits are per replica: up to max_batch rows and max_queue waiting
each, then 429. The requests a replica holds when it dies fail (a 500, or a stream cut short: part of their audio
has gone out); the others go on, and the service fails (503) once no replica is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time

from seseme_cli.errors import SesemeError
from seseme_cli.replicas.cluster import Cluster, ReplicaSpec, task_error
from seseme_cli.server.errors import unavailable
from seseme_cli.server.service import FAILED, MAX_CONSECUTIVE_FAILURES, RequestStream, SpeechService
from seseme_cli.server.settings import ServerSettings
from seseme_cli.server.voices import VoiceBook

log = logging.getLogger("seseme")

STATS_EVERY_S = 0.5  # how often the front reads each replica's numbers (/metrics, a replica's fatal error)
_keys = itertools.count()


class _Replica:
    """The front's view of one replica: its actor, the requests routed to it and not ended, its last numbers."""

    def __init__(self, index: int, actor):
        self.index, self.actor = index, actor
        self.up = True
        self.load = 0
        self.routed = 0
        self.stats = {"active_rows": 0, "queue_depth": 0, "frames": 0, "failures": 0}


class RemoteHandle:
    """The fields of engine.handle.RequestHandle that the HTTP side reads, filled from the replica's events."""

    def __init__(self):
        self.created = time.perf_counter()
        self.started: float | None = None
        self.status = "waiting"
        self.frames = 0
        self.codes = None
        self.error: str | None = None
        self.exception = None
        self.done = False

    def update(self, event, news: dict) -> None:
        if "queue_wait" in news:
            self.started = self.created + news["queue_wait"]
        if event[0] == "end":
            self.status, self.done = event[1], True
            self.frames, self.codes = news.get("frames", self.frames), news.get("codes")
            self.error, self.exception = news.get("error"), news.get("exception")


class RemoteStream(RequestStream):
    """A RequestStream whose events come from a replica: a task pumps them from the `speak` generator into the
    queue that `next()` reads (so `interrupt` and `close` work as on one engine)."""

    def __init__(self, service: "ReplicaService", replica: _Replica, request, request_id: str | None,
                 listening: bool):
        super().__init__(service, RemoteHandle(), asyncio.Queue())
        self.replica, self.key = replica, next(_keys)
        events = replica.actor.speak.options(num_returns="streaming").remote(request, self.key, listening,
                                                                           request_id)
        self.pump = asyncio.get_running_loop().create_task(self._pump(events))

    async def _pump(self, events) -> None:
        try:
            async for ref in events:
                event, news = await ref
                self.handle.update(event, news)
                self.queue.put_nowait(event)
        except Exception as e:  # noqa: BLE001 - the replica died (or the call failed): the request fails with it
            why = task_error(e)
            self.service.replica_down(self.replica, why)
            if not self.handle.done:
                self.handle.update(("end", "failed"), {"error": f"engine replica {self.replica.index} failed: {why}"})
                self.queue.put_nowait(("end", "failed"))
        finally:
            self.service.replica_done(self.replica)

    def abort(self) -> None:
        if not self.handle.done and self.replica.up:
            self.replica.actor.abort.remote(self.key)


class ReplicaService(SpeechService):
    def __init__(self, spec: ReplicaSpec, settings: ServerSettings):
        super().__init__(None, settings)
        self.spec = spec
        self.replicas: list[_Replica] = []
        self._thread.name = "seseme-replicas"

    # --- the front's thread: start the replicas, then watch them --------------------------------------------------

    def _run(self) -> None:
        cluster = None
        try:
            cluster = Cluster(self.spec)
            infos = cluster.setup(rows=self.settings.max_batch, todo=self.settings.max_batch, pcm16=True,
                                  warm_up=self.settings.warm_up, max_failures=MAX_CONSECUTIVE_FAILURES)
            info = infos[0]
            self.voices = VoiceBook(self.settings.voices_dir, self.settings.openai_voices, info.codec_id,
                                    info.num_codebooks, info.cardinality)
            self.tts, self.sample_rate = info, info.sample_rate  # tts: its description and tokenizer
            self.replicas = [_Replica(i.index, actor) for i, actor in zip(infos, cluster.actors)]
            self._now_ready()
            self._watch()
        except BaseException as e:  # the replicas did not start (or a bug): say so on /health and to the CLI
            self._fail(e)
        finally:
            self._ready.set()
            if cluster is not None:
                with contextlib.suppress(Exception):
                    cluster.close()

    def _watch(self) -> None:
        import ray

        while not self._stop.wait(STATS_EVERY_S):
            calls = {r.actor.stats.remote(): r for r in self.replicas if r.up}
            done, _ = ray.wait(list(calls), num_returns=len(calls), timeout=STATS_EVERY_S)
            for ref in done:
                replica = calls[ref]
                try:
                    replica.stats = ray.get(ref)
                except ray.exceptions.RayError as e:
                    self.replica_down(replica, task_error(e))
                    continue
                if replica.stats.get("error"):
                    self.replica_down(replica, replica.stats["error"])
            self.engine_failures = sum(r.stats["failures"] for r in self.replicas)
            self._sample_frames()
            if not any(r.up for r in self.replicas):
                self.error = SesemeError("every engine replica is gone")
                with self._lock:
                    self.state = FAILED
                return

    def replica_down(self, replica: _Replica, why: str) -> None:
        """Route nothing more to `replica` (it died, or its engine gave up) and stop its actor."""
        import ray

        if not replica.up:
            return
        replica.up = False
        log.error("engine replica %d is gone: %s", replica.index, " ".join(why.split()))
        with contextlib.suppress(Exception):
            ray.kill(replica.actor)

    def replica_done(self, replica: _Replica) -> None:
        with self._lock:
            replica.load -= 1

    # --- the HTTP side ---------------------------------------------------------------------------------------------

    def submit(self, request, request_id: str | None = None, listening: bool = True) -> RemoteStream:
        with self._lock:
            self.check_open()
            live = [r for r in self.replicas if r.up]
            if not live:
                raise unavailable("no engine replica is running", self.settings.unavailable_retry_after_s,
                                  "engine_failed")
            replica = min(live, key=lambda r: (r.load, r.routed))
            if replica.load >= self.settings.max_batch + self.settings.max_queue:
                raise self._queue_full()
            replica.load += 1
            replica.routed += 1
            self._inflight += 1
            stream = RemoteStream(self, replica, request, request_id, listening)
            self._streams.add(stream)
        return stream

    # --- numbers for /metrics ------------------------------------------------------------------------------------

    @property
    def active_rows(self) -> int:
        return sum(r.stats["active_rows"] for r in self.replicas if r.up)

    @property
    def queue_depth(self) -> int:
        return sum(r.stats["queue_depth"] for r in self.replicas if r.up)

    @property
    def frames(self) -> int:
        return sum(r.stats["frames"] for r in self.replicas)

    def replica_stats(self) -> list[dict]:
        return [{"replica": r.index, "up": int(r.up), "active_rows": r.stats["active_rows"] if r.up else 0,
                 "queue_depth": r.stats["queue_depth"] if r.up else 0, "inflight": r.load,
                 "frames": r.stats["frames"]} for r in self.replicas]

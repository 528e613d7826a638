"""Prometheus metrics of one app, in its own CollectorRegistry (two apps in one process never share counters).

Counted by the HTTP side as requests end: requests by how they ended, time to first audio, queue wait, request
duration. Read from the service at scrape time: active rows, queue depth, frames generated, frames/s and the
real-time factor over the last seconds, the engine's step times; with several engine replicas also per replica
(label `replica`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from seseme_cli.speech.request import FRAME_MS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds. Time to first audio is what a voice agent feels: fine-grained below half a second.
TTFA_BUCKETS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# How a request ended: finished, failed (engine or input fault found while generating), cancelled (the client
# went away), aborted (the server shut down), rejected (429: queue full), unavailable (503), invalid (4xx).
OUTCOMES = ("finished", "failed", "cancelled", "aborted", "rejected", "unavailable", "invalid")

REPLICA_SERIES = (
    ("seseme_replica_up", "1 while the engine replica runs, 0 once it died or failed", "up", GaugeMetricFamily),
    ("seseme_replica_active_rows", "engine rows generating a request now, per replica", "active_rows",
     GaugeMetricFamily),
    ("seseme_replica_queue_depth", "requests waiting for an engine row, per replica", "queue_depth", GaugeMetricFamily),
    ("seseme_replica_inflight_requests", "speech requests routed to the replica and not ended", "inflight",
     GaugeMetricFamily),
    ("seseme_replica_frames", "audio frames generated (80 ms each), per replica", "frames", CounterMetricFamily),
)


class _ServiceCollector:
    def __init__(self, service):
        self.service = service

    def collect(self):
        s = self.service
        fps = s.frames_per_second()
        gauges = [
            ("seseme_ready", "1 when the model is loaded and requests are taken", float(s.state == "ready")),
            ("seseme_active_rows", "engine rows generating a request now", s.active_rows),
            ("seseme_queue_depth", "requests waiting for an engine row", s.queue_depth),
            ("seseme_max_batch", "engine rows (requests generated together at most)", s.settings.max_batch),
            ("seseme_inflight_requests", "speech requests accepted whose responses are not over", s.inflight),
            ("seseme_frames_per_second", "audio frames (80 ms each) generated per second, last 10 s", fps),
            ("seseme_real_time_factor", "seconds of audio generated per second, all requests together, last 10 s",
             fps * FRAME_MS / 1000),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("seseme_frames", "audio frames generated (80 ms each)", value=s.frames)
        yield CounterMetricFamily("seseme_audio_seconds", "seconds of audio generated", value=s.frames * FRAME_MS / 1000)
        yield CounterMetricFamily("seseme_engine_failures", "engine steps that failed (their requests failed)",
                                  value=s.engine_failures)
        steps = getattr(s, "step_times", None)  # one engine in this process (replicas report no steps)
        if steps is not None:
            yield from steps.collect()
        replicas = s.replica_stats()
        if replicas:  # several engine replicas (seseme serve --gpus N): the same numbers per replica
            for name, doc, key, kind in REPLICA_SERIES:
                family = kind(name, doc, labels=["replica"])
                for r in replicas:
                    family.add_metric([str(r["replica"])], r[key])
                yield family


class Metrics:
    def __init__(self, service):
        self.registry = CollectorRegistry()
        self.requests = Counter("seseme_requests", "speech requests by how they ended", ["status"],
                                registry=self.registry)
        for outcome in OUTCOMES:  # every series exists from the start (rate() of a missing series is no data)
            self.requests.labels(outcome)
        self.ttfa = Histogram("seseme_time_to_first_audio_seconds",
                              "from the request arriving to its first audio leaving", buckets=TTFA_BUCKETS,
                              registry=self.registry)
        self.queue_wait = Histogram("seseme_queue_wait_seconds", "from the request arriving to getting an engine row",
                                    buckets=TTFA_BUCKETS, registry=self.registry)
        self.duration = Histogram("seseme_request_duration_seconds", "from the request arriving to its last byte",
                                  buckets=DURATION_BUCKETS, registry=self.registry)
        self.registry.register(_ServiceCollector(service))

    def outcome(self, status: str) -> None:
        self.requests.labels(status).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

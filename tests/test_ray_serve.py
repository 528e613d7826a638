"""`seseme serve` over engine replicas: one HTTP front (a real uvicorn on a loopback port) and two CPU replicas of
the tiny random model on a local Ray. Concurrent requests spread over both replicas and give the codes one engine
gives; a client that goes away has its request aborted on its replica; /metrics has each replica's numbers; a
replica that dies takes only its own requests with it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import serve_in_thread
from seseme_cli.api import load_csm_1b_optimized
from seseme_cli.replicas.cluster import ReplicaSpec
from seseme_cli.server.settings import ServerSettings

MAX_BATCH, MAX_QUEUE = 2, 2


class Front:
    def __init__(self, url, service):
        self.url, self.service = url, service

    def post(self, body):
        return httpx.post(f"{self.url}/v1/audio/speech", json=body, timeout=120)

    def metrics(self) -> dict:
        """{(name, replica label or None): value}"""
        found = {}
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics").text):
            for sample in family.samples:
                found[sample.name, sample.labels.get("replica", sample.labels.get("status"))] = sample.value
        return found

    def wait_for(self, check, timeout=30.0, what="the metrics"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            metrics = self.metrics()
            if check(metrics):
                return metrics
            time.sleep(0.1)
        raise AssertionError(f"{what} never came true: {metrics}")


@pytest.fixture(scope="module")
def front():
    ray = pytest.importorskip("ray")
    from seseme_cli.server.replicas import ReplicaService

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 << 20,
             logging_level=logging.ERROR)
    settings = ServerSettings(model="tiny-random", device="cpu", max_batch=MAX_BATCH, max_queue=MAX_QUEUE,
                              max_audio_ms=8000, voices_dir=None, drain_timeout_s=5)
    service = ReplicaService(ReplicaSpec(2, "tiny-random", "cpu"), settings).start()
    server, thread, url = serve_in_thread(service, settings)
    assert httpx.get(f"{url}/health").status_code == 503  # the replicas are still loading
    assert service.wait_ready(120), service.describe_error()
    yield Front(url, service)
    server.drain()
    thread.join(15)
    service.stop()
    ray.shutdown()


def codes_digest(tts, text, **kw) -> str:
    codes = tts.generate_codes(text, **kw)
    return hashlib.sha256(codes.contiguous().numpy().astype("<i8", copy=False).tobytes()).hexdigest()


def test_concurrent_requests_spread_over_both_replicas_with_one_engines_codes(front):
    assert httpx.get(f"{front.url}/health").json()["status"] == "ready"
    before = front.metrics()
    bodies = [{"input": f"Request {i} to the front.", "response_format": "pcm", "stream": False,
               "max_audio_ms": 320 + 80 * i, "seed": 10 + i} for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(front.post, bodies))
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    tts = load_csm_1b_optimized("tiny-random", device="cpu")
    for body, answer in zip(bodies, answers):
        expected = codes_digest(tts, body["input"], max_audio_length_ms=body["max_audio_ms"], seed=body["seed"])
        assert answer.headers["x-seseme-codes-sha256"] == expected
        assert len(answer.content) == int(answer.headers["x-seseme-frames"]) * 1920 * 2
    after = front.wait_for(lambda m: m["seseme_active_rows", None] == 0)
    for r in ("0", "1"):  # least-loaded routing: 4 requests at once, two on each
        assert after["seseme_replica_frames_total", r] > before["seseme_replica_frames_total", r]
        assert after["seseme_replica_up", r] == 1 and after["seseme_replica_inflight_requests", r] == 0
    assert after["seseme_frames_total", None] == sum(after["seseme_replica_frames_total", r] for r in ("0", "1"))


def test_a_client_that_goes_away_frees_its_row_on_the_replica(front):
    cancelled = front.metrics()["seseme_requests_total", "cancelled"]
    body = {"input": "A long answer nobody waits for.", "response_format": "pcm", "max_audio_ms": 8000, "seed": 3}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{front.url}/v1/audio/speech", json=body) as response:
            assert response.status_code == 200
            next(response.iter_bytes())  # the first audio, then hang up
    # 100 frames would take many seconds on the CPU; the abort ends it at the next step.
    front.wait_for(lambda m: m["seseme_requests_total", "cancelled"] == cancelled + 1
                   and m["seseme_replica_active_rows", "0"] + m["seseme_replica_active_rows", "1"] == 0
                   and m["seseme_replica_inflight_requests", "0"] + m["seseme_replica_inflight_requests", "1"] == 0,
                   timeout=10, what="the abort")


def test_a_dead_replica_takes_only_its_requests(front):
    import ray

    long = {"input": "Generating when its replica dies.", "response_format": "pcm", "stream": False,
            "max_audio_ms": 8000, "seed": 5}
    busy = lambda m: [r for r in ("0", "1") if m["seseme_replica_active_rows", r] == 1]  # noqa: E731
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(front.post, long)
        doomed = busy(front.wait_for(busy, what="the request on a replica"))[0]
        ray.kill(front.service.replicas[int(doomed)].actor)
        lost = running.result()
    assert lost.status_code == 500 and f"replica {doomed}" in lost.json()["error"]["message"]
    metrics = front.wait_for(lambda m: m["seseme_replica_up", doomed] == 0)
    assert metrics["seseme_ready", None] == 1  # the other replica serves on
    answers = [front.post({"input": f"After the loss {i}.", "response_format": "wav", "max_audio_ms": 240, "seed": i})
               for i in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    assert httpx.get(f"{front.url}/health").status_code == 200

"""`seseme serve` over real HTTP: a real uvicorn on a free loopback port, the tiny random model on the CPU.

Driven with httpx and with the official `openai` client: every format streamed and whole, SSE, requests that join
a running batch, a client that goes away (its row must be freed), a full queue (429), bad input of every kind
(OpenAI-shaped 4xx, never a 500 or FastAPI's 422), seeded requests alone and inside a busy batch (the same PCM
bytes), named voices added through the CLI, and SIGTERM (drain, then exit 0) on a server in its own process.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import typer
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from conftest import serve_in_thread
from seseme_cli.api import load_csm_1b_optimized
from seseme_cli.cli import serve as serve_cli
from seseme_cli.errors import InputError
from seseme_cli.server.app import create_app
from seseme_cli.server.engine_process import EngineProcessService
from seseme_cli.server.service import SpeechService
from seseme_cli.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "samples" / "context" / "espeak_hello.wav"
FRAME_BYTES = 1920 * 2  # one 80 ms frame of s16le at 24 kHz
SHORT = {"max_audio_ms": 320, "seed": 1}  # 4 frames: ~1 s on a CPU
MAX_QUEUE, MAX_BATCH = 6, 4

cli = typer.Typer()
cli.command()(serve_cli.serve)  # registered as cli/main.py registers them
cli.add_typer(serve_cli.voice_app, name="voice")
runner = CliRunner()


class Server:
    def __init__(self, url, service, server, voices, before_ready):
        self.url, self.service, self.server, self.voices = url, service, server, voices
        self.before_ready = before_ready  # (health status, speech status, Retry-After) while the model loaded

    def post(self, body, **kw):
        return httpx.post(f"{self.url}/v1/audio/speech", json=body, timeout=60, **kw)

    def stream(self, client, body):
        return client.stream("POST", f"{self.url}/v1/audio/speech", json=body, timeout=60)

    def metric(self, name, **labels) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        raise KeyError(name)

    def wait_metric(self, name, check, timeout=5.0) -> float:
        """The metric's value once `check(value)` holds (the engine process sends its numbers a little later)."""
        deadline = time.monotonic() + timeout
        while not check(value := self.metric(name)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return value

    def wait_idle(self, timeout=10.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.metric("seseme_active_rows") == 0 and self.metric("seseme_queue_depth") == 0:
                return time.monotonic()
            time.sleep(0.05)
        raise AssertionError("the engine did not become idle")


@pytest.fixture(scope="module", params=["engine thread", "engine process"])
def server(request, tmp_path_factory):
    """Every test runs against both services: the engine as a thread of the server's process (the CPU's default)
    and in a process of its own (server.engine_process, the GPU's default)."""
    voices = tmp_path_factory.mktemp("voices")
    settings = ServerSettings(model="tiny-random", device="cpu", max_batch=MAX_BATCH, max_queue=MAX_QUEUE,
                              max_input_chars=500, max_body_bytes=256 * 1024, max_audio_ms=4000, voices_dir=voices,
                              max_context_seconds=10, drain_timeout_s=5)
    gate = threading.Event()

    def load():
        gate.wait(30)  # held until the test has seen the server answer while "loading"
        return load_csm_1b_optimized("tiny-random", device="cpu")

    if request.param == "engine process":  # its child spends seconds importing torch and loading: no gate needed
        service = EngineProcessService(settings).start()
    else:
        service = SpeechService(load, settings).start()
    srv, thread, url = serve_in_thread(service, settings)
    health = httpx.get(f"{url}/health").status_code
    early = httpx.post(f"{url}/v1/audio/speech", json={"input": "hi"})
    gate.set()
    assert service.wait_ready(60), service.describe_error()
    yield Server(url, service, srv, voices, (health, early.status_code, early.headers.get("retry-after")))
    srv.drain()
    thread.join(15)
    service.stop()


def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="anything", max_retries=0, timeout=60)


def assert_openai_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def read_audio(data: bytes):
    with sf.SoundFile(io.BytesIO(data)) as f:
        return f.samplerate, len(f.read(dtype="int16"))


# --- health, models, voices, metrics --------------------------------------------------------------------------

def test_health_is_503_until_loaded_then_200(server):
    health, speech, retry = server.before_ready
    assert (health, speech) == (503, 503) and retry is not None and int(retry) > 0
    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200 and r.json()["status"] == "ready"


def test_models_and_voices(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list"
    ids = [m["id"] for m in models["data"]]
    assert ids[0] == "csm-1b" and "tts-1" in ids and all(m["object"] == "model" for m in models["data"])
    assert httpx.get(f"{server.url}/v1/models/tts-1").json()["id"] == "tts-1"
    assert_openai_error(httpx.get(f"{server.url}/v1/models/nope"), 404, "model", "model_not_found")
    voices = {v["id"]: v for v in httpx.get(f"{server.url}/v1/voices").json()["data"]}
    assert voices["alloy"]["kind"] == "builtin" and voices["alloy"]["speaker"] == 0 and voices["echo"]["speaker"] == 4


def test_metrics_are_prometheus_text(server):
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("seseme_active_rows", "seseme_queue_depth", "seseme_frames_total", "seseme_frames_per_second",
                 "seseme_real_time_factor", "seseme_time_to_first_audio_seconds_bucket", "seseme_ready"):
        assert name in r.text, name
    assert server.metric("seseme_requests_total", status="finished") >= 0
    assert server.metric("seseme_max_batch") == MAX_BATCH


def test_metrics_count_the_engines_steps(server):
    before = server.metric("seseme_engine_step_seconds_count")
    r = server.post({"input": "Count my steps.", "response_format": "pcm", "max_audio_ms": 400, "seed": 3})
    assert r.status_code == 200
    steps = server.wait_metric("seseme_engine_step_seconds_count", lambda n: n >= before + 5)
    assert steps >= before + 5  # 5 frames at least, one step each
    assert server.metric("seseme_engine_step_seconds_bucket", le="+Inf") == steps
    assert server.metric("seseme_engine_step_seconds_sum") > 0


# --- formats ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["pcm", "wav", "mp3", "opus", "flac"])
def test_every_format_whole_and_streamed(server, fmt):
    for stream in (False, True):
        r = server.post({"input": "Hello there.", "response_format": fmt, "stream": stream, **SHORT})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith({"pcm": "audio/pcm", "wav": "audio/wav", "mp3": "audio/mpeg",
                                                      "opus": "audio/ogg", "flac": "audio/flac"}[fmt])
        data = r.content
        assert len(data) > 0
        if fmt == "pcm":
            assert len(data) % 2 == 0 and len(data) == 4 * FRAME_BYTES  # 4 frames (the model never stops early)
        elif fmt == "flac" and stream:
            assert data[:4] == b"fLaC"  # streamed FLAC's header says "length unknown": libsndfile cannot read it
        else:
            rate, samples = read_audio(data)
            assert rate == 24000 and samples > 0
            if fmt in ("wav", "flac", "opus") or not stream:
                assert samples == 4 * 1920
        if not stream:
            assert r.headers["content-length"] == str(len(data)) and r.headers["x-seseme-frames"] == "4"


def test_default_format_is_mp3_like_openai(server):
    r = server.post({"input": "Hi.", "voice": "alloy", "model": "tts-1", **SHORT})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/mpeg"
    assert read_audio(r.content)[0] == 24000


# --- the openai client --------------------------------------------------------------------------------------------

def test_openai_client_create(server):
    client = openai_client(server)
    audio = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello from the client.",
                                       response_format="wav", extra_body=SHORT)
    rate, samples = read_audio(audio.content)
    assert (rate, samples) == (24000, 4 * 1920)


def test_openai_client_streaming_response(server):
    client = openai_client(server)
    started = time.perf_counter()
    first, chunks = None, []
    with client.audio.speech.with_streaming_response.create(
            model="csm-1b", voice="nova", input="Streaming through the official client.", response_format="pcm",
            extra_body={"max_audio_ms": 960, "seed": 2}) as response:
        assert response.headers["content-type"] == "audio/pcm"
        for chunk in response.iter_bytes():
            first = first if first is not None else time.perf_counter() - started
            chunks.append(chunk)
    total = time.perf_counter() - started
    data = b"".join(chunks)
    assert len(data) == 12 * FRAME_BYTES
    assert first < total * 0.7, (first, total)  # the first audio left long before the end


def test_openai_client_sse_events(server):
    client = openai_client(server)
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input="Events.", response_format="pcm", stream_format="sse",
            extra_body=SHORT) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    deltas, done = events[:-1], events[-1]
    assert deltas and all(set(e) == {"type", "audio"} and e["type"] == "speech.audio.delta" for e in deltas)
    assert done["type"] == "speech.audio.done" and set(done) == {"type", "usage"}
    usage = done["usage"]
    assert set(usage) == {"input_tokens", "output_tokens", "total_tokens"}
    assert usage["output_tokens"] == 4 and usage["total_tokens"] == usage["input_tokens"] + 4
    assert len(b"".join(base64.b64decode(e["audio"]) for e in deltas)) == 4 * FRAME_BYTES


def test_sse_wav_deltas_join_into_a_file(server):
    r = server.post({"input": "Hi.", "response_format": "wav", "stream_format": "sse", **SHORT})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    data = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert read_audio(data) == (24000, 4 * 1920)


# --- batching, cancelling, overload ------------------------------------------------------------------------------------

def _stream_timed(server, body, read_all=True):
    """(status, bytes, time of the first chunk, time of the end), times from time.monotonic()."""
    with httpx.Client(timeout=60) as client, server.stream(client, body) as r:
        first, data = None, b""
        for chunk in r.iter_bytes():
            first = first or time.monotonic()
            data += chunk
        return r.status_code, data, first, time.monotonic()


def test_requests_join_a_running_batch(server):
    long_body = {"input": "A long one that keeps the batch busy.", "response_format": "pcm", "max_audio_ms": 1600,
                 "seed": 5}
    with ThreadPoolExecutor(4) as pool:
        long = pool.submit(_stream_timed, server, long_body)
        time.sleep(0.8)  # the long request is generating by now
        later = [pool.submit(_stream_timed, server, {"input": f"Join {i}.", "response_format": "pcm", **SHORT})
                 for i in range(3)]
        results = [f.result() for f in later]
        long_status, long_data, _, long_end = long.result()
    assert long_status == 200 and len(long_data) == 20 * FRAME_BYTES
    for status, data, first, end in results:
        assert status == 200 and len(data) == 4 * FRAME_BYTES
        assert end < long_end  # admitted into free rows while the long request ran, not after it


def test_cancelled_stream_frees_its_row(server):
    server.wait_idle()
    cancelled = server.metric("seseme_requests_total", status="cancelled")
    with httpx.Client(timeout=60) as client:
        with server.stream(client, {"input": "Cancel me.", "response_format": "pcm", "max_audio_ms": 4000}) as r:
            assert r.status_code == 200
            pieces = r.iter_bytes()  # kept: a dropped iterator would close the response at once
            next(pieces)
            assert server.metric("seseme_active_rows") == 1
        closed = time.monotonic()  # leaving the block closes the connection mid-stream
    assert server.wait_idle(timeout=5) - closed < 3.0  # 50 frames would take ~10 s: the row was freed at once
    deadline = time.monotonic() + 5
    while server.metric("seseme_requests_total", status="cancelled") == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("seseme_requests_total", status="cancelled") == cancelled + 1


def test_openai_client_leaving_early_frees_its_row(server):
    server.wait_idle()
    client = openai_client(server)
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input="Leave early.", response_format="pcm",
            extra_body={"max_audio_ms": 4000}) as response:
        pieces = response.iter_bytes()
        next(pieces)
    assert server.wait_idle(timeout=5)


def test_client_leaving_a_whole_file_request_frees_its_row(server):
    server.wait_idle()
    with pytest.raises(httpx.ReadTimeout):  # a whole file is sent at the end: the client gives up before
        httpx.post(f"{server.url}/v1/audio/speech", json={"input": "Too slow.", "response_format": "wav",
                                                         "stream": False, "max_audio_ms": 4000}, timeout=1.0)
    assert server.wait_idle(timeout=5)


def test_full_queue_answers_429_with_retry_after(server):
    server.wait_idle()
    busy = {"input": "Busy.", "response_format": "pcm", "max_audio_ms": 4000}
    flood = {"response_format": "pcm", "max_audio_ms": 160}
    with httpx.Client(timeout=60) as client:
        holders, readers = [server.stream(client, busy) for _ in range(MAX_BATCH)], []
        for holder in holders:  # all rows taken: the flood below can only wait (MAX_QUEUE of it) or be refused
            response = holder.__enter__()
            assert response.status_code == 200
            readers.append(response.iter_bytes())  # kept: a dropped iterator would close the response at once
            next(readers[-1])
        assert server.wait_metric("seseme_active_rows", lambda n: n == MAX_BATCH) == MAX_BATCH
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(client.post, f"{server.url}/v1/audio/speech", json={"input": f"Flood {i}.", **flood})
                       for i in range(12)]
            deadline = time.monotonic() + 10
            while sum(f.done() for f in futures) < 12 - MAX_QUEUE and time.monotonic() < deadline:
                time.sleep(0.02)
            for holder in holders:  # free the rows: the queued requests run
                holder.__exit__(None, None, None)
            responses = [f.result() for f in futures]
    codes = sorted(r.status_code for r in responses)
    assert codes.count(429) == 12 - MAX_QUEUE and codes.count(200) == MAX_QUEUE, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert_openai_error(refused, 429, code="queue_full")


# --- same seed, same audio -------------------------------------------------------------------------------------------

def test_seeded_request_alone_and_in_a_busy_batch_give_the_same_bytes(server):
    body = {"input": "Same seed, same sound.", "response_format": "pcm", "stream": False, "max_audio_ms": 480,
            "seed": 1234, "temperature": 0.9, "topk": 50}
    server.wait_idle()
    alone = server.post(body)
    assert alone.status_code == 200 and alone.headers["x-seseme-seed"] == "1234"
    others = [{"input": f"Noise {i} of another request.", "response_format": "pcm", "max_audio_ms": 1200,
               "seed": i} for i in range(3)]
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(_stream_timed, server, o) for o in others]
        time.sleep(0.5)  # the others are mid-generation: the seeded one joins rows 0..2 busy, decoder slots shifted
        busy = pool.submit(server.post, body).result()
        [f.result() for f in running]
    assert busy.status_code == 200
    # The codes are identical. The samples may differ in the last bit: Mimi decodes the request's frames in other
    # rounds beside other rows (measured on the CPU: 2 of 11520 samples off by 1).
    assert busy.headers["x-seseme-codes-sha256"] == alone.headers["x-seseme-codes-sha256"] != ""
    a, b = (np.frombuffer(r.content, "<i2").astype(np.int32) for r in (alone, busy))
    assert a.shape == b.shape == (6 * 1920,)
    assert np.abs(a - b).max() <= 2 and np.mean(a != b) < 0.01


# --- bad input -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, param, code", [
    (b"{not json", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_json"),
    (b'{"input": NaN}', None, "invalid_json"),
    (b"\xff\xfe", None, "invalid_json"),
    (b"{}", "input", "missing_required_parameter"),
    (b'{"input": ""}', "input", "empty_input"),
    (b'{"input": "   \\n "}', "input", "empty_input"),
    (b'{"input": 5}', "input", None),
    (b'{"input": "x", "speed": 1.5}', "speed", "unsupported_value"),
    (b'{"input": "x", "response_format": "aac"}', "response_format", "unsupported_format"),
    (b'{"input": "x", "response_format": "ogg"}', "response_format", None),
    (b'{"input": "x", "stream_format": "chunks"}', "stream_format", None),
    (b'{"input": "x", "stream_format": "sse", "stream": false}', "stream", None),
    (b'{"input": "x", "temprature": 1}', "temprature", "unknown_parameter"),
    (b'{"input": "x", "temperature": -1}', "temperature", None),
    (b'{"input": "x", "topk": 0}', "topk", None),
    (b'{"input": "x", "seed": -3}', "seed", None),
    (b'{"input": "x", "speaker": -1}', "speaker", None),
    (b'{"input": "x", "max_audio_ms": 999999}', "max_audio_ms", None),
    (b'{"input": "x", "context": [{"audio": "%%%", "text": "hi"}]}', "context[0].audio", None),
    (b'{"input": "x", "context": [{"audio": "aGVsbG8=", "text": "hi"}]}', "context[0].audio", None),
    (b'{"input": "x", "context": [{"text": "hi"}]}', "context[0].audio", "missing_required_parameter"),
])
def test_bad_input_is_an_openai_400(server, body, param, code):
    r = httpx.post(f"{server.url}/v1/audio/speech", content=body, headers={"content-type": "application/json"})
    assert_openai_error(r, 400, param, code)


def test_unknown_voice_names_the_known_ones(server):
    error = assert_openai_error(server.post({"input": "x", "voice": "nobody"}), 400, "voice", "voice_not_found")
    assert "nobody" in error["message"] and "alloy" in error["message"]


def test_unknown_model_is_404(server):
    assert_openai_error(server.post({"input": "x", "model": "gpt-9"}), 404, "model", "model_not_found")


def test_huge_input_and_huge_body(server):
    assert_openai_error(server.post({"input": "word " * 200}), 400, "input", "string_above_max_length")
    r = server.post({"input": "x" * 300_000})  # over --max-body-bytes: refused before it is parsed
    assert_openai_error(r, 413, code="request_too_large")


def test_unknown_route_and_method(server):
    assert_openai_error(httpx.get(f"{server.url}/v1/nothing"), 404, code="unknown_url")
    assert_openai_error(httpx.get(f"{server.url}/v1/audio/speech"), 405)


def test_form_content_type_is_read_as_json(server):
    # curl -d without -H sends application/x-www-form-urlencoded; the body is JSON all the same
    r = httpx.post(f"{server.url}/v1/audio/speech", content=json.dumps({"input": "Hi.", "response_format": "pcm",
                   **SHORT}), headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and len(r.content) == 4 * FRAME_BYTES


def test_instructions_are_accepted_and_said_to_be_ignored(server):
    r = server.post({"input": "Hi.", "instructions": "Speak like a pirate.", "response_format": "pcm", **SHORT})
    assert r.status_code == 200 and r.headers["x-seseme-ignored"] == "instructions"


def test_inline_context(server):
    audio = base64.b64encode(CLIP.read_bytes()).decode()
    r = server.post({"input": "And now me.", "response_format": "pcm", "speaker": 1, **SHORT,
                     "context": [{"audio": audio, "text": "Hello there. Nice to meet you.", "speaker": 0}]})
    assert r.status_code == 200 and len(r.content) == 4 * FRAME_BYTES


def test_request_failing_at_admission_gets_400_and_spares_the_others(server):
    # A voice longer than the 2048-frame window (written by hand: `voice add` refuses clips this long): the engine
    # fails that request when it builds its prompt, while another request streams beside it.
    codes = np.random.default_rng(0).integers(0, 2048, (2100, 32)).astype(np.int16)
    np.save(server.voices / "toolong.npy", codes)
    from seseme_cli.server.voices import codec_id

    meta = {"version": 1, "name": "toolong", "transcript": "far too long", "speaker": 0, "frames": 2100,
            "codebooks": 32, "codec": codec_id(load_csm_1b_optimized("tiny-random", device="cpu").codec)}
    (server.voices / "toolong.json").write_text(json.dumps(meta))
    try:
        with ThreadPoolExecutor(2) as pool:
            ok = pool.submit(_stream_timed, server, {"input": "I am fine.", "response_format": "pcm",
                                                     "max_audio_ms": 800, "seed": 3})
            time.sleep(0.3)
            bad = server.post({"input": "Too much context.", "voice": "toolong", "response_format": "pcm"})
            status, data, _, _ = ok.result()
        error = assert_openai_error(bad, 400)
        assert "window" in error["message"]
        assert status == 200 and len(data) == 10 * FRAME_BYTES
    finally:
        (server.voices / "toolong.json").unlink()
        (server.voices / "toolong.npy").unlink()


# --- named voices through the CLI ---------------------------------------------------------------------------------------

def test_voice_add_list_use_remove(server):
    folder = str(server.voices)
    fast = ["--voices", folder, "--model", "tiny-random", "--device", "cpu"]
    added = runner.invoke(cli, ["voice", "add", "hello", str(CLIP), "Hello there. Nice to meet you.", "--speaker", "1",
                                *fast])
    assert added.exit_code == 0, added.output
    assert (server.voices / "hello.json").exists() and (server.voices / "hello.npy").exists()
    assert not list(server.voices.glob(".*.part"))
    again = runner.invoke(cli, ["voice", "add", "hello", str(CLIP), "Hello.", *fast])
    assert again.exit_code == 2 and "--force" in again.output
    bad_name = runner.invoke(cli, ["voice", "add", "../evil", str(CLIP), "Hello.", *fast])
    assert bad_name.exit_code == 2 and "not valid" in bad_name.output
    listed = runner.invoke(cli, ["voice", "list", "--voices", folder])
    assert listed.exit_code == 0 and "hello" in listed.output

    voices = {v["id"]: v for v in httpx.get(f"{server.url}/v1/voices").json()["data"]}  # picked up while running
    assert voices["hello"]["kind"] == "stored" and voices["hello"]["speaker"] == 1
    assert abs(voices["hello"]["seconds"] - 2.4) < 0.1
    for voice in ("hello", {"id": "hello"}):
        r = server.post({"input": "Using a stored voice.", "voice": voice, "response_format": "pcm", **SHORT})
        assert r.status_code == 200 and len(r.content) == 4 * FRAME_BYTES
    assert "hello" in assert_openai_error(server.post({"input": "x", "voice": "bye"}), 400, "voice")["message"]

    removed = runner.invoke(cli, ["voice", "remove", "hello", "--voices", folder])
    assert removed.exit_code == 0 and not (server.voices / "hello.json").exists()
    assert runner.invoke(cli, ["voice", "remove", "hello", "--voices", folder]).exit_code == 2
    assert_openai_error(server.post({"input": "x", "voice": "hello"}), 400, "voice", "voice_not_found")


# --- without a model: auth --------------------------------------------------------------------------------------------

def test_api_key_is_required_when_set():
    from fastapi.testclient import TestClient

    settings = ServerSettings(model="tiny-random", api_key="sekret")
    service = SpeechService(lambda: None, settings)  # never started: loading forever
    client = TestClient(create_app(service, settings))
    assert_openai_error(client.post("/v1/audio/speech", json={"input": "x"}), 401, code="invalid_api_key")
    assert_openai_error(client.get("/v1/models", headers={"authorization": "Bearer wrong"}), 401)
    assert client.get("/v1/models", headers={"authorization": "Bearer sekret"}).status_code == 200
    r = client.post("/v1/audio/speech", json={"input": "x"}, headers={"authorization": "Bearer sekret"})
    assert_openai_error(r, 503, code="model_loading")
    assert client.get("/health").status_code == 503  # health needs no key


# --- a failure after the 200 (the response alone, with fakes: the engine is not needed) --------------------------------

class _Fakes:
    class Stream:
        def __init__(self, events):
            self.events = list(events)
            self.handle = type("Handle", (), {"error": "the engine failed: boom", "exception": None, "frames": 1,
                                              "started": 0.0, "created": 0.0, "codes": None})()
            self.closed = False

        async def next(self):
            return self.events.pop(0)

        def interrupt(self, reason):
            pass

        def close(self):
            self.closed = True

    class Histogram:
        def observe(self, value):
            pass

    class Metrics:
        def __init__(self):
            self.outcomes = []
            self.ttfa = self.queue_wait = self.duration = _Fakes.Histogram()

        def outcome(self, status):
            self.outcomes.append(status)


def _respond(plan_fields, events):
    import asyncio

    from seseme_cli.server.plan import Plan
    from seseme_cli.server.responses import SpeechResponse
    from seseme_cli.speech.request import SpeechRequest

    plan = Plan(SpeechRequest.make("x", seed=1), **plan_fields, request_id="r")
    service = type("Service", (), {"sample_rate": 24000, "settings": ServerSettings(),
                                   "count_tokens": staticmethod(len)})()
    stream, metrics, sent = _Fakes.Stream(events), _Fakes.Metrics(), []

    async def receive():
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    asyncio.run(SpeechResponse(stream, plan, service, metrics, 0.0)({"type": "http"}, receive, send))
    assert stream.closed
    return sent, metrics.outcomes


AUDIO = ("audio", np.zeros(1920, np.int16))


def test_failure_mid_audio_stream_cuts_the_body():
    sent, outcomes = _respond({"format": "pcm", "stream": True, "sse": False}, [AUDIO, ("end", "failed")])
    assert sent[0]["status"] == 200 and outcomes == ["failed"]
    assert all(m.get("more_body", True) for m in sent[1:])  # no final chunk: the client sees an incomplete body


def test_failure_mid_sse_stream_ends_with_an_error_event():
    sent, outcomes = _respond({"format": "pcm", "stream": True, "sse": True}, [AUDIO, ("end", "failed")])
    last = json.loads(sent[-1]["body"].decode()[len("data: "):])
    assert last["type"] == "error" and last["error"]["type"] == "server_error" and sent[-1]["more_body"] is False
    assert outcomes == ["failed"]


def test_failure_of_a_whole_file_is_an_openai_500():
    sent, outcomes = _respond({"format": "wav", "stream": False, "sse": False}, [AUDIO, ("end", "failed")])
    assert sent[0]["status"] == 500 and json.loads(sent[1]["body"])["error"]["code"] == "engine_error"
    sent, outcomes = _respond({"format": "wav", "stream": False, "sse": False}, [AUDIO, ("end", "aborted")])
    assert sent[0]["status"] == 503 and (b"retry-after", b"5") in sent[0]["headers"] and outcomes == ["aborted"]


# --- SIGTERM --------------------------------------------------------------------------------------------------------------

LAUNCHER = """
import sys, torch
torch.set_num_threads(1)
import typer
from seseme_cli.cli import serve
app = typer.Typer()
app.command()(serve.serve)
app.add_typer(serve.voice_app, name="voice")
if __name__ == "__main__":  # not in the engine process, which spawn starts by importing this file
    app(sys.argv[1:])
"""


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("where", ["--in-process", "--engine-process"])
def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path, where):
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    env = dict(os.environ)  # no PYTHONUNBUFFERED: the ready line must be flushed by itself
    proc = subprocess.Popen([sys.executable, str(launcher), "serve", "--model", "tiny-random", "--device", "cpu",
                             "--port", "0", "--max-batch", "2", "--voices", str(tmp_path / "voices"),
                             "--no-access-log", where], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)  # its own process group, as under a service manager
    try:
        line = proc.stdout.readline()  # "seseme serve: ready on http://127.0.0.1:PORT ..."
        assert "ready on" in line, line + proc.stderr.read()
        url = line.split("ready on ")[1].split()[0]
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/v1/audio/speech", json={
                "input": "Finish me.", "response_format": "pcm", "max_audio_ms": 1600, "seed": 1}) as r:
            pieces = r.iter_bytes()
            chunks = [next(pieces)]
            os.killpg(proc.pid, signal.SIGTERM)  # the whole group: an engine process must leave the drain to the front
            time.sleep(0.3)
            late = httpx.post(f"{url}/v1/audio/speech", json={"input": "Too late."})
            assert_openai_error(late, 503, code="shutting_down")
            assert int(late.headers["retry-after"]) > 0
            assert httpx.get(f"{url}/health").status_code == 503
            chunks += list(pieces)
        assert len(b"".join(chunks)) == 20 * FRAME_BYTES  # the in-flight request was spoken to its end
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        deadline = time.monotonic() + 5
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _group_alive(proc.pid), "a process of the server outlived it"
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_the_mailbox_wakes_the_event_loop_once_per_burst_and_keeps_each_queues_order():
    """Events posted from another thread while the event loop is busy arrive in order, per queue, after one
    wake-up; a later burst gets its own."""
    import asyncio

    from seseme_cli.server.service import EventMailbox

    async def scenario():
        loop = asyncio.get_running_loop()
        wakeups = []
        mailbox = EventMailbox(loop)
        schedule = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakeups.append(1), schedule(*a))  # count the wake-ups
        queues = [asyncio.Queue() for _ in range(3)]

        def burst(start):
            for i in range(start, start + 300):
                mailbox.post(queues[i % 3], i)

        for start in (0, 300):
            worker = threading.Thread(target=burst, args=(start,))
            worker.start()
            worker.join()  # the event loop is blocked meanwhile: the whole burst waits for one delivery
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        got = [[q.get_nowait() for _ in range(q.qsize())] for q in queues]
        return got, len(wakeups)

    got, wakeups = asyncio.run(scenario())
    assert got == [list(range(k, 600, 3)) for k in range(3)]
    assert wakeups == 2


def test_the_gil_switch_interval_is_a_checked_setting():
    assert ServerSettings(switch_interval_ms=2).switch_interval_ms == 2
    with pytest.raises(InputError, match="--switch-interval-ms"):
        ServerSettings(switch_interval_ms=0)

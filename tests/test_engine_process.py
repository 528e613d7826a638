"""The engine in a process of its own (server.engine_process), where it can fail in ways a thread cannot: the
child dies mid-request (killed, out of memory), or the model does not load there. Everything else the engine
process does is tested with the in-process engine in test_server.py (its `server` fixture runs both)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import serve_in_thread
from seseme_cli.server.engine_process import EngineProcessService, engine_process_default
from seseme_cli.server.service import FAILED
from seseme_cli.server.settings import ServerSettings

ROOT_LAUNCHER = """
import sys
from seseme_cli.cli.main import app
if __name__ == "__main__":
    app(sys.argv[1:], prog_name="seseme")
"""


def start(settings):
    service = EngineProcessService(settings).start()
    return (service, *serve_in_thread(service, settings))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_dead_engine_process_fails_the_requests_in_flight_and_the_service():
    settings = ServerSettings(model="tiny-random", device="cpu", max_batch=2, max_queue=2, max_audio_ms=8000,
                              voices_dir=None, drain_timeout_s=5)
    service, server, thread, url = start(settings)
    try:
        assert service.wait_ready(120), service.describe_error()
        body = {"input": "Generating when the engine dies.", "response_format": "pcm", "max_audio_ms": 8000, "seed": 2}
        with httpx.Client(timeout=60) as client:
            whole = threading.Thread(target=lambda: answers.append(client.post(f"{url}/v1/audio/speech",
                                                                              json={**body, "stream": False})))
            answers: list = []
            with client.stream("POST", f"{url}/v1/audio/speech", json=body) as streamed:
                assert streamed.status_code == 200
                pieces = streamed.iter_bytes()
                received = len(next(pieces))
                whole.start()
                time.sleep(0.3)
                os.kill(service._process.pid, signal.SIGKILL)
                with pytest.raises(httpx.RemoteProtocolError):  # cut short: not a short body that looks whole
                    for piece in pieces:
                        received += len(piece)
            whole.join(30)
        assert received < 100 * 1920 * 2
        assert answers and answers[0].status_code == 500, answers
        assert "engine process exited unexpectedly" in answers[0].json()["error"]["message"]
        thread.join(15)  # nothing can be served any more: the server exits (the CLI then says why, non-zero)
        assert not thread.is_alive()
        assert service.state == FAILED and "exit code -9" in service.describe_error()
    finally:
        server.should_exit = True
        thread.join(15)
        service.stop()


def test_a_model_that_does_not_load_in_the_engine_process_is_one_error_line(tmp_path):
    launcher = tmp_path / "launch.py"
    launcher.write_text(ROOT_LAUNCHER)
    missing = tmp_path / "no-such-checkpoint"
    result = subprocess.run([sys.executable, str(launcher), "serve", "--model", str(missing), "--device", "cpu",
                             "--port", "0", "--engine-process", "--no-access-log"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert str(missing) in result.stderr, result.stderr


def test_the_engine_process_is_the_default_on_a_gpu_only():
    assert engine_process_default("cuda") and engine_process_default("cuda:1")
    assert not engine_process_default("cpu")

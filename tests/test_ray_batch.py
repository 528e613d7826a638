"""`seseme batch` over engine replicas (Ray actors): two CPU replicas of the tiny random model on a local Ray.

The same outputs and manifest as one process; a replica killed mid-batch loses and duplicates nothing; the flags'
errors; and the default path never imports ray.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from seseme_cli.cli import main as cli
from seseme_cli.errors import InputError
from seseme_cli.replicas import cluster

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
CONTEXT = SAMPLES / "context" / "espeak_hello.wav"
TINY = ["--model", "tiny-random", "--device", "cpu"]
runner = CliRunner()


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster of 2 CPUs for this module's runs (a run started inside it leaves it running)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 << 20,
             logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def batch(*args):
    return runner.invoke(cli.app, ["batch", *map(str, args)])


def records(folder: Path, stem: str = "in") -> list[dict]:
    return [json.loads(line) for line in (folder / f"{stem}.manifest.jsonl").read_text().splitlines()]


def assert_same_audio(a: Path, b: Path) -> None:
    """The same codes decode to the same samples up to one 16-bit step (Mimi decodes a request beside others)."""
    x, y = (sf.read(p, dtype="int16")[0].astype(np.int32) for p in (a, b))
    assert x.shape == y.shape and np.abs(x - y).max() <= 1, (a, b)


def test_two_replicas_write_what_one_process_writes(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(CONTEXT, tmp_path / "clip.wav")  # a relative context path: the replicas run elsewhere
    lines = [{"id": f"r{i}", "text": f"Request number {i} of a mixed batch.", "max_audio_ms": 160 * (1 + i % 4),
              "seed": i} for i in range(8)]
    lines += [
        {"id": "ctx", "text": "With a voice.", "max_audio_ms": 320, "seed": 9, "out": "sub/ctx.flac",
         "context": [{"audio": "clip.wav", "text": "Hello there.", "speaker": 1}]},
        {"id": "long", "text": "Too long.", "context": [{"audio": "clip.wav", "text": "word " * 2100}]},
        "not json",
    ]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    one = batch(src, "-d", "one", "--batch-size", 2, *TINY)
    two = batch(src, "-d", "two", "--batch-size", 2, "--replicas", 2, *TINY)
    assert one.exit_code == two.exit_code == 1, two.output  # "long" and "not json" fail, in both
    assert "2 replicas, batch size 2 each" in two.stdout
    key = lambda r: r["line"]  # noqa: E731 - the replicas finish in another order
    assert sorted(records(tmp_path / "one"), key=key) == sorted(records(tmp_path / "two"), key=key)
    outputs = [f"r{i}.wav" for i in range(8)] + ["sub/ctx.flac"]
    for name in outputs:
        assert_same_audio(tmp_path / "one" / name, tmp_path / "two" / name)
    made = sorted(p.relative_to(tmp_path / "two").as_posix() for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert made == sorted(outputs + ["in.manifest.jsonl"])  # no temp file left, nothing else


def test_a_replica_killed_mid_batch_loses_and_duplicates_nothing(local_ray, tmp_path):
    from seseme_cli.batch.manifest import Manifest
    from seseme_cli.batch.replicas import ReplicaRun
    from seseme_cli.batch.run import BatchSettings
    from seseme_cli.cli.batch import plan
    from seseme_cli.replicas.cluster import ReplicaSpec

    n = 8
    lines = [{"id": f"r{i}", "text": f"Request number {i}.", "max_audio_ms": 400 + 80 * (i % 3), "seed": i}
             for i in range(n)]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    assert batch(src, "-d", tmp_path / "one", "--batch-size", 2, *TINY).exit_code == 0
    steps = plan(src, tmp_path / "two", "wav")
    manifest = Manifest(steps.manifest_path, steps.out_dir)
    killed = []

    def progress(tally, stats) -> None:  # the writer's thread or the run's: kill replica 0 once 2 files are written
        if tally.done >= 2 and not killed:
            killed.append(tally.done)
            local_ray.kill(run.cluster.actors[0])

    run = ReplicaRun(ReplicaSpec(2, "tiny-random", "cpu"), manifest, BatchSettings(batch_size=2), progress)
    try:
        tally = run.run(steps.todo)
    finally:
        manifest.close()
    print(f"set-up {tally.setup_s:.1f} s, generation {run.stats.seconds:.1f} s, {tally.retried} retried")
    assert killed and tally.retried >= 1, "replica 0 should have died holding unfinished requests"
    assert (tally.ok, tally.failed) == (n, [])
    done = records(tmp_path / "two")
    assert sorted(r["output"] for r in done) == sorted(f"r{i}.wav" for i in range(n))  # each once, all ok
    assert {r["status"] for r in done} == {"ok"}
    for i in range(n):
        assert_same_audio(tmp_path / "one" / f"r{i}.wav", tmp_path / "two" / f"r{i}.wav")
    assert not list((tmp_path / "two").glob(".*.part"))


# --- flags -----------------------------------------------------------------------------------------------------------

def test_replica_flags(monkeypatch):
    monkeypatch.setattr(cluster, "gpu_count", lambda: 4)
    monkeypatch.setattr(cluster, "has_ray", lambda: True)
    assert [cluster.replica_count(gpus, None, "cuda") for gpus in (None, "1", "3", "all")] == [1, 1, 3, 4]
    assert cluster.replica_count(None, 3, "cpu") == 3
    for gpus, replicas, device, message in [
        ("0", None, "cuda", "1 or more"), ("two", None, "cuda", "or 'all'"), ("8", None, "cuda", "only 4 GPUs"),
        ("2", None, "cpu", "--device cpu --replicas N"), (None, 2, "cuda", "on GPUs use --gpus"),
        ("2", 2, "cpu", "exclude each other"), (None, 0, "cpu", "at least 1"),
    ]:
        with pytest.raises(InputError, match=message):
            cluster.replica_count(gpus, replicas, device)
    monkeypatch.setattr(cluster, "has_ray", lambda: False)
    with pytest.raises(InputError, match=r"pip install 'seseme\[ray\]'"):
        cluster.replica_count("all", None, "cuda")
    assert cluster.replica_count("1", None, "cuda") == 1  # one replica needs no Ray
    monkeypatch.setattr(cluster, "gpu_count", lambda: 1)
    assert cluster.replica_count("all", None, "cuda") == 1  # one GPU: the single-process path


def test_gpus_on_the_cpu_is_one_error_line(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    result = batch(src, "--gpus", "2", *TINY)
    assert result.exit_code == 2 and result.stderr.count("error:") == 1 and "--replicas" in result.stderr
    assert not (tmp_path / "in.manifest.jsonl").exists()


def test_the_default_path_does_not_import_ray(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "One.", "max_audio_ms": 160}])
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from seseme_cli.cli import main\n"
        "import seseme_cli.cli.serve, seseme_cli.server.app, seseme_cli.server.service\n"
        f"result = CliRunner().invoke(main.app, ['batch', {str(src)!r}, *{TINY!r}])\n"
        "assert result.exit_code == 0, result.output\n"
        "print('ray imported' if 'ray' in sys.modules else 'no ray')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "no ray"
    assert sf.info(tmp_path / "a.wav").frames == 2 * 1920

"""`seseme batch`: request parsing, output naming and checks, the manifest, continuous batching on the engine's
rows, and end to end on real files (tiny random model on the CPU; the real-size random model on a GPU)."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

import seseme_cli
from seseme_cli.cli import main as cli
from seseme_cli.batch.manifest import Manifest, Request, RequestError, parse_request, plan_outputs, read_requests
from seseme_cli.batch.run import Tally, Writer
from seseme_cli.engine import Engine
from seseme_cli.errors import SesemeError
from seseme_cli.api import load_csm_1b_optimized
from seseme_cli.ops.kernels import has_cuda_kernels
from seseme_cli.speech.longform import max_chunk_chars, split_text

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
CONTEXT = SAMPLES / "context" / "espeak_hello.wav"
PARAGRAPHS = (SAMPLES / "texts" / "paragraphs.txt").read_text()
FRAME = 1920
TINY = ["--model", "tiny-random", "--device", "cpu"]
runner = CliRunner()


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def manifest_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- parsing -------------------------------------------------------------------------------------------------

def test_parse_full_request():
    req = parse_request(3, json.dumps({
        "id": 7, "text": "  Hello\n there. ", "speaker": 1, "temperature": 0.5, "topk": 10, "max_audio_ms": 800,
        "seed": 4, "out": "a/b.flac", "context": [{"audio": str(CONTEXT), "text": "Hello there."}]}))
    s = req.speech
    assert (req.line, req.id, s.text, s.speaker, s.sampling.temperature, s.sampling.topk, s.max_audio_ms, s.sampling.seed,
            req.out) == (3, "7", "Hello there.", 1, 0.5, 10, 800.0, 4, "a/b.flac")
    assert req.context[0].audio == CONTEXT and req.context[0].speaker == 1  # defaults to the request's speaker


@pytest.mark.parametrize("line,message", [
    ('{"text": "hi"', "not valid JSON"),
    ('["hi"]', "JSON object"),
    ('{"id": "x"}', 'no "text"'),
    ('{"text": "   "}', "text is empty"),
    ('{"text": 5}', "text must be a string"),
    ('{"text": "hi", "temprature": 1}', "unknown field 'temprature'"),
    ('{"text": "hi", "speaker": -1}', "speaker must be >= 0"),
    ('{"text": "hi", "speaker": 1.5}', "speaker must be an integer"),
    ('{"text": "hi", "topk": 0}', "topk must be >= 1"),
    ('{"text": "hi", "temperature": -1}', "temperature must be >= 0"),
    ('{"text": "hi", "temperature": true}', "temperature must be a number"),
    ('{"text": "hi", "max_audio_ms": 0}', "max_audio_ms must be >= 80"),
    ('{"text": "hi", "seed": -3}', "seed must be between 0 and"),
    ('{"text": "hi", "id": "' + "x" * 300 + '"}', "at most 200 bytes"),
    ('{"text": "hi", "id": "a/b"}', "cannot be a file name"),
    ('{"text": "hi", "id": [1]}', "id must be a string or an integer"),
    ('{"text": "hi", "context": {"audio": "x"}}', "context must be a list"),
    ('{"text": "hi", "context": [{"text": "x"}]}', "context[0] has no 'audio'"),
    ('{"text": "hi", "context": [{"audio": "/no/such.wav", "text": "x"}]}', "no such file"),
])
def test_malformed_requests_say_why(line, message):
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_request(1, line)


def test_read_requests_keeps_line_numbers_and_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, "", "nope", {"text": "b"}])
    reqs = read_requests(path)
    assert [(r.line, r.speech and r.speech.text, r.error is None) for r in reqs] == \
        [(1, "a", True), (3, None, False), (4, "b", True)]


def test_a_bad_field_keeps_the_id_and_a_byte_order_mark_is_not_text(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"id": "first", "text": "a"}\n{"id": "second", "text": "b", "topk": 0}\n')
    first, second = read_requests(path)
    assert first.error is None and first.id == "first" and first.speech.text == "a"
    assert second.id == "second" and "topk" in second.error


# --- outputs ---------------------------------------------------------------------------------------------------

def test_output_names_escapes_and_duplicates(tmp_path):
    reqs = [Request(1, id="a"), Request(2), Request(3, out="sub/x.ogg"), Request(4, out="../x.wav"),
            Request(5, out="/tmp/x.wav"), Request(6, out="sub/../dup.flac"), Request(7, id="dup"),
            Request(8, out="x.aac"), Request(9, out=".")]
    plan_outputs(reqs, tmp_path, "flac")
    root = tmp_path.resolve()
    assert reqs[0].output == root / "a.flac" and reqs[1].output == root / "2.flac"
    assert reqs[2].output == root / "sub" / "x.ogg"
    assert "outside the output directory" in reqs[3].error and "relative" in reqs[4].error
    assert "lines 6, 7 all write dup.flac" in reqs[5].error and reqs[5].error == reqs[6].error
    assert "unsupported file type" in reqs[7].error and reqs[8].error
    assert all(r.error is None for r in reqs[:3])


def test_manifest_survives_a_line_cut_short(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"output": "a.wav", "status": "ok"}) + '\n{"output": "b.wav", "sta')
    manifest = Manifest(path, tmp_path)
    assert manifest.ok == {"a.wav"}
    req = Request(2, id="c", output=tmp_path.resolve() / "c.wav")
    manifest.append(req, "ok", 1.5)
    manifest.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1]) == {"line": 2, "id": "c", "output": "c.wav", "duration_s": 1.5, "status": "ok",
                                     "error": None}


# --- writing ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 4])
def test_writer_prepares_writes_and_discards(tmp_path, threads):
    root = tmp_path.resolve()
    (root / "taken").write_text("a file where a directory should be")
    reqs = {name: Request(i, id=name, output=root / out) for i, (name, out) in enumerate(
        [("ok", "ok.wav"), ("dropped", "dropped.wav"), ("unprepared", "unprepared.flac"), ("blocked", "taken/x.wav"),
         ("left", "left.wav"), ("sub", "new/sub.ogg")])}
    done = {}
    tally = Tally()
    writer = Writer(SimpleNamespace(sample_rate=24000), tally, lambda req, s, e: done.setdefault(req.id, (s, e)),
                    threads)
    for name in ("ok", "dropped", "blocked", "left", "sub"):
        writer.prepare(reqs[name])
    concurrent.futures.wait(writer.prepared.values())  # every prepare has run
    parts = sorted(p.relative_to(root).as_posix().split(".")[1] for p in root.rglob("*.part"))
    assert parts == ["dropped", "left", "ok", "sub"] and not done  # made before any audio; "new" made for it
    pieces = [np.full(1000, 0.25, np.float32), np.full(920, -0.25, np.float32)]
    for name in ("ok", "unprepared", "blocked", "sub"):
        writer.submit(reqs[name], pieces, special=2)
    writer.discard(reqs["dropped"])
    writer.close()  # "left" was never written: its temp file goes too
    assert done["ok"] == done["unprepared"] == done["sub"] == (1920 / 24000, None)
    assert done["blocked"][0] is None and "File exists" in done["blocked"][1] and "\n" not in done["blocked"][1]
    assert set(done) == {"ok", "unprepared", "blocked", "sub"} and tally.special == 8
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == \
        ["new/sub.ogg", "ok.wav", "taken", "unprepared.flac"]
    assert np.array_equal(sf.read(root / "ok.wav", dtype="float32")[0], np.concatenate(pieces))


# --- sizing ----------------------------------------------------------------------------------------------------

def test_batch_size_that_fits_counts_the_engine_row_and_its_decoder_slot(tts, monkeypatch):
    from seseme_cli.batch import run as batch_run
    from seseme_cli.engine.runner import bytes_per_row

    per_row = bytes_per_row(tts.config, torch.bfloat16) + batch_run.ROW_AUDIO_SLOT_BYTES
    gpu = SimpleNamespace(device=torch.device("cuda"), config=tts.config, dtype=torch.bfloat16)
    free = batch_run.RESERVE_BYTES + 100 * per_row + per_row // 2
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 2 * free))
    assert batch_run.pick_batch_size(gpu, None, 1000) == 100
    assert batch_run.pick_batch_size(gpu, None, 7) == 7  # never more rows than requests
    assert batch_run.pick_batch_size(gpu, 3, 1000) == 3  # asked for
    free = batch_run.RESERVE_BYTES + per_row // 2
    with pytest.raises(SesemeError, match="not enough free GPU memory"):
        batch_run.pick_batch_size(gpu, None, 10)


# --- end to end ------------------------------------------------------------------------------------------------

def batch(*args):
    return runner.invoke(cli.app, ["batch", *map(str, args)])


def test_batch_end_to_end_and_rerun(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.wav").write_bytes(b"not audio" * 20)
    lines = [
        {"id": "hello", "text": "Hello there.", "max_audio_ms": 400, "seed": 1},
        {"text": "No id: named by line.", "max_audio_ms": 240, "seed": 2},
        {"id": "reply", "text": "Nice to meet you.", "max_audio_ms": 320, "seed": 3, "out": "sub/reply.flac",
         "context": [{"audio": str(CONTEXT), "text": "Hello there. Nice to meet you.", "speaker": 1}]},
        "this is not json",
        {"id": "junk", "text": "Bad context.", "context": [{"audio": "junk.wav", "text": "x"}]},
        {"id": "story", "text": PARAGRAPHS, "max_audio_ms": 160, "seed": 4},
        {"id": "esc", "text": "x", "out": "../escape.wav"},
    ]
    src = write_jsonl(tmp_path / "reqs.jsonl", lines)
    result = batch(src, "--out-dir", tmp_path / "out", "--batch-size", 2, "--format", "ogg", *TINY)
    assert result.exit_code == 1, result.output  # some requests failed
    out = tmp_path / "out"
    records = {r["line"]: r for r in manifest_records(out / "reqs.manifest.jsonl")}
    assert {k: r["status"] for k, r in records.items()} == {1: "ok", 2: "ok", 3: "ok", 4: "failed", 5: "failed",
                                                             6: "ok", 7: "failed"}
    assert "not valid JSON" in records[4]["error"] and "junk.wav" in records[5]["error"]
    assert "outside the output directory" in records[7]["error"]
    for line, name, frames in [(1, "hello.ogg", 5), (2, "2.ogg", 3), (3, "sub/reply.flac", 4)]:
        assert records[line]["output"] == name and sf.info(out / name).frames == frames * FRAME
        assert records[line]["duration_s"] == pytest.approx(frames * 0.08)
    chunks = len(split_text(PARAGRAPHS, max_chunk_chars(10_000)))
    assert sf.info(out / "story.ogg").frames == 2 * chunks * FRAME  # long-form: every chunk, 2 frames each
    assert "Traceback" not in result.output and "failed requests" in result.stdout
    assert not (tmp_path / "escape.wav").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]

    # A rerun skips what exists and generates what is missing.
    mtime = (out / "hello.ogg").stat().st_mtime_ns
    (out / "2.ogg").unlink()
    again = batch(src, "--out-dir", out, "--format", "ogg", *TINY)
    assert again.exit_code == 1
    assert (out / "hello.ogg").stat().st_mtime_ns == mtime and (out / "2.ogg").exists()
    last = manifest_records(out / "reqs.manifest.jsonl")[-1]
    assert (last["line"], last["status"]) == (2, "ok")


def test_requests_failing_after_their_file_was_prepared_leave_no_temp_file(tmp_path, monkeypatch):
    # The temp file is made as a request starts generating. "long": its prompt is past the context window, which
    # only the scheduler finds (after the temp file was made); "blocked": its directory cannot be made, which the
    # writer finds while preparing and reports when the audio is there, as it reports a failed write.
    left_at_close = []
    close = Writer.close
    monkeypatch.setattr(Writer, "close", lambda self: (left_at_close.append(len(self.prepared)), close(self)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "taken").write_text("a file where a directory should be")
    lines = [{"id": "ok", "text": "Fine.", "max_audio_ms": 160, "seed": 1},
             {"id": "long", "text": "Too long.", "context": [{"audio": str(CONTEXT), "text": "word " * 2100}]},
             {"id": "blocked", "text": "Nowhere to go.", "max_audio_ms": 160, "out": "taken/blocked.wav"}]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    result = batch(src, "--out-dir", out, "--batch-size", 2, *TINY)
    assert result.exit_code == 1, result.output
    records = {r["id"]: r for r in manifest_records(out / "in.manifest.jsonl")}
    assert {k: r["status"] for k, r in records.items()} == {"ok": "ok", "long": "failed", "blocked": "failed"}
    assert "context window" in records["long"]["error"] and "File exists" in records["blocked"]["error"]
    assert sorted(p.name for p in out.rglob("*")) == ["in.manifest.jsonl", "ok.wav", "taken"]
    assert left_at_close == [0]  # each was written or discarded as its request ended, not only by the final close


def test_all_good_exits_zero_and_defaults_next_to_the_input(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "One.", "max_audio_ms": 160}])
    result = batch(src, *TINY)
    assert result.exit_code == 0, result.output
    assert sf.info(tmp_path / "a.wav").frames == 2 * FRAME
    assert manifest_records(tmp_path / "in.manifest.jsonl")[0]["status"] == "ok"


def test_bad_arguments_are_one_line(tmp_path):
    assert batch(tmp_path / "missing.jsonl", *TINY).exit_code == 2
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    result = batch(empty, *TINY)
    assert result.exit_code == 2 and "no requests" in result.stderr
    result = batch(write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}]), "--batch-size", 0, *TINY)
    assert result.exit_code == 2 and result.stderr.count("error:") == 1


def test_kill_9_then_rerun_completes_the_rest(tmp_path):
    lines = [{"id": f"r{i}", "text": f"Request number {i}.", "max_audio_ms": 480, "seed": i} for i in range(12)]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    source = str(Path(seseme_cli.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "seseme_cli", "batch", str(src), "--batch-size", "2", *TINY]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob("r*.wav")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_run = {p.name for p in tmp_path.glob("r*.wav")}
    assert 0 < len(first_run) < 12, "the kill should land mid-run"
    for name in first_run:  # whatever the kill left is whole
        assert sf.info(tmp_path / name).frames == 6 * FRAME
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert {p.name for p in tmp_path.glob("r*.wav")} == {f"r{i}.wav" for i in range(12)}
    assert not list(tmp_path.glob(".*.part"))
    ok = {r["output"] for r in manifest_records(tmp_path / "in.manifest.jsonl") if r["status"] == "ok"}
    assert ok == {f"r{i}.wav" for i in range(12)}


# --- GPU: the real-size random model ----------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda_kernels(), reason="needs a GPU and the CUDA kernels")
def test_batch_real_size_random_gpu(tmp_path):
    lines = [{"id": f"r{i}", "text": f"Request number {i} is here.", "max_audio_ms": 80 * (4 + i % 7), "seed": i}
             for i in range(40)] + [{"id": "story", "text": PARAGRAPHS, "max_audio_ms": 800, "seed": 1}]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    result = batch(src, "--batch-size", 16, "--model", "random", "--device", "cuda")
    assert result.exit_code == 0, result.output
    print(result.stdout)
    for i in range(40):
        frames = sf.info(tmp_path / f"r{i}.wav").frames
        assert 0 < frames <= (4 + i % 7) * FRAME and frames % FRAME == 0
    tts = load_csm_1b_optimized("random", device="cuda")
    same = sum(sf.info(tmp_path / f"r{i}.wav").frames == FRAME * tts.generate_codes(
        f"Request number {i} is here.", max_audio_length_ms=80 * (4 + i % 7), seed=i).shape[0] for i in range(8))
    print(f"{same} of 8 requests have the same length batched (batch 16) as alone (batch 1)")

"""The `seseme` command line, end to end with the tiny random model on the CPU.

Good input must give a readable audio file whose length matches the saved codes; every bad input must give
one `error:` line, a non-zero exit code, no traceback, and no file left behind (not even a temp file).
"""

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

import seseme_cli
import seseme_cli.api
import seseme_cli.audio.files
from seseme_cli.cli import inputs
from seseme_cli.cli import main as cli

FRAME_SAMPLES = 1920  # 80 ms at 24 kHz
FAST = ["--model", "tiny-random", "--device", "cpu", "--max-audio-ms", "800", "--seed", "1"]
runner = CliRunner()


def say(*args, input=None):
    return runner.invoke(cli.app, ["say", *map(str, args)], input=input)


def assert_ok(result):
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"


def read_codes(path: Path) -> np.ndarray:
    codes = np.load(path)
    assert codes.ndim == 2 and codes.shape[1] == 32 and 1 <= codes.shape[0] <= 10
    assert np.issubdtype(codes.dtype, np.integer) and codes.min() >= 0 and codes.max() < 2048
    return codes


@pytest.fixture
def stereo_sine(tmp_path) -> Path:
    """1 s of a 440 Hz tone at 16 kHz in two channels: the CLI must resample and downmix it."""
    t = np.arange(16000) / 16000
    path = tmp_path / "tone.wav"
    sf.write(path, np.stack([0.3 * np.sin(2 * np.pi * 440 * t)] * 2, axis=1), 16000)
    return path


# --- good input -------------------------------------------------------------------------------------------

def test_say_writes_wav_and_matching_codes(tmp_path):
    out, codes_path = tmp_path / "out.wav", tmp_path / "codes.npy"
    result = say("Hello there.", "-o", out, "--codes", codes_path, *FAST)
    assert_ok(result)
    codes = read_codes(codes_path)
    info = sf.info(out)
    assert (info.samplerate, info.channels) == (24000, 1)
    assert info.frames == codes.shape[0] * FRAME_SAMPLES
    assert "RANDOM" in result.stderr and "noise" in result.stderr
    assert "real-time factor" in result.stdout and f"({codes.shape[0]} frames" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy", "out.wav"]  # no temp files left


def test_same_seed_same_codes(tmp_path):
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        assert_ok(say("Hello there.", "-o", tmp_path / f"{name}.wav", "--codes", tmp_path / f"{name}.npy", *FAST, "--seed", seed))
    a, b, c = (np.load(tmp_path / f"{name}.npy") for name in "abc")
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("suffix,fmt,subtype", [(".flac", "FLAC", "PCM_16"), (".ogg", "OGG", "VORBIS"),
                                                (".mp3", "MP3", "MPEG_LAYER_III"), (".opus", "OGG", "OPUS")])
def test_say_other_formats(tmp_path, suffix, fmt, subtype, stream):
    out = tmp_path / f"out{suffix}"
    assert_ok(say("Hello there.", "-o", out, "--codes", tmp_path / "codes.npy", *FAST, *(["--stream"] if stream else [])))
    info = sf.info(out)
    assert (info.format, info.subtype, info.samplerate, info.channels) == (fmt, subtype, 24000, 1)
    assert info.frames == read_codes(tmp_path / "codes.npy").shape[0] * FRAME_SAMPLES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy", out.name]


def test_text_from_file_and_stdin_matches_argument(tmp_path):
    (tmp_path / "hello.txt").write_text("Hello\n  there.\n")  # whitespace runs collapse to one space
    assert_ok(say("Hello there.", "-o", tmp_path / "arg.wav", "--codes", tmp_path / "arg.npy", *FAST))
    assert_ok(say("--file", tmp_path / "hello.txt", "-o", tmp_path / "file.wav", "--codes", tmp_path / "file.npy", *FAST))
    assert_ok(say("-", "-o", tmp_path / "stdin.wav", "--codes", tmp_path / "stdin.npy", *FAST, input="Hello there.\n"))
    arg = np.load(tmp_path / "arg.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "file.npy"), arg)
    np.testing.assert_array_equal(np.load(tmp_path / "stdin.npy"), arg)


def test_context_audio(tmp_path, stereo_sine):
    out = tmp_path / "out.wav"
    # The transcript holds ':' on purpose: only the first and last ':' separate the fields.
    result = say("Hello there.", "-o", out, *FAST, "--context", f"{stereo_sine}:Note: a tone, at 10:30.:1",
                 "--context", f"{stereo_sine}:And again.:0")
    assert_ok(result)
    assert sf.info(out).samplerate == 24000 and sf.info(out).frames % FRAME_SAMPLES == 0


def test_parse_context_splits_first_and_last_colon():
    assert inputs.parse_context("a.wav:Time: 10:30:2") == (Path("a.wav"), "Time: 10:30", 2)


# --- bad input ----------------------------------------------------------------------------------------------

def _model_must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the cheap input checks")


NO_CUDA = not torch.cuda.is_available()
# (id, arguments after `say -o OUT --codes CODES <FAST>`, stdin); {tmp} is the test's folder, {tone} a good clip.
CHEAP_CASES = [
    ("empty text", [""], None),
    ("blank text", ["  \n\t "], None),
    ("no text", [], None),
    ("empty stdin", ["-"], ""),
    ("blank stdin", ["-"], "\n \n"),
    ("empty file", ["--file", "{tmp}/empty.txt"], None),
    ("missing file", ["--file", "{tmp}/missing.txt"], None),
    ("file is a folder", ["--file", "{tmp}"], None),
    ("file not utf-8", ["--file", "{tmp}/latin1.txt"], None),
    ("text and file", ["Hi.", "--file", "{tmp}/hello.txt"], None),
    ("context without speaker", ["Hi.", "--context", "{tone}:hello"], None),
    ("context bad speaker", ["Hi.", "--context", "{tone}:hello:one"], None),
    ("context negative speaker", ["Hi.", "--context", "{tone}:hello:-1"], None),
    ("context without audio", ["Hi.", "--context", ":hello:1"], None),
    ("context empty transcript", ["Hi.", "--context", "{tone}::1"], None),
    ("context missing audio", ["Hi.", "--context", "{tmp}/missing.wav:hello:1"], None),
    ("context not audio", ["Hi.", "--context", "{tmp}/garbage.wav:hello:1"], None),
    ("unsupported suffix", ["Hi.", "-o", "{tmp}/out.aac"], None),
    ("no suffix", ["Hi.", "-o", "{tmp}/out"], None),
    ("output folder missing", ["Hi.", "-o", "{tmp}/nowhere/out.wav"], None),
    ("output is a folder", ["Hi.", "-o", "{tmp}/folder.wav"], None),
    ("codes not npy", ["Hi.", "--codes", "{tmp}/codes.txt"], None),
    ("codes folder missing", ["Hi.", "--codes", "{tmp}/nowhere/codes.npy"], None),
    ("negative temperature", ["Hi.", "--temperature", "-0.1"], None),
    ("nan temperature", ["Hi.", "--temperature", "nan"], None),
    ("topk 0", ["Hi.", "--topk", "0"], None),
    ("max-audio-ms 0", ["Hi.", "--max-audio-ms", "0"], None),
    ("negative speaker", ["Hi.", "--speaker", "-1"], None),
    # found while hardening (issue 15): each was a traceback, a partial file or a late failure
    ("stdin not utf-8", ["-"], "caf\xe9".encode("latin-1")),
    ("file is binary", ["--file", "{tmp}/binary.txt"], None),
    ("file holds a NUL", ["--file", "{tmp}/nul.txt"], None),
    ("text and stdin and file", ["-", "--file", "{tmp}/hello.txt"], "Hello."),
    ("speaker not an integer", ["Hi.", "--speaker", "1.5"], None),
    ("speaker not a number", ["Hi.", "--speaker", "one"], None),
    ("seed -1", ["Hi.", "--seed", "-1"], None),
    ("seed 2^63", ["Hi.", "--seed", str(2**63)], None),
    ("seed not an integer", ["Hi.", "--seed", "0.5"], None),
    ("inf temperature", ["Hi.", "--temperature", "inf"], None),
    ("temperature not a number", ["Hi.", "--temperature", "warm"], None),
    ("topk negative", ["Hi.", "--topk", "-3"], None),
    ("topk not an integer", ["Hi.", "--topk", "2.5"], None),
    ("max-audio-ms nan", ["Hi.", "--max-audio-ms", "nan"], None),
    ("max-audio-ms under a frame", ["Hi.", "--max-audio-ms", "10"], None),
    ("max-audio-ms with a unit", ["Hi.", "--max-audio-ms", "10s"], None),
    ("chunk-ms 0", ["Hi.", "--chunk-ms", "0"], None),
    ("chunk-ms inf", ["Hi.", "--chunk-ms", "inf"], None),
    ("unknown device", ["Hi.", "--device", "tpu"], None),
    ("unknown option", ["Hi.", "--bogus"], None),
    ("old max-audio spelling", ["Hi.", "--max-audio-length-ms", "800"], None),
    ("output under a file", ["Hi.", "-o", "{tmp}/hello.txt/out.wav"], None),
    ("output suffix only", ["Hi.", "-o", "{tmp}/.wav"], None),
    ("output name too long for its temp file", ["Hi.", "-o", "{tmp}/" + "x" * 241 + ".wav"], None),
    ("codes name too long for its temp file", ["Hi.", "--codes", "{tmp}/" + "x" * 241 + ".npy"], None),
    ("codes is a folder", ["Hi.", "--codes", "{tmp}/folder.npy"], None),
    ("codes under a file", ["Hi.", "--codes", "{tmp}/hello.txt/codes.npy"], None),
    ("context is a folder", ["Hi.", "--context", "{tmp}:hello:1"], None),
    ("context claims 2^31 Hz", ["Hi.", "--context", "{tmp}/fast.wav:hello:1"], None),
    ("context claims 2^31-1 Hz", ["Hi.", "--context", "{tmp}/fast2.wav:hello:1"], None),
    ("second context bad", ["Hi.", "--context", "{tone}:hello:1", "--context", "{tone}:hello"], None),
] + ([("cuda without a GPU", ["Hi.", "--device", "cuda"], None)] if NO_CUDA else [])
# These pass the cheap checks and fail while (or after) loading the model.
MODEL_CASES = [
    ("prompt too long", ["a" * 2100], None),
    ("folder without a checkpoint", ["Hi.", "--model", "{tmp}/folder.wav"], None),
    ("model name not an id", ["Hi.", "--model", "not a model"], None),
]


@pytest.fixture
def bad_input_dir(tmp_path, stereo_sine):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "hello.txt").write_text("Hello.")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "garbage.wav").write_bytes(b"this is not audio at all" * 10)
    (tmp_path / "folder.wav").mkdir()
    (tmp_path / "folder.npy").mkdir()
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    (tmp_path / "nul.txt").write_bytes(b"Hello\0there.")
    (tmp_path / "fast.wav").write_bytes(wav_header_claiming(2**31))
    (tmp_path / "fast2.wav").write_bytes(wav_header_claiming(2**31 - 1))
    return tmp_path


def wav_header_claiming(rate: int, data: bytes = b"\0" * 2000) -> bytes:
    """A PCM16 mono WAV whose header says `rate` Hz (a 2^31 Hz clip once made an 8.6 GB allocation)."""
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, (2 * rate) & 0xFFFFFFFF, 2, 16)
            + b"data" + struct.pack("<I", len(data)) + data)


def _run_bad(tmp_path, tone, args, stdin):
    before = set(tmp_path.rglob("*"))
    args = [a.format(tmp=tmp_path, tone=tone) for a in args]
    result = say("-o", tmp_path / "out.wav", "--codes", tmp_path / "codes.npy", *FAST, *args, input=stdin)
    assert result.exit_code == 2, f"{result.output}\n{result.exception!r}"
    assert len([line for line in result.stderr.splitlines() if "error:" in line]) == 1, result.stderr
    assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None)))
    assert set(tmp_path.rglob("*")) == before  # no output, no partial or temp file
    return result


@pytest.mark.parametrize("args,stdin", [c[1:] for c in CHEAP_CASES], ids=[c[0] for c in CHEAP_CASES])
def test_bad_input_fails_before_loading_the_model(bad_input_dir, stereo_sine, monkeypatch, args, stdin):
    monkeypatch.setattr(seseme_cli.api, "load_csm_1b_optimized", _model_must_not_load)
    result = _run_bad(bad_input_dir, stereo_sine, args, stdin)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr  # that line only


@pytest.mark.parametrize("args,stdin", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_bad_input_found_by_the_model(bad_input_dir, stereo_sine, args, stdin):
    _run_bad(bad_input_dir, stereo_sine, args, stdin)


def test_interrupt_leaves_no_files(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(seseme_cli.audio.files, "write_audio", interrupted)
    result = say("Hello there.", "-o", tmp_path / "out.wav", "--codes", tmp_path / "codes.npy", *FAST)
    assert result.exit_code == 130, result.output
    assert "error: interrupted" in result.stderr
    assert list(tmp_path.iterdir()) == []  # the codes' temp file is gone too


@pytest.mark.parametrize("args", [["--batch-sizes", "1,x"], ["--batch-sizes", "0"], ["--frames", "0"], []])
def test_bench_bad_input_or_no_gpu_is_one_line(args):
    if torch.cuda.is_available() and not args:
        pytest.skip("a GPU is visible: bench would run")
    result = runner.invoke(cli.app, ["bench", *args])
    assert result.exit_code == 2
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.output


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bench_on_the_gpu_writes_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    result = runner.invoke(cli.app, ["bench", "--model", "tiny-random", "--frames", "4", "--batch-sizes", "1,3",
                                     "--compare-baseline", "--baseline-frames", "2", "--json", str(out),
                                     "--plot", str(plot)])
    assert_ok(result)
    import json

    data = json.loads(out.read_text())
    assert data["gpu"] == torch.cuda.get_device_name() and data["copy_bandwidth_gb_s"] > 0
    assert data["kernel_tuning"]  # a table's path, or "built-in rules"
    rows = {(r["name"], r["batch"]): r for r in data["results"]}
    assert {b for name, b in rows if name == "seseme engine"} == {1, 3} and len(rows) == 4
    assert all(r["ms_per_frame"] > 0 and r["frames"] >= 2 for r in rows.values())
    assert rows[("seseme engine", 1)]["ttff_ms"] > 0 and plot.stat().st_size > 0


# --- as a program: `python -m seseme_cli` -------------------------------------------------------------------

def run_module(*args, **env):
    # Works whether seseme is installed or run from a checkout.
    src = str(Path(seseme_cli.__file__).resolve().parents[1])
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run([sys.executable, "-m", "seseme_cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_module_help_lists_commands():
    result = run_module("--help")
    assert result.returncode == 0, result.stderr
    for command in ("say", "batch", "tune", "bench"):
        assert command in result.stdout


def test_unknown_model_offline_is_one_line(tmp_path):
    out = tmp_path / "out.wav"
    result = run_module("say", "Hello.", "-o", out, "--model", "does/not-exist", "--device", "cpu",
                        HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "does/not-exist" in errors[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()

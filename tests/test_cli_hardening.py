"""The `seseme` command line as a finished tool (issue 15): fast --help/--version without torch, --version and
doctor, signals and full disks during `say --stream`, --play without a sound device, mp3/opus, batch's options,
and usage errors as one line. Bad-input tables for `say` are in test_cli.py."""

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

import seseme_cli
import seseme_cli.api
from seseme_cli.cli import main as cli, probe
from conftest import FullDisk

FRAME_SAMPLES = 1920
TINY = ["--model", "tiny-random", "--device", "cpu"]
FAST = [*TINY, "--max-audio-ms", "800", "--seed", "1"]
SRC = str(Path(seseme_cli.__file__).resolve().parents[1])
HEAVY = ("torch", "numpy", "soundfile", "moshi", "transformers", "fastapi", "uvicorn", "rich.progress",
         "sounddevice", "huggingface_hub", "seseme_cli.api")
runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(cli.app, [str(a) for a in args], input=input)


def one_error_line(result, code=2):
    assert result.exit_code == code, f"{result.output}\n{result.exception!r}"
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None)))
    return errors[0]


def python(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([sys.executable, *args], stderr=subprocess.PIPE, text=True, env=env, timeout=120, **kwargs)


def gpu_visible() -> bool:
    return bool(probe.driver_gpus()[0])


# --- start-up: --help and --version answer at once -------------------------------------------------------------

def test_importing_the_cli_imports_nothing_heavy():
    code = f"import sys, seseme_cli.cli.main; print([m for m in {HEAVY!r} if m in sys.modules])"
    result = python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--version"], []], ids=["help", "h", "version", "bare"])
def test_help_and_version_import_no_torch(args):
    if args == ["--version"] and gpu_visible():
        pytest.skip("with a GPU, --version asks torch which tuning table applies")
    code = ("import sys\nfrom seseme_cli.cli.main import app\ntry:\n    app(%r, prog_name='seseme')\n"
            "except SystemExit as e:\n    code = e.code\nprint('HEAVY', [m for m in %r if m in sys.modules], code)"
            % (args, tuple(m for m in HEAVY if m != "huggingface_hub")))  # --version asks it for the model cache
    result = python("-c", code)
    assert "HEAVY [] " in result.stdout, result.stdout + result.stderr


def test_version_is_fast():
    # The import check above is the robust one; this is the user's view (2-core CI runner: ~0.3 s measured).
    if gpu_visible():
        pytest.skip("with a GPU, --version imports torch for the tuning line")
    walls = []
    for _ in range(2):
        started = time.perf_counter()
        result = python("-m", "seseme_cli", "--version")
        walls.append(time.perf_counter() - started)
        assert result.returncode == 0, result.stderr
    assert min(walls) < 1.5, walls


def test_shell_completion_lists_the_commands_without_torch():
    result = python("-m", "seseme_cli", env={"_SESEME_COMPLETE": "complete_bash", "COMP_WORDS": "seseme s",
                                             "COMP_CWORD": "1"})
    assert result.returncode == 0, result.stderr
    assert {"say", "serve"} <= set(result.stdout.split())


# --- --version and doctor --------------------------------------------------------------------------------------

def test_version_lines():
    result = invoke("--version")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"seseme {seseme_cli.__version__}"
    assert [line.split(":")[0] for line in lines[1:]] == ["kernels", "torch", "GPU", "kernel tuning", "depth decoder",
                                                         "model cache"]
    import torch

    assert torch.__version__ in lines[2] and (torch.version.cuda or "CPU-only") in lines[2]
    if not gpu_visible():
        assert lines[3] == "GPU: no GPU (no NVIDIA driver (libcuda) found)" or lines[3].startswith("GPU: no GPU")
        assert lines[4] == "kernel tuning: none (no GPU)"
    assert "kernel" in lines[5] or "reference" in lines[5]  # the depth decoder's path, whatever the build


FAKE_H200 = probe.Gpu(0, "NVIDIA H200", (9, 0), 132, 150.0)


def test_doctor_without_gpu_is_fine():
    if gpu_visible():
        pytest.skip("a GPU is visible")
    result = invoke("doctor")
    assert result.exit_code == 0, result.output
    for row in ("kernels", "torch", "GPU (driver)", "nvcc", "kernel tuning", "model cache", "audio formats",
                "say --play"):
        assert f"\n{row} " in "\n" + result.stdout, row
    assert "no problems found" in result.stdout


REBUILD = "python3 -m pip install -e . -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 -C cmake.define.CMAKE_CUDA_COMPILER="


@pytest.mark.parametrize("nvcc,fix", [
    (("/usr/local/cuda/bin/nvcc", None), REBUILD + "/usr/local/cuda/bin/nvcc -C cmake.define.SESEME_CUDA=ON"),
    ((None, "/opt/cuda/bin/nvcc"), REBUILD + "/opt/cuda/bin/nvcc -C cmake.define.SESEME_CUDA=ON"),
    ((None, None), "install the CUDA toolkit (nvcc)"),
], ids=["nvcc on PATH", "nvcc off PATH", "no nvcc"])
def test_doctor_says_how_to_fix_cpu_only_kernels_on_a_gpu(monkeypatch, nvcc, fix):
    # The case issue 15 found: no nvcc at install time, so the kernels built CPU-only and a GPU runs ~30x slower.
    monkeypatch.setattr(probe, "driver_gpus", lambda: ([FAKE_H200], None))
    monkeypatch.setattr(probe, "kernels", lambda: probe.Kernels(True, False, 0, "0.1.0", None))
    monkeypatch.setattr(probe, "nvcc", lambda: nvcc)
    result = invoke("doctor")
    assert result.exit_code == 1, result.output
    problems = [line for line in result.stderr.splitlines() if line.startswith("problem:")]
    assert any("built without CUDA" in p and "~30x slower" in p for p in problems), result.stderr
    fixes = [line for line in result.stderr.splitlines() if line.strip().startswith("fix:")]
    assert any(fix in f for f in fixes), result.stderr
    assert all("CMAKE_CUDA_ARCHITECTURES=90" in f and "CMAKE_CUDA_COMPILER=" in f for f in fixes if "pip install" in f)
    assert "Traceback" not in result.output

    version = invoke("--version")  # --version says it too, in one warning, and still succeeds
    assert version.exit_code == 0 and "GPU: NVIDIA H200 (compute 9.0, 132 SMs" in version.stdout
    assert "kernel tuning: none (the kernels are built without CUDA)" in version.stdout
    assert version.stderr.count("warning:") == 1 and "seseme doctor" in version.stderr


def test_rebuild_command_is_cmakelists_own_plus_the_compiler():
    # CMakeLists.txt's example, plus the compiler named: after an install without nvcc, CMake's cache keeps
    # CMAKE_CUDA_COMPILER=NOTFOUND and the example alone stays CPU-only (seen on an H200, 2 s rebuild, has_cuda False).
    cmake = (Path(SRC).parent / "CMakeLists.txt").read_text()
    example = "python3 -m pip install -e . -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90"
    assert example in cmake
    command = probe.rebuild_command("90", "/usr/local/cuda/bin/nvcc")
    assert command.split(" && ")[-1] == (f"{example} -C cmake.define.CMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc "
                                         "-C cmake.define.SESEME_CUDA=ON")
    assert "CMAKE_CUDA_COMPILER=$(command -v nvcc)" in probe.rebuild_command("90", None)


def test_torch_facts_without_importing_torch_match_torch():
    import torch

    facts = probe.torch_build()
    assert facts.version == torch.__version__ and facts.cuda == torch.version.cuda


# --- signals during `say --stream` -----------------------------------------------------------------------------

@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum,code,message", [(signal.SIGTERM, 143, "error: stopped by SIGTERM"),
                                                  (signal.SIGINT, 130, "error: interrupted")], ids=["TERM", "INT"])
def test_signal_during_stream_removes_the_part_file(tmp_path, signum, code, message):
    out = tmp_path / "out.wav"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "seseme_cli", "say", "Hello there.", "-o", str(out), "--stream",
                             *TINY, "--max-audio-ms", "60000", "--seed", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 90
        while not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no .part file appeared"
            time.sleep(0.02)
        time.sleep(0.3)  # a few chunks in
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    assert [line for line in stderr.splitlines() if "error:" in line] == [message], stderr
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []  # neither the output nor its .part file


# --- a full disk -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_disk_full_is_one_line_and_no_file(tmp_path, monkeypatch, stream):
    import seseme_cli.audio.files as files
    import seseme_cli.audio.stream as streaming

    if stream:
        real = os.fdopen
        monkeypatch.setattr(streaming.os, "fdopen", lambda *a, **k: FullDisk(real(*a, **k), room=0))
    else:
        real_open = open
        monkeypatch.setattr(files, "open", lambda *a, **k: FullDisk(real_open(*a, **k), room=0), raising=False)
    out = tmp_path / "out.wav"
    result = invoke("say", "Hello there.", "-o", out, "--codes", tmp_path / "codes.npy", *FAST,
                    *(["--stream"] if stream else []))
    line = one_error_line(result)
    assert line == f"error: cannot write {out}: No space left on device"
    assert list(tmp_path.iterdir()) == []  # no audio, no codes, no temp file


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_stdout_on_a_full_disk_is_one_line():
    with open("/dev/full", "wb") as full:
        result = python("-m", "seseme_cli", "say", "Hello there.", "-o", "-", *FAST, stdout=full)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == ["error: cannot write standard output: No space left on device"], result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


# --- --play ------------------------------------------------------------------------------------------------------

def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before --play found no sound device")


def test_play_without_a_sound_device_is_one_line(tmp_path, monkeypatch):
    from seseme_cli.cli import play
    from seseme_cli.errors import InputError

    try:
        play.check_output_device()
        pytest.skip("this machine has a sound output device")
    except InputError:
        pass
    monkeypatch.setattr(seseme_cli.api, "load_csm_1b_optimized", _no_model)
    for args in (["--play"], ["--play", "-o", tmp_path / "out.wav"]):
        line = one_error_line(invoke("say", "Hello there.", *args, *FAST))
        assert line.startswith("error: --play: ") and "-o" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("reason", ["no portaudio", "no device", "no package"])
def test_play_errors_name_the_cause(monkeypatch, reason):
    from seseme_cli.cli import play
    from seseme_cli.errors import InputError

    class PortAudioError(Exception):
        pass

    def no_device(kind=None):
        raise PortAudioError("Error querying device -1")

    fake = types.SimpleNamespace(PortAudioError=PortAudioError, query_devices=no_device)
    if reason == "no portaudio":
        monkeypatch.setattr(play, "_sounddevice", lambda: (_ for _ in ()).throw(
            InputError("--play: cannot play audio here: PortAudio library not found")))
    elif reason == "no device":
        monkeypatch.setitem(sys.modules, "sounddevice", fake)
    else:
        monkeypatch.setitem(sys.modules, "sounddevice", None)  # import fails with ImportError
    monkeypatch.setattr(seseme_cli.api, "load_csm_1b_optimized", _no_model)
    line = one_error_line(invoke("say", "Hello there.", "--play", *FAST))
    assert {"no portaudio": "PortAudio", "no device": "no audio output device",
            "no package": "sounddevice package"}[reason] in line


class FakeOutputStream:
    played: list = []

    def __init__(self, samplerate, channels, dtype, latency):
        assert (samplerate, channels, dtype) == (24000, 1, "float32")
        self.closed = False

    def start(self):
        pass

    def write(self, samples):
        assert samples.ndim == 2 and samples.shape[1] == 1 and samples.dtype == np.float32
        FakeOutputStream.played.append(samples[:, 0].copy())

    def stop(self):
        pass

    def abort(self):
        pass

    def close(self):
        self.closed = True


def test_play_streams_to_the_device_and_the_file(tmp_path, monkeypatch):
    fake = types.SimpleNamespace(PortAudioError=RuntimeError, OutputStream=FakeOutputStream,
                                 query_devices=lambda kind=None: {"name": "fake speakers"})
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    FakeOutputStream.played = []
    out = tmp_path / "out.wav"
    result = invoke("say", "Hello there.", "--play", "-o", out, "--codes", tmp_path / "codes.npy", *FAST)
    assert result.exit_code == 0, result.output
    frames = np.load(tmp_path / "codes.npy").shape[0]
    played = np.concatenate(FakeOutputStream.played)
    written, _ = sf.read(out, dtype="float32")
    assert len(played) == len(written) == frames * FRAME_SAMPLES
    assert np.abs(played - written).max() < 1 / 16384  # the file is 16-bit
    assert "and played it" in result.stdout
    FakeOutputStream.played = []
    result = invoke("say", "Hello there.", "--play", *FAST)  # play only: no file needed
    assert result.exit_code == 0 and len(np.concatenate(FakeOutputStream.played)) > 0
    assert result.stdout.startswith("played: ")


def test_no_output_and_no_play_is_one_line(monkeypatch):
    monkeypatch.setattr(seseme_cli.api, "load_csm_1b_optimized", _no_model)
    line = one_error_line(invoke("say", "Hello there.", *FAST))
    assert "-o/--output" in line and "--play" in line


# --- global options ------------------------------------------------------------------------------------------------

def test_quiet_says_nothing_but_warnings(tmp_path):
    result = invoke("-q", "say", "Hello there.", "-o", tmp_path / "out.wav", *FAST)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert all(line.startswith(("WARNING", "warning:")) for line in result.stderr.splitlines()), result.stderr
    assert (tmp_path / "out.wav").exists()


def test_verbose_and_quiet_together_is_one_line():
    one_error_line(invoke("-q", "-v", "doctor"))


@pytest.mark.parametrize("args", [["--bogus"], ["nosuch"], ["sya", "Hi."], ["say", "Hi.", "-o"],
                                  ["batch"], ["voice", "remove"], ["bench", "--frames", "x"]])
def test_usage_errors_are_one_line(args):
    result = invoke(*args)
    line = one_error_line(result)
    assert "--help" in line and result.stderr.startswith("error: ")
    if args[0] == "sya":
        assert "Did you mean 'say'" in line


# --- batch ---------------------------------------------------------------------------------------------------------

def _jsonl(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


BATCH_CASES = [
    ("a directory", ["{tmp}"]),
    ("missing file", ["{tmp}/missing.jsonl"]),
    ("empty file", ["{tmp}/empty.jsonl"]),
    ("blank lines only", ["{tmp}/blank.jsonl"]),
    ("binary file", ["{tmp}/binary.jsonl"]),
    ("batch size 0", ["{tmp}/good.jsonl", "--batch-size", "0"]),
    ("batch size negative", ["{tmp}/good.jsonl", "--batch-size", "-2"]),
    ("batch size not a number", ["{tmp}/good.jsonl", "--batch-size", "many"]),
    ("unknown format", ["{tmp}/good.jsonl", "--format", "aac"]),
    ("chunk-ms 0", ["{tmp}/good.jsonl", "--chunk-ms", "0"]),
    ("chunk-ms nan", ["{tmp}/good.jsonl", "--chunk-ms", "nan"]),
    ("out-dir is a file", ["{tmp}/good.jsonl", "--out-dir", "{tmp}/good.jsonl"]),
    ("-o is not batch's", ["{tmp}/good.jsonl", "-o", "{tmp}/out"]),
    ("unknown device", ["{tmp}/good.jsonl", "--device", "tpu"]),
]


@pytest.mark.parametrize("args", [c[1] for c in BATCH_CASES], ids=[c[0] for c in BATCH_CASES])
def test_batch_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, args):
    monkeypatch.setattr(seseme_cli.api, "load_csm_1b_optimized", _no_model)
    _jsonl(tmp_path / "good.jsonl", [{"text": "Hello."}])
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    before = set(tmp_path.rglob("*"))
    one_error_line(invoke("batch", *[a.format(tmp=tmp_path) for a in args]))
    assert set(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("fmt", ["mp3", "opus"])
def test_batch_out_dir_short_option_and_new_formats(tmp_path, fmt):
    src = _jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "One.", "max_audio_ms": 160, "seed": 1},
                                         {"id": "b", "text": "Two.", "max_audio_ms": 160, "seed": 2,
                                          "out": "b.opus" if fmt == "mp3" else "b.mp3"}])
    result = invoke("batch", src, "-d", tmp_path / "out", "--format", fmt, *TINY)
    assert result.exit_code == 0, result.output
    a, b = sf.info(tmp_path / "out" / f"a.{fmt}"), sf.info(tmp_path / "out" / ("b.opus" if fmt == "mp3" else "b.mp3"))
    assert a.frames == b.frames == 2 * FRAME_SAMPLES and a.samplerate == b.samplerate == 24000
    assert (a.format, b.format) == (("MP3", "OGG") if fmt == "mp3" else ("OGG", "MP3"))

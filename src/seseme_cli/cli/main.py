"""The `seseme` command line: `say` speaks one text, `batch` many, `bench` times the engine, `tune` tunes its kernels.

Everything cheap is checked before the model loads, so a typo costs no model load. Problems are raised as
SesemeError where they are found; `user_errors` is the one place that turns them into a single `error: ...`
line on stderr and an exit code. Outputs appear whole or not at all (temp file + rename).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer
from rich.console import Console

from seseme_cli.audio import files as audio_io

from seseme_cli.audio import stream as streaming
from seseme_cli.model.checkpoints import DEFAULT_MODEL
from seseme_cli.errors import InputError, SesemeError
from seseme_cli.api import FRAME_MS, Segment, load_csm_1b_optimized
from seseme_cli.speech.request import DEFAULT_CHUNK_MS as CHUNK_MS, SpeechRequest

# Mimi's rate; context audio is read at it before the model (and so its codec) is loaded.
SAMPLE_RATE = 24_000
COMMAND_STARTED = time.perf_counter()  # "from the start" in say's report (this module loads first)

app = typer.Typer(
    help="seseme: fast text-to-speech with Sesame's CSM-1B.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
# soft_wrap: a long message stays one line instead of being wrapped at the terminal width.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Device(str, Enum):
    cuda = "cuda"
    cpu = "cpu"


# --- the CLI edge -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def user_errors():
    """Show a SesemeError as one line and exit with its code; anything else is a bug and keeps its traceback."""
    try:
        yield
    except SesemeError as e:
        err.print(f"error: {' '.join(str(e).split())}", style="bold red", markup=False)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err.print("error: interrupted", style="bold red", markup=False)
        raise typer.Exit(130) from None


class _WarningsToConsole(logging.Handler):
    """Shows the generator's log (logger "seseme") on stderr: warnings as `warning: ...` lines, information
    (which kernel tuning the engine loaded) as plain dim lines."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            err.print(f"warning: {record.getMessage()}", style="yellow", markup=False)
        else:
            err.print(record.getMessage(), style="dim", markup=False)


# --- input checks (all before the model loads) ----------------------------------------------------------

def read_text(text: str | None, file: Path | None) -> str:
    """The text to speak from TEXT, `-` (stdin) or --file, with whitespace runs collapsed to one space."""
    if text is not None and file is not None:
        raise InputError("give the text either as TEXT or with --file, not both")
    if file is not None:
        try:
            text, where = file.read_text(encoding="utf-8"), f"--file {file}"
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read --file {file}: {getattr(e, 'strerror', None) or e}") from None
    elif text == "-":
        text, where = sys.stdin.read(), "standard input"
    elif text is None:
        raise InputError("no text to speak: give TEXT, --file PATH, or - to read standard input")
    else:
        where = "TEXT"
    text = " ".join(text.split())
    if not text:
        raise InputError(f"the text to speak is empty ({where})")
    return text


def parse_context(value: str) -> tuple[Path, str, int]:
    """AUDIO:TRANSCRIPT:SPEAKER -> (audio path, transcript, speaker). The path ends at the first ':' and the
    speaker starts after the last one, so a transcript may contain ':'."""
    audio, _, rest = value.partition(":")
    transcript, sep, speaker = rest.rpartition(":")
    usage = f"--context {value!r}: expected AUDIO:TRANSCRIPT:SPEAKER, e.g. hello.wav:Hello there.:1"
    if not audio or not sep:
        raise InputError(usage)
    if not transcript.strip():
        raise InputError(f"{usage} (the transcript is empty)")
    try:
        speaker_id = int(speaker)
    except ValueError:
        raise InputError(f"{usage} (speaker {speaker!r} is not an integer)") from None
    if speaker_id < 0:
        raise InputError(f"{usage} (speaker must be >= 0)")
    return Path(audio), transcript.strip(), speaker_id


def load_context(values: list[str]) -> list[Segment]:
    segments = []
    for value in values:
        path, transcript, speaker = parse_context(value)
        segments.append(Segment(speaker, transcript, audio_io.load_audio(path, target_sample_rate=SAMPLE_RATE)))
    return segments


def check_codes_path(path: Path) -> None:
    if path.suffix.lower() != ".npy":
        raise InputError(f"--codes {path}: the file name must end in .npy")
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"--codes {path}: folder {folder} does not exist")
    if path.is_dir() or not os.access(folder, os.W_OK):
        raise InputError(f"--codes {path}: cannot write there")


def pick_device(device: Device | None) -> str:
    if device is Device.cuda and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is available here (use --device cpu)")
    return device.value if device else ("cuda" if torch.cuda.is_available() else "cpu")


# --- outputs ----------------------------------------------------------------------------------------------

def _save_npy_temp(path: Path, array: np.ndarray) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):
            raise InputError(f"cannot write --codes {path}: {e.strerror or e}") from None
        raise
    return tmp


def write_outputs(output: Path, commit_audio, codes: torch.Tensor, codes_path: Path | None) -> None:
    """Write the audio (`commit_audio()`) and (optionally) the codes: both appear, or neither does."""
    tmp = _save_npy_temp(codes_path, codes.numpy()) if codes_path else None
    try:
        commit_audio()
        if tmp:
            try:
                os.replace(tmp, codes_path)
            except OSError as e:
                if str(output) != "-":
                    output.unlink(missing_ok=True)
                raise InputError(f"cannot write --codes {codes_path}: {e.strerror or e}") from None
            tmp = None
    finally:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# --- commands ---------------------------------------------------------------------------------------------

def load_model(model: str, device_name: str):
    """Load the model with a status line, say so on stderr, and warn loudly about random weights."""
    log = logging.getLogger("seseme")
    if not any(isinstance(h, _WarningsToConsole) for h in log.handlers):
        log.addHandler(_WarningsToConsole(logging.INFO))
        log.setLevel(logging.INFO)
    started = time.perf_counter()
    with err.status(f"loading model {model} on {device_name}..."):
        tts = load_csm_1b_optimized(model, device=device_name)
    if tts.sample_rate != SAMPLE_RATE:
        raise SesemeError(f"the model's codec runs at {tts.sample_rate} Hz; seseme expects {SAMPLE_RATE} Hz")
    err.print(f"loaded {tts.description} on {device_name} in {time.perf_counter() - started:.1f} s",
              style="dim", markup=False)
    if tts.is_random:
        err.print(f"WARNING: --model {model} has RANDOM weights: the output is noise, not speech.",
                  style="bold red", markup=False)
    return tts


def _say_stream(tts, output: Path, codes_path: Path | None, request):
    """Write the audio while it is generated: into a temp file renamed at the end, or as a WAV stream on
    stdout. Returns (codes, audio seconds, time of the first audio)."""
    first = None
    sink = streaming.open_sink(output, SAMPLE_RATE)
    try:
        with err.status("generating...") as status, contextlib.closing(tts.stream_request(request)) as chunks:
            for chunk in chunks:
                first = first if first is not None else time.perf_counter()
                sink.write(chunk)
                status.update(f"streaming: {sink.samples / SAMPLE_RATE:.1f} s of audio written...")
        write_outputs(output, sink.commit, tts.last_codes, codes_path)
    finally:
        sink.abort()  # after a commit there is nothing left to remove
    return tts.last_codes, sink.samples / SAMPLE_RATE, first


@app.command()
def say(
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Audio file to write: .wav, .flac or .ogg; - streams a WAV to standard output.")],
    text: Annotated[Optional[str], typer.Argument(
        metavar="TEXT", help="Text to speak; - reads it from standard input.", show_default=False)] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="Read the text to speak from this file.")] = None,
    speaker: Annotated[int, typer.Option(help="Speaker id of the generated voice.")] = 0,
    context: Annotated[Optional[list[str]], typer.Option(
        "--context", "-c", metavar="AUDIO:TRANSCRIPT:SPEAKER",
        help="A context turn: an audio file, what is said in it, and its speaker id. Repeatable, in order.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 0.9,
    topk: Annotated[int, typer.Option(help="Sample from the k most likely codes.")] = 50,
    max_audio_ms: Annotated[float, typer.Option(
        "--max-audio-ms", help="Longest audio of one generation, in ms (a long text is spoken in chunks).")] = 90_000,
    seed: Annotated[Optional[int], typer.Option(help="Random seed, for repeatable output.")] = None,
    model: Annotated[str, typer.Option(
        help="Hugging Face id, local checkpoint, 'random' or 'tiny-random'.")] = DEFAULT_MODEL,
    device: Annotated[Optional[Device], typer.Option(help="Where to run (default: cuda when available).")] = None,
    codes: Annotated[Optional[Path], typer.Option(
        "--codes", help="Also save the Mimi codes (frames x 32) to this .npy file.")] = None,
    stream: Annotated[bool, typer.Option(
        "--stream", help="Write the audio while it is generated (always on with -o -).")] = False,
    chunk_ms: Annotated[float, typer.Option(
        "--chunk-ms", help="Text longer than this much speech is split into chunks spoken in turn, in ms.")] = CHUNK_MS,
) -> None:
    """Speak TEXT and write it to an audio file (or stream it)."""
    to_stdout = str(output) == "-"
    report = err if to_stdout else out  # with -o -, standard output carries the audio only
    with user_errors():
        words = read_text(text, file)
        SpeechRequest.make(words, speaker, (), max_audio_ms, temperature, topk, seed, chunk_ms)  # checks, before any file
        if not to_stdout:
            audio_io.check_output_path(output)
        if codes is not None:
            check_codes_path(codes)
        device_name = pick_device(device)
        segments = load_context(context or [])
        request = SpeechRequest.make(words, speaker, segments, max_audio_ms, temperature, topk, seed, chunk_ms)
        tts = load_model(model, device_name)
        with err.status("preparing the engine (caches, CUDA graphs, decoder)..."):
            tts.prepare()
        ready = time.perf_counter()
        err.print(f"ready {ready - COMMAND_STARTED:.2f} s after the command started", style="dim", markup=False)

        started, first = time.perf_counter(), None
        if stream or to_stdout:
            frames, seconds, first = _say_stream(tts, output, codes, request)
        else:
            doing = f"encoding {len(segments)} context clip(s) and generating..." if segments else "generating..."
            with err.status(doing):
                handle = tts.run(request)
            frames, audio = handle.codes, handle.audio()
            write_outputs(output, lambda: audio_io.write_audio(output, audio, SAMPLE_RATE), frames, codes)
            seconds = len(audio) / SAMPLE_RATE
        wall = time.perf_counter() - started

    if frames.shape[0] == 0:
        err.print("warning: the model stopped at once: the audio is empty", style="yellow")
    report.print(
        f"wrote {'a WAV stream to standard output' if to_stdout else output}: {seconds:.2f} s of audio "
        f"({frames.shape[0]} frames of {FRAME_MS} ms) in {wall:.2f} s, real-time factor {seconds / wall:.2f}"
        + (f", first audio {(first - ready) * 1000:.0f} ms after the model was ready "
           f"({first - COMMAND_STARTED:.2f} s after the command started)" if first is not None else "")
        + (f"; codes in {codes}" if codes else ""),
        markup=False,
    )


class AudioFormat(str, Enum):
    wav = "wav"
    flac = "flac"
    ogg = "ogg"


@app.command()
def batch(
    input: Annotated[Path, typer.Argument(
        metavar="INPUT.jsonl", help="Requests, one JSON object per line ({\"text\": ...} at least).")],
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out-dir", "-o", help="Folder for the outputs and the manifest (default: the input's folder).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help="Requests generated together (default: what fits in memory).")] = None,
    format: Annotated[AudioFormat, typer.Option(help="Format of outputs named after their id.")] = AudioFormat.wav,
    chunk_ms: Annotated[float, typer.Option(
        "--chunk-ms", help="Text longer than this much speech is split into chunks spoken in turn, in ms.")] = CHUNK_MS,
    model: Annotated[str, typer.Option(
        help="Hugging Face id, local checkpoint, 'random' or 'tiny-random'.")] = DEFAULT_MODEL,
    device: Annotated[Optional[Device], typer.Option(help="Where to run (default: cuda when available).")] = None,
) -> None:
    """Generate many requests from a JSONL file with continuous batching; skips outputs that already exist."""
    from seseme_cli.cli import batch as batch_cli

    with user_errors():
        if batch_size is not None and batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {batch_size}")
        SpeechRequest.make("-", chunk_ms=chunk_ms)  # checks --chunk-ms before the file is read
        plan = batch_cli.plan(input, out_dir, format.value, chunk_ms)
        tts = load_model(model, pick_device(device)) if plan.todo else None
        failed = batch_cli.run(plan, tts, batch_size, out, err)
    if failed:
        raise typer.Exit(1)


@app.command()
def tune(
    model: Annotated[str, typer.Option(help="Model whose shapes to tune (only its config is read for 'random').")] = "random",
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32,64",
    quick: Annotated[bool, typer.Option("--quick", help="Batch-1 shapes only (under a minute on an H100).")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON.")] = None,
) -> None:
    """Autotune the kernels' launch parameters for this GPU at the model's shapes; the engine uses the result."""
    with user_errors():
        from seseme_cli.tools import tune as t
        from seseme_cli.engine import tuning
        from seseme_cli.model.checkpoints import load_checkpoint

        sizes = [1] if quick else _parse_batch_sizes(batch_sizes)
        if json_path is not None and not json_path.parent.is_dir():
            raise InputError(f"cannot write {json_path}: {json_path.parent} is not a directory")
        t.require_gpu()
        with err.status(f"reading the shapes of {model}..."):
            config = load_checkpoint(model).config
        key = tuning.device_key()
        started = time.perf_counter()
        with err.status("tuning...") as status:
            results = t.run(config, sizes, progress=status.update)
        path = tuning.save_tuning(key, [r.to_dict() for r in results])
        for table in t.tables(results):
            out.print(table)
        out.print(f"tuned {len(results)} shapes on {key['gpu']} in {time.perf_counter() - started:.0f} s; "
                  f"saved to {path} (the engine loads it at start-up; SESEME_TUNING=off ignores it)", markup=False)
        if json_path is not None:
            import json

            json_path.write_text(json.dumps({"cache": str(path), **tuning.Tuning.to_json(key, [r.to_dict() for r in results])},
                                            indent=2))


@app.command()
def bench(
    model: Annotated[str, typer.Option(help="Weights to time (speed does not depend on their values).")] = "random",
    frames: Annotated[int, typer.Option(help="Frames timed per batch size, after warm-up.")] = 125,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32,64",
    compare_baseline: Annotated[bool, typer.Option(help="Also time transformers' generate and the eager reference.")] = False,
    baseline_frames: Annotated[int, typer.Option(help="Frames for the (slow) baselines.")] = 20,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON.")] = None,
    plot_path: Annotated[Optional[Path], typer.Option("--plot", help="Plot ms/frame and real-time factor (.png).")] = None,
) -> None:
    """Measure generation speed: ms per frame, real-time factor, time to first frame, bandwidth, memory."""
    with user_errors():
        from seseme_cli.tools import bench as b

        sizes = _parse_batch_sizes(batch_sizes)
        if frames < 1 or baseline_frames < 1:
            raise InputError("--frames and --baseline-frames must be at least 1")
        if not torch.cuda.is_available():
            raise InputError("seseme bench needs a CUDA GPU; none is visible")
        for path in (json_path, plot_path):
            if path is not None and not path.parent.is_dir():
                raise InputError(f"cannot write {path}: {path.parent} is not a directory")
        tts = load_model(model, "cuda")
        if tts.engine is None and not tts.uses_graphs:
            err.print("warning: no CUDA kernels: timing the reference path", style="yellow", markup=False)
        copy = b.copy_bandwidth_gb_s(tts.device)
        results = []
        if compare_baseline:
            with err.status("timing transformers generate"):
                results.append(b.bench_transformers(tts, baseline_frames))
            with err.status("timing the eager reference"):
                results.append(b.bench_reference(tts, baseline_frames))
        for size in sizes:
            with err.status(f"timing batch {size}"):
                results.append(b.bench_engine(tts, size, frames))
        _print_bench(results, copy, tts)
        from seseme_cli.engine.tuning import load_tuning

        tuning = load_tuning(tts.device)  # what the engine ran with (read once per process)
        info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": tts.description,
                "kernel_tuning": str(tuning.path) if tuning is not None else "built-in rules"}
        if json_path is not None:
            import json

            json_path.write_text(json.dumps(b.results_json(results, copy, info), indent=2))
        if plot_path is not None:
            b.plot(results, str(plot_path))


def _parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise InputError("--batch-sizes needs at least one size, each >= 1")
    return sizes


def _print_bench(results, copy_gb_s: float, tts) -> None:
    from rich.table import Table

    slowest = max(r.ms_per_frame for r in results if r.batch == 1) if any(r.batch == 1 for r in results) else None
    table = Table(title=f"{torch.cuda.get_device_name()} | {tts.description} | copy bandwidth {copy_gb_s:.0f} GB/s")
    for col in ("what", "batch", "ms/frame", "frames/s", "x real time", "first frame ms", "first audio ms", "GB/s",
                "% copy bw", "peak GB", "speedup"):
        table.add_column(col, justify="right" if col != "what" else "left")
    for r in results:
        speedup = f"{slowest / r.ms_per_frame * r.batch:.0f}x" if slowest else ""
        table.add_row(
            r.name, str(r.batch), f"{r.ms_per_frame:.2f}", f"{r.frames_per_s:.0f}", f"{r.real_time_factor:.1f}",
            "" if r.ttff_ms is None else f"{r.ttff_ms:.1f}",
            "" if r.extra.get("ttfa_ms") is None else f"{r.extra['ttfa_ms']:.1f}",
            "" if r.gb_per_s is None else f"{r.gb_per_s:.0f}",
            "" if r.gb_per_s is None else f"{100 * r.gb_per_s / copy_gb_s:.0f}%",
            "" if r.peak_gb is None else f"{r.peak_gb:.2f}", speedup,
        )
    # Wide enough for every column when the output is a file or a pipe (rich would squeeze it to 80).
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)

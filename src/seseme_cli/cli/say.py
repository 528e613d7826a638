"""`seseme say`: speak one text into an audio file (whole, or written while it is generated), a WAV stream on
standard output, or the speakers (--play).

Every cheap check runs before the model loads. Outputs appear whole or not at all (temp file + rename), also when
the command is stopped by SIGTERM or Ctrl+C (signals are raised as errors, so the temp files are removed on the
way out) or the disk fills up.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from seseme_cli.cli import common
from seseme_cli.cli.common import SAMPLE_RATE, Device, info, out, err, status, user_errors
from seseme_cli.cli.inputs import check_codes_path, load_context, read_text
from seseme_cli.errors import InputError
from seseme_cli.model.config import DEFAULT_MODEL
from seseme_cli.speech.request import (DEFAULT_CHUNK_MS, DEFAULT_MAX_AUDIO_MS, DEFAULT_TEMPERATURE, DEFAULT_TOPK,
                                       FRAME_MS, SpeechRequest)


# --- outputs ----------------------------------------------------------------------------------------------

def _save_npy_temp(path: Path, array) -> str:
    import numpy as np

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


def write_outputs(output: Path | None, commit_audio, codes, codes_path: Path | None) -> None:
    """Write the audio (`commit_audio()`) and (optionally) the codes: both appear, or neither does."""
    tmp = _save_npy_temp(codes_path, codes.numpy()) if codes_path else None
    try:
        commit_audio()
        if tmp:
            try:
                os.replace(tmp, codes_path)
            except OSError as e:
                if output is not None and str(output) != "-":
                    output.unlink(missing_ok=True)
                raise InputError(f"cannot write --codes {codes_path}: {e.strerror or e}") from None
            tmp = None
    finally:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


class Tee:
    """Several sinks as one (--play with -o): each chunk to each; commit all, or abort all."""

    def __init__(self, sinks):
        self.sinks = sinks

    @property
    def samples(self) -> int:
        return self.sinks[0].samples

    def write(self, audio) -> None:
        for sink in self.sinks:
            sink.write(audio)

    def commit(self) -> None:
        for sink in self.sinks:
            sink.commit()

    def abort(self) -> None:
        for sink in self.sinks:
            with contextlib.suppress(Exception):  # one failing to stop must not keep another's temp file
                sink.abort()


def _open_sinks(output: Path | None, play: bool):
    from seseme_cli.audio.stream import open_sink

    sinks = [open_sink(output, SAMPLE_RATE)] if output is not None else []
    if play:
        from seseme_cli.cli.play import Player

        try:
            sinks.append(Player(SAMPLE_RATE))
        except BaseException:
            Tee(sinks).abort()
            raise
    return sinks[0] if len(sinks) == 1 else Tee(sinks)


def _say_stream(tts, output: Path | None, codes_path: Path | None, request, play: bool):
    """Write (and/or play) the audio while it is generated. Returns (codes, audio seconds, time of the first
    audio)."""
    first = None
    sink = _open_sinks(output, play)
    try:
        with status("generating...") as shown, contextlib.closing(tts.stream_request(request)) as chunks:
            for chunk in chunks:
                first = first if first is not None else time.perf_counter()
                sink.write(chunk)
                shown.update(f"streaming: {sink.samples / SAMPLE_RATE:.1f} s of audio"
                             + (f", text chunk {tts.streaming.chunks_done + 1} of {tts.streaming.chunks_total}"
                                if tts.streaming is not None and tts.streaming.chunks_total > 1 else "") + "...")
        write_outputs(output, sink.commit, tts.last_codes, codes_path)
    finally:
        sink.abort()  # after a commit there is nothing left to remove
    return tts.last_codes, sink.samples / SAMPLE_RATE, first


def _say_whole(tts, output: Path, codes_path: Path | None, request, segments):
    from seseme_cli.audio import files as audio_files

    doing = f"encoding {len(segments)} context clip(s) and generating..." if segments else "generating..."
    with status(doing) as shown:
        def progress(handle) -> None:  # long text: which chunk, how much audio so far
            if handle.chunks_total > 1:
                shown.update(f"generating: text chunk {min(handle.chunks_done + 1, handle.chunks_total)} of "
                             f"{handle.chunks_total}, {handle.duration_s:.1f} s of audio...")

        handle = tts.run(request, progress)
    audio = handle.audio()
    write_outputs(output, lambda: audio_files.write_audio(output, audio, SAMPLE_RATE), handle.codes, codes_path)
    return handle.codes, len(audio) / SAMPLE_RATE, None


def _check_output(output: Path | None, play: bool) -> None:
    from seseme_cli.audio import files as audio_files

    if output is None and not play:
        raise InputError("give the audio file to write with -o/--output FILE (or - for standard output), "
                         "or --play to hear it")
    if output is not None and str(output) != "-":
        audio_files.check_output_path(output)
    if play:
        from seseme_cli.cli.play import check_output_device

        check_output_device()


# --- the command ------------------------------------------------------------------------------------------

def say(
    text: Annotated[Optional[str], typer.Argument(
        metavar="TEXT", help="Text to speak; - reads it from standard input.", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", show_default=False,
        help="Audio file to write: .wav, .flac, .ogg, .mp3 or .opus; - streams a WAV to standard output.")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="Read the text to speak from this file.")] = None,
    play: Annotated[bool, typer.Option(
        "--play", help="Play the audio on the default output device while it is generated.")] = False,
    speaker: Annotated[int, typer.Option(help="Speaker id of the generated voice.")] = 0,
    context: Annotated[Optional[list[str]], typer.Option(
        "--context", "-c", metavar="AUDIO:TRANSCRIPT:SPEAKER",
        help="A context turn: an audio file, what is said in it, and its speaker id. Repeatable, in order.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = DEFAULT_TEMPERATURE,
    topk: Annotated[int, typer.Option(help="Sample from the k most likely codes.")] = DEFAULT_TOPK,
    max_audio_ms: Annotated[float, typer.Option(
        "--max-audio-ms", help="Longest audio of one generation, in ms (a long text is spoken in chunks).")]
    = DEFAULT_MAX_AUDIO_MS,
    seed: Annotated[Optional[int], typer.Option(help="Random seed, for repeatable output.")] = None,
    model: Annotated[str, typer.Option(
        help="Hugging Face id, local checkpoint, 'random' or 'tiny-random'.")] = DEFAULT_MODEL,
    device: Annotated[Optional[Device], typer.Option(help="Where to run (default: cuda when available).")] = None,
    codes: Annotated[Optional[Path], typer.Option(
        "--codes", help="Also save the Mimi codes (frames x 32) to this .npy file.")] = None,
    stream: Annotated[bool, typer.Option(
        "--stream", help="Write the audio while it is generated (always on with -o - and --play).")] = False,
    chunk_ms: Annotated[float, typer.Option(
        "--chunk-ms", help="Text longer than this much speech is split into chunks spoken in turn, in ms.")]
    = DEFAULT_CHUNK_MS,
) -> None:
    """Speak TEXT and write it to an audio file, stream it, or play it."""
    to_stdout = output is not None and str(output) == "-"
    report = err if to_stdout else out  # with -o -, standard output carries the audio only
    with user_errors(), common.signals_raise():
        words = read_text(text, file)
        SpeechRequest.make(words, speaker, (), max_audio_ms, temperature, topk, seed, chunk_ms)  # checks, before any file
        _check_output(output, play)
        if codes is not None:
            check_codes_path(codes)
        device_name = common.pick_device(device)
        segments = load_context(context or [], SAMPLE_RATE)
        request = SpeechRequest.make(words, speaker, segments, max_audio_ms, temperature, topk, seed, chunk_ms)
        tts = common.load_model(model, device_name)
        with status("preparing the engine (caches, CUDA graphs, decoder)..."):
            tts.prepare()
        ready = time.perf_counter()
        info(f"ready {ready - common.COMMAND_STARTED:.2f} s after the command started")

        started = time.perf_counter()
        if stream or to_stdout or play:
            frames, seconds, first = _say_stream(tts, output, codes, request, play)
        else:
            frames, seconds, first = _say_whole(tts, output, codes, request, segments)
        wall = time.perf_counter() - started

    if frames.shape[0] == 0:
        common.warn("the model stopped at once: the audio is empty")
    if common.quiet():
        return
    where = ("a WAV stream to standard output" if to_stdout else str(output)) if output is not None else None
    done = f"wrote {where}" + (" and played it" if play else "") if where else "played"
    report.print(
        f"{done}: {seconds:.2f} s of audio ({frames.shape[0]} frames of {FRAME_MS} ms) in {wall:.2f} s, "
        f"real-time factor {seconds / wall:.2f}"
        + (f", first audio {(first - ready) * 1000:.0f} ms after the model was ready "
           f"({first - common.COMMAND_STARTED:.2f} s after the command started)" if first is not None else "")
        + (f"; codes in {codes}" if codes else ""),
        markup=False,
    )

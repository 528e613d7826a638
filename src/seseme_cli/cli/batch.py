"""`seseme batch`: the command and its steps around generation: plan (read, check, name outputs, skip what
exists, all before the model loads), then run with a progress bar, and print a summary."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from seseme_cli.audio.files import SUPPORTED_FORMATS, writable_format
from seseme_cli.batch.manifest import (Manifest, Request, exclusive_run, plan_outputs, read_requests,
                                       stale_temp_files)
from seseme_cli.cli import common
from seseme_cli.errors import InputError
from seseme_cli.model.config import DEFAULT_MODEL
from seseme_cli.speech.request import DEFAULT_CHUNK_MS, FRAME_MS, SpeechRequest

if TYPE_CHECKING:
    from seseme_cli.batch.run import Tally
    from seseme_cli.replicas.cluster import ReplicaSpec

MAX_FAILURES_SHOWN = 20


@dataclass
class Plan:
    input: Path
    out_dir: Path
    manifest_path: Path
    requests: list[Request]
    bad: list[Request]  # malformed, or rejected outputs
    skipped: list[Request]  # output already there
    todo: list[Request]


def _out_dir(input: Path, out_dir: Path | None) -> Path:
    folder = out_dir if out_dir is not None else input.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the output folder {folder}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to the output folder {folder}")
    return folder


def _check_paths(input: Path, out_dir: Path | None) -> None:
    if not input.is_file():
        raise InputError(f"cannot read {input}: {'it is a directory' if input.is_dir() else 'no such file'}")
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dir {out_dir}: it is a file, not a folder")


def plan(input: Path, out_dir: Path | None, fmt: str, chunk_ms: float | None = None) -> Plan:
    _check_paths(input, out_dir)
    requests = read_requests(input, chunk_ms)
    folder = _out_dir(input, out_dir)
    plan_outputs(requests, folder, fmt)
    bad = [r for r in requests if r.error]
    skipped = [r for r in requests if not r.error and r.output.exists()]
    todo = [r for r in requests if not r.error and not r.output.exists()]
    return Plan(input, folder, folder / f"{input.stem}.manifest.jsonl", requests, bad, skipped, todo)


def _existing_duration(path: Path) -> float | None:
    import soundfile as sf

    try:
        return sf.info(str(path)).duration
    except Exception:  # an output we cannot read back is still an output; its duration is just unknown
        return None


def _record_before_run(plan: Plan, manifest: Manifest) -> None:
    for req in plan.bad:
        manifest.append(req, "failed", error=req.error)
    for req in plan.skipped:  # e.g. a kill between the rename and the manifest line
        if manifest.relative(req.output) not in manifest.ok:
            manifest.append(req, "ok", _existing_duration(req.output))
    for req in plan.todo:
        for tmp in stale_temp_files(req.output):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _progress_bar(err_console) -> Progress:
    return Progress(
        TextColumn("[bold]generating"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[audio]:.1f} s audio"), TextColumn("{task.fields[fps]:.0f} frames/s"),
        TextColumn("{task.fields[rtf]:.1f}x real time"), TimeElapsedColumn(),
        console=err_console, transient=False,
    )


def _generate(plan: Plan, tts, manifest: Manifest, batch_size: int | None, err_console,
              replicas: ReplicaSpec | None = None) -> tuple[Tally, float, int]:
    from seseme_cli.batch.run import BatchRun, BatchSettings  # torch: only when there is work

    settings = BatchSettings(batch_size)
    with _progress_bar(err_console) as bar:
        task = bar.add_task("generating", total=len(plan.todo), audio=0.0, fps=0.0, rtf=0.0)

        def progress(tally: Tally, stats) -> None:
            wall = max(stats.seconds, 1e-9)
            audio = stats.frames * FRAME_MS / 1000
            bar.update(task, completed=tally.done, audio=audio, fps=stats.frames / wall, rtf=audio / wall)

        if replicas is None:
            runner = BatchRun(tts, manifest, settings, progress)
        else:
            from seseme_cli.batch.replicas import ReplicaRun

            runner = ReplicaRun(replicas, manifest, settings, progress, on_ready=_replicas_ready)
        tally = runner.run(plan.todo)
        progress(tally, runner.stats)
    return tally, runner.stats.seconds, runner.stats.frames


def _replicas_ready(infos) -> None:
    info = infos[0]
    common.info(f"{len(infos)} engine replicas ready: {info.description}, {info.rows} rows each "
                f"(set-up {max(i.setup_s for i in infos):.1f} s)")
    if info.is_random:
        common.err.print("WARNING: the model has RANDOM weights: the output is noise, not speech.", style="bold red",
                         markup=False)


def _summary(plan: Plan, tally: Tally | None, wall: float, frames: int, out_console) -> None:
    table = Table(title=f"seseme batch {plan.input}", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    generated = tally.ok if tally else 0
    failed = len(plan.bad) + (len(tally.failed) if tally else 0)
    table.add_row("requests", str(len(plan.requests)))
    table.add_row("generated", str(generated))
    table.add_row("skipped (output exists)", str(len(plan.skipped)))
    table.add_row("failed", str(failed), style="bold red" if failed else None)
    if tally and tally.ok:
        table.add_row("audio", f"{tally.audio_s:.1f} s")
        if tally.replicas > 1:
            table.add_row("set-up", f"{tally.setup_s:.1f} s (Ray, {tally.replicas} replicas: model, engine, "
                                    "CUDA graphs, decoder)")
            table.add_row("generation time", f"{wall:.2f} s ({tally.replicas} replicas, batch size {tally.batch_size} "
                                             "each; until the last file)")
            if tally.retried:
                table.add_row("retried", f"{tally.retried} (their replica died)", style="yellow")
        else:
            table.add_row("set-up", f"{tally.setup_s:.1f} s (engine, CUDA graphs, decoder)")
            table.add_row("generation time", f"{wall:.2f} s (batch size {tally.batch_size}; until the last file)")
        table.add_row("frames/s", f"{frames / max(wall, 1e-9):.0f}")
        table.add_row("real-time factor", f"{frames * FRAME_MS / 1000 / max(wall, 1e-9):.1f}x")
    table.add_row("outputs", str(plan.out_dir))
    table.add_row("manifest", str(plan.manifest_path))
    out_console.print(table)


def _failures(plan: Plan, tally: Tally | None, out_console) -> int:
    failures = [(r, r.error) for r in plan.bad] + (list(tally.failed) if tally else [])
    if not failures:
        return 0
    table = Table(title="failed requests", title_style="bold red")
    for col in ("line", "id", "error"):
        table.add_column(col, overflow="fold")
    for req, error in sorted(failures, key=lambda f: f[0].line)[:MAX_FAILURES_SHOWN]:
        table.add_row(str(req.line), "" if req.id is None else req.id, error)
    out_console.print(table)
    if len(failures) > MAX_FAILURES_SHOWN:
        out_console.print(f"... and {len(failures) - MAX_FAILURES_SHOWN} more: see {plan.manifest_path}", markup=False)
    return len(failures)


def run(plan: Plan, tts, batch_size: int | None, out_console, err_console, progress_console=None,
        summary: bool = True, replicas: ReplicaSpec | None = None) -> int:
    """Generate the plan's requests (progress bar on `progress_console`, default `err_console`) with `tts`, or
    with `replicas` (then `tts` is None); print the summary (unless not `summary`) and the failed requests; return
    how many requests failed."""
    manifest = Manifest(plan.manifest_path, plan.out_dir)
    tally, wall, frames = None, 0.0, 0
    try:
        _record_before_run(plan, manifest)
        if plan.todo:
            tally, wall, frames = _generate(plan, tts, manifest, batch_size,
                                            progress_console or err_console, replicas)
    finally:
        manifest.close()
    if tally and tally.truncated:
        err_console.print(f"warning: {tally.truncated} request(s) had a text chunk cut at the chunk limit "
                          "before the model ended it", style="yellow", markup=False)
    if tally and tally.special:
        err_console.print(f"warning: {tally.special} sampled ids were special tokens, not codec codes; decoded "
                          "them as code 0", style="yellow", markup=False)
    if summary:
        _summary(plan, tally, wall, frames, out_console)
    return _failures(plan, tally, out_console)


# --- the command ------------------------------------------------------------------------------------------

def _replicas(gpus: str | None, replicas: int | None, device: common.Device | None, model: str) -> ReplicaSpec | None:
    """The replicas --gpus / --replicas ask for, or None for the single-process path (then nothing of Ray is
    imported, nor torch before there is work)."""
    if gpus is None and replicas is None:
        return None
    from seseme_cli.replicas.cluster import ReplicaSpec, replica_count

    device_name = common.pick_device(device)
    count = replica_count(gpus, replicas, device_name)
    return ReplicaSpec(count, model, device_name) if count > 1 else None


AudioFormat = Enum("AudioFormat", {suffix[1:]: suffix[1:] for suffix in SUPPORTED_FORMATS}, type=str)


def batch(
    input: Annotated[Path, typer.Argument(
        metavar="INPUT.jsonl", help="Requests, one JSON object per line ({\"text\": ...} at least).")],
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out-dir", "-d", help="Folder for the outputs and the manifest (default: the input's folder).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help="Requests generated together (default: what fits in memory).")] = None,
    format: Annotated[AudioFormat, typer.Option(help="Format of outputs named after their id.")] = AudioFormat.wav,
    chunk_ms: Annotated[float, typer.Option(
        "--chunk-ms", help="Text longer than this much speech is split into chunks spoken in turn, in ms.")]
    = DEFAULT_CHUNK_MS,
    model: Annotated[str, typer.Option(
        help="Hugging Face id, local checkpoint, 'random' or 'tiny-random'.")] = DEFAULT_MODEL,
    device: Annotated[Optional[common.Device], typer.Option(help="Where to run (default: cuda when available).")]
    = None,
    gpus: Annotated[Optional[str], typer.Option(
        metavar="N|all", show_default=False,
        help="Spread the requests over N GPUs (or all), one engine replica each, through Ray (the `ray` extra). "
             "Default: one GPU, in this process.")] = None,
    replicas: Annotated[Optional[int], typer.Option(
        hidden=True, help="Engine replicas on the CPU (with --device cpu): the --gpus path, for tests.")] = None,
) -> None:
    """Generate many requests from a JSONL file with continuous batching; skips outputs that already exist."""
    with common.user_errors():
        if batch_size is not None and batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {batch_size}")
        SpeechRequest.make("-", chunk_ms=chunk_ms)  # checks --chunk-ms before the file is read
        writable_format(Path(f"x.{format.value}"), f"--format {format.value}")  # mp3 and opus need libsndfile 1.1+
        _check_paths(input, out_dir)
        spec = _replicas(gpus, replicas, device, model)
        with exclusive_run(_out_dir(input, out_dir), input):
            steps = plan(input, out_dir, format.value, chunk_ms)
            tts = common.load_model(model, common.pick_device(device)) if steps.todo and spec is None else None
            failed = run(steps, tts, batch_size, common.out, common.err, common.note, summary=not common.quiet(),
                         replicas=spec)
    if failed:
        raise typer.Exit(1)

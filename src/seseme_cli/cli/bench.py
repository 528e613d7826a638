"""`seseme bench`: time the engine on a GPU (the timing itself is in tools/bench.py) and print or save the
results."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from seseme_cli.cli import common
from seseme_cli.errors import InputError


def bench(
    model: Annotated[str, typer.Option(help="Weights to time (speed does not depend on their values).")] = "random",
    frames: Annotated[int, typer.Option(help="Frames timed per batch size, after warm-up.")] = 125,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32,64",
    dtype: Annotated[str, typer.Option(help="Weights: bf16, fp8 (e4m3 projections for the decode GEMV), or "
                                       "bf16,fp8 for an A/B of both (bf16 first: fp8 quantizes the loaded weights).")]
    = "bf16",
    compare_baseline: Annotated[bool, typer.Option(help="Also time transformers' generate and the eager reference.")]
    = False,
    baseline_frames: Annotated[int, typer.Option(help="Frames for the (slow) baselines.")] = 20,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON.")] = None,
    plot_path: Annotated[Optional[Path], typer.Option("--plot", help="Plot ms/frame and real-time factor (.png).")]
    = None,
) -> None:
    """Measure generation speed: ms per frame, real-time factor, time to first frame, bandwidth, memory."""
    with common.user_errors():
        sizes = common.parse_batch_sizes(batch_sizes)
        formats = _parse_formats(dtype)
        if frames < 1 or baseline_frames < 1:
            raise InputError("--frames and --baseline-frames must be at least 1")
        common.check_parent(json_path, "--json")
        common.check_parent(plot_path, "--plot")
        import torch

        if not torch.cuda.is_available():
            raise InputError("seseme bench needs a CUDA GPU; none is visible")
        from seseme_cli.engine.tuning import load_tuning
        from seseme_cli.tools import bench as b

        tts = common.load_model(model, "cuda")
        if tts.engine is None and not tts.uses_graphs:
            common.warn("no CUDA kernels: timing the reference path")
        copy = b.copy_bandwidth_gb_s(tts.device)
        results = []
        if compare_baseline:
            with common.status("timing transformers generate"):
                results.append(b.bench_transformers(tts, baseline_frames))
            with common.status("timing the eager reference"):
                results.append(b.bench_reference(tts, baseline_frames))
        for fmt in formats:
            for size in sizes:
                with common.status(f"timing batch {size} ({fmt})"):
                    results.append(b.bench_engine(tts, size, frames, weights=fmt))
        _print_bench(results, copy, tts)
        tuning = load_tuning(tts.device)  # what the engine ran with (read once per process)
        info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": tts.description,
                "kernel_tuning": str(tuning.path) if tuning is not None else "built-in rules", "weights": formats}
        if json_path is not None:
            import json

            common.write_text(json_path, json.dumps(b.results_json(results, copy, info), indent=2), "--json")
        if plot_path is not None:
            b.plot(results, str(plot_path))


def _parse_formats(value: str) -> list[str]:
    formats = [v.strip() for v in value.split(",") if v.strip()]
    if not formats or any(f not in ("bf16", "fp8") for f in formats) or len(set(formats)) != len(formats):
        raise InputError(f"--dtype takes bf16, fp8 or bf16,fp8; got {value!r}")
    return sorted(formats, key=("bf16", "fp8").index)  # fp8 quantizes the loaded weights for good: bf16 first


def _print_bench(results, copy_gb_s: float, tts) -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    slowest = max(r.ms_per_frame for r in results if r.batch == 1) if any(r.batch == 1 for r in results) else None
    table = Table(title=f"{torch.cuda.get_device_name()} | {tts.description} | copy bandwidth {copy_gb_s:.0f} GB/s")
    for col in ("what", "weights", "depth steps 2-31", "batch", "ms/frame", "frames/s", "x real time", "first frame ms", "first audio ms", "GB/s",
                "% copy bw", "peak GB", "speedup"):
        table.add_column(col, justify="right" if col != "what" else "left")
    for r in results:
        speedup = f"{slowest / r.ms_per_frame * r.batch:.0f}x" if slowest else ""
        table.add_row(
            r.name, r.extra.get("weights_path", ""), r.extra.get("depth_path", ""), str(r.batch), f"{r.ms_per_frame:.2f}", f"{r.frames_per_s:.0f}", f"{r.real_time_factor:.1f}",
            "" if r.ttff_ms is None else f"{r.ttff_ms:.1f}",
            "" if r.extra.get("ttfa_ms") is None else f"{r.extra['ttfa_ms']:.1f}",
            "" if r.gb_per_s is None else f"{r.gb_per_s:.0f}",
            "" if r.gb_per_s is None else f"{100 * r.gb_per_s / copy_gb_s:.0f}%",
            "" if r.peak_gb is None else f"{r.peak_gb:.2f}", speedup,
        )
    # Wide enough for every column when the output is a file or a pipe (rich would squeeze it to 80).
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)

"""`seseme --version` (a few lines, at once) and `seseme doctor` (everything, and what to fix).

The common trap is an install without nvcc: the package builds CPU-only kernels without a word, and on a GPU
generation then runs the plain-PyTorch path, ~30x slower. Both say so; doctor gives the one command that fixes it
and exits non-zero.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import typer

from seseme_cli import __version__
from seseme_cli.cli import common, probe

# What the README's set-up installs; a CPU-only torch on a GPU machine is replaced by this build.
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu128"


@dataclass
class Problem:
    what: str
    fix: str


def _kernels_line(k: probe.Kernels) -> str:
    if not k.built:
        return f"not built (cannot import seseme_cli._kernels: {k.error})"
    if not k.cuda:
        return f"built WITHOUT CUDA (CPU-only; version {k.version})"
    return f"built with CUDA (version {k.version}; its CUDA runtime sees {k.runtime_gpus} GPU(s))"


def _torch_line(t: probe.Torch) -> str:
    if t.version is None:
        return "not installed"
    return f"{t.version}, " + (f"CUDA {t.cuda}" if t.cuda else "CPU-only build")


def _gpu_line(gpus: list[probe.Gpu], why: str | None) -> str:
    return "; ".join(g.describe() for g in gpus) if gpus else f"no GPU ({why})"


def _depth_line(k: probe.Kernels) -> str:
    """Which kernels run the depth decoder's steps 2..31 (issue: the chosen path is reported)."""
    if not k.cuda:
        return "the plain-PyTorch reference (no CUDA kernels)"
    # engine.frame.PERSISTENT_DEPTH's rule, read here without importing the engine (--version imports no torch)
    if os.environ.get("SESEME_PERSISTENT_DEPTH", "0") == "1":
        return "the persistent kernel at batches 1-4 (SESEME_PERSISTENT_DEPTH=1), separate kernels above"
    return "separate kernels (the persistent kernel is off until measured; SESEME_PERSISTENT_DEPTH=1 turns it on)"


def _tuning_line(k: probe.Kernels, gpus: list[probe.Gpu]) -> str:
    """Which kernel tuning table the engine would load. Only this needs torch (the table is chosen by torch's
    view of the GPU), so it is imported only where a GPU and CUDA kernels make the answer something but 'none'."""
    if not gpus:
        return "none (no GPU)"
    if not k.cuda:
        return "none (the kernels are built without CUDA)"
    import torch

    if not torch.cuda.is_available():
        return "none (torch sees no GPU)"
    from seseme_cli.engine import tuning

    log = logging.getLogger("seseme")
    level = log.level
    log.setLevel(logging.WARNING)  # its "kernel tuning from ..." line is what this line says
    try:
        table = tuning.load_tuning(torch.device("cuda"))
    finally:
        log.setLevel(level)
    if table is None:
        return "built-in rules (no table for this GPU; `seseme tune` makes one)"
    shipped = table.path is not None and table.path.parent == tuning.BUILTIN_DIR
    return f"{table.path} ({len(table)} tuned shapes{', shipped with seseme' if shipped else ''})"


def _cache_line() -> str:
    cache = probe.model_cache()
    found = probe.cached_models(cache)
    return f"{cache} ({'has ' + ', '.join(found) if found else 'no seseme model downloaded yet'})"


def print_version() -> None:
    """`seseme --version`."""
    common.set_verbosity(common.Verbosity.normal)  # warnings of the tuning look-up as `warning:` lines
    kernels, torch_build = probe.kernels(), probe.torch_build()
    gpus, why = probe.driver_gpus()
    lines = [
        f"seseme {__version__}",
        f"kernels: {_kernels_line(kernels)}",
        f"torch: {_torch_line(torch_build)}",
        f"GPU: {_gpu_line(gpus, why)}",
        f"kernel tuning: {_safe(lambda: _tuning_line(kernels, gpus))}",
        f"depth decoder: {_safe(lambda: _depth_line(kernels))}",
        f"model cache: {_safe(_cache_line)}",
    ]
    for line in lines:
        common.out.print(line, markup=False)
    if gpus and not kernels.cuda:
        common.warn("a GPU is visible but the CUDA kernels are not built: `seseme doctor` says how to fix it")


# --- doctor -----------------------------------------------------------------------------------------------

def _problems(kernels: probe.Kernels, torch_build: probe.Torch, gpus: list[probe.Gpu], torch_gpus: int) -> list[Problem]:
    if not gpus:
        return []
    problems = []
    arch = gpus[0].arch
    on_path, elsewhere = probe.nvcc()
    rebuild = probe.rebuild_command(arch, on_path or elsewhere)
    if torch_build.version is not None and torch_build.cuda is None:
        problems.append(Problem(f"torch {torch_build.version} is a CPU-only build: it cannot use the "
                                f"{gpus[0].name}", f'python3 -m pip install --force-reinstall "torch=='
                                f'{torch_build.version.split("+")[0]}" --index-url {TORCH_CUDA_INDEX}'))
    elif torch_build.version is not None and torch_gpus == 0:
        problems.append(Problem(f"the NVIDIA driver shows {len(gpus)} GPU(s) but torch (CUDA {torch_build.cuda}) "
                                "sees none: the driver is probably older than torch's CUDA",
                                "update the NVIDIA driver (nvidia-smi shows its version and the CUDA it supports)"))
    if not kernels.cuda:
        state = "were built without CUDA" if kernels.built else "are not built"
        what = (f"a GPU is visible ({gpus[0].name}) but seseme's kernels {state}: generation runs the "
                "plain-PyTorch path, ~30x slower")
        fix = rebuild
        if elsewhere:
            what += f"; nvcc is at {elsewhere} but not on PATH, so the build did not find it"
        elif not on_path:
            what += "; no nvcc (CUDA compiler) was found"
            fix = (f"install the CUDA toolkit (nvcc) for CUDA {torch_build.cuda or '12.x'}, put its bin/ on PATH, "
                   f"then: {rebuild}")
        problems.append(Problem(what, fix))
    elif kernels.runtime_gpus == 0:
        problems.append(Problem("seseme's kernels are built with CUDA but their CUDA runtime sees no GPU: the "
                                "NVIDIA driver is older than the CUDA toolkit they were built with",
                                f"update the NVIDIA driver, or rebuild with the CUDA toolkit the driver supports: "
                                f"{rebuild}"))
    return problems


def _package(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _audio_lines() -> list[tuple[str, str]]:
    import soundfile as sf

    from seseme_cli.audio.files import SUPPORTED_FORMATS, writable_format
    from seseme_cli.cli.play import check_output_device
    from seseme_cli.errors import InputError

    usable, missing = [], []
    for suffix in SUPPORTED_FORMATS:
        try:
            writable_format(f"x{suffix}")
            usable.append(suffix[1:])
        except InputError:
            missing.append(suffix[1:])
    formats = " ".join(usable) + (f" (not {', '.join(missing)})" if missing else "")
    try:
        play = f"output device {check_output_device()}"
    except InputError as e:
        play = f"not available: {str(e).removeprefix('--play: ')}"
    return [("audio formats", f"{formats}; libsndfile {sf.__libsndfile_version__}"), ("say --play", play)]


def _safe(row):
    """A row's value, or why it could not be found: doctor reports a broken install instead of failing on it."""
    try:
        return row()
    except Exception as e:  # noqa: BLE001 - an import or probe that fails is exactly what doctor must show
        return f"unavailable ({type(e).__name__}: {common.one_line(e)})"


def _torch_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _fast_path() -> str:
    from seseme_cli.ops.kernels import has_cuda_kernels

    return "CUDA graphs of the fused kernels" if has_cuda_kernels() else "plain PyTorch (no GPU with CUDA kernels)"


def _tuning_cache() -> str:
    from seseme_cli.engine.tuning import cache_dir

    return str(cache_dir())


def doctor() -> None:
    """Check the install: kernels, GPU, torch, tuning, caches, audio; say what to fix (exit 1 when something is)."""
    with common.user_errors():
        kernels, torch_build = probe.kernels(), probe.torch_build()
        gpus, why = probe.driver_gpus()
        torch_gpus = _safe(_torch_gpus)
        on_path, elsewhere = probe.nvcc()
        root = probe.source_root()
        rows = [
            ("seseme", f"{__version__} at {Path(__file__).resolve().parents[1]}"
                       + (f" (editable install of {root})" if root else "")),
            ("python", f"{platform.python_version()} ({sys.executable}) on {platform.system()} {platform.machine()}"),
            ("kernels", _kernels_line(kernels)),
            ("torch", f"{_torch_line(torch_build)}; sees {torch_gpus} GPU(s)"),
            ("GPU (driver)", _gpu_line(gpus, why)),
            ("nvcc", on_path or (f"{elsewhere} (not on PATH)" if elsewhere else "not found")),
            ("fast path", _safe(_fast_path)),
            ("kernel tuning", _safe(lambda: _tuning_line(kernels, gpus))),
            ("tuning cache", _safe(_tuning_cache)),
            ("model cache", _safe(_cache_line)),
            *_audio_rows(),
            ("packages", ", ".join(f"{name} {_package(name)}" for name in
                                   ("moshi", "tokenizers", "soundfile", "soxr", "transformers", "fastapi"))),
        ]
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            common.out.print(f"{name:<{width}}  {value}", markup=False)
        problems = _problems(kernels, torch_build, gpus, torch_gpus if isinstance(torch_gpus, int) else 0)
        for p in problems:
            common.err.print(f"problem: {p.what}", style="bold red", markup=False)
            common.err.print(f"  fix: {p.fix}", markup=False)
        if not problems:
            common.out.print("no problems found" + ("" if gpus else " (no GPU: seseme runs on the CPU, slowly)"),
                             markup=False)
    if problems:
        raise typer.Exit(1)


def _audio_rows() -> list[tuple[str, str]]:
    try:
        return _audio_lines()
    except Exception as e:  # noqa: BLE001 - soundfile or PortAudio missing: shown, not raised
        return [("audio", f"unavailable ({type(e).__name__}: {common.one_line(e)})")]

"""`seseme tune`: autotune the kernels' launch parameters on this GPU (the sweep is tools/tune.py) and save the
table the engine loads at start-up (engine/tuning.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from seseme_cli.cli import common


def tune(
    model: Annotated[str, typer.Option(help="Model whose shapes to tune (only its config is read for 'random').")]
    = "random",
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32,64",
    quick: Annotated[bool, typer.Option("--quick", help="Batch-1 shapes only (under a minute on an H100).")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON.")] = None,
) -> None:
    """Autotune the kernels' launch parameters for this GPU at the model's shapes; the engine uses the result."""
    with common.user_errors():
        sizes = [1] if quick else common.parse_batch_sizes(batch_sizes)
        common.check_parent(json_path, "--json")
        from seseme_cli.engine import tuning
        from seseme_cli.model.checkpoints import load_checkpoint
        from seseme_cli.tools import tune as t

        t.require_gpu()
        with common.status(f"reading the shapes of {model}..."):
            config = load_checkpoint(model).config
        key = tuning.device_key()
        started = time.perf_counter()
        with common.status("tuning...") as shown:
            results = t.run(config, sizes, progress=shown.update)
        path = tuning.save_tuning(key, [r.to_dict() for r in results])
        for table in t.tables(results):
            common.out.print(table)
        common.out.print(f"tuned {len(results)} shapes on {key['gpu']} in {time.perf_counter() - started:.0f} s; "
                         f"saved to {path} (the engine loads it at start-up; SESEME_TUNING=off ignores it)",
                         markup=False)
        if json_path is not None:
            import json

            data = {"cache": str(path), **tuning.Tuning.to_json(key, [r.to_dict() for r in results])}
            common.write_text(json_path, json.dumps(data, indent=2), "--json")

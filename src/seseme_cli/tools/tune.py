"""`seseme tune`: time every launch configuration of the hot kernels at the model's exact shapes on this GPU and
cache the fastest (see tuning.py for the cache and how the engine uses it).

For each op call of a frame (engine/frame.py) at batch sizes 1, 8, 32, 64, every candidate parameter set is
first run once against the op's reference (the parity bound of the tests: at most 2x PyTorch's own bf16
error against float64, or one rounding from the fp32 reference); a candidate that fails or does not launch
never competes. The rest are timed as CUDA graphs of repeated calls (the engine replays whole-frame graphs, so
launch overhead is not part of a kernel's cost), with weights and KV caches rotated through more memory than
the L2 holds (in a frame, a layer's weights come from HBM). The default (what the engine runs untuned) is
always a candidate, and a candidate replaces it only when a final, interleaved timing of the two confirms it
faster: tuned is never slower than default by construction, up to timing noise. The candidates and cases
themselves are in tune_cases.py.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch

from seseme_cli.model.config import CsmConfig
from seseme_cli.errors import InputError
from seseme_cli.ops.kernels import has_cuda_kernels
from seseme_cli.ops.linear_config import LinearConfig
from seseme_cli.tools.tune_cases import Case, frame_cases

CALLS = 32  # calls per timed graph: long enough for event resolution, short enough to sweep hundreds
SURVIVORS = 6  # candidates re-timed in the final round, beside the default
MIN_GAIN = 0.01  # a candidate must beat the default by 1% in the final round (noise is ~0.5%)


def require_gpu() -> None:
    if not has_cuda_kernels():
        raise InputError("seseme tune needs a CUDA GPU and the CUDA-built kernels; none is usable here")


@dataclass
class Result:
    op: str
    shape: tuple
    label: str
    params: dict  # {} = the default won
    default_us: float
    tuned_us: float
    candidates: int
    rejected: int
    rejected_why: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.default_us / self.tuned_us

    def to_dict(self) -> dict:
        return dict(op=self.op, shape=list(self.shape), label=self.label, params=self.params,
                    default_us=round(self.default_us, 3), tuned_us=round(self.tuned_us, 3),
                    speedup=round(self.speedup, 4), candidates=self.candidates, rejected=self.rejected)


# --- timing ---------------------------------------------------------------------------------------------------

def _capture(case: Case, params: dict, calls: int) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # first launches load modules and raise shared-memory limits: not capturable
        for i in range(2):
            case.launch(params, i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            case.launch(params, i)
    graph.replay()  # warm-up
    return graph


def _replay_us(graph: torch.cuda.CUDAGraph, calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def tune_case(case: Case, calls: int = CALLS) -> Result:
    """Check, time, confirm; see the module docstring."""
    graphs, first, why = {}, {}, []
    for i, params in enumerate(case.candidates):
        try:
            if not case.check(params):
                why.append(f"{params}: fails the reference check")
                continue
            graphs[i] = _capture(case, params, calls)
        except (ValueError, RuntimeError) as e:  # a launch the kernels refuse
            why.append(f"{params}: {str(e).splitlines()[0]}")
            continue
        first[i] = statistics.median(_replay_us(graphs[i], calls) for _ in range(3))
        if len(graphs) > SURVIVORS + 1:  # keep only the graphs that may still reach the final round
            worst = max((j for j in graphs if j != 0), key=first.__getitem__)
            del graphs[worst]
    if 0 not in graphs:
        raise RuntimeError(f"{case.label} {case.shape}: the default fails: {why[0] if why else '?'}")
    final = {j: [] for j in graphs}
    for _ in range(15):  # interleaved, so a clock or thermal drift hits every finalist alike
        for j, graph in graphs.items():
            final[j].append(_replay_us(graph, calls))
    med = {j: statistics.median(t) for j, t in final.items()}
    best = min(med, key=med.__getitem__)
    if best != 0 and med[best] > (1 - MIN_GAIN) * med[0]:
        best = 0
    return Result(case.op, case.shape, case.label, case.candidates[best], med[0], med[best],
                  len(case.candidates), len(why), why)


def run(cfg: CsmConfig, batch_sizes: list[int], progress: Callable[[str], None] = lambda s: None) -> list[Result]:
    """Tune every op call of a frame at these batch sizes, one case at a time (its inputs freed after)."""
    results = []
    specs = frame_cases(cfg, batch_sizes)
    for i, (op, shape, label, make) in enumerate(specs):
        progress(f"[{i + 1}/{len(specs)}] tuning {label} {list(shape)}")
        with torch.inference_mode():
            results.append(tune_case(make()))
        torch.cuda.empty_cache()
    return results


# --- report ---------------------------------------------------------------------------------------------------

def describe(params: dict) -> str:
    """Short text for a parameter set: 'default', 'mma w4 r1 split8 st3', 'splits 8 threads 128'."""
    if not params:
        return "default"
    cfg = params.get("config")
    if isinstance(cfg, LinearConfig):
        if cfg.kernel == "torch":
            return "torch (cuBLAS)"
        tail = f"unroll{cfg.unroll}" if cfg.kernel == "gemv" else f"st{cfg.stages}"
        return f"{cfg.kernel} w{cfg.warps} r{cfg.rows} split{cfg.split_k} {tail}"
    return " ".join(f"{k.replace('_', ' ')} {v}" for k, v in params.items())


SHAPE_NAMES = {"linear": "n, m, k, swiglu", "attention": "n, H, Hkv, hd, S", "short_attention": "n, H, Hkv, hd, S",
               "rope": "n, H, Hkv, hd", "sampling": "n, V"}


def tables(results: list[Result]) -> list:
    """One rich table per kernel: a row per shape with default vs tuned time and the speedup."""
    from rich.table import Table

    out = []
    for op in dict.fromkeys(r.op for r in results):
        rows = [r for r in results if r.op == op]
        total_d, total_t = sum(r.default_us for r in rows), sum(r.tuned_us for r in rows)
        table = Table(title=f"{op}: {total_d:.1f} -> {total_t:.1f} us over {len(rows)} shapes "
                            f"({total_d / total_t:.2f}x)")
        for col in ("call", f"shape ({SHAPE_NAMES[op]})", "default us", "tuned us", "speedup", "tuned", "ok/tried"):
            table.add_column(col, justify="left" if col in ("call", "tuned") else "right")
        for r in rows:
            table.add_row(r.label, " ".join(map(str, r.shape)), f"{r.default_us:.2f}", f"{r.tuned_us:.2f}",
                          f"{r.speedup:.2f}x", describe(r.params), f"{r.candidates - r.rejected}/{r.candidates}")
        out.append(table)
    return out

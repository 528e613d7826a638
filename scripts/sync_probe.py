"""Probe (GPU, random CSM-1B): which host calls in the engine loop wait for the GPU. Drives the mixed workload
(make_requests.py --mixed) through SpeechEngine without audio, with torch's CUDA sync debug mode on (every
synchronizing call warns; the first ones of each call site are printed with their stack), and times each
statement of Engine.set_rows on the host.
Usage: python scripts/sync_probe.py [--n 1024] [--batch 512]"""

import argparse
import collections
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from profile_loop import requests  # noqa: E402

from seseme_cli import load_csm_1b_optimized  # noqa: E402
from seseme_cli.engine import runner as runner_module  # noqa: E402
from seseme_cli.engine.prefill import pack_prompts  # noqa: E402

sites: collections.Counter = collections.Counter()
shown: set = set()


def on_warning(message, category, filename, lineno, file=None, line=None):
    stack = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
    ours = [f for f in stack if "seseme_cli" in f.filename or "scripts" in f.filename]
    key = tuple((Path(f.filename).name, f.lineno) for f in ours[-3:])
    sites[key] += 1
    if key not in shown and len(shown) < 12:
        shown.add(key)
        print(f"sync: {str(message)[:100]}")
        for f in ours[-4:]:
            print(f"    {Path(f.filename).name}:{f.lineno} {f.line}")


times: collections.defaultdict = collections.defaultdict(float)


def timed_set_rows(self, requests_):
    t = [time.perf_counter()]

    def mark(name):
        now = time.perf_counter()
        times[name] += now - t[0]
        t[0] = now

    with torch.inference_mode():
        prompts = pack_prompts(requests_, self.cfg.num_codebooks, self.max_batch, self.cfg.max_seq_len, self.device)
        mark("pack_prompts")
        buf, rows = self.buf, prompts.rows
        x = self.prefill(prompts)
        mark("prefill")
        buf.backbone.h[rows] = x
        mark("h[rows] =")
        buf.positions[rows] = prompts.last
        buf.lengths[rows] = (prompts.last + 1).int()
        buf.temperature[rows] = prompts.temperature
        buf.topk[rows] = prompts.topk
        buf.seeds[rows] = prompts.seeds
        buf.counters[rows] = 0
        mark("the other row states")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--batch", type=int, default=512)
    args = p.parse_args()
    tts = load_csm_1b_optimized("random", device="cuda")
    reqs = requests(args.n)
    engine = tts.speech_engine(args.batch, decode_audio=False)
    runner_module.Engine.set_rows = timed_set_rows
    for r in reqs:
        engine.add_request(r, keep_audio=False)
    torch.cuda.synchronize()
    warnings.showwarning = on_warning
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    start = time.perf_counter()
    engine.drain()
    wall = time.perf_counter() - start
    torch.cuda.set_sync_debug_mode("default")
    print(f"{engine.stats.frames} frames, {engine.stats.steps} steps in {wall:.2f} s")
    print("host time in Engine.set_rows by statement:", {k: round(v, 3) for k, v in times.items()})
    print("synchronizing calls by site (our last 3 frames):")
    for key, n in sites.most_common(12):
        print(f"  {n:6d}  {key}")
    engine.close()


if __name__ == "__main__":
    main()

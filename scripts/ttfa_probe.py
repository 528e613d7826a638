"""Where a stream's first audio goes (GPU): for a one-sentence request through `tts.stream_request` (bench's path),
the time from the call to admission, to the first frame's codes on the host, to its first decoded audio (audio
thread) and to the caller holding it; medians of N runs. Usage: python scripts/ttfa_probe.py [--model random] [N]"""
import statistics
import sys
import time

import torch

from seseme_cli import load_csm_1b_optimized
from seseme_cli.speech.request import SpeechRequest

n = int(sys.argv[-1]) if sys.argv[-1].isdigit() else 20
tts = load_csm_1b_optimized(sys.argv[2] if len(sys.argv) > 2 and sys.argv[1] == "--model" else "random", "cuda" if torch.cuda.is_available() else "cpu")
tts.setup_caches(1)
request = SpeechRequest.make("Hello there, this is one sentence.", 0, max_audio_ms=800, seed=1)
rows = []
for i in range(n + 3):
    t0 = time.perf_counter()
    stream = tts.stream_request(request)
    first = next(stream)
    got = time.perf_counter()
    handle = tts.streaming
    for _ in stream:
        pass
    if i >= 3:  # warm-up
        rows.append([handle.started - t0, handle.first_frame - t0, handle.first_audio - t0, got - t0])
names = ["admitted", "first frame on host", "first audio decoded", "caller has it"]
for j, name in enumerate(names):
    print(f"{name:>22}: {statistics.median(r[j] for r in rows) * 1e3:7.2f} ms (min {min(r[j] for r in rows) * 1e3:.2f})")

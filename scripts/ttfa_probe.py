"""Where a stream's first audio goes (GPU): for a one-sentence request through `tts.stream_request` (bench's path),
the time from the call to admission, to the first frame's codes on the host, to its first decoded audio (audio
thread) and to the caller holding it; medians of N runs. With --profile, one more request with the engine loop's
phases timed: when each began and ended on the host, and when the GPU reached its start and end (CUDA events on
the phase's stream, against one recorded while the GPU was idle).
Usage: python scripts/ttfa_probe.py [--model random] [--profile] [N]"""
import functools
import statistics
import sys
import time

import torch

from seseme_cli import load_csm_1b_optimized
from seseme_cli.speech.request import SpeechRequest

args = sys.argv[1:]
n = int(args[-1]) if args and args[-1].isdigit() else 20
model = args[args.index("--model") + 1] if "--model" in args else "random"
tts = load_csm_1b_optimized(model, "cuda" if torch.cuda.is_available() else "cpu")
tts.setup_caches(1)
request = SpeechRequest.make("Hello there, this is one sentence.", 0, max_audio_ms=800, seed=1)


def one():
    t0 = time.perf_counter()
    stream = tts.stream_request(request)
    next(stream)
    got = time.perf_counter()
    handle = tts.streaming
    for _ in stream:
        pass
    return [handle.started - t0, handle.first_frame - t0, handle.first_audio - t0, got - t0]


rows = [one() for _ in range(n + 3)][3:]  # 3 warm-ups
names = ["admitted", "first frame on host", "first audio decoded", "caller has it"]
for j, name in enumerate(names):
    print(f"{name:>22}: {statistics.median(r[j] for r in rows) * 1e3:7.2f} ms (min {min(r[j] for r in rows) * 1e3:.2f})")

if "--profile" in args:
    import threading

    from seseme_cli.audio import rows as row_audio
    from seseme_cli.engine import loop, prefill, runner
    from seseme_cli.speech import longform

    cuda = torch.cuda.is_available()
    marks, recording = [], threading.Event()

    def labelled(owner, name):
        original = getattr(owner, name)
        label = f"{getattr(owner, '__name__', 'prefill')}.{name}"

        @functools.wraps(original)
        def wrapper(*a, **kw):
            if not recording.is_set():
                return original(*a, **kw)
            events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else [None, None]
            h0 = time.perf_counter()
            if cuda:
                events[0].record()
            try:
                return original(*a, **kw)
            finally:
                if cuda:
                    events[1].record()
                marks.append((label, h0, time.perf_counter(), *events, threading.current_thread().name))

        setattr(owner, name, wrapper)

    for owner, name in [(loop.SpeechEngine, "_take_arrivals"), (loop.SpeechEngine, "_admit"),
                        (loop.SpeechEngine, "_launch"), (loop.SpeechEngine, "_process"),
                        (loop.SpeechEngine, "_audio_round"), (runner.Engine, "set_rows"), (runner.Engine, "step"),
                        (prefill.Prefill, "__call__"), (longform.SpeechJob, "next_generation"),
                        (row_audio.RowAudio, "_round"), (runner, "pack_prompts")]:
        labelled(owner, name)

    # The GPU's clock: an event recorded and waited for at t0 (the GPU is idle then), so an event's elapsed time
    # from it is when the GPU got to that point of its stream, on the host's time line.
    ref = torch.cuda.Event(enable_timing=True) if cuda else None
    if cuda:
        torch.cuda.synchronize()
        ref.record()
        ref.synchronize()
    t_ref = time.perf_counter()
    recording.set()
    got = one()
    recording.clear()
    if cuda:
        torch.cuda.synchronize()
    print(f"profiled request (from the GPU clock's zero): first frame {got[1] * 1e3 + 0:.2f} ms after its call")
    print(f"{'phase':>28} {'thread':>18} {'host start':>10} {'host end':>9} {'GPU start':>9} {'GPU end':>8}")
    for label, h0, h1, e0, e1, thread in sorted(marks, key=lambda m: m[1])[:50]:
        gpu = f"{ref.elapsed_time(e0):9.2f} {ref.elapsed_time(e1):8.2f}" if cuda else ""
        print(f"{label:>28} {thread:>18} {(h0 - t_ref) * 1e3:10.2f} {(h1 - t_ref) * 1e3:9.2f} {gpu}")

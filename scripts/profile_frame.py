"""Where the time goes (a diagnostic, not a benchmark: `seseme bench` is the benchmark). On a CUDA GPU with
the random CSM-1B model: the GPU time of one frame's kernels (eager, profiler) against one graph replay (the
difference is launch gaps), the parts of time to first frame and time to first audio, and Mimi's speed.
Usage: python scripts/profile_frame.py [batch ...]"""

import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from seseme_cli import load_csm_1b_optimized
from seseme_cli.tools.bench import bench_prompt, bench_text
from seseme_cli.engine.frame import run_frame
from seseme_cli.audio.stream import StreamDecoder
from seseme_cli.speech.request import SpeechRequest


def wall(fn, repeats=7):
    """Median host wall time of fn() with the GPU synchronized before and after, ms (first call dropped)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


def kernel_sequence(prof, count):
    """`count` kernels from the middle of the profiled run, in launch order: (name, microseconds)."""
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    start = max(0, len(kernels) // 2 - count // 2)
    return [(e.name.split("(")[0][-60:], e.time_range.elapsed_us()) for e in kernels[start : start + count]]


def kernel_table(fn, top=12, sequence=None):
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    if sequence:
        for name, us in kernel_sequence(prof, sequence):
            print(f"   {us:7.2f} us  {name}")
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events) / 1e3
    count = sum(e.count for e in events)
    rows = sorted(events, key=lambda e: -e.self_device_time_total)[:top]
    return total, count, [(e.key[:70], e.count, e.self_device_time_total / 1e3) for e in rows]


@torch.inference_mode()
def frame_profile(tts, b):
    tts.setup_caches(b)
    eng = tts.engine
    tokens, mask = bench_prompt(tts)
    eng.set_rows([(r, tokens, mask, 0.9, 50, r) for r in range(b)])
    bucket = eng.bucket_for(b)
    for _ in range(5):
        eng.step(b)
    graph_ms = wall(lambda: [eng.step(b) for _ in range(20)]) / 20
    eager = lambda: run_frame(eng.weights, eng.buf, eng.schedules[bucket], bucket)  # noqa: E731
    eager_ms = wall(eager)
    # About one depth step from the middle of the frame, kernel by kernel (a depth step is ~30 kernels).
    print(f"batch {b}: 32 kernels from the middle of the frame, in order (eager):")
    total, count, rows = kernel_table(eager, sequence=32)
    print(f"batch {b}: graph replay {graph_ms:.3f} ms/frame, eager {eager_ms:.2f} ms; kernels of one eager frame: "
          f"{count} launches, {total:.3f} ms of GPU time -> gaps in the graph ~{graph_ms - total:.3f} ms")
    for key, n, ms in rows:
        print(f"   {ms:8.3f} ms  {n:5d}x  {key}")


@torch.inference_mode()
def graph_profile(tts, b, replays=3):
    """Kernels of one graph replay (the middle of `replays`), by marginal cost: a kernel's end minus the previous
    kernel's end. With programmatic dependent launch kernels overlap, so a kernel's own duration includes its
    wait for the one before; the marginal cost is what the frame would save without it."""
    tts.setup_caches(b)
    eng = tts.engine
    tokens, mask = bench_prompt(tts)
    eng.set_rows([(r, tokens, mask, 0.9, 50, r) for r in range(b)])
    for _ in range(5):
        eng.step(b)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            eng.step(b)
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    per = len(kernels) // replays
    if per == 0:
        print(f"batch {b}: the profiler saw no kernels inside graph replays")
        return
    frame = kernels[per * (replays // 2) : per * (replays // 2 + 1)]
    span = (frame[-1].time_range.end - frame[0].time_range.start) / 1e3
    costs: dict[str, list[float]] = {}
    for prev, k in zip(frame, frame[1:]):
        name = k.name.replace("(anonymous namespace)::", "").replace("void ", "").split("(")[0].split("<")[0][-48:]
        costs.setdefault(name, []).append((k.time_range.end - prev.time_range.end) / 1e3)
    print(f"batch {b}: graph replay, {per} kernels, {span:.3f} ms from first start to last end; marginal cost:")
    for name, c in sorted(costs.items(), key=lambda kv: -sum(kv[1])):
        print(f"   {sum(c):7.3f} ms  {len(c):5d}x  {statistics.median(c) * 1e3:7.2f} us median  {name}")
    # One stretch from the middle of the frame (about one depth step), kernel by kernel.
    middle = len(frame) // 2
    print(f"batch {b}: kernels {middle}..{middle + 29} of the replayed frame, marginal cost each:")
    for prev, k in zip(frame[middle - 1 : middle + 29], frame[middle : middle + 30]):
        print(f"   {(k.time_range.end - prev.time_range.end):7.2f} us  {k.name.split('(')[0][-70:]}")


@torch.inference_mode()
def first_frame_parts(tts):
    tts.setup_caches(1)
    eng = tts.engine
    tokens, mask = bench_prompt(tts)
    prefill = wall(lambda: eng.set_row(0, tokens, mask, 0.9, 50, 0))
    step = wall(lambda: eng.step(1).cpu())
    total, count, rows = kernel_table(lambda: eng.set_row(0, tokens, mask, 0.9, 50, 0))
    print(f"time to first frame parts ({tokens.shape[0]} prompt frames): prefill {prefill:.2f} ms "
          f"({count} kernels, {total:.2f} ms GPU), first step + copy {step:.2f} ms")


def first_audio_parts(tts):
    tts.setup_caches(1)
    codes = torch.randint(0, 2048, (16, tts.config.num_codebooks))
    dec = StreamDecoder(tts.codec)

    def enter_decode_exit(n):
        with dec:
            for i in range(n):
                dec.decode(codes[i : i + 1])

    enter = wall(lambda: enter_decode_exit(0))
    one = wall(lambda: enter_decode_exit(1))
    eight = wall(lambda: enter_decode_exit(8))
    print(f"Mimi streaming: enter+exit {enter:.2f} ms, + first 1-frame decode {one - enter:.2f} ms, "
          f"later 1-frame decodes {(eight - one) / 7:.2f} ms each")
    request = SpeechRequest.make(bench_text(tts), max_audio_ms=50 * 80, seed=0)

    def first_audio():  # through the engine loop, as `seseme bench` times it
        stream = tts.stream_request(request, first_chunk_frames=1)
        next(stream)
        stream.close()

    print(f"time to first audio (whole path) {wall(first_audio):.2f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        first_audio()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))


def mimi_batch(tts, requests=40, frames=25):
    codes = torch.randint(0, 2048, (requests, tts.config.num_codebooks, frames), device=tts.device)
    with torch.inference_mode():
        ms = wall(lambda: tts.codec.decode(codes))
    audio_s = requests * frames * 0.08
    print(f"Mimi one-shot decode of {requests} x {frames} frames: {ms:.1f} ms, {audio_s / ms * 1e3:.0f}x real time")


if __name__ == "__main__":
    tts = load_csm_1b_optimized("random", "cuda")
    for b in [int(a) for a in sys.argv[1:]] or [1]:
        graph_profile(tts, b)
        frame_profile(tts, b)
    first_frame_parts(tts)
    first_audio_parts(tts)
    mimi_batch(tts)

"""Probe (CPU is enough): the engine loop's own host time per step with B busy rows, the GPU work stubbed out
(the frame step returns fixed codes, the prefill does nothing, the audio decoder hands each request zeros at
once). What is left is the loop's Python per step: admission, reading the frame, audio rounds, handles' events;
on a GPU it runs while the frame runs, and in the server it shares the GIL with the event loop.
--staggered: a server's workload instead of one wave: requests of 1-10 s, each replaced by a new one when it
ends, so rows are at every phase of their chunks; it also counts the audio events handed to listeners per step
(in a server each is a wake-up of the HTTP side).
The collector is set as the server sets it after set-up (engine.collector.freeze_after_setup) unless --default-gc;
--gc reports the time the cyclic garbage collector took per timed step and its longest pause (gc.callbacks).
Usage: python scripts/loop_host_probe.py [B] [--staggered] [--profile] [--gc] [--default-gc]"""
import cProfile
import gc
import pstats
import sys
import time

import numpy as np
import torch

from seseme_cli import load_csm_1b_optimized
from seseme_cli.speech.request import SpeechRequest

B = next((int(a) for a in sys.argv[1:] if a.isdigit()), 512)
STEPS = 100
tts = load_csm_1b_optimized("tiny-random", "cpu")
tts.setup_caches(B)
engine = tts.speech_engine(B, decode_audio=True, pcm16=True)
runner, decoder = engine.runner, engine.audio.decoder
codes = torch.randint(1, 2048, (B, 32))  # never all zero: no row ends early
runner.step = lambda n: codes[: runner.bucket_for(n)]
runner.set_rows = lambda requests: None
silence = np.zeros(8 * 1920, np.int16)


def instant_round(frames, rows, fresh):
    for slot, work, kept, _ in rows:
        if kept:
            decoder.on_piece(work, silence[: kept * 1920])


decoder.round, decoder.end, decoder.sync = instant_round, (lambda work, done: done(0)), (lambda: None)
staggered = "--staggered" in sys.argv
rng = np.random.default_rng(0)
events = {"audio": 0, "end": 0}


def listener(event) -> None:
    events[event[0]] += 1
    if staggered and event[0] == "end":  # a new client takes the place of the one that is done
        add()


def add() -> None:
    seconds = rng.uniform(1, 10) if staggered else 40
    engine.add_request(SpeechRequest.make("A request speaks for a while.", 0, max_audio_ms=int(seconds * 1000),
                                          seed=int(rng.integers(1 << 30))),
                       on_event=listener, keep_audio=False, low_latency=True)


if "--default-gc" not in sys.argv:
    from seseme_cli.engine.collector import freeze_after_setup

    freeze_after_setup()  # as the server does once set up, before any request

for _ in range(B):
    add()
for _ in range(20 if not staggered else 300):  # admission and the first chunks (staggered: rows at every phase)
    engine.step()
events.update(audio=0, end=0)
collections = {"seconds": 0.0, "longest": 0.0, "count": 0, "since": 0.0}


def timed_collection(phase, info) -> None:
    if phase == "start":
        collections["since"] = time.perf_counter()
        return
    took = time.perf_counter() - collections["since"]
    collections["seconds"] += took
    collections["longest"] = max(collections["longest"], took)
    collections["count"] += 1


if "--gc" in sys.argv:
    gc.callbacks.append(timed_collection)
profile = cProfile.Profile() if "--profile" in sys.argv else None
start, cpu_start = time.perf_counter(), time.thread_time()
if profile:
    profile.enable()
for _ in range(STEPS):
    engine.step()
if profile:
    profile.disable()
seconds, cpu_seconds = (time.perf_counter() - start) / STEPS, (time.thread_time() - cpu_start) / STEPS
print(f"B = {B}{' staggered' if staggered else ''}: {seconds * 1e3:.2f} ms of host time per step "
      f"({cpu_seconds * 1e3:.2f} ms of the loop thread's CPU time), "
      f"{engine.active_rows} rows busy, {events['audio'] / STEPS:.1f} audio events per step")
if "--gc" in sys.argv:
    print(f"collector ({'defaults' if '--default-gc' in sys.argv else 'frozen after set-up'}, thresholds "
          f"{gc.get_threshold()}): {collections['seconds'] * 1e3 / STEPS:.2f} ms per step, {collections['count']} "
          f"collections in {STEPS} steps, the longest {collections['longest'] * 1e3:.1f} ms")
if profile:
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)

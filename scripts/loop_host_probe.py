"""Probe (CPU is enough): the engine loop's own host time per step with B busy rows, the GPU work stubbed out
(the frame step returns fixed codes, the prefill does nothing, the audio decoder hands each request zeros at
once). What is left is the loop's Python per step: admission, reading the frame, audio rounds, handles' events;
on a GPU it runs while the frame runs, and in the server it shares the GIL with the event loop.
Usage: python scripts/loop_host_probe.py [B] [--profile]"""
import cProfile
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
for i in range(B):  # listeners, long enough to stay busy through the timed steps
    engine.add_request(SpeechRequest.make(f"Request {i} speaks for a while.", 0, max_audio_ms=40_000, seed=i),
                       keep_audio=False, low_latency=True)
for _ in range(20):  # admission and the first chunks
    engine.step()
profile = cProfile.Profile() if "--profile" in sys.argv else None
start = time.perf_counter()
if profile:
    profile.enable()
for _ in range(STEPS):
    engine.step()
if profile:
    profile.disable()
seconds = (time.perf_counter() - start) / STEPS
print(f"B = {B}: {seconds * 1e3:.2f} ms of host time per step, {engine.active_rows} rows busy")
if profile:
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)

"""Python's cyclic garbage collector in a process that runs an engine loop for long (the server's engine, a batch
job, a Ray replica): once set-up is over, everything alive (the model, its CUDA graphs, torch's and the libraries'
own objects: ~190,000 tracked objects in the probe below) is frozen out of the collector's view, and the young
generation is collected every 10,000 allocations instead of 700.

Why (`scripts/loop_host_probe.py 512 --staggered --gc [--default-gc]`: 512 rows of a server's workload, the GPU
work stubbed out, on a 2-core CPU, the dev machine): with the defaults a full collection came about once in 100
steps and held the loop for 130-200 ms (every stream waits for that step, longer than the 80 ms of audio a frame
buys), and collecting took 1.6-2.6 ms per step on average, of the loop's 6-12 ms of host time per step; frozen and
with the larger young generation, 0.06-0.14 ms per step and at most 4-10 ms at once. The loop makes no reference
cycles per step (tests/test_engine_loop.py checks it: a 25-frame request leaves as much cyclic garbage as a 2-frame
one, the few objects of moshi's streaming reset), so collecting less often keeps no memory.
"""

from __future__ import annotations

import gc

YOUNG_GENERATION = 10_000  # allocations between collections of the youngest generation (Python's default: 700)


def freeze_after_setup() -> None:
    """Call once the engine is set up (and warmed up): collect what set-up left, freeze the survivors, and make
    the young generation's collections rarer. Process-wide; later objects are collected as usual."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION, older, oldest)

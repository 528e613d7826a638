"""Where a `seseme batch` run of many short requests spends its time (a diagnostic on a GPU, random weights):
engine set-up, building the requests' prompts, the scheduler alone (no decoding), Mimi decoding in groups.
Usage: python scripts/batch_timing.py REQUESTS BATCH_SIZE"""
import sys, time, torch
from seseme_cli import load_csm_1b_optimized
from seseme_cli.scheduler import Scheduler, Work
from seseme_cli.batch_run import decode_group

n, B = int(sys.argv[1]), int(sys.argv[2])
tts = load_csm_1b_optimized("random", "cuda")
texts = ["Your order has shipped and should arrive on Thursday.", "Please hold while I transfer your call."]
t0 = time.perf_counter()
tts.setup_caches(B)
t1 = time.perf_counter(); print(f"engine for {B} rows (graphs): {t1 - t0:.2f} s")
for rep in range(2):
    t1 = time.perf_counter()
    jobs = [tts.speech_job(texts[i % 2], i % 2, (), 4000, 0.9, 50, i) for i in range(n)]
    gens = [j.next_generation() for j in jobs]
    t2 = time.perf_counter(); print(f"{n} jobs and prompts: {(t2 - t1) * 1e3:.0f} ms")
    jobs = [tts.speech_job(texts[i % 2], i % 2, (), 4000, 0.9, 50, i) for i in range(n)]  # fresh, for the scheduler
    done = []
    sched = Scheduler(tts.engine)
    torch.cuda.synchronize(); t2 = time.perf_counter()
    sched.run((Work(i, j, 0.9, 50) for i, j in enumerate(jobs)), lambda w: done.append(w), lambda w, e: print(e))
    torch.cuda.synchronize(); t3 = time.perf_counter()
    print(f"scheduler: {sched.stats.frames} frames in {t3 - t2:.2f} s = {sched.stats.frames * 0.08 / (t3 - t2):.0f}x real time")
    codes = [w.job.codes(32) for w in done]
    t3 = time.perf_counter()
    for i in range(0, len(codes), 20):
        decode_group(tts.codec, codes[i : i + 20])
    torch.cuda.synchronize(); t4 = time.perf_counter()
    print(f"decode in groups of 20: {t4 - t3:.2f} s")

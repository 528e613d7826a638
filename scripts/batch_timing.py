"""Where a `seseme batch` run of many short requests spends its time (a diagnostic on a GPU, random weights):
engine set-up, building the requests' prompts, the scheduler alone (its prefills timed apart), and the scheduler
with Mimi decoding the rows as they generate (row_audio.RowAudio; no files written), then the `seseme batch`
path itself (BatchRun, files in a temp folder) stage by stage.
Usage: python scripts/batch_timing.py REQUESTS BATCH_SIZE"""
import sys, tempfile, time, torch
from pathlib import Path
from seseme_cli.batch import run as batch_run
from seseme_cli.audio import rows as row_audio
from seseme_cli.engine import scheduler as sched_mod
from seseme_cli.batch.manifest import Manifest, read_requests, plan_outputs
from seseme_cli import load_csm_1b_optimized
from seseme_cli.audio.rows import RowAudio
from seseme_cli.engine.scheduler import Scheduler, Work

n, B = int(sys.argv[1]), int(sys.argv[2])
tts = load_csm_1b_optimized("random", "cuda")
texts = ["Your order has shipped and should arrive on Thursday.", "Please hold while I transfer your call."]
t0 = time.perf_counter()
tts.setup_caches(B)
t1 = time.perf_counter(); print(f"engine for {B} rows (graphs): {t1 - t0:.2f} s")

# The scheduler's prefills, timed with the GPU synchronized around each (so the rest is the frame loop).
prefill = {"s": 0.0, "calls": 0, "rows": 0}
set_rows = tts.engine.set_rows
def timed_set_rows(requests):
    torch.cuda.synchronize(); t = time.perf_counter()
    set_rows(requests)
    torch.cuda.synchronize(); prefill["s"] += time.perf_counter() - t
    prefill["calls"] += 1; prefill["rows"] += len(requests)

def jobs():
    return [tts.speech_job(texts[i % 2], i % 2, (), 4000, 0.9, 50, i) for i in range(n)]

for rep in range(1):
    t1 = time.perf_counter()
    gens = [j.next_generation() for j in jobs()]
    t2 = time.perf_counter(); print(f"{n} jobs and prompts: {(t2 - t1) * 1e3:.0f} ms, prompt frames {gens[0].tokens.shape[0]}")
    for decode in (False, True):
        tts.engine.set_rows = timed_set_rows if not decode else set_rows
        prefill.update(s=0.0, calls=0, rows=0)
        got = []
        audio = RowAudio(tts.codec, B, lambda w, pieces, special: got.append(sum(len(p) for p in pieces))) if decode else None
        sched = Scheduler(tts.engine, audio=audio)
        torch.cuda.synchronize(); t2 = time.perf_counter()
        sched.run((Work(i, j, 0.9, 50) for i, j in enumerate(jobs())), audio.finish if decode else lambda w: None,
                  lambda w, e: print(e))
        if decode:
            audio.close()
        torch.cuda.synchronize(); t3 = time.perf_counter()
        what = f"with row decoding ({sum(got) / 24000:.0f} s of audio)" if decode else \
            f"alone; prefills {prefill['s']:.3f} s ({prefill['calls']} calls, {prefill['rows']} rows)"
        print(f"scheduler {what}: {sched.stats.frames} frames in {t3 - t2:.2f} s = "
              f"{sched.stats.frames * 0.08 / (t3 - t2):.0f}x real time")

# The `seseme batch` path itself (BatchRun: requests built lazily, row decoding, files written to a temp folder),
# in this warm process, with the time of each stage's end after the scheduler's start.
marks = {}
def mark(name, fn):
    def wrapped(*a, **k):
        r = fn(*a, **k)
        marks.setdefault(name, []).append(time.perf_counter())
        return r
    return wrapped
sched_mod.Scheduler.run = mark("scheduler.run", sched_mod.Scheduler.run)
row_audio.RowAudio.close = mark("decoding done", row_audio.RowAudio.close)
batch_run.Writer.close = mark("files written", batch_run.Writer.close)
row_audio.RowAudio._round = mark("decoded rounds", row_audio.RowAudio._round)
batch_run.make_engine = lambda tts, batch_size: tts.engine  # the engine set up above (a second would not fit)
with tempfile.TemporaryDirectory() as folder:
    src = Path(folder) / "rq.jsonl"
    src.write_text("".join(f'{{"id": "r{i}", "text": "{texts[i % 2]}", "seed": {i}, "max_audio_ms": 4000}}\n'
                           for i in range(n)))
    for rep in range(2):
        out = Path(folder) / f"out{rep}"
        out.mkdir()
        requests = read_requests(src)
        plan_outputs(requests, out, "wav")
        marks.clear()
        manifest = Manifest(out / "m.jsonl", out)
        runner = batch_run.BatchRun(tts, manifest, batch_run.BatchSettings(B))
        t0 = time.perf_counter()
        tally = runner.run(requests)
        t1 = time.perf_counter()
        start = runner.stats.started
        stages = ", ".join(f"{k} +{(v[-1] - start):.2f} s" for k, v in marks.items())
        print(f"BatchRun: set-up {start - t0:.2f} s; {stages}; "
              f"returned +{t1 - start:.2f} s; {tally.audio_s:.0f} s of audio = {tally.audio_s / (t1 - start):.0f}x real time")

"""Probe (GPU, random weights): prefill of many prompts by chunk size and its kernels; Mimi streaming decode of
many rows at once; and that decode beside graph replays of generation. Usage: python scripts/decode_probe.py"""
import copy, statistics, threading, time
import torch
from torch.profiler import ProfilerActivity, profile
from seseme_cli import load_csm_1b_optimized
from seseme_cli.engine.prefill import Prefill

def sync_time(fn, reps=3):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize(); t = time.perf_counter(); fn(); torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)

tts = load_csm_1b_optimized("random", "cuda")
B = 512
tts.setup_caches(B)
eng = tts.engine
text = "Your order has shipped and should arrive on Thursday."
reqs = []
for i in range(B):
    tokens, mask = tts.build_prompt(text, i % 2)
    reqs.append((i, tokens, mask, 0.9, 50, i))
print(f"prompt frames {reqs[0][1].shape[0]}, prefill rows {sum(r[1].shape[0] - 1 for r in reqs)}")
for chunk in (256, 1024, 2048):
    eng.prefill = Prefill(tts.model, eng.weights.backbone, eng.tuning, eng.buf.linear_workspace, chunk_rows=chunk)
    s = sync_time(lambda: eng.set_rows(reqs))
    print(f"prefill of {B} prompts, chunk {chunk}: {s * 1e3:.0f} ms")
    if chunk == 256:
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            eng.set_rows(reqs); torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=70))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=70))

# Mimi streaming decode of B rows.
model = copy.deepcopy(tts.codec.model)
from moshi.utils.compile import no_compile, no_cuda_graph
side = torch.cuda.Stream()
K = tts.codec.num_codebooks
for per_call in (1, 2, 4, 8):
    codes = torch.randint(0, 2048, (B, K, per_call), device="cuda")
    with torch.inference_mode(), no_compile(), no_cuda_graph(), model.streaming(B):
        model.decode(codes)
        s = sync_time(lambda: model.decode(codes), reps=5)
    print(f"streaming decode {B} rows x {per_call} frames per call: {s * 1e3:.1f} ms = {B * per_call * 0.08 / s:.0f}x real time, "
          f"peak {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")
    torch.backends.cuda.matmul.allow_tf32 = True
    with torch.inference_mode(), no_compile(), no_cuda_graph(), model.streaming(B):
        model.decode(codes)
        s = sync_time(lambda: model.decode(codes), reps=5)
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"   with tf32: {s * 1e3:.1f} ms = {B * per_call * 0.08 / s:.0f}x real time")

# Beside generation: 16 graph steps at batch B, and 8 frames of decode in calls of 2, alone and together.
for _ in range(3): eng.step(B)
steps = lambda: [eng.step(B) for _ in range(16)]
codes = torch.randint(0, 2048, (B, K, 2), device="cuda")
with torch.inference_mode(), no_compile(), no_cuda_graph(), model.streaming(B):
    def dec():
        side.wait_stream(torch.cuda.current_stream())  # the state was made on the default stream
        with torch.cuda.stream(side):
            for _ in range(8):
                model.decode(codes)
        side.synchronize()
    dec()
    g, d = sync_time(steps), sync_time(dec)
    def both():
        t = threading.Thread(target=dec); t.start(); steps(); t.join()
    b = sync_time(both)
print(f"16 steps {g * 1e3:.0f} ms, decode 16 frames x {B} rows {d * 1e3:.0f} ms, together {b * 1e3:.0f} ms")

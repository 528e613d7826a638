"""Probe (GPU, random full-size Mimi): what one streaming decode frame costs per slot bucket of the engine's audio
decoder (audio.rows.streaming_decoder: CUDA graphs, TF32 matmuls), for an engine of `slots` decoder slots.
CUDA events around 12 replays after a warm-up, on the decoder's own stream.
--cudnn-benchmark: let cuDNN time its convolution algorithms at capture (torch.backends.cudnn.benchmark).
--profile: the CUDA kernels of 3 graphed frames of all slots, by total time (torch.profiler; CUPTI sees the
kernels inside a graph). SESEME_MIMI_ATTENTION=torch: Mimi's attention on PyTorch's kernel (audio.mimi_attention).
--bf16: the same with Mimi's weights and streaming state in bf16 (its attention then on PyTorch's kernel), after the
fp32 run, and the SNR of the bf16 audio against the fp32 audio of the same codes, all slots.
--history=F: before each bucket's timing, every slot starts over and decodes F frames (untimed), so the timed frames
attend a ring that F frames filled (2 steps a frame, 250 slots: full from 125); without it the slots carry on
from the buckets before.
Usage: python scripts/mimi_probe.py [slots] [--cudnn-benchmark] [--profile] [--bf16] [--history=F]
(576: a 512-row engine's slots)"""
import sys

import torch

from seseme_cli.audio.codec import MimiCodec
from seseme_cli.audio.rows import slot_buckets, streaming_decoder

args = sys.argv[1:]
slots = next((int(a) for a in args if a.isdigit()), 576)
torch.backends.cudnn.benchmark = "--cudnn-benchmark" in args
codec = MimiCodec.random("full", device="cuda")
K, frames = codec.num_codebooks, 12
torch.manual_seed(0)
codes = torch.randint(0, codec.cardinality, (slots, K, frames), device="cuda")
history = next((int(a.split("=", 1)[1]) for a in args if a.startswith("--history=")), None)


def start_over_with_history(decode, m):
    """Every slot starts over, then the first m decode `history` frames, 12 at a time (graphed rounds)."""
    start_over = torch.ones(slots, dtype=torch.bool, device="cuda")
    for done in range(0, max(history, 1), frames):  # the first round starts the slots over, so at least one
        decode(codes[:m, :, :min(frames, max(history, 1) - done)], start_over if done == 0 else None, None)


def probe(codec, label):
    with streaming_decoder(codec, slots, 1) as (decode, graphed):
        print(f"{label}, slots {slots}: graphed {graphed}; attention on ops.masked_attention "
              f"{getattr(decode, 'kernel_attention', False)}; cudnn.benchmark {torch.backends.cudnn.benchmark}; "
              f"history {history} frames; buckets {slot_buckets(slots)}", flush=True)
        stream = torch.cuda.current_stream()
        for m in slot_buckets(slots):
            decode(codes[:m, :, :2], None, None)  # warm
            if history is not None:
                start_over_with_history(decode, m)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            decode(codes[:m], None, None)
            end.record(stream)
            end.synchronize()
            print(f"bucket {m:4d} slots: {start.elapsed_time(end) / frames:.3f} ms per frame", flush=True)
        if "--profile" in args:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                decode(codes[:, :, :3], None, None)
                torch.cuda.synchronize()
            print(f"3 graphed frames x {slots} slots, CUDA kernels by total time:")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
        # All slots from a fresh state, for the dtype comparison.
        audio = decode(codes, torch.ones(slots, dtype=torch.bool, device="cuda"), None).float()
    return audio


reference = probe(codec, "fp32")
if "--bf16" in args:
    codec.model.to(torch.bfloat16)
    audio = probe(codec, "bf16")
    error = (audio - reference).pow(2).sum()
    print(f"bf16 against fp32, {slots} slots x {frames} frames: SNR "
          f"{10 * torch.log10(reference.pow(2).sum() / error):.1f} dB, worst sample error "
          f"{(audio - reference).abs().max():.2e} (audio rms {reference.pow(2).mean().sqrt():.3f})")

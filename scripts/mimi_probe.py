"""Probe (GPU, random full-size Mimi): what one streaming decode frame costs per slot bucket of the engine's audio
decoder (audio.rows.streaming_decoder: CUDA graphs, TF32 matmuls), for an engine of `slots` decoder slots.
CUDA events around 12 replays after a warm-up, on the decoder's own stream.
Usage: python scripts/mimi_probe.py [slots]   (576: the slots of a 512-row engine)"""
import sys

import torch

from seseme_cli.audio.codec import MimiCodec
from seseme_cli.audio.rows import slot_buckets, streaming_decoder

slots = int(sys.argv[1]) if len(sys.argv) > 1 else 576
codec = MimiCodec.random("full", device="cuda")
K, frames = codec.num_codebooks, 12
torch.manual_seed(0)
codes = torch.randint(0, codec.cardinality, (slots, K, frames), device="cuda")

with streaming_decoder(codec, slots, 1) as (decode, graphed):
    print(f"slots {slots}: graphed {graphed}; buckets {slot_buckets(slots)}", flush=True)
    stream = torch.cuda.current_stream()
    for m in slot_buckets(slots):
        decode(codes[:m, :, :2], None, None)  # warm
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        decode(codes[:m], None, None)
        end.record(stream)
        end.synchronize()
        print(f"bucket {m:4d} slots: {start.elapsed_time(end) / frames:.3f} ms per frame", flush=True)

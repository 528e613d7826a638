"""Probe (GPU, random full-size Mimi): what one streaming decode frame costs for many slots, in fp32 (today),
with TF32 matmuls, and with the decoder in bf16; and how far TF32/bf16 audio is from fp32 (SNR on random codes).
Usage: python scripts/mimi_probe.py [slots,...]"""
import copy
import sys

import torch
from moshi.utils.compile import no_compile

from seseme_cli.audio.codec import MimiCodec
from seseme_cli.audio.rows import _GraphedDecode

slots_list = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "1,64,576").split(",")]
codec = MimiCodec.random("full", device="cuda")
K, frames = codec.num_codebooks, 12
torch.manual_seed(0)


def timed_decode(model, slots, codes, tf32=False):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = True  # torch's default
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.inference_mode(), no_compile(), model.streaming(slots):
        states = [m._streaming_state for m in model.modules() if getattr(m, "_streaming_state", None) is not None]
        for st in states:
            for name in ("graphed_tr_enc", "graphed_tr_dec", "graphed_encoder", "graphed_decoder"):
                if getattr(st, name, None) is not None:
                    getattr(st, name).disable = True
        g = _GraphedDecode.capture(model, states, slots, K, stream)
        model.reset_streaming()
        out = g.decode(codes[:, :, :2], None, None).float()  # warm
        model.reset_streaming()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        audio = g.decode(codes, None, None).float()
        end.record(stream)
        stream.synchronize()
        torch.backends.cuda.matmul.allow_tf32 = False
        return start.elapsed_time(end) / codes.shape[-1], audio


def snr(ref, x):
    return 10 * torch.log10(ref.pow(2).mean() / (ref - x).pow(2).mean().clamp_min(1e-30)).item()


for slots in slots_list:
    codes = torch.randint(0, codec.cardinality, (slots, K, frames), device="cuda")
    fp32 = copy.deepcopy(codec.model)
    t32, a32 = timed_decode(fp32, slots, codes)
    ttf, atf = timed_decode(copy.deepcopy(codec.model), slots, codes, tf32=True)
    bf = copy.deepcopy(codec.model).to(torch.bfloat16)
    try:
        tbf, abf = timed_decode(bf, slots, codes)
        bf_txt = f"bf16 {tbf:.3f} ms (SNR vs fp32 {snr(a32, abf):.1f} dB)"
    except Exception as e:  # moshi may not run in bf16 everywhere
        bf_txt = f"bf16 failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    print(f"slots {slots}: per frame fp32 {t32:.3f} ms | tf32 {ttf:.3f} ms (SNR {snr(a32, atf):.1f} dB) | {bf_txt}",
          flush=True)

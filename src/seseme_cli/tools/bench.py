"""`seseme bench`: speed of the engine (and, with --compare-baseline, of transformers and the eager reference)
on the same weights and prompt. Timing: CUDA events after warm-up, medians; bandwidth is compared with a
device-to-device copy measured in the same run.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from seseme_cli.model.checkpoints import _HF_LAYER, _HF_TOP
from seseme_cli.api import CSM, FRAME_MS
from seseme_cli.engine import frame
from seseme_cli.model.reference import generate_frames
from seseme_cli.speech.request import SpeechRequest

PROMPT = ("The quick brown fox jumps over the lazy dog, and then it runs far away into the quiet forest "
          "where nobody can find it until the morning comes and the birds start singing again.")
PROMPT_TOKENS = 40  # the prompt length the speed targets are stated for


@dataclass
class Result:
    name: str
    batch: int
    frames: int
    ms_per_frame: float  # median time of one frame step (all rows)
    ttff_ms: float | None = None  # prefill + first frame, wall clock, batch 1
    gb_per_s: float | None = None
    peak_gb: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def frames_per_s(self) -> float:
        return self.batch * 1000.0 / self.ms_per_frame

    @property
    def real_time_factor(self) -> float:
        return self.batch * FRAME_MS / self.ms_per_frame


def bench_text(tts: CSM, n_tokens: int = PROMPT_TOKENS) -> str:
    """The longest start of PROMPT (whole words) whose prompt is at most `n_tokens` text tokens (<bos> ... <eos>
    included), whatever the tokenizer: the same text is timed by the frame engine and through the engine loop."""
    words = PROMPT.split()
    text = words[0]
    for word in words[1:]:
        longer = f"{text} {word}"
        if tts.build_prompt(longer, 0)[0].shape[0] > n_tokens:
            break
        text = longer
    return text


def bench_prompt(tts: CSM, n_tokens: int = PROMPT_TOKENS):
    """Prompt frames (tokens, mask) of `bench_text`."""
    return tts.build_prompt(bench_text(tts, n_tokens), 0)


def copy_bandwidth_gb_s(device, size_mb: int = 1024, repeats: int = 20) -> float:
    """A large device-to-device copy, counting bytes read plus written (the ceiling for reading weights)."""
    src = torch.randn(size_mb * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * src.numel() * 4 / (statistics.median(times) * 1e-3) / 1e9


def bytes_per_frame(engine, batch: int, position: int) -> int:
    """Bytes one frame must read: every backbone weight once, every depth weight once per depth step, the
    heads used, the projection once, and the backbone KV caches up to the current positions. With fp8 weights a
    projection counts its e4m3 bytes (and scales) where the frame runs the fp8 GEMV (engine.frame.uses_fp8)."""
    from seseme_cli.engine.frame import uses_fp8

    w, cfg = engine.weights, engine.cfg
    K = cfg.num_codebooks
    names = ("wqkv", "wo", "w_gate_up", "w_down")

    def nbytes(t, fp8, n):
        return fp8.nbytes if uses_fp8(fp8, n) else t.numel() * t.element_size()

    def stack_bytes(stack, n):
        return sum(nbytes(getattr(l, a), l.fp8 and getattr(l.fp8, a), n) for l in stack.layers for a in names)

    q8 = w.fp8
    head = nbytes(w.audio_heads[0], q8 and q8.audio_heads[0], batch)
    weights = stack_bytes(w.backbone, batch) + nbytes(w.c0_head, q8 and q8.c0_head, batch)
    # The projection runs once per frame (on the backbone state); codes enter through the projected table. Depth
    # step 0 has two tokens per row.
    weights += stack_bytes(w.depth, 2 * batch) + (K - 2) * stack_bytes(w.depth, batch) + (K - 1) * head
    weights += nbytes(w.projection, q8 and q8.projection, batch)
    bb = cfg.backbone
    kv = 2 * bb.num_layers * batch * position * bb.num_kv_heads * bb.head_dim * w.c0_head.element_size()
    return weights + kv


def _event_times(step, frames: int) -> list[float]:
    times = []
    for _ in range(frames):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in times]


def time_to_first_audio(tts: CSM, seed: int, rounds: int = 6) -> float:
    """Streaming through the engine loop (`tts.stream_request`, what `say --stream` runs): from the call to the
    first decoded audio chunk (queueing, prefill, one frame, its Mimi decode), warm: the median of rounds 2..
    (the first loads kernels)."""
    request = SpeechRequest.make(bench_text(tts), max_audio_ms=50 * FRAME_MS, seed=seed)
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        stream = tts.stream_request(request, first_chunk_frames=1)
        next(stream)
        times.append((time.perf_counter() - start) * 1e3)
        stream.close()
    return statistics.median(times[1:])


def weights_path(engine, batch: int) -> str:
    """Which kernels a frame of `batch` rows runs its projections on, for the results: "bf16", or for fp8
    weights which calls take the fp8 GEMV."""
    if engine.weights.format != "fp8":
        return "bf16"
    rows = {"backbone and heads": batch, "depth step 0": 2 * batch, "depth steps 1-30": batch}
    fp8 = [what for what, n in rows.items() if frame.uses_fp8(engine.weights.fp8, n)]
    if len(fp8) == len(rows):
        return f"fp8 GEMV (all projections; fp8 up to {frame.FP8_MAX_N} rows)"
    if not fp8:
        return f"fp8 weights, bf16 kernels on the dequantized copy (fp8 GEMV only up to {frame.FP8_MAX_N} rows)"
    return f"fp8 GEMV for {', '.join(fp8)}; bf16 (dequantized) elsewhere"


@torch.inference_mode()
def bench_engine(tts: CSM, batch: int, frames: int, warmup: int = 10, seed: int = 0, weights: str | None = None) -> Result:
    """weights: "bf16" or "fp8" (tts.setup_caches' argument; None keeps the object's current format)."""
    tts.setup_caches(batch, weights=weights)
    engine = tts.engine
    tokens, mask = bench_prompt(tts)
    torch.cuda.reset_peak_memory_stats()

    # Time to first frame: prefill of one row + its first frame, host clock around synchronized work. The first
    # round loads the prefill's kernels (a one-time cost of the process); the median of the next rounds counts.
    ttffs = []
    for _ in range(6):
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.set_row(0, tokens, mask, 0.9, 50, seed)
        engine.step(1).cpu()
        ttffs.append((time.perf_counter() - start) * 1e3)
    ttff = statistics.median(ttffs[1:])

    ttfa = time_to_first_audio(tts, seed) if batch == 1 else None

    for row in range(batch):
        engine.set_row(row, tokens, mask, 0.9, 50, seed + row)
    for _ in range(warmup):
        engine.step(batch)
    times = _event_times(lambda: engine.step(batch), frames)
    ms = statistics.median(times)
    position = tokens.shape[0] + warmup + frames // 2
    fp8 = engine.weights.format == "fp8"
    return Result(
        name=("seseme engine fp8" if fp8 else "seseme engine") + ("" if engine.graphs else " (eager, graph capture failed)"),
        batch=batch, frames=frames, ms_per_frame=ms, ttff_ms=ttff if batch == 1 else None,
        gb_per_s=bytes_per_frame(engine, batch, position) / (ms * 1e-3) / 1e9,
        peak_gb=torch.cuda.max_memory_allocated() / 1e9,
        extra={"prompt_frames": tokens.shape[0], "graphs": bool(engine.graphs), "first_ttff_ms": ttffs[0],
               "ttfa_ms": ttfa, "weights": engine.weights.format, "weights_path": weights_path(engine, batch),
               # after the timed frames: a launch the GPU refused has turned the persistent kernel off by now
               "depth_path": frame.depth_decoder_path(engine.weights, engine.buf, batch)},
    )


@torch.inference_mode()
def bench_reference(tts: CSM, frames: int, seed: int = 0) -> Result:
    """The in-tree eager reference (plain PyTorch, what runs without the kernels), batch 1."""
    tokens, mask = bench_prompt(tts)
    if tts.model.cache_batch_size < 1:
        tts.model.setup_caches(1)
    g = torch.Generator(tts.device).manual_seed(seed)
    generate_frames(tts.model, tokens, mask, 2, 0.9, 50, g)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate_frames(tts.model, tokens, mask, frames, 0.9, 50, g)
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) * 1e3
    return Result("in-tree eager reference", 1, len(out), elapsed / max(1, len(out)))


def to_transformers_state(model) -> dict[str, torch.Tensor]:
    """seseme weights under transformers' CsmForConditionalGeneration names (the inverse of the loader)."""
    top = {v: k for k, v in _HF_TOP.items()}
    layer = {v: k for k, v in _HF_LAYER.items()}
    state = {}
    for name, tensor in model.state_dict().items():
        if name in top:
            state[top[name]] = tensor
            continue
        part, _, i, *rest = name.split(".")
        sub = ".".join(rest).removesuffix(".weight")
        prefix = "backbone_model" if part == "backbone" else "depth_decoder.model"
        state[f"{prefix}.layers.{i}.{layer[sub]}.weight"] = tensor
    return state


def transformers_config(cfg):
    from transformers import CsmConfig

    def stack(t):
        s = t.rope_scaling
        # The same frequencies written with original_max_position_embeddings below max_position_embeddings,
        # as transformers wants: dividing it and both factors by c leaves every threshold and the smoothing as is.
        c = max(1.0, s.original_max_position_embeddings / 2 ** math.floor(math.log2(t.max_seq_len / 2)))
        return dict(hidden_size=t.dim, intermediate_size=t.ffn_dim, num_hidden_layers=t.num_layers,
                    num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
                    max_position_embeddings=t.max_seq_len, rms_norm_eps=t.norm_eps, rope_theta=t.rope_theta,
                    rope_scaling={"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor / c,
                                  "high_freq_factor": s.high_freq_factor / c,
                                  "original_max_position_embeddings": int(s.original_max_position_embeddings / c)})

    depth = dict(stack(cfg.depth), num_codebooks=cfg.num_codebooks, backbone_hidden_size=cfg.backbone.dim,
                 vocab_size=cfg.audio_vocab_size)
    return CsmConfig(num_codebooks=cfg.num_codebooks, vocab_size=cfg.audio_vocab_size, text_vocab_size=cfg.text_vocab_size,
                     depth_decoder_config=depth, tie_codebooks_embeddings=False, **stack(cfg.backbone))


@torch.inference_mode()
def bench_transformers(tts: CSM, frames: int) -> Result:
    """transformers' CsmForConditionalGeneration.generate on the same weights and prompt, batch 1, bf16."""
    from transformers import CsmForConditionalGeneration

    with torch.device(tts.device):
        hf = CsmForConditionalGeneration(transformers_config(tts.config)).to(tts.dtype).eval()
    missing, unexpected = hf.load_state_dict(to_transformers_state(tts.model), strict=False)
    assert not unexpected and all(m.startswith("codec_model.") for m in missing), (missing[:3], unexpected[:3])
    tokens, mask = bench_prompt(tts)
    embeds = tts.model.embed_frames(tokens[None].to(tts.device), mask[None].to(tts.device)).to(tts.dtype)
    kwargs = dict(inputs_embeds=embeds, do_sample=True, temperature=0.9, top_k=50, depth_decoder_do_sample=True,
                  depth_decoder_temperature=0.9, depth_decoder_top_k=50)
    hf.generate(max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = hf.generate(max_new_tokens=frames, min_new_tokens=frames, **kwargs)
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) * 1e3
    n = out.shape[1] if out.dim() == 3 else out.shape[0]
    del hf
    torch.cuda.empty_cache()
    return Result("transformers generate", 1, n, elapsed / n)


def results_json(results: list[Result], copy_gb_s: float, info: dict) -> dict:
    rows = [dict(asdict(r), frames_per_s=r.frames_per_s, real_time_factor=r.real_time_factor) for r in results]
    return {"copy_bandwidth_gb_s": copy_gb_s, **info, "results": rows}


def plot(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for fmt in ("bf16", "fp8"):
        engine = [r for r in results if r.name.startswith("seseme engine") and r.extra.get("weights") == fmt]
        if engine:
            a.plot([r.batch for r in engine], [r.ms_per_frame for r in engine], "o-", label=fmt)
            b.plot([r.batch for r in engine], [r.real_time_factor for r in engine], "o-", label=fmt)
    a.legend()
    a.set(xlabel="batch size", ylabel="ms per frame step", xscale="log", title="frame time")
    b.set(xlabel="batch size", ylabel="x real time (aggregate)", xscale="log", yscale="log", title="real-time factor")
    fig.tight_layout()
    fig.savefig(path, dpi=120)

"""The engine with fp8 weights (engine/pack.py, frame.project) against the reference model on the same quantized
weights: on CPU through the ops' references (tiny model, fp32), on GPU with the fp8 GEMV (CSM-1B shapes, bf16)."""

from __future__ import annotations

import copy

import pytest
import torch

from seseme_cli.api import load_csm_1b_optimized
from seseme_cli.engine import Engine, frame
from seseme_cli.engine.pack import weight_format
from seseme_cli.errors import InputError
from seseme_cli.model.reference import generate_frames
from seseme_cli.ops.kernels import has_cuda_kernels, kernels_module
from seseme_cli.ops.linear_fp8 import dequantize_fp8, quantize_fp8
from test_engine import K, engine_teacher_forced, models, prompt, reference_teacher_forced


def quantize_reference(model) -> None:
    """Quantize a reference model's projections one parameter at a time, as the engine's pack does per fused
    matrix (per-row scales commute with the concatenation), and write back the dequantized values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.weight") or ".mlp." in name or name in ("c0_head.weight", "projection.weight"):
                w8, s = quantize_fp8(p)
                p.copy_(dequantize_fp8(w8, s, p.dtype))
            elif name == "audio_head":  # (heads, dim, vocab): output channels are the vocab rows
                w8, s = quantize_fp8(p.transpose(1, 2))
                p.copy_(dequantize_fp8(w8, s, p.dtype).transpose(1, 2))


def fp8_models(device: str, dtype):
    ref, model = models("tiny-random" if device == "cpu" else "random", device, dtype)
    quantize_reference(ref)
    return ref, model


class Spy:
    """Counts the fp8 GEMV calls the frame makes (the engine must take the fp8 path, not only the bf16 copy)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for name in ("linear_fp8", "swiglu_linear_fp8"):
            real = getattr(frame, name)
            monkeypatch.setattr(frame, name, self._wrap(real))

    def _wrap(self, real):
        def call(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)
        return call


@pytest.mark.parametrize("fp8_max_n", [8, 2])  # 2: depth step 0 (4 rows) and the prefill run on the bf16 copy
def test_fp8_engine_greedy_equals_quantized_reference_cpu(monkeypatch, fp8_max_n):
    monkeypatch.setattr(frame, "FP8_MAX_N", fp8_max_n)
    spy = Spy(monkeypatch)
    ref, model = fp8_models("cpu", torch.float32)
    engine = Engine(model, max_batch=3, use_graphs=False, weights="fp8")
    assert engine.weights.format == "fp8" and weight_format(model) == "fp8"
    prompts = [prompt(1, 9), prompt(2, 14)]
    for row, (t, m) in enumerate(prompts):
        engine.set_row(row, t, m, temperature=0.0, topk=50, seed=row)
    frames = torch.stack([engine.step(2)[:2].clone() for _ in range(5)], dim=1)
    assert spy.calls > 0
    for row, (t, m) in enumerate(prompts):
        ref.setup_caches(1)
        expected = generate_frames(ref, t, m, 5, temperature=0.0, topk=1)
        assert torch.equal(frames[row, : len(expected)], expected)


def test_fp8_engine_teacher_forced_logits_equal_quantized_reference_cpu():
    ref, model = fp8_models("cpu", torch.float32)
    engine = Engine(model, max_batch=1, use_graphs=False, weights="fp8")
    tokens, mask = prompt(3, 11)
    forced = torch.randint(1, 2048, (3, K), generator=torch.Generator().manual_seed(0))
    expected = reference_teacher_forced(ref, tokens, mask, forced)
    got = engine_teacher_forced(engine, tokens, mask, forced)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and the quantization changed the model: the bf16 (here fp32) model's logits differ
    plain, _ = models("tiny-random", "cpu", torch.float32)
    unquantized = reference_teacher_forced(plain, tokens, mask, forced)
    assert (unquantized - expected).abs().max() > 1e-3


def test_quantization_is_done_once_and_kept():
    _, model = models("tiny-random", "cpu", torch.float32)
    first = Engine(model, max_batch=1, use_graphs=False, weights="fp8")
    stored = dict(model.fp8_weights)
    values = first.weights.backbone.layers[0].wqkv.clone()
    again = Engine(model, max_batch=2, use_graphs=False)  # None: the model's format, fp8
    assert again.weights.format == "fp8"
    assert again.weights.backbone.layers[0].fp8.wqkv is stored["backbone.0.wqkv"]
    assert torch.equal(again.weights.backbone.layers[0].wqkv, values)  # not quantized a second time
    with pytest.raises(ValueError, match="load the model again"):
        Engine(model, max_batch=1, use_graphs=False, weights="bf16")
    with pytest.raises(ValueError, match="weights must be one of"):
        Engine(copy.deepcopy(model), max_batch=1, use_graphs=False, weights="int4")


def test_bench_accounting_counts_fp8_bytes(monkeypatch):
    from seseme_cli.tools.bench import bytes_per_frame, weights_path

    _, a = models("tiny-random", "cpu", torch.float32)
    b = copy.deepcopy(a)
    plain = Engine(a, max_batch=4, use_graphs=False)
    fp8 = Engine(b, max_batch=4, use_graphs=False, weights="fp8")
    assert weights_path(plain, 1) == "bf16" and weights_path(fp8, 1).startswith("fp8 GEMV (all")
    assert "depth steps 1-30" in weights_path(fp8, 8) and "depth step 0" not in weights_path(fp8, 8).split(";")[0]
    assert bytes_per_frame(fp8, 1, 10) < bytes_per_frame(plain, 1, 10)
    monkeypatch.setattr(frame, "FP8_MAX_N", 0)
    assert bytes_per_frame(fp8, 1, 10) == bytes_per_frame(plain, 1, 10)
    assert weights_path(fp8, 1).startswith("fp8 weights, bf16 kernels")


def test_api_setup_caches_weights():
    tts = load_csm_1b_optimized("tiny-random", device="cpu")
    for bad in ("int4", "FP8", 8):
        with pytest.raises(InputError, match="weights must be one of"):
            tts.setup_caches(1, weights=bad)
    tts.setup_caches(1, weights="fp8")
    assert tts.engine.weights.format == "fp8"
    codes = tts.generate_codes("hello", max_audio_length_ms=240, seed=3, temperature=0.9)
    assert codes.shape[1] == K and codes.shape[0] >= 1
    again = tts.generate_codes("hello", max_audio_length_ms=240, seed=3, temperature=0.9)
    assert torch.equal(codes, again)
    tts.setup_caches(2)  # keeps fp8
    assert tts.engine.weights.format == "fp8"
    with pytest.raises(InputError, match="load the model again"):
        tts.setup_caches(1, weights="bf16")


# --- GPU: the fp8 GEMV in the frame, CSM-1B shapes -----------------------------------------------------------

needs_kernels = pytest.mark.skipif(not has_cuda_kernels() or not hasattr(kernels_module(), "linear_fp8"),
                                   reason="needs a GPU and the CUDA kernels (with linear_fp8)")


def rel_err(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.cuda
@needs_kernels
def test_fp8_engine_teacher_forced_logits_close_to_quantized_reference_gpu():
    ref, model = fp8_models("cuda", torch.bfloat16)
    engine = Engine(model, max_batch=4, weights="fp8")
    tokens, mask = prompt(4, 40)
    forced = torch.randint(1, 2048, (3, K), generator=torch.Generator().manual_seed(1))
    expected = reference_teacher_forced(ref, tokens, mask, forced)
    got = engine_teacher_forced(engine, tokens, mask, forced)
    errors = [rel_err(got[f, k], expected[f, k]) for f in range(3) for k in range(K)]
    print(f"fp8 engine vs quantized reference (bf16), teacher-forced logits: max {max(errors):.2e}, "
          f"mean {sum(errors) / len(errors):.2e}")
    assert max(errors) < 2e-2  # the bf16 engine's bound against the bf16 reference (test_engine)
    # graphs: a replayed frame runs, and its codes are valid
    engine.set_row(0, tokens, mask, 0.9, 50, 0)
    codes = torch.stack([engine.step(1)[0].clone() for _ in range(3)])
    assert codes.min() >= 0 and codes.max() < 2051

"""The reference model equals transformers' CsmForConditionalGeneration on tiny random checkpoints.

transformers' model is built and saved by transformers; seseme loads the saved folder through its own
loader, so names, the RoPE scaling, both audio-embedding tables and the heads are all checked.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TEXT_VOCAB, make_transformers_model
from seseme_cli.model.checkpoints import load_checkpoint
from seseme_cli.api import build_model
from seseme_cli.model.reference import generate_frames

K, V = 32, 2051
FP32_TOL = dict(rtol=1e-4, atol=1e-4)


def load_seseme(folder):
    return build_model(load_checkpoint(str(folder)), torch.device("cpu"), torch.float32)


def prompt_frames(seed: int, with_context: bool):
    """(tokens, mask) of a prompt: optional context (text frames, audio frames + EOS frame), then text frames."""
    g = torch.Generator().manual_seed(seed)
    parts = []

    def text(n):
        t = torch.zeros(n, K + 1, dtype=torch.long)
        t[:, -1] = torch.randint(0, 256, (n,), generator=g)
        t[0, -1], t[-1, -1] = 256, 257  # <bos> ... <eos>
        m = torch.zeros_like(t, dtype=torch.bool)
        m[:, -1] = True
        parts.append((t, m))

    if with_context:
        text(9)
        frames = 7
        t = torch.zeros(frames + 1, K + 1, dtype=torch.long)
        t[:frames, :K] = torch.randint(1, 2048, (frames, K), generator=g)  # last frame stays all-zero: audio EOS
        m = torch.zeros_like(t, dtype=torch.bool)
        m[:, :K] = True
        parts.append((t, m))
    text(11)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def transformers_embeds(hf, tokens, mask):
    """Embed prompt frames with transformers' own modules: text frames by embed_text_tokens, audio frames
    (and the audio EOS frame) by the backbone's summed codebook embeddings, as its processor would place them."""
    is_audio = mask[:, 0]
    text = hf.embed_text_tokens(tokens[:, -1])
    audio = hf.backbone_model.embed_tokens(tokens[None, :, :K])[0]
    return torch.where(is_audio[:, None], audio, text)[None]


@pytest.mark.parametrize("with_context", [False, True])
def test_codebook0_logits_match(hf_tiny, with_context):
    hf, folder = hf_tiny
    model = load_seseme(folder)
    model.setup_caches(1)
    tokens, mask = prompt_frames(1, with_context)
    with torch.no_grad():
        expected = hf(inputs_embeds=transformers_embeds(hf, tokens, mask)).logits[0]
        positions = torch.arange(tokens.shape[0]).unsqueeze(0)
        hidden = model.backbone(model.embed_frames(tokens[None], mask[None]), positions)
        got = model.c0_head(hidden)[0]
    assert got.shape == expected.shape == (tokens.shape[0], V)
    torch.testing.assert_close(got, expected, **FP32_TOL)


def test_depth_decoder_logits_match(hf_tiny):
    hf, folder = hf_tiny
    model = load_seseme(folder)
    model.setup_caches(3)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 64, generator=g)
    codes = torch.randint(0, 2048, (3, K - 1), generator=g)
    with torch.no_grad():
        input_ids = torch.cat([torch.zeros(3, 1, dtype=torch.long), codes], dim=1)  # slot 0 = backbone state
        expected = hf.depth_decoder(input_ids=input_ids, backbone_last_hidden_state=hidden).logits
        got = model.depth_logits(hidden, codes)
    assert got.shape == expected.shape == (3, K - 1, V)
    torch.testing.assert_close(got, expected, **FP32_TOL)


@pytest.mark.parametrize("with_context", [False, True])
def test_greedy_generation_matches(hf_tiny, with_context):
    hf, folder = hf_tiny
    model = load_seseme(folder)
    model.setup_caches(1)
    tokens, mask = prompt_frames(3, with_context)
    frames = 6
    with torch.no_grad():
        expected = hf.generate(
            inputs_embeds=transformers_embeds(hf, tokens, mask), max_new_tokens=frames, do_sample=False,
            depth_decoder_do_sample=False, depth_decoder_max_new_tokens=K - 1, depth_decoder_min_new_tokens=K - 1,
        )
    expected = expected[0] if expected.dim() == 3 else expected
    got = generate_frames(model, tokens, mask, frames, temperature=0.0, topk=1)
    assert expected.shape == (frames, K)
    assert torch.equal(got, expected)


def test_tied_audio_embeddings_checkpoint_loads_the_shared_table(tmp_path):
    hf = make_transformers_model(seed=5, tie_codebooks_embeddings=True)
    hf.save_pretrained(tmp_path)
    from conftest import byte_level_tokenizer

    byte_level_tokenizer().save_pretrained(tmp_path)
    model = load_seseme(tmp_path)
    table = hf.backbone_model.embed_tokens.embed_audio_tokens.weight
    torch.testing.assert_close(model.depth_audio_embed.weight, hf.depth_decoder.model.embed_tokens.weight)
    torch.testing.assert_close(model.audio_embed.weight, table)


def test_untied_tables_stay_distinct(hf_tiny):
    hf, folder = hf_tiny
    model = load_seseme(folder)
    assert not torch.equal(model.audio_embed.weight, model.depth_audio_embed.weight)
    torch.testing.assert_close(model.depth_audio_embed.weight, hf.depth_decoder.model.embed_tokens.weight)
    assert model.text_embed.weight.shape == (TEXT_VOCAB, 64)

"""An original-format (torchtune names, interleaved q/k rows) checkpoint loads to the same model."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from conftest import TEXT_VOCAB, byte_level_tokenizer
from seseme_cli.model.checkpoints import MIMI_FILE, load_checkpoint
from seseme_cli.api import build_model

K = 32


def halves_to_interleaved(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of the loader's permutation, written independently: old row 2j = new row j, old 2j+1 = new hd/2+j."""
    rows, cols = w.shape
    hd = rows // num_heads
    out = torch.empty_like(w)
    for h in range(num_heads):
        for j in range(hd // 2):
            out[h * hd + 2 * j] = w[h * hd + j]
            out[h * hd + 2 * j + 1] = w[h * hd + hd // 2 + j]
    return out


def to_torchtune_names(model) -> dict[str, torch.Tensor]:
    """seseme's weights written as the original SesameAILabs/csm Model's state dict."""
    out = {
        "text_embeddings.weight": model.text_embed.weight,
        "audio_embeddings.weight": model.audio_embed.weight,
        "projection.weight": model.projection.weight,
        "codebook0_head.weight": model.c0_head.weight,
        "audio_head": model.audio_head,
        "backbone.norm.scale": model.backbone.norm.weight,
        "decoder.norm.scale": model.depth.norm.weight,
    }
    for ours, theirs in (("backbone", "backbone"), ("depth", "decoder")):
        body = getattr(model, ours)
        for i, layer in enumerate(body.layers):
            p = f"{theirs}.layers.{i}."
            out[p + "attn.q_proj.weight"] = halves_to_interleaved(layer.attn.q_proj.weight, body.cfg.num_heads)
            out[p + "attn.k_proj.weight"] = halves_to_interleaved(layer.attn.k_proj.weight, body.cfg.num_kv_heads)
            out[p + "attn.v_proj.weight"] = layer.attn.v_proj.weight
            out[p + "attn.output_proj.weight"] = layer.attn.o_proj.weight
            out[p + "mlp.w1.weight"] = layer.mlp.gate.weight
            out[p + "mlp.w3.weight"] = layer.mlp.up.weight
            out[p + "mlp.w2.weight"] = layer.mlp.down.weight
            out[p + "sa_norm.scale"] = layer.attn_norm.weight
            out[p + "mlp_norm.scale"] = layer.mlp_norm.weight
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def write_original(folder, model, as_ckpt_pt: bool):
    state = to_torchtune_names(model)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"backbone_flavor": "seseme-tiny-backbone", "decoder_flavor": "seseme-tiny-decoder",
              "text_vocab_size": TEXT_VOCAB, "audio_vocab_size": 2051, "audio_num_codebooks": K}
    (folder / "config.json").write_text(json.dumps(config))
    if as_ckpt_pt:
        torch.save(state, folder / "ckpt.pt")
    else:
        save_file(state, str(folder / "model.safetensors"))
    byte_level_tokenizer().save_pretrained(folder)
    (folder / MIMI_FILE).write_bytes(b"")  # present, so the loader does not reach for the hub; not read here


def test_original_format_gives_the_same_outputs(tmp_path):
    ref = build_model(load_checkpoint("tiny-random", seed=3), torch.device("cpu"), torch.float32)
    # The original decoder embeds codes with the backbone's table: make the reference agree.
    ref.depth_audio_embed.weight.data.copy_(ref.audio_embed.weight)
    for as_ckpt_pt in (False, True):
        folder = tmp_path / ("pt" if as_ckpt_pt else "st")
        write_original(folder, ref, as_ckpt_pt)
        loaded = build_model(load_checkpoint(str(folder)), torch.device("cpu"), torch.float32)
        ref.setup_caches(2)
        loaded.setup_caches(2)
        g = torch.Generator().manual_seed(4)
        tokens = torch.randint(0, 2048, (2, 5, K + 1), generator=g)
        tokens[..., -1] %= TEXT_VOCAB
        mask = torch.rand(2, 5, K + 1, generator=g) > 0.5
        positions = torch.arange(5).expand(2, 5)
        hidden = torch.randn(2, 64, generator=g)
        codes = torch.randint(0, 2048, (2, K - 1), generator=g)
        with torch.no_grad():
            torch.testing.assert_close(loaded.backbone_hidden(tokens, mask, positions), ref.backbone_hidden(tokens, mask, positions),
                                       rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(loaded.depth_logits(hidden, codes), ref.depth_logits(hidden, codes), rtol=1e-4, atol=1e-4)


def test_permutation_matters(tmp_path):
    """Loading interleaved rows without the permutation would change the outputs: the test can fail."""
    ref = build_model(load_checkpoint("tiny-random", seed=3), torch.device("cpu"), torch.float32)
    q = ref.backbone.layers[0].attn.q_proj.weight
    assert not torch.equal(halves_to_interleaved(q, 4), q)

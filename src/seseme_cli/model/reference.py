"""The CSM model in plain PyTorch: the reference path every fast path is checked against.

Layout (one internal choice for both checkpoint formats): Llama blocks with pre-RMSNorm, GQA attention,
SwiGLU MLP, and RoPE that rotates halves of each head (transformers' layout; original-format q/k rows are
permuted on load). Static KV caches are allocated once by `setup_caches`; every call writes its keys and
values at explicit positions, and a query at position p sees cache slots 0..p, so the depth decoder's
"reset every frame" is just writing from position 0 again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seseme_cli.model.config import CsmConfig, RopeScaling, TransformerConfig
from seseme_cli.ops.rmsnorm import rms_norm_ref


def sample_topk(logits: torch.Tensor, temperature: float, topk: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The original's sampling, in plain PyTorch: logits (B, V) -> ids (B,) int64. logits / temperature, keep every
    logit >= the k-th largest (ties stay in), softmax, then an exponential race argmax(p / E), E ~ Exp(1), which picks
    i with probability p_i without a host sync. temperature <= 0 or topk == 1: greedy. (The engine samples with
    ops.sampling's Philox kernel: the same distribution, another random stream.)"""
    if temperature <= 0 or topk == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if topk < logits.shape[-1]:
        kth_largest = torch.topk(logits, topk, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,), with Llama-3 scaling as transformers computes it."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_ref(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.dim, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=False)
        self.k_cache: torch.Tensor | None = None  # (B, max_seq_len, kv_heads, head_dim)
        self.v_cache: torch.Tensor | None = None

    def setup_cache(self, batch_size: int, device, dtype) -> None:
        shape = (batch_size, self.cfg.max_seq_len, self.cfg.num_kv_heads, self.cfg.head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)

    def forward(self, x, cos, sin, positions, mask, cache_rows):
        """x (B, T, dim); cos/sin (B, T, head_dim); positions (B, T); mask (B, 1, T, S) bool over the first S
        cache slots (S <= max_seq_len); cache_rows (B,): the cache row each batch row reads and writes."""
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, self.cfg.num_heads, hd)
        k = self.k_proj(x).view(B, T, self.cfg.num_kv_heads, hd)
        v = self.v_proj(x).view(B, T, self.cfg.num_kv_heads, hd)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        rows = cache_rows.unsqueeze(1)
        self.k_cache[rows, positions] = k
        self.v_cache[rows, positions] = v
        # (B, heads, S, hd); KV head h serves query heads h*rep .. h*rep+rep-1, as in transformers' repeat_kv.
        rep = self.cfg.num_heads // self.cfg.num_kv_heads
        S = mask.shape[-1]
        keys = self.k_cache[cache_rows, :S].transpose(1, 2).repeat_interleave(rep, dim=1)
        values = self.v_cache[cache_rows, :S].transpose(1, 2).repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, positions, mask, cache_rows):
        x = x + self.attn(self.attn_norm(x), cos, sin, positions, mask, cache_rows)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """A Llama body: blocks + final norm, no embeddings or head. Returns normed hidden states."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False)

    def reset_buffers(self, device) -> None:
        """Recompute the derived buffers (after loading on the meta device)."""
        cfg = self.cfg
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)

    def setup_cache(self, batch_size: int, device, dtype) -> None:
        for layer in self.layers:
            layer.attn.setup_cache(batch_size, device, dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache_rows: torch.Tensor | None = None,
                kv_len: int | None = None) -> torch.Tensor:
        """x (B, T, dim), positions (B, T) int64 -> (B, T, dim). Batch row b uses cache row cache_rows[b]
        (default b). kv_len: attend over only the first kv_len cache slots (all positions must be below it);
        a prefill that knows its length saves reading the whole window."""
        if cache_rows is None:
            cache_rows = torch.arange(x.shape[0], device=x.device)
        angles = positions.unsqueeze(-1).float() * self.inv_freq.float()  # fp32, like transformers
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        slots = torch.arange(kv_len or self.cfg.max_seq_len, device=x.device)
        mask = (slots <= positions.unsqueeze(-1)).unsqueeze(1)
        for layer in self.layers:
            x = layer(x, cos, sin, positions, mask, cache_rows)
        return self.norm(x)


class CsmModel(nn.Module):
    """Backbone + depth decoder + embeddings and heads. Parameter names are seseme's own (see checkpoints)."""

    def __init__(self, cfg: CsmConfig):
        super().__init__()
        self.cfg = cfg
        K, V = cfg.num_codebooks, cfg.audio_vocab_size
        self.text_embed = nn.Embedding(cfg.text_vocab_size, cfg.backbone.dim)
        self.audio_embed = nn.Embedding(K * V, cfg.backbone.dim)
        # The depth decoder embeds codes with its own table (a copy of audio_embed in real checkpoints).
        self.depth_audio_embed = nn.Embedding(K * V, cfg.backbone.dim)
        self.backbone = Transformer(cfg.backbone)
        self.c0_head = nn.Linear(cfg.backbone.dim, V, bias=False)
        self.projection = nn.Linear(cfg.backbone.dim, cfg.depth.dim, bias=False)
        self.depth = Transformer(cfg.depth)
        self.audio_head = nn.Parameter(torch.empty(K - 1, cfg.depth.dim, V))
        self.register_buffer("codebook_offsets", torch.arange(K) * V, persistent=False)

    def reset_buffers(self, device) -> None:
        """Recompute the derived buffers (after loading on the meta device)."""
        self.backbone.reset_buffers(device)
        self.depth.reset_buffers(device)
        self.codebook_offsets = torch.arange(self.cfg.num_codebooks, device=device) * self.cfg.audio_vocab_size

    def setup_caches(self, batch_size: int) -> None:
        p = self.c0_head.weight
        self.backbone.setup_cache(batch_size, p.device, p.dtype)
        self.depth.setup_cache(batch_size, p.device, p.dtype)

    @property
    def cache_batch_size(self) -> int:
        cache = self.backbone.layers[0].attn.k_cache
        return 0 if cache is None else cache.shape[0]

    def embed_frames(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens, mask (B, T, K+1): K audio codes then the text token -> (B, T, dim).

        A frame's embedding is the sum of its unmasked columns' embeddings.
        """
        text = self.text_embed(tokens[..., -1]) * mask[..., -1:]
        audio = self.audio_embed(tokens[..., :-1] + self.codebook_offsets)
        audio = (audio * mask[..., :-1].unsqueeze(-1)).sum(dim=2)
        return audio + text

    def backbone_hidden(self, tokens, mask, positions, kv_len: int | None = None) -> torch.Tensor:
        """Run the backbone over new frames; returns the normed hidden state of each row's last frame (B, dim)."""
        h = self.backbone(self.embed_frames(tokens, mask).to(self.c0_head.weight.dtype), positions, kv_len=kv_len)
        return h[:, -1]

    def depth_logits(self, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced depth decoder: hidden (B, dim), codes (B, K-1) = codebooks 0..K-2 -> (B, K-1, V)
        logits for codebooks 1..K-1. Used by tests; generation goes step by step in `generate_frame`."""
        K = self.cfg.num_codebooks
        code_embeds = self.depth_audio_embed(codes + self.codebook_offsets[: K - 1])
        x = self.projection(torch.cat([hidden.unsqueeze(1), code_embeds], dim=1))
        positions = torch.arange(K, device=x.device).expand(x.shape[0], K)
        h = self.depth(x, positions)[:, 1:]  # position i (1..K-1) predicts codebook i
        return torch.einsum("bkd,kdv->bkv", h, self.audio_head)

    @torch.inference_mode()
    def generate_frame(self, tokens, mask, positions, temperature: float, topk: int, generator=None,
                       kv_len: int | None = None) -> torch.Tensor:
        """One audio frame: backbone over the new frames, codebook 0 from its head, codebooks 1..K-1 from the
        depth decoder one at a time. Returns codes (B, K) int64. kv_len: see Transformer.forward."""
        K, V = self.cfg.num_codebooks, self.cfg.audio_vocab_size
        hidden = self.backbone_hidden(tokens, mask, positions, kv_len)
        code = sample_topk(self.c0_head(hidden), temperature, topk, generator)
        codes = [code]
        B = hidden.shape[0]
        depth_in = torch.stack([hidden, self.depth_audio_embed(code)], dim=1)
        depth_pos = torch.arange(2, device=hidden.device).expand(B, 2)
        for i in range(1, K):
            h = self.depth(self.projection(depth_in), depth_pos)[:, -1]
            code = sample_topk(h @ self.audio_head[i - 1], temperature, topk, generator)
            codes.append(code)
            depth_in = self.depth_audio_embed(code + i * V).unsqueeze(1)
            depth_pos = depth_pos[:, -1:] + 1
        return torch.stack(codes, dim=1)


def generate_frames(model: CsmModel, tokens, mask, max_frames: int, temperature: float, topk: int, generator=None):
    """The reference frame loop for one prompt (tests and the baseline benchmark, not a product path): codes
    (frames, K) on the CPU, stopping before the first all-zero frame (the original's EOS, dropped)."""
    device = model.c0_head.weight.device
    K = model.cfg.num_codebooks
    tokens, mask = tokens.unsqueeze(0).to(device), mask.unsqueeze(0).to(device)
    positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0)
    kv_len = tokens.shape[1]  # the host knows how far the cache is filled: attend over just that
    frame_mask = torch.zeros(1, 1, K + 1, dtype=torch.bool, device=device)
    frame_mask[..., :K] = True
    text_column = torch.zeros(1, 1, dtype=torch.long, device=device)
    frames = []
    with torch.inference_mode():
        for _ in range(max_frames):
            codes = model.generate_frame(tokens, mask, positions, temperature, topk, generator, kv_len=kv_len)
            if bool((codes == 0).all()):
                break
            frames.append(codes[0].cpu())
            kv_len += 1
            tokens, mask = torch.cat([codes, text_column], dim=1).unsqueeze(1), frame_mask
            positions = positions[:, -1:] + 1
    return torch.stack(frames) if frames else torch.zeros(0, K, dtype=torch.long)

"""Top-k + temperature sampling without host syncs (the reference; the fused kernel comes with the engine).

Same distribution as the original CSM code: logits / temperature, keep every logit >= the k-th largest
(ties at the k-th value stay in), softmax, then sample with an exponential race: argmax(p / E) with
E ~ Exp(1) picks index i with probability p_i and needs no `.item()`, so the frame loop never waits on the host.
"""

from __future__ import annotations

import torch


def sample_topk(
    logits: torch.Tensor,
    temperature: float,
    topk: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> sampled ids (B,) int64. temperature <= 0 or topk == 1 means greedy (argmax)."""
    if temperature <= 0 or topk == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if topk < logits.shape[-1]:
        kth_largest = torch.topk(logits, topk, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)

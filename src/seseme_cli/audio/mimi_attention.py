"""Mimi's streaming attention on ops.masked_attention: a torch function mode, entered while the audio decoder's CUDA
graphs are captured (audio.rows), that answers moshi's `F.scaled_dot_product_attention(q, k, v, mask)` calls
with the kernel when they fit it (a boolean mask, no dropout, few queries over a short cache, fp32 on the GPU)
and passes every other call on unchanged. A mode rather than a patched moshi: it is local to the thread that
enters it and to the capture, and moshi's code stays as it is everywhere else (the codec's encoder, eager
decodes). Graph replays then run the kernel without any Python.

SESEME_MIMI_ATTENTION=torch keeps PyTorch's attention (A/B timing, `scripts/mimi_probe.py`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from seseme_cli.ops.masked_attention import check_masked_attention_args, masked_attention, masked_attention_applies


def wanted() -> bool:
    return os.environ.get("SESEME_MIMI_ATTENTION", "kernel") != "torch"


class MimiAttention(TorchFunctionMode):
    """Inside `with MimiAttention():`, fitting scaled_dot_product_attention calls run ops.masked_attention."""

    def __init__(self):
        super().__init__()
        self.calls = 0  # calls the kernel took (a test and the probe check that Mimi's did)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            taken = self._attention(*args, **kwargs)
            if taken is not None:
                self.calls += 1
                return taken
        return func(*args, **kwargs)

    @staticmethod
    def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
        if attn_mask is None or attn_mask.dtype != torch.bool or dropout_p or is_causal or enable_gqa:
            return None
        try:
            check_masked_attention_args(query, key, value, attn_mask, None)
        except ValueError:
            return None
        if not masked_attention_applies(query, key, value, attn_mask):
            return None
        return masked_attention(query, key, value, attn_mask, scale)  # laid out so moshi's rearrange is a view

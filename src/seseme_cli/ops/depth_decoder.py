"""The depth decoder's one-token steps of a frame in one persistent kernel launch (cuda/depth_decoder.cu).

    depth_steps(stack, heads, embed, h, codes, temperature, topk, seeds, counters, first_step,
                qkv=..., attn=..., act=..., logits=..., barrier=...)

runs, for the n rows of h and each step i = first_step .. K-1 (K = codes.shape[0]):

    the stack's layers over h at position i (cache row r for row r, attending to slots 0..i, writing slot i)
    logits = heads[i - 1] @ rms_norm(h, stack.norm)
    codes[i, :n] = sample_topk_philox(logits, temperature, topk, seeds, counters, codebook=i)  (or forced[i, :n])
    h = embed[i * V + codes[i, :n]]                                        (for i < K - 1: the next step's input)

which is what the engine's frame did with ~26 kernels per step (engine/frame.py). `depth_steps_ref` is the same in
plain PyTorch, composed of the ops' references; the kernel runs where `kernel_applies` says so, the reference
everywhere else, with the same result up to fp32 summation order.
"""

from __future__ import annotations

import torch

from seseme_cli.ops.kernels import dtype_code, has_cuda_kernels, kernels_module, stream_handle
from seseme_cli.ops.linear import linear_ref, swiglu_linear_ref
from seseme_cli.ops.sampling import sample_topk_philox_ref
from seseme_cli.ops.short_attention import rope_append_attention_ref

Tensor = torch.Tensor

KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def depth_steps(stack, heads: Tensor, embed: Tensor, h: Tensor, codes: Tensor, temperature: Tensor, topk: Tensor,
                seeds: Tensor, counters: Tensor, first_step: int, *, qkv: Tensor, attn: Tensor, act: Tensor,
                logits: Tensor, barrier: Tensor, forced: Tensor | None = None, blocks: int | None = None) -> None:
    """Depth steps first_step..K-1 for the rows of h (see the module docstring), in place.

    stack: the depth stack's weights with .layers (each with attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down,
    k_cache, v_cache as engine.pack.LayerWeights packs them), .norm, .inv_freq and .eps. heads (K-1, V, D) with
    contiguous rows; embed (K * V, D), the projected depth embedding; h (n, D) contiguous, the input of step
    first_step (left holding the last step's residual stream); codes (K, >= n) int64, rows first_step.. written;
    temperature, topk, seeds, counters: the sampling settings of ops.sampling, (n,) each.
    qkv (>= n, q + 2 kv), attn (>= n, H, hd) and act (>= n, ffn) are scratch; logits (n, V) receives each step's
    logits in turn, or (K, n, V) keeps step i's at logits[i]; barrier: 2 int32, the first (the arrival count) zero,
    which the kernel leaves zero while it moves the second (the barrier's generation) on; one launch at a time per
    barrier. forced (K, >= n) int64: the codes to take instead of the draws (teacher forcing). blocks: the
    kernel's grid (None: one block per SM), for tests.
    """
    _check_args(stack, heads, embed, h, codes, temperature, topk, seeds, counters, first_step, qkv, attn, act,
                logits, barrier, forced)
    if not kernel_applies(stack, heads, embed, h, codes, first_step, logits, forced):
        depth_steps_ref(stack, heads, embed, h, codes, temperature, topk, seeds, counters, first_step, qkv=qkv,
                        attn=attn, act=act, logits=logits, barrier=barrier, forced=forced, blocks=blocks)
        return
    n, D = h.shape
    K, V = codes.shape[0], heads.shape[1]
    layer0 = stack.layers[0]
    _, S, Hkv, hd = layer0.k_cache.shape
    H, ffn = layer0.wo.shape[1] // hd, layer0.w_down.shape[1]  # the weights' (_check_args: the scratch's too)
    layers = [(l.attn_norm.data_ptr(), l.wqkv.data_ptr(), l.wo.data_ptr(), l.mlp_norm.data_ptr(),
               l.w_gate_up.data_ptr(), l.w_down.data_ptr(), l.k_cache.data_ptr(), l.v_cache.data_ptr())
              for l in stack.layers]
    kernels_module().depth_steps(
        layers, stack.norm.data_ptr(), heads.data_ptr(), heads.stride(0), embed.data_ptr(), stack.inv_freq.data_ptr(),
        h.data_ptr(), qkv.data_ptr(), attn.data_ptr(), act.data_ptr(), logits.data_ptr(),
        logits.stride(0) if logits.dim() == 3 else 0, codes.data_ptr(), codes.stride(0),
        0 if forced is None else forced.data_ptr(), 0 if forced is None else forced.stride(0),
        temperature.data_ptr(), topk.data_ptr(), seeds.data_ptr(), counters.data_ptr(), barrier.data_ptr(),
        float(stack.eps), hd ** -0.5, n, D, H, Hkv, hd, ffn, V, first_step, K, S,
        layer0.k_cache.shape[0], dtype_code(h.dtype), blocks or 0, stream_handle(h.device.index or 0))


def depth_steps_ref(stack, heads: Tensor, embed: Tensor, h: Tensor, codes: Tensor, temperature: Tensor,
                    topk: Tensor, seeds: Tensor, counters: Tensor, first_step: int, *, qkv: Tensor, attn: Tensor,
                    act: Tensor, logits: Tensor, barrier: Tensor, forced: Tensor | None = None,
                    blocks: int | None = None) -> None:
    """`depth_steps` in plain PyTorch, op by op as the engine's frame runs a step (barrier and blocks unused)."""
    n, K, V = h.shape[0], codes.shape[0], heads.shape[1]
    rows = torch.arange(n, device=h.device)
    qkv, attn, act = qkv[:n], attn[:n], act[:n]
    xn = torch.empty_like(h)  # each norm's output (the kernel keeps it in shared memory)
    for i in range(first_step, K):
        positions = torch.full((n,), i, dtype=torch.long, device=h.device)
        for layer in stack.layers:
            linear_ref(h, layer.wqkv, out=qkv, norm_weight=layer.attn_norm, norm_eps=stack.eps, norm_out=xn)
            rope_append_attention_ref(qkv, positions, rows, positions + 1, stack.inv_freq, layer.k_cache,
                                      layer.v_cache, attn)
            linear_ref(attn.view(n, -1), layer.wo, out=h, residual=h)
            swiglu_linear_ref(h, layer.w_gate_up, out=act, norm_weight=layer.mlp_norm, norm_eps=stack.eps,
                              norm_out=xn)
            linear_ref(act, layer.w_down, out=h, residual=h)
        step_logits = logits[i] if logits.dim() == 3 else logits
        linear_ref(h, heads[i - 1], out=step_logits, norm_weight=stack.norm, norm_eps=stack.eps, norm_out=xn)
        drawn = sample_topk_philox_ref(step_logits, temperature, topk, seeds, counters, i)
        codes[i, :n] = drawn if forced is None else forced[i, :n]
        if i < K - 1:
            h.copy_(embed[i * V + codes[i, :n]])


def kernel_applies(stack, heads: Tensor, embed: Tensor, h: Tensor, codes: Tensor, first_step: int, logits: Tensor,
                   forced: Tensor | None) -> bool:
    """Whether `depth_steps` launches the kernel for these arguments (already checked)."""
    if not (has_cuda_kernels() and h.is_cuda and h.dtype in KERNEL_DTYPES):
        return False
    layer0 = stack.layers[0]
    cache_batch, S, Hkv, hd = layer0.k_cache.shape
    H = layer0.wo.shape[1] // hd
    error = kernels_module().depth_steps_shape_error(
        h.shape[0], len(stack.layers), h.shape[1], H, Hkv, hd, layer0.w_down.shape[1], heads.shape[1], first_step,
        codes.shape[0], S, cache_batch, dtype_code(h.dtype))
    if error is not None:
        return False
    # The kernel takes layer 0's shapes for every layer, and h's type for every 16-bit tensor it reads or writes.
    D, q, kv, ffn = h.shape[1], H * hd, Hkv * hd, layer0.w_down.shape[1]
    same_layers = all(
        l.wqkv.shape == (q + 2 * kv, D) and l.wo.shape == (D, q) and l.w_gate_up.shape == (2 * ffn, D)
        and l.w_down.shape == (D, ffn) and l.attn_norm.shape == (D,) and l.mlp_norm.shape == (D,)
        and l.k_cache.shape == layer0.k_cache.shape and l.v_cache.shape == layer0.k_cache.shape
        for l in stack.layers)
    # One attention block per (head, row) must be resident beside the others (the grid is one block per SM).
    fits_grid = H * h.shape[0] <= torch.cuda.get_device_properties(h.device).multi_processor_count
    tensors = [heads, embed, h, logits, stack.norm]
    for layer in stack.layers:
        tensors += [layer.attn_norm, layer.wqkv, layer.wo, layer.mlp_norm, layer.w_gate_up, layer.w_down,
                    layer.k_cache, layer.v_cache]
    same_dtype = (all(t.dtype == h.dtype for t in tensors) and stack.inv_freq.dtype == torch.float32
                  and stack.inv_freq.shape == (hd // 2,))
    tensors.append(stack.inv_freq)
    # heads' rows are read 16 bytes at a time from heads + (i - 1) * stride(0)
    rows_contiguous = heads.stride(2) == 1 and heads.stride(1) == D and heads.stride(0) % 8 == 0
    aligned = all(t.data_ptr() % 16 == 0 for t in tensors)
    contiguous = all(t.is_contiguous() for t in tensors if t is not heads) and rows_contiguous
    no_autograd = not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))  # the kernel has no backward
    return (same_layers and fits_grid and same_dtype and aligned and contiguous and no_autograd
            and codes.stride(1) == 1 and (forced is None or forced.stride(1) == 1))


def _check_args(stack, heads, embed, h, codes, temperature, topk, seeds, counters, first_step, qkv, attn, act,
                logits, barrier, forced) -> None:
    """ValueError naming the first argument that does not fit the others."""
    if h.dim() != 2:
        raise ValueError(f"depth_steps: h must be (n, dim), got {tuple(h.shape)}")
    n, D = h.shape
    if codes.dim() != 2 or codes.dtype != torch.int64 or codes.shape[1] < n:
        raise ValueError(f"depth_steps: codes must be int64 (K, >= {n}), got {codes.dtype} {tuple(codes.shape)}")
    K = codes.shape[0]
    if heads.dim() != 3 or heads.shape[0] != K - 1 or heads.shape[2] != D:
        raise ValueError(f"depth_steps: heads must be ({K - 1}, V, {D}), got {tuple(heads.shape)}")
    V = heads.shape[1]
    if tuple(embed.shape) != (K * V, D):
        raise ValueError(f"depth_steps: embed must be ({K * V}, {D}), got {tuple(embed.shape)}")
    if not 1 <= first_step < K:
        raise ValueError(f"depth_steps: first_step must be in [1, {K}), got {first_step}")
    if not stack.layers:
        raise ValueError("depth_steps: the stack has no layers")
    if logits.shape[-2:] != (n, V) or logits.dim() not in (2, 3) or (logits.dim() == 3 and logits.shape[0] != K):
        raise ValueError(f"depth_steps: logits must be ({n}, {V}) or ({K}, {n}, {V}), got {tuple(logits.shape)}")
    for name, t, dtype in (("temperature", temperature, torch.float32), ("topk", topk, torch.int32),
                           ("seeds", seeds, torch.int64), ("counters", counters, torch.int64)):
        if t.shape != (n,) or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"depth_steps: {name} must be contiguous {dtype} ({n},), got {t.dtype} {tuple(t.shape)}")
    layer0 = stack.layers[0]
    _, _, Hkv, hd = layer0.k_cache.shape
    H, ffn = layer0.wo.shape[1] // hd, layer0.w_down.shape[1]
    for name, t, row in (("qkv", qkv, ((H + 2 * Hkv) * hd,)), ("attn", attn, (H, hd)), ("act", act, (ffn,))):
        if t.shape[0] < n or tuple(t.shape[1:]) != row or t.dtype != h.dtype or not t.is_contiguous():
            raise ValueError(f"depth_steps: {name} must be contiguous {h.dtype} (>= {n}, "
                             f"{', '.join(map(str, row))}), got {t.dtype} {tuple(t.shape)}")
    if barrier.shape != (2,) or barrier.dtype != torch.int32 or not barrier.is_contiguous():
        raise ValueError(f"depth_steps: barrier must be int32 (2,), got {barrier.dtype} {tuple(barrier.shape)}")
    if forced is not None and (forced.dtype != torch.int64 or forced.dim() != 2 or forced.shape[0] != K
                               or forced.shape[1] < n):
        raise ValueError(f"depth_steps: forced must be int64 ({K}, >= {n}), got {forced.dtype} {tuple(forced.shape)}")
    tensors = [heads, embed, h, codes, temperature, topk, seeds, counters, qkv, attn, act, logits, barrier]
    if any(t.device != h.device for t in tensors) or (forced is not None and forced.device != h.device):
        raise ValueError("depth_steps: all tensors must be on h's device")

"""One whole audio frame as a fixed sequence of kernel calls on static buffers: capturable in a CUDA graph.

A frame, for every active row: the backbone consumes the embedding of the row's previous frame (or of its
last prompt frame) at the row's position, codebook 0 is sampled from its head, the depth decoder runs 31
steps (step 0 holds two tokens per row: the backbone state and codebook 0's embedding), and the sampled frame
is embedded for the next backbone step. All memory is allocated in `FrameBuffers` once; nothing here
allocates or syncs the host, so `run` can be captured once per batch bucket and replayed.
"""

from __future__ import annotations

import logging
import os

import torch

from seseme_cli.model.config import CsmConfig, TransformerConfig
from seseme_cli.ops.attention import attention_workspace, decode_attention, max_num_splits, rope_append
from seseme_cli.ops.depth_decoder import depth_steps, kernel_applies as depth_kernel_applies
from seseme_cli.ops.embedding import embed_codes
from seseme_cli.ops.linear import linear, swiglu_linear
from seseme_cli.ops.linear_config import MMA_MAX_N, linear_workspace_bytes
from seseme_cli.ops.linear_fp8 import linear_fp8, swiglu_linear_fp8
from seseme_cli.ops.rmsnorm import rms_norm
from seseme_cli.ops.short_attention import rope_append_attention, short_attention_fits
from seseme_cli.ops.sampling import sample_topk_philox
from seseme_cli.engine.tuning import tuned_config
from seseme_cli.engine.pack import EngineWeights, Fp8Weight, StackWeights, padded_vocab

log = logging.getLogger("seseme")

# The depth decoder's one-token steps run RoPE + append + attention as one kernel (ops.short_attention's
# rope_append_attention) where the shape allows; False = the two kernels (for A/B timing).
FUSED_SHORT_ATTENTION = True

# At batches the persistent depth decoder takes (ops.depth_decoder, up to 4 rows), depth steps 2..K-1 can be one
# launch of it instead of ~26 kernels each. Off until it has run on a GPU (written in a session whose device calls
# found no machine): SESEME_PERSISTENT_DEPTH=1 in the environment turns it on.
PERSISTENT_DEPTH = os.environ.get("SESEME_PERSISTENT_DEPTH", "0") == "1"

# Weights packed as fp8: projections of at most this many rows run the fp8 GEMV (ops.linear_fp8) on the e4m3
# copy; larger ones (prefill chunks, depth step 0 at batch > 4, batches > 8) the bf16 kernels on the dequantized
# copy, the same model. 8 is the GEMV's limit; a lower value keeps buckets where fp8 does not pay on bf16
# (not yet measured on a GPU). 0 = never (A/B timing).
FP8_MAX_N = 8


def uses_fp8(fp8, n: int) -> bool:
    """Whether a projection of n rows with this Fp8Weight (or None) runs the fp8 GEMV."""
    return fp8 is not None and n <= FP8_MAX_N


def project(x: torch.Tensor, weight: torch.Tensor, fp8: Fp8Weight | None, out: torch.Tensor, ws, tuned: dict,
            residual: torch.Tensor | None = None, swiglu: bool = False, **norm) -> torch.Tensor:
    """out = x (n, k) @ weight.T (+ residual), or its SwiGLU: the fp8 GEMV on `fp8` (the same matrix in e4m3)
    where uses_fp8, else ops.linear on weight with its tuned launch config. norm: the fused RMSNorm's keywords."""
    if uses_fp8(fp8, x.shape[0]):
        if swiglu:
            return swiglu_linear_fp8(x, fp8.w8, fp8.scale, out=out, **norm)
        return linear_fp8(x, fp8.w8, fp8.scale, out=out, residual=residual, **norm)
    if swiglu:
        return swiglu_linear(x, weight, out=out, workspace=ws, **norm, **tuned)
    return linear(x, weight, out=out, residual=residual, workspace=ws, **norm, **tuned)


class StackBuffers:
    """Activations of one transformer stack for up to `rows` query rows."""

    def __init__(self, cfg: TransformerConfig, rows: int, device, dtype):
        def new(*shape):
            return torch.empty(shape, device=device, dtype=dtype)

        self.h = new(rows, cfg.dim)  # residual stream (the backbone's holds the next frame's embedding between frames)
        self.xn = new(rows, cfg.dim)  # normed input of the next projection
        self.qkv = new(rows, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim)
        self.q = new(rows, cfg.num_heads, cfg.head_dim)
        self.attn = new(rows, cfg.num_heads, cfg.head_dim)
        self.act = new(rows, cfg.ffn_dim)
        self.workspace = attention_workspace(rows, cfg.num_heads, cfg.head_dim, max_num_splits(cfg.max_seq_len), device)


class FrameBuffers:
    """Every tensor a frame touches, for up to `max_batch` rows; buckets use the leading rows."""

    def __init__(self, cfg: CsmConfig, max_batch: int, device, dtype, tuning=None):
        B, K, V = max_batch, cfg.num_codebooks, cfg.audio_vocab_size

        def new(*shape, dt=dtype):
            return torch.empty(shape, device=device, dtype=dt)

        # Per-row request state, written by the runner between frames.
        self.positions = torch.zeros(B, device=device, dtype=torch.long)  # backbone position of the frame in backbone.h
        self.lengths = torch.ones(B, device=device, dtype=torch.int32)  # = positions + 1
        self.rows = torch.arange(B, device=device, dtype=torch.int32)
        self.temperature = torch.ones(B, device=device, dtype=torch.float32)
        self.topk = torch.ones(B, device=device, dtype=torch.int32)
        self.seeds = torch.zeros(B, device=device, dtype=torch.long)
        self.counters = torch.zeros(B, device=device, dtype=torch.long)  # frames sampled so far, per row

        self.backbone = StackBuffers(cfg.backbone, B, device, dtype)
        self.depth = StackBuffers(cfg.depth, 2 * B, device, dtype)  # depth step 0 has two tokens per row
        self.logits = new(B, V)
        # Above the MMA kernel's rows the heads are cuBLAS GEMMs of the padded heads (pack.EngineWeights) into
        # logits rows of the padded width; sampling reads their first V columns.
        self.padded_logits = new(B, padded_vocab(V)) if B > MMA_MAX_N else None
        self.codes = new(K, B, dt=torch.long)  # codebook-major: each draw writes one contiguous row
        self.depth_barrier = torch.zeros(2, device=device, dtype=torch.int32)  # persistent depth decoder's barrier
        self.frame_codes = new(B, K, dt=torch.long)  # the finished frame, row-major
        # One zeroed split-K workspace serves every linear call (each call leaves it zeroed again), sized for the
        # tuned configs where there are any (a tuned config may split K more than the default).
        self.tuning = tuning  # a tuning.Tuning (from `seseme tune`) or None: the ops' built-in defaults
        need = max(linear_workspace_bytes(n, m, k, swiglu, tuned_config(tuning, "linear", n, m, k, swiglu).get("config"),
                                          device=device) for n, m, k, swiglu in linear_shapes(cfg, B))
        self.linear_workspace = torch.zeros(max(need, 16), device=device, dtype=torch.uint8)


def linear_shapes(cfg: CsmConfig, max_batch: int):
    """(rows, out features, in features, swiglu) of every linear call a frame makes, for every bucket size."""
    bb, dd, V = cfg.backbone, cfg.depth, cfg.audio_vocab_size
    for b in range(1, max_batch + 1):
        for n, t in ((b, bb), (b, dd), (2 * b, dd)):
            yield n, (t.num_heads + 2 * t.num_kv_heads) * t.head_dim, t.dim, False
            yield n, t.dim, t.num_heads * t.head_dim, False
            yield n, t.ffn_dim, t.dim, True
            yield n, t.dim, t.ffn_dim, False
        yield b, V, bb.dim, False
        yield b, V, dd.dim, False
        yield b, dd.dim, bb.dim, False


class DepthSchedule:
    """Positions, lengths and cache rows of the 31 depth steps for one bucket (constants of its graph)."""

    def __init__(self, b: int, num_codebooks: int, device):
        rows = torch.arange(b, device=device, dtype=torch.int32)
        self.first_rows = torch.cat([rows, rows])  # step 0: rows b..2b-1 hold position 1 of the same sequences
        self.first_positions = torch.cat([torch.zeros(b), torch.ones(b)]).long().to(device)
        self.first_lengths = (self.first_positions + 1).int()
        self.rows = rows
        self.positions = [torch.full((b,), i, device=device, dtype=torch.long) for i in range(num_codebooks + 1)]
        self.lengths = [(p + 1).int() for p in self.positions]


def run_stack(w: StackWeights, buf: StackBuffers, n: int, positions, lengths, cache_rows, ws, tuning=None,
              one_token_per_cache_row: bool = False, final_norm: bool = True) -> torch.Tensor:
    """The transformer layers over the first n rows of buf.h (in place) -> normed output in buf.xn[:n]
    (final_norm=False: the unnormed buf.h[:n], for a head that applies the stack's norm itself).
    one_token_per_cache_row: the rows have distinct cache rows, and positions, lengths and cache_rows are not
    written by the QKV projection (the fused short-cache attention's preconditions)."""
    h, xn, qkv, q, attn, act = buf.h[:n], buf.xn[:n], buf.qkv[:n], buf.q[:n], buf.attn[:n], buf.act[:n]
    # Tuned launch parameters ({} = the ops' defaults); every layer of a stack has the same shapes.
    H, (S, Hkv, hd) = q.shape[1], w.layers[0].k_cache.shape[1:]
    fused = FUSED_SHORT_ATTENTION and one_token_per_cache_row and short_attention_fits(H, Hkv, hd, S)
    t_qkv = tuned_config(tuning, "linear", n, qkv.shape[1], xn.shape[1], False)
    t_o = tuned_config(tuning, "linear", n, h.shape[1], H * hd, False)
    t_up = tuned_config(tuning, "linear", n, act.shape[1], xn.shape[1], True)
    t_down = tuned_config(tuning, "linear", n, h.shape[1], act.shape[1], False)
    t_rope, t_attn = tuned_config(tuning, "rope", n, H, Hkv, hd), tuned_config(tuning, "attention", n, H, Hkv, hd, S)
    t_short = tuned_config(tuning, "short_attention", n, H, Hkv, hd, S)
    for layer in w.layers:
        f = layer.fp8  # None unless the weights are packed as fp8
        # The pre-attention and pre-MLP norms run inside the projections (fused when the GEMV runs, else
        # rms_norm into xn first); xn is scratch here.
        project(h, layer.wqkv, f and f.wqkv, qkv, ws, t_qkv, norm_weight=layer.attn_norm, norm_eps=w.eps, norm_out=xn)
        if fused:
            rope_append_attention(qkv, positions, cache_rows, lengths, w.inv_freq, layer.k_cache, layer.v_cache, attn,
                                  **t_short)
        else:
            rope_append(qkv, positions, cache_rows, w.inv_freq, layer.k_cache, layer.v_cache, q, **t_rope)
            decode_attention(q, layer.k_cache, layer.v_cache, cache_rows, lengths, attn, workspace=buf.workspace,
                             **t_attn)
        project(attn.view(n, -1), layer.wo, f and f.wo, h, ws, t_o, residual=h)
        project(h, layer.w_gate_up, f and f.w_gate_up, act, ws, t_up, swiglu=True, norm_weight=layer.mlp_norm,
                norm_eps=w.eps, norm_out=xn)
        project(act, layer.w_down, f and f.w_down, h, ws, t_down, residual=h)
    if not final_norm:
        return h
    rms_norm(h, w.norm, w.eps, out=xn)
    return xn


class TeacherForcing:
    """Test hook (eager only): replace each sampled codebook by `codes` (K, b) and keep a copy of every
    codebook's logits in `logits` (K tensors of (b, vocab))."""

    def __init__(self, codes: torch.Tensor):
        self.codes = codes
        self.logits: list[torch.Tensor] = []

    def __call__(self, i: int, logits: torch.Tensor, sampled: torch.Tensor) -> None:
        self.logits.append(logits.float().clone())
        sampled.copy_(self.codes[i])


def run_frame(w: EngineWeights, buf: FrameBuffers, sched: DepthSchedule, b: int, teacher: TeacherForcing | None = None) -> None:
    """Generate one frame for rows 0..b-1 into buf.frame_codes[:b] and advance their state by one frame."""
    K, V = buf.codes.shape[0], buf.logits.shape[1]
    temperature, topk, seeds, counters = buf.temperature[:b], buf.topk[:b], buf.seeds[:b], buf.counters[:b]
    codes = buf.codes[:, :b]
    ws = buf.linear_workspace
    tuning, bb_dim, dd_dim = buf.tuning, buf.backbone.h.shape[1], buf.depth.h.shape[1]
    t_proj = tuned_config(tuning, "linear", b, dd_dim, bb_dim, False)
    if b > MMA_MAX_N:  # cuBLAS GEMMs of the padded heads into rows of the padded vocab (pack.EngineWeights)
        heads_out, c0_head, audio_heads = buf.padded_logits[:b], w.c0_head_padded, w.audio_heads_padded
        t_c0 = t_head = {}  # no kernel runs above MMA_MAX_N rows, so no launch config
    else:
        heads_out, c0_head, audio_heads = buf.logits[:b], w.c0_head, w.audio_heads
        t_c0 = tuned_config(tuning, "linear", b, V, bb_dim, False)
        t_head = tuned_config(tuning, "linear", b, V, dd_dim, False)
    logits = heads_out[:, :V]
    t_sample = tuned_config(tuning, "sampling", b, V)
    q8 = w.fp8  # None unless the weights are packed as fp8

    def sample(i: int, next_input: torch.Tensor | None) -> None:
        """Codebook i's draw into codes[i]; its projected embedding (one row of w.projected_embed: the
        projection is folded into the table) into next_input, the depth decoder's next input. The sampling
        kernel writes both, unless a teacher replaces the code first."""
        table = w.projected_embed[i * V : (i + 1) * V] if next_input is not None else None
        if teacher is None:
            sample_topk_philox(logits, temperature, topk, seeds, counters, i, codes[i], embed_table=table,
                               embed_out=next_input, **t_sample)
            return
        sample_topk_philox(logits, temperature, topk, seeds, counters, i, codes[i], **t_sample)
        teacher(i, logits, codes[i])
        if table is not None:
            embed_codes(codes[i].view(b, 1), table, next_input, V)

    # Backbone: one position per row, then codebook 0, whose embedding is the depth decoder's second token.
    hidden = run_stack(w.backbone, buf.backbone, b, buf.positions[:b], buf.lengths[:b], buf.rows[:b], ws, tuning)
    project(hidden, c0_head, q8 and q8.c0_head, heads_out, ws, t_c0)
    sample(0, buf.depth.h[b : 2 * b])

    # Depth decoder step 0: [backbone state, embedding of codebook 0] at positions 0 and 1.
    project(hidden, w.projection, q8 and q8.projection, buf.depth.h[:b], ws, t_proj)
    # The heads apply the depth decoder's final norm themselves (fused into the GEMV at small batch).
    d, dn = w.depth, buf.depth.xn
    out = run_stack(d, buf.depth, 2 * b, sched.first_positions, sched.first_lengths, sched.first_rows, ws, tuning,
                    final_norm=False)
    project(out[b:], audio_heads[0], q8 and q8.audio_heads[0], heads_out, ws, t_head, norm_weight=d.norm,
            norm_eps=d.eps, norm_out=dn[b : 2 * b])
    sample(1, buf.depth.h[:b])

    # Depth steps 2..K-1: the previous codebook's embedding at position i.
    if PERSISTENT_DEPTH and q8 is None and run_persistent_depth(w, buf, b, teacher):
        finish_frame(w, buf, b)
        return
    for i in range(2, K):
        out = run_stack(d, buf.depth, b, sched.positions[i], sched.lengths[i], sched.rows, ws, tuning,
                        one_token_per_cache_row=True, final_norm=False)
        project(out, audio_heads[i - 1], q8 and q8.audio_heads[i - 1], heads_out, ws, t_head, norm_weight=d.norm,
                norm_eps=d.eps, norm_out=dn[:b])
        sample(i, buf.depth.h[:b] if i < K - 1 else None)
    finish_frame(w, buf, b)


def run_persistent_depth(w: EngineWeights, buf: FrameBuffers, b: int, teacher: TeacherForcing | None) -> bool:
    """Depth steps 2..K-1 of rows 0..b-1 as one persistent launch (ops.depth_decoder), if the kernel takes them;
    False (nothing run) where it does not. With a teacher, its codes are forced and its logits kept."""
    global PERSISTENT_DEPTH
    K, V = buf.codes.shape[0], buf.logits.shape[1]
    h, codes, d = buf.depth.h[:b], buf.codes[:, :b], w.depth
    logits = buf.logits[:b] if teacher is None else buf.logits.new_empty(K, b, V)
    forced = None if teacher is None else teacher.codes
    if not depth_kernel_applies(d, w.audio_heads, w.projected_embed, h, codes, 2, logits, forced):
        return False
    try:
        depth_steps(d, w.audio_heads, w.projected_embed, h, codes, buf.temperature[:b], buf.topk[:b], buf.seeds[:b],
                    buf.counters[:b], 2, qkv=buf.depth.qkv, attn=buf.depth.attn, act=buf.depth.act, logits=logits,
                    barrier=buf.depth_barrier, forced=forced)
    except RuntimeError as err:  # refused at launch (its grid does not fit this GPU): nothing was written
        log.warning("persistent depth decoder unavailable (%s); running the depth steps as separate kernels",
                    str(err).splitlines()[0])
        PERSISTENT_DEPTH = False
        return False
    if teacher is not None:
        teacher.logits.extend(logits[i].float() for i in range(2, K))
    return True


def depth_decoder_path(w: EngineWeights, buf: FrameBuffers, b: int) -> str:
    """What runs depth steps 2..K-1 in a frame of b rows now (`seseme bench` reports it beside each batch)."""
    if PERSISTENT_DEPTH and w.fp8 is None and depth_kernel_applies(
            w.depth, w.audio_heads, w.projected_embed, buf.depth.h[:b], buf.codes[:, :b], 2, buf.logits[:b], None):
        return "persistent kernel"
    return "separate kernels"


def finish_frame(w: EngineWeights, buf: FrameBuffers, b: int) -> None:
    """The finished frame of rows 0..b-1: row-major codes, their embedding for the next backbone step, and the
    rows' positions, lengths and frame counters advanced."""
    codes, V = buf.codes[:, :b], buf.logits.shape[1]
    buf.frame_codes[:b].copy_(codes.T)
    embed_codes(buf.frame_codes[:b], w.audio_embed, buf.backbone.h[:b], V)
    buf.positions[:b].add_(1)
    buf.lengths[:b].add_(1)
    buf.counters[:b].add_(1)

// Launcher for the persistent depth decoder (cuda/depth_decoder.cu): depth steps first_step..K-1 of a frame for a
// few rows in one launch. Plain C++ types only, so cpp/bind_depth_decoder.cpp can include this header in a build
// without CUDA.
#pragma once

#include <cstdint>

#include "common.cuh"

constexpr int kDepthMaxRows = 4;        // rows per launch (the kernel is compiled for 1, 2 and 4)
constexpr int kDepthMaxLayers = 8;      // layers of the depth stack
constexpr int kDepthThreads = 256;      // threads per block, one block per SM
constexpr int64_t kDepthMaxCache = 64;  // cache slots (the short attention's limit)
constexpr int64_t kDepthMaxVocab = 8192;
constexpr int64_t kDepthMaxHeadDim = 128;

// One layer's weights (the engine's packed layout, engine/pack.py) and KV cache.
struct DepthLayer {
    const void* attn_norm;  // (dim,)
    const void* wqkv;       // (q + 2 kv, dim)
    const void* wo;         // (dim, q)
    const void* mlp_norm;   // (dim,)
    const void* w_gate_up;  // (2 ffn, dim): gate rows, then up rows
    const void* w_down;     // (dim, ffn)
    void* k_cache;          // (cache_batch, cache_len, kv_heads, head_dim)
    void* v_cache;
};

// Everything one launch reads and writes. Step i (first_step <= i < num_codebooks) of row r:
//   the stack over h[r] at position i (cache row r, attending to slots 0..i), which writes slot i of each layer's
//   cache; logits = heads[i - 1] @ rms_norm(h[r], final_norm); code = the draw of cuda/sampling.cuh for codebook i
//   (or forced[i * forced_stride + r] when forced is set); codes[i * codes_stride + r] = code; and, when
//   i < num_codebooks - 1, h[r] = embed[i * vocab + code] (the next step's input).
// logits: row r of step i at logits + i * logits_step_stride + r * vocab (step stride 0: one buffer for every
// step, which then holds the last step's). qkv (n, q + 2 kv), attn (n, q) and act (n, ffn) are scratch.
// barrier: two uint32 words for a grid-wide barrier between dependent phases: the arrival count, zero, which
// the kernel leaves zero, and the generation, which it moves on by one per barrier; one launch at a time may use
// them.
struct DepthStepsArgs {
    DepthLayer layers[kDepthMaxLayers];
    int num_layers;
    const void* final_norm;
    const void* heads;  // (num_codebooks - 1) heads of (vocab, dim), head j at heads + j * head_stride elements
    int64_t head_stride;
    const void* embed;  // (num_codebooks * vocab, dim)
    const float* inv_freq;  // (head_dim / 2,)
    void* h;
    void* qkv;
    void* attn;
    void* act;
    void* logits;
    int64_t logits_step_stride;
    int64_t* codes;
    int64_t codes_stride;
    const int64_t* forced;  // null: the draws
    int64_t forced_stride;
    const float* temperature;  // (n,) as cuda/sampling.cuh
    const int32_t* topk;
    const int64_t* seeds;
    const int64_t* counters;
    unsigned* barrier;
    float eps, scale;  // RMSNorm epsilon, attention scale
    int n, dim, heads_q, kv_heads, head_dim, ffn, vocab, first_step, num_codebooks, cache_len;
    int64_t cache_batch;
    int dtype;  // bf16 or fp16
};

// Why the shapes cannot run on the kernel (a static message), or nullptr. Python asks before launching.
const char* depth_steps_shape_error(int n, int num_layers, int dim, int heads_q, int kv_heads, int head_dim, int ffn,
                                    int vocab, int first_step, int num_codebooks, int64_t cache_len,
                                    int64_t cache_batch, int dtype);

// Launches the kernel on `blocks` blocks (0: one per SM of the current device). Returns nullptr on success, else a
// static error message.
const char* launch_depth_steps(const DepthStepsArgs& a, int blocks, uintptr_t stream);

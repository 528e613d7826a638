// Launcher for RoPE + KV-cache append + decode attention in one kernel, for short caches (the depth decoder's
// one-token steps), cuda/rope_append_attention.cu.
// Plain C++ types only, so cpp/bind_attention.cpp can include this header in a build without CUDA.
#pragma once

#include <cstdint>

#include "common.cuh"

// Limits of the kernel; the Python side sends anything else to the two-kernel path.
constexpr int64_t kShortAttnMaxLen = 64;       // cache slots (the whole row's K and V sit in shared memory)
constexpr int64_t kShortAttnMaxHeadDim = 128;  // head_dim % 16 == 0 too (16-byte halves for the rotation)
constexpr int kShortAttnMaxThreads = 256;      // threads per block: a multiple of 32 in [32, 256]
constexpr int kShortAttnDefaultThreads = 128;

// For each row n < rows, with p = positions[n], b = cache_rows[n], L = lengths[n] clamped to [0, cache_len]
// (0 when b is outside [0, cache_batch)), qkv row n = [q | k | v] and the rotation of cuda/rope.cuh:
//   k_cache[b, p, g] = rotated key head g;  v_cache[b, p, g] = value head g      (when 0 <= p < cache_len)
//   out[n, h] = softmax_j(scale * rot(q_h) . k_cache[b, j, h / (heads / kv_heads)]) @ v_cache[b, j, ...], j < L
// i.e. launch_rope_append followed by launch_decode_attention, with q and k rounded to `dtype` after the fp32
// rotation as there, and the softmax in fp32 (a row with L == 0 gets zeros).
// Preconditions beyond the shapes (the kernel reads them before it waits for the kernel launched before it,
// cuda/launch.cuh): positions, cache_rows, lengths, inv_freq and every cache slot other than (b, p) are not
// written by the immediately preceding kernel. Rows have distinct cache rows (a row never sees another row's
// new slot). Only qkv may come from the preceding kernel.
// Block = (heads_per_block query heads of one KV head, row): heads_per_block divides heads / kv_heads; 0 picks
// the default. threads: a multiple of 32 in [32, kShortAttnMaxThreads], 0 for the default. All tensors
// contiguous in `dtype` (bf16 or fp16), 16-byte aligned; inv_freq fp32; index tensors int64 or int32 per flag.
// head_dim % 16 == 0, head_dim <= kShortAttnMaxHeadDim, cache_len <= kShortAttnMaxLen, rows <= 65535.
// Returns nullptr on success, else a static error message.
const char* launch_rope_append_attention(void* out, void* k_cache, void* v_cache, const void* qkv,
                                         const void* positions, bool positions_int32, const void* cache_rows,
                                         bool cache_rows_int32, const void* lengths, bool lengths_int32,
                                         const float* inv_freq, int64_t rows, int64_t heads, int64_t kv_heads,
                                         int64_t head_dim, int64_t cache_batch, int64_t cache_len, float scale,
                                         int heads_per_block, int threads, int dtype, uintptr_t stream);

// The heads_per_block the launcher picks for 0: all of a KV head's query heads in one block from
// kShortAttnGroupRows rows on (fewer blocks, each K/V byte read once), one head per block below (more blocks
// share a row's latency chain).
constexpr int64_t kShortAttnGroupRows = 16;

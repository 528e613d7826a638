// Launcher for the fused RoPE + KV-cache append + decode attention kernel for short caches (cuda/rope_attention.cu).
// Plain C++ types only, so cpp/bind_attention.cpp can include this header in a build without CUDA.
#pragma once

#include <cstdint>

#include "common.cuh"

constexpr int64_t kRopeAttnHeadDim = 128;  // the only head_dim compiled (CSM's depth decoder)
constexpr int64_t kRopeAttnMaxCacheLen = 64;
constexpr int64_t kRopeAttnMaxRep = 8;  // query heads per KV head: one warp each

// For each row n < rows, exactly launch_rope_append (rope.cuh) followed by launch_decode_attention with
// lengths[n] = positions[n] + 1 (clamped to [0, cache_len]), in one kernel: q and k of qkv row n rotated, k and v
// written into the caches at (cache_rows[n], positions[n]), and out[n] = softmax(scale q.K) V over the row's
// first positions[n] + 1 slots. Rows must use distinct cache rows (a row never sees another row's new key). A row
// whose cache row is out of range gets zeros; one whose position is out of range writes no cache slot.
// qkv (rows, (heads + 2 kv_heads) * 128), caches (cache_batch, cache_len, kv_heads, 128), out (rows, heads, 128),
// contiguous bf16 or fp16, 8-byte aligned; inv_freq (64,) fp32; positions, cache_rows int64 or int32 (flags).
// heads = kv_heads * rep with rep <= kRopeAttnMaxRep; cache_len <= kRopeAttnMaxCacheLen.
const char* launch_rope_attention(void* out, void* k_cache, void* v_cache, const void* qkv, const void* positions,
                                  bool positions_int32, const void* cache_rows, bool cache_rows_int32,
                                  const float* inv_freq, int64_t rows, int64_t heads, int64_t kv_heads,
                                  int64_t cache_batch, int64_t cache_len, float scale, int dtype, uintptr_t stream);

// Launcher for the fused RoPE + KV-cache append kernel (cuda/rope.cu).
// Plain C++ types only, so cpp/bind_attention.cpp can include this header in a build without CUDA.
#pragma once

#include <cstdint>

#include "common.cuh"

// Largest head_dim the kernel takes (the attention kernel's limit too).
constexpr int64_t kRopeMaxHeadDim = 256;
// Most threads per block.
constexpr int kRopeMaxThreads = 1024;

// For each query row n < rows, with p = positions[n], b = cache_rows[n] and qkv row n = [q | k | v]
// (heads, kv_heads, kv_heads heads of head_dim), rotating halves (x1 = x[:hd/2], x2 = x[hd/2:]) by the
// angles a_j = float(p) * inv_freq[j] (fp32):
//   q_out[n, h]           = (x1 cos a - x2 sin a, x2 cos a + x1 sin a)   for each query head h
//   k_cache[b, p, g]      = the same rotation of key head g
//   v_cache[b, p, g]      = value head g, unchanged
// computed in fp32 and rounded once to `dtype`. qkv (rows, (heads + 2 kv_heads) * head_dim), q_out
// (rows, heads, head_dim), caches (cache_batch, cache_len, kv_heads, head_dim), all contiguous in `dtype`;
// inv_freq (head_dim / 2,) fp32; positions and cache_rows (rows,) int64, or int32 where the flag says.
// head_dim even in [2, kRopeMaxHeadDim]. A row whose position or cache row is out of range writes no cache
// slot (a caller bug the kernel cannot report without a host sync); its q_out is still written.
// Writes nothing else. threads: a multiple of 32 in [32, kRopeMaxThreads], or 0 for the default.
// Returns nullptr on success, else a static error message.
const char* launch_rope_append(void* q_out, void* k_cache, void* v_cache, const void* qkv, const void* positions,
                               bool positions_int32, const void* cache_rows, bool cache_rows_int32,
                               const float* inv_freq, int64_t rows, int64_t heads, int64_t kv_heads,
                               int64_t head_dim, int64_t cache_batch, int64_t cache_len, int dtype, int threads,
                               uintptr_t stream);

// Launcher for decode attention over the static KV cache (cuda/attention.cu).
// Plain C++ types only, so cpp/bind_attention.cpp can include this header in a build without CUDA.
#pragma once

#include <cstdint>

#include "common.cuh"

// Limits of the kernel; the Python side sends anything else to the reference.
constexpr int64_t kAttnMaxHeadDim = 256;  // head_dim % 8 == 0 too (16-byte loads)
constexpr int kAttnMaxSplits = 64;        // split-KV blocks per (row, KV head)
constexpr int kAttnMaxThreads = 256;      // threads per block: a multiple of 32 in [32, 256]
constexpr int kAttnMaxKeysPerIter = 8;    // keys_per_iter in {1, 2, 4, 8}
// keys_per_iter times the query heads per block (heads / kv_heads, at most 8, rounded up to a power of two)
// is at most this: above it the loop's registers spill.
constexpr int kAttnMaxRepTimesKeys = 32;
constexpr int kAttnDefaultThreads = 128;
constexpr int kAttnDefaultKeysPerIter = 4;

// fp32 workspace the split-KV path needs: a normalised partial output (head_dim floats) and its (max, sum)
// pair per (split, row, head), laid out [splits][rows][heads][head_dim] then [splits][rows][heads][2].
inline int64_t attention_workspace_floats(int64_t rows, int64_t heads, int64_t head_dim, int64_t splits) {
    return splits * rows * heads * (head_dim + 2);
}

// For each row n < rows and query head h < heads, with b = cache_rows[n], L = lengths[n] clamped to
// [0, cache_len] (0 when b is outside [0, cache_batch)) and g = h / (heads / kv_heads):
//   out[n, h] = softmax_j(scale * q[n, h] . k_cache[b, j, g]) @ v_cache[b, j, g]   over j < L
// in fp32, rounded once to `dtype`; a row with L == 0 gets zeros. Slots j >= L are never read.
// q and out (rows, heads, head_dim), caches (cache_batch, cache_len, kv_heads, head_dim), all contiguous in
// `dtype` (bf16 or fp16) and 16-byte aligned; head_dim % 8 == 0, head_dim <= kAttnMaxHeadDim;
// heads % kv_heads == 0; cache_len <= 2^24 and cache_len * kv_heads * head_dim < 2^31. cache_rows and
// lengths (rows,) int64, or int32 where the flags say.
// num_splits in [1, kAttnMaxSplits]: with 1 the blocks write out directly and workspace may be null; with
// more, each (row, KV head) is split over num_splits blocks whose key ranges are set on the device from
// lengths[n], and a second kernel combines their partials from `workspace` (16-byte aligned, at least
// attention_workspace_floats(rows, heads, head_dim, num_splits) floats). threads: a multiple of 32 in
// [32, kAttnMaxThreads], 0 for the default; keys_per_iter: keys each lane group loads per loop iteration,
// in {1, 2, 4, 8}, 0 for the default. Returns nullptr on success, else a static error message.
const char* launch_decode_attention(void* out, const void* q, const void* k_cache, const void* v_cache,
                                    const void* cache_rows, bool cache_rows_int32, const void* lengths,
                                    bool lengths_int32, float* workspace, int64_t rows, int64_t heads,
                                    int64_t kv_heads, int64_t head_dim, int64_t cache_batch, int64_t cache_len,
                                    float scale, int num_splits, int threads, int keys_per_iter, int dtype,
                                    uintptr_t stream);

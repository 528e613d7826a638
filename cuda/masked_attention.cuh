// Launcher for attention of a few queries under a boolean mask (cuda/masked_attention.cu): Mimi's streaming
// decoder attends its 2 new steps over a 250-slot ring KV cache, in fp32.
// Plain C++ types only, so cpp/bind_attention.cpp can include this header in a build without CUDA.
#pragma once

#include <cstdint>

#include "common.cuh"

constexpr int kMaskedAttnMaxQueries = 4;   // T: queries per (batch, head)
constexpr int64_t kMaskedAttnMaxKeys = 1024;  // C: keys per (batch, head), scored in shared memory
constexpr int kMaskedAttnThreads = 256;

// Strides in elements of each tensor's dimensions (the last dimension, D, is contiguous).
struct MaskedAttentionArgs {
    float* out;          // (B, H, T, D)
    const float* q;      // (B, H, T, D)
    const float* k;      // (B, H, C, D)
    const float* v;      // (B, H, C, D)
    const bool* mask;    // (B, H, T, C), any strides (0 where broadcast); true: attend
    int64_t B, H, T, C, D;
    int64_t out_s[3], q_s[3], k_s[3], v_s[3];  // strides of b, h, t (c for k and v)
    int64_t mask_s[4];                          // strides of b, h, t, c
    float scale;
};

// out[b,h,t] = sum_c p[c] v[b,h,c] with p = softmax over the attended keys c (mask[b,h,t,c]) of
// scale * q[b,h,t] . k[b,h,c]; a query that attends no key gets zeros. fp32 throughout. Needs D in {32, 64, 128},
// 1 <= T <= kMaskedAttnMaxQueries, 1 <= C <= kMaskedAttnMaxKeys, B * H in [1, 2^31), 16-byte aligned q, k, v, out
// with strides that are multiples of 4. Returns nullptr on success, else a static error message.
const char* launch_masked_attention(const MaskedAttentionArgs& args, uintptr_t stream);

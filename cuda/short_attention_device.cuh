// Device code of RoPE + KV-cache append + decode attention for short caches (the design: the header comment of
// cuda/rope_append_attention.cu), split at the wait for the QKV projection so that both the standalone kernel
// and the persistent depth decoder (cuda/depth_decoder.cu) run it. CUDA only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "numeric.cuh"

namespace seseme_short_attention {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kKPad = 8;  // elements of padding per K row in shared memory (16 bytes)

struct ShortAttnArgs {
    void* out;
    void* k_cache;
    void* v_cache;
    const void* qkv;
    const void* positions;
    const void* cache_rows;
    const void* lengths;
    const float* inv_freq;
    bool positions_int32, cache_rows_int32, lengths_int32;
    int heads, kv_heads, head_dim, heads_per_block;
    int64_t cache_batch;
    int cache_len;
    float scale_log2;  // scale * log2(e), folded into q
};

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* src) {
    const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// The block's shared memory: K rows padded by 16 bytes, then V, q (fp32), cos/sin, scores.
template <typename T>
struct ShortAttnSmem {
    T* k_s;       // [S][hd + pad]
    T* v_s;       // [S][hd]
    float* q_s;   // [hpb][hd], rotated, rounded, times scale_log2
    float* cos_s; // [hd / 2]
    float* sin_s; // [hd / 2]
    float* p_s;   // [hpb][S]: scores, then probabilities
};

template <typename T>
__device__ __forceinline__ ShortAttnSmem<T> short_attention_smem(const ShortAttnArgs& a, unsigned char* smem) {
    ShortAttnSmem<T> s;
    s.k_s = reinterpret_cast<T*>(smem);
    s.v_s = s.k_s + a.cache_len * (a.head_dim + kKPad);
    s.q_s = reinterpret_cast<float*>(s.v_s + a.cache_len * a.head_dim);
    s.cos_s = s.q_s + a.heads_per_block * a.head_dim;
    s.sin_s = s.cos_s + a.head_dim / 2;
    s.p_s = s.sin_s + a.head_dim / 2;
    return s;
}

// What the part before the wait for the QKV projection hands to the part after it.
struct ShortAttnBlock {
    int n, h0, g, len;
    int64_t pos, base;
    bool new_in_range, writes_cache;
};

// The part before the wait (nothing it reads is written by the preceding kernel: the header's preconditions):
// row n's cos/sin into shared memory and cp.async copies of every cached K and V slot it attends to except the
// new one (still in flight on return). row, pos, len64: the row's cache row, position and length.
template <typename T>
__device__ __forceinline__ ShortAttnBlock short_attention_start(const ShortAttnArgs& a, unsigned char* smem, int n,
                                                                int head_block, int64_t row, int64_t pos,
                                                                int64_t len64) {
    const int hd = a.head_dim, half = hd / 2, S = a.cache_len, hpb = a.heads_per_block;
    const int ks = hd + kKPad;  // K row stride in shared memory
    const ShortAttnSmem<T> s = short_attention_smem<T>(a, smem);
    T* k_s = s.k_s;
    T* v_s = s.v_s;
    float* cos_s = s.cos_s;
    float* sin_s = s.sin_s;
    const int h0 = head_block * hpb;            // first query head of this block
    const int g = h0 / (a.heads / a.kv_heads);  // its KV head
    const int tid = threadIdx.x, nthreads = blockDim.x;

    const bool row_ok = row >= 0 && row < a.cache_batch;
    const int len = row_ok ? (int)min(max(len64, (int64_t)0), (int64_t)S) : 0;
    const bool pos_ok = row_ok && pos >= 0 && pos < S;
    const bool new_in_range = pos_ok && pos < len;              // the new slot is attended to
    const bool writes_cache = pos_ok && h0 % (a.heads / a.kv_heads) == 0;  // one block per (row, KV head)

    for (int i = tid; i < half; i += nthreads) {
        // As rope.cu: float(position) * inv_freq in fp32, accurate sincosf.
        sincosf((float)pos * a.inv_freq[i], &sin_s[i], &cos_s[i]);
    }
    const int chunks = hd / 8;  // 16-byte chunks per head
    const int64_t slot_stride = (int64_t)a.kv_heads * hd;
    const int64_t base = (row_ok ? row : 0) * S * slot_stride + (int64_t)g * hd;
    const T* kc = static_cast<const T*>(a.k_cache) + base;
    const T* vc = static_cast<const T*>(a.v_cache) + base;
    for (int i = tid; i < len * chunks; i += nthreads) {
        const int j = i / chunks, c = (i - j * chunks) * 8;
        if (new_in_range && j == pos) continue;  // this block makes that slot itself
        cp_async16(k_s + j * ks + c, kc + j * slot_stride + c);
        cp_async16(v_s + j * hd + c, vc + j * slot_stride + c);
    }
    return ShortAttnBlock{n, h0, g, len, pos, base, new_in_range, writes_cache};
}

// The part after the wait: rotate the row's q and new k/v (qkv is the projection's output), store the new slot,
// then scores, softmax and p @ V from shared memory into out. Every thread of the block calls it.
template <typename T>
__device__ __forceinline__ void short_attention_finish(const ShortAttnArgs& a, unsigned char* smem,
                                                       const ShortAttnBlock& b) {
    const int hd = a.head_dim, half = hd / 2, S = a.cache_len, hpb = a.heads_per_block;
    const int ks = hd + kKPad;  // K row stride in shared memory
    const ShortAttnSmem<T> s = short_attention_smem<T>(a, smem);
    T* k_s = s.k_s;
    T* v_s = s.v_s;
    float* q_s = s.q_s;
    const float* cos_s = s.cos_s;
    const float* sin_s = s.sin_s;
    float* p_s = s.p_s;
    const int n = b.n, h0 = b.h0, g = b.g, len = b.len;
    const int64_t pos = b.pos, base = b.base;
    const bool new_in_range = b.new_in_range, writes_cache = b.writes_cache;
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int chunks = hd / 8;  // 16-byte chunks per head
    const int64_t slot_stride = (int64_t)a.kv_heads * hd;
    __syncthreads();  // cos/sin were written by other threads than those that read them below

    // --- rotate: items are (head, 8-element chunk of the first half) with its partner chunk in the second half;
    // heads hpb and hpb + 1 of the item space are the KV head's k and v.
    const int hc = half / 8;
    const int heads_all = a.heads + 2 * a.kv_heads;
    const T* src_row = static_cast<const T*>(a.qkv) + (int64_t)n * heads_all * hd;
    const bool need_kv = new_in_range || writes_cache;
    for (int i = tid; i < (hpb + 2) * hc; i += nthreads) {
        const int h = i / hc, j = (i - h * hc) * 8;
        if (h >= hpb && !need_kv) continue;
        const int col = h < hpb ? h0 + h : (h == hpb ? a.heads + g : a.heads + a.kv_heads + g);
        const T* src = src_row + col * hd + j;
        Pack<T, 8> x1 = *reinterpret_cast<const Pack<T, 8>*>(src);
        Pack<T, 8> x2 = *reinterpret_cast<const Pack<T, 8>*>(src + half);
        if (h <= hpb) {  // q or k: rotate in fp32, round once (as rope.cu)
#pragma unroll
            for (int e = 0; e < 8; e++) rotate_pair(x1.v[e], x2.v[e], cos_s[j + e], sin_s[j + e]);
        }
        if (h < hpb) {
            float* q = q_s + h * hd + j;
#pragma unroll
            for (int e = 0; e < 8; e++) {
                q[e] = to_f32(x1.v[e]) * a.scale_log2;
                q[half + e] = to_f32(x2.v[e]) * a.scale_log2;
            }
            continue;
        }
        T* cache = static_cast<T*>(h == hpb ? a.k_cache : a.v_cache) + base + pos * slot_stride + j;
        T* shared = h == hpb ? k_s + pos * ks + j : v_s + pos * hd + j;
        if (new_in_range) {
            *reinterpret_cast<Pack<T, 8>*>(shared) = x1;
            *reinterpret_cast<Pack<T, 8>*>(shared + half) = x2;
        }
        if (writes_cache) {
            *reinterpret_cast<Pack<T, 8>*>(cache) = x1;
            *reinterpret_cast<Pack<T, 8>*>(cache + half) = x2;
        }
    }
    cp_async_wait_all();
    __syncthreads();

    // --- scores (base 2, q pre-scaled): one thread per (head, key)
    for (int i = tid; i < hpb * len; i += nthreads) {
        const int h = i / len, j = i - h * len;
        const float* q = q_s + h * hd;
        const T* k = k_s + j * ks;
        float dot = 0.f;
        for (int c = 0; c < chunks; c++) {
            float kf[8];
            unpack8<T>(*reinterpret_cast<const uint4*>(k + c * 8), kf);
            const float4 q0 = *reinterpret_cast<const float4*>(q + c * 8);
            const float4 q1 = *reinterpret_cast<const float4*>(q + c * 8 + 4);
            dot = fmaf(q0.x, kf[0], dot);
            dot = fmaf(q0.y, kf[1], dot);
            dot = fmaf(q0.z, kf[2], dot);
            dot = fmaf(q0.w, kf[3], dot);
            dot = fmaf(q1.x, kf[4], dot);
            dot = fmaf(q1.y, kf[5], dot);
            dot = fmaf(q1.z, kf[6], dot);
            dot = fmaf(q1.w, kf[7], dot);
        }
        p_s[h * S + j] = dot;
    }
    __syncthreads();

    // --- softmax: one warp per head; probabilities normalised in place
    const int warp = tid / 32, lane = tid % 32, warps = nthreads / 32;
    for (int h = warp; h < hpb; h += warps) {
        float* p = p_s + h * S;
        float mx = -INFINITY;
        for (int j = lane; j < len; j += 32) mx = fmaxf(mx, p[j]);
#pragma unroll
        for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, off));
        float sum = 0.f;
        for (int j = lane; j < len; j += 32) {
            const float e = fast_exp2(p[j] - mx);
            p[j] = e;
            sum += e;
        }
#pragma unroll
        for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(kFull, sum, off);
        const float inv = 1.f / sum;
        for (int j = lane; j < len; j += 32) p[j] *= inv;
    }
    __syncthreads();

    // --- p @ V: one thread per (head, pair of dims); a row with len == 0 writes zeros
    T* out = static_cast<T*>(a.out) + ((int64_t)n * a.heads + h0) * hd;
    for (int i = tid; i < hpb * half; i += nthreads) {
        const int h = i / half, d = (i - h * half) * 2;
        const float* p = p_s + h * S;
        float o0 = 0.f, o1 = 0.f;
#pragma unroll 4
        for (int j = 0; j < len; j++) {
            const T* v = v_s + j * hd + d;
            const float w = p[j];
            o0 = fmaf(w, to_f32(v[0]), o0);
            o1 = fmaf(w, to_f32(v[1]), o1);
        }
        Pack<T, 2> r;
        r.v[0] = from_f32<T>(o0);
        r.v[1] = from_f32<T>(o1);
        *reinterpret_cast<Pack<T, 2>*>(out + h * hd + d) = r;
    }
}

// Shared memory of a block of heads_per_block query heads.
__host__ __device__ inline size_t smem_bytes(int64_t heads_per_block, int64_t head_dim, int64_t cache_len, size_t esize) {
    return (size_t)cache_len * (2 * head_dim + kKPad) * esize +
           sizeof(float) * ((size_t)heads_per_block * head_dim + head_dim + (size_t)heads_per_block * cache_len);
}

}  // namespace seseme_short_attention

// RoPE + KV-cache append + decode attention in one kernel, for short caches: the depth decoder's 30 one-token
// steps per frame, where rope.cu and attention.cu each cost a launch and a few microseconds of latency for
// almost no work (33 keys). Measured before this kernel (H100, batch 1): RoPE 2.3 us and attention 6.9 us per
// call, x124 per frame.
//
// Block = (KV head g, row n); warp w = query head g * rep + w; lane l holds dims 4l..4l+3 of a head (head_dim
// 128), so the rotate-half partner of a lane's dims sits in lane l ^ 16. Warp 0 rotates k and writes k, v into
// the caches; after one __syncthreads every warp reads the row's keys 0..pos from the cache (the new one
// included). Scores: each lane multiplies its 4 dims of q with its 4 dims of 32 keys, and a transpose-reduce
// (31 shuffles) leaves key j's dot product in lane j; a second round covers keys 32..63. Softmax in fp32 and
// base 2 across the warp; the output sums p_j V_j over the keys with p_j broadcast from lane j. q and k are
// rounded to the storage type after the rotation, as the unfused path stores them.
#include "rope_attention.cuh"
#include "launch.cuh"
#include "numeric.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kHD = 128;  // head_dim
constexpr int kE = 4;     // dims per lane
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
__device__ __forceinline__ void load4(const T* p, float (&f)[kE]) {
    const Pack<T, kE> v = *reinterpret_cast<const Pack<T, kE>*>(p);
#pragma unroll
    for (int e = 0; e < kE; e++) f[e] = to_f32(v.v[e]);
}

template <typename T>
__device__ __forceinline__ void store4(T* p, const float (&f)[kE]) {
    Pack<T, kE> v;
#pragma unroll
    for (int e = 0; e < kE; e++) v.v[e] = from_f32<T>(f[e]);
    *reinterpret_cast<Pack<T, kE>*>(p) = v;
}

// This lane's 4 dims of a head rotated (rotate-half RoPE) and rounded to T, as floats.
template <typename T>
__device__ __forceinline__ void rotate4(const T* head, int lane, const float (&c)[kE], const float (&s)[kE],
                                        float (&r)[kE]) {
    float x[kE];
    load4(head + lane * kE, x);
#pragma unroll
    for (int e = 0; e < kE; e++) {
        const float partner = __shfl_xor_sync(kFull, x[e], 16);
        const float y = lane < 16 ? x[e] * c[e] - partner * s[e] : x[e] * c[e] + partner * s[e];
        r[e] = to_f32(from_f32<T>(y));
    }
}

// Scores of keys base..base+31 (lane j: key base + j), -inf past len.
template <typename T>
__device__ __forceinline__ float scores32(const T* k_row, int key_stride, int base, int len, int lane,
                                          const float (&q)[kE]) {
    float part[32];
#pragma unroll
    for (int j = 0; j < 32; j++) {
        float k[kE] = {0.f, 0.f, 0.f, 0.f};
        if (base + j < len) load4(k_row + (base + j) * key_stride + lane * kE, k);
        part[j] = q[0] * k[0] + q[1] * k[1] + q[2] * k[2] + q[3] * k[3];
    }
    transpose_reduce<32, 16>(part, lane);  // numeric.cuh: lane j now holds key j's dot product in part[0]
    return base + lane < len ? part[0] : -INFINITY;
}

// acc += sum over keys base..base+31 (< len) of p(lane j) * V[key] on this lane's dims.
template <typename T>
__device__ __forceinline__ void accumulate32(const T* v_row, int key_stride, int base, int len, int lane, float p,
                                             float (&acc)[kE]) {
#pragma unroll
    for (int j = 0; j < 32; j++) {
        const float pj = __shfl_sync(kFull, p, j);
        if (base + j < len) {
            float v[kE];
            load4(v_row + (base + j) * key_stride + lane * kE, v);
#pragma unroll
            for (int e = 0; e < kE; e++) acc[e] = fmaf(pj, v[e], acc[e]);
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(256) rope_attention_kernel(T* __restrict__ out, T* __restrict__ k_cache,
                                                             T* __restrict__ v_cache, const T* __restrict__ qkv,
                                                             const void* positions, bool positions_int32,
                                                             const void* cache_rows, bool cache_rows_int32,
                                                             const float* __restrict__ inv_freq, int heads,
                                                             int kv_heads, int64_t cache_batch, int cache_len,
                                                             float scale_log2) {
    wait_for_inputs();  // before any read of activations or write (cuda/launch.cuh)
    let_next_kernel_start();
    const int g = blockIdx.x, n = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rep = heads / kv_heads, h = g * rep + warp;
    const int64_t pos = load_index(positions, positions_int32, n);
    const int64_t row = load_index(cache_rows, cache_rows_int32, n);
    const bool row_ok = row >= 0 && row < cache_batch;
    const bool slot_ok = row_ok && pos >= 0 && pos < cache_len;
    const int len = row_ok ? (int)min(max(pos + 1, (int64_t)0), (int64_t)cache_len) : 0;

    const T* x = qkv + (int64_t)n * (heads + 2 * kv_heads) * kHD;
    float c[kE], s[kE];
    const int f0 = (lane * kE) % (kHD / 2);  // frequency index of this lane's first dim
#pragma unroll
    for (int e = 0; e < kE; e++) sincosf((float)pos * inv_freq[f0 + e], &s[e], &c[e]);

    const int key_stride = kv_heads * kHD;
    const int64_t slot0 = (row_ok ? row : 0) * cache_len * key_stride + (int64_t)g * kHD;
    if (warp == 0 && slot_ok) {  // the new key and value into the caches
        float k[kE], v[kE];
        rotate4(x + (int64_t)(heads + g) * kHD, lane, c, s, k);
        load4(x + (int64_t)(heads + kv_heads + g) * kHD + lane * kE, v);
        store4(k_cache + slot0 + pos * key_stride + lane * kE, k);
        store4(v_cache + slot0 + pos * key_stride + lane * kE, v);
    }
    float q[kE];
    rotate4(x + (int64_t)h * kHD, lane, c, s, q);
#pragma unroll
    for (int e = 0; e < kE; e++) q[e] *= scale_log2;
    __syncthreads();  // the new slot is visible to every warp of the block

    const T* k_row = k_cache + slot0;
    const T* v_row = v_cache + slot0;
    const float s0 = scores32(k_row, key_stride, 0, len, lane, q);
    const float s1 = len > 32 ? scores32(k_row, key_stride, 32, len, lane, q) : -INFINITY;  // block-uniform
    float m = fmaxf(s0, s1);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(kFull, m, off));
    const float base = m == -INFINITY ? 0.f : m;
    const float p0 = exp2f(s0 - base), p1 = exp2f(s1 - base);
    float l = p0 + p1;
#pragma unroll
    for (int off = 16; off > 0; off /= 2) l += __shfl_xor_sync(kFull, l, off);

    float acc[kE] = {0.f, 0.f, 0.f, 0.f};
    accumulate32(v_row, key_stride, 0, len, lane, p0, acc);
    if (len > 32) accumulate32(v_row, key_stride, 32, len, lane, p1, acc);
    const float inv = l > 0.f ? 1.f / l : 0.f;  // len = 0: zeros
#pragma unroll
    for (int e = 0; e < kE; e++) acc[e] *= inv;
    store4(out + ((int64_t)n * heads + h) * kHD + lane * kE, acc);
}

template <typename T>
const char* launch_typed(void* out, void* k_cache, void* v_cache, const void* qkv, const void* positions,
                         bool positions_int32, const void* cache_rows, bool cache_rows_int32,
                         const float* inv_freq, int64_t rows, int64_t heads, int64_t kv_heads, int64_t cache_batch,
                         int64_t cache_len, float scale, cudaStream_t stream) {
    const dim3 grid((unsigned)kv_heads, (unsigned)rows);
    const dim3 block((unsigned)(32 * (heads / kv_heads)));
    return launch_error(launch(rope_attention_kernel<T>, grid, block, 0, stream, (T*)out, (T*)k_cache, (T*)v_cache,
                               (const T*)qkv, positions, positions_int32, cache_rows, cache_rows_int32, inv_freq,
                               (int)heads, (int)kv_heads, cache_batch, (int)cache_len, scale * kLog2e));
}

}  // namespace

const char* launch_rope_attention(void* out, void* k_cache, void* v_cache, const void* qkv, const void* positions,
                                  bool positions_int32, const void* cache_rows, bool cache_rows_int32,
                                  const float* inv_freq, int64_t rows, int64_t heads, int64_t kv_heads,
                                  int64_t cache_batch, int64_t cache_len, float scale, int dtype, uintptr_t stream) {
    if (rows == 0) return nullptr;  // a grid of 0 blocks is a launch error, an empty batch is not
    if (rows > 65535) return "rope_attention: rows must be <= 65535";
    if (kv_heads < 1 || heads % kv_heads != 0 || heads / kv_heads > kRopeAttnMaxRep)
        return "rope_attention: heads must be kv_heads * rep with rep <= 8";
    if (cache_len < 1 || cache_len > kRopeAttnMaxCacheLen || cache_batch < 1)
        return "rope_attention: cache_len must be in [1, 64]";
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    switch (dtype) {
        case SESEME_F16:
            return launch_typed<__half>(out, k_cache, v_cache, qkv, positions, positions_int32, cache_rows,
                                        cache_rows_int32, inv_freq, rows, heads, kv_heads, cache_batch, cache_len,
                                        scale, s);
        case SESEME_BF16:
            return launch_typed<__nv_bfloat16>(out, k_cache, v_cache, qkv, positions, positions_int32, cache_rows,
                                               cache_rows_int32, inv_freq, rows, heads, kv_heads, cache_batch,
                                               cache_len, scale, s);
        default: return "rope_attention: unsupported dtype code (bf16 and fp16 only)";
    }
}

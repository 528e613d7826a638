// RoPE + KV-cache append + decode attention in one kernel, built for latency on short caches: the depth
// decoder's one-token steps (33 slots, 8 query heads over 2 KV heads of 128), 120 calls per frame.
//
// Two kernels did this before (rope_append 2.0 us, decode_attention 6.8 us of marginal time each at batch 1) and
// a first fused version lost (10.5 us, cuda/NOTES.md) because it ran one long serial chain per block: rotate,
// store, barrier, then rounds of key loads each waiting on the last. Here the chain after the wait for the
// preceding kernel (the QKV projection) is as short as it can be:
//   - before the wait: the row's indices, cos/sin of its position, and cp.async copies of every cached K and V
//     slot it attends to except the new one, into shared memory, all in flight at once (one memory latency,
//     overlapping the projection's tail; launch.cuh's rule 1 is relaxed by the precondition in the header:
//     these slots were written many kernels ago);
//   - after it: one 16-byte load pair per (head, chunk) of the row's qkv, rotated in registers; q goes to
//     shared memory as fp32 (pre-scaled), the new k and v to shared memory and, from one block per KV head, to
//     the caches;
//   - then three short phases from shared memory, a barrier apart: scores (one thread per (head, key)),
//     softmax (one warp per head), p @ V (one thread per (head, 2 dims)).
// Blocks are (heads_per_block query heads, row): with one head per block a batch-1 step spreads over 8 blocks,
// each with a quarter of the work, and every block reads its KV head's slots (from L2 after the first).
//
// Shared memory: K rows padded by 16 bytes (a warp's threads score different keys at the same column: the pad
// puts 8 consecutive keys' 16-byte chunks in distinct banks), V rows unpadded (p @ V reads along a row).
#include "rope_append_attention.cuh"
#include "launch.cuh"
#include "numeric.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

namespace {

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

template <typename T>
__global__ void __launch_bounds__(kShortAttnMaxThreads) rope_append_attention_kernel(const ShortAttnArgs a) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int hd = a.head_dim, half = hd / 2, S = a.cache_len, hpb = a.heads_per_block;
    const int ks = hd + kKPad;  // K row stride in shared memory
    T* k_s = reinterpret_cast<T*>(smem_raw);         // [S][hd + pad]
    T* v_s = k_s + S * ks;                            // [S][hd]
    float* q_s = reinterpret_cast<float*>(v_s + S * hd);  // [hpb][hd], rotated, rounded, times scale_log2
    float* cos_s = q_s + hpb * hd;                    // [hd / 2]
    float* sin_s = cos_s + half;                      // [hd / 2]
    float* p_s = sin_s + half;                        // [hpb][S]: scores, then probabilities

    const int n = blockIdx.y;
    const int h0 = blockIdx.x * hpb;            // first query head of this block
    const int g = h0 / (a.heads / a.kv_heads);  // its KV head
    const int tid = threadIdx.x, nthreads = blockDim.x;

    // --- before the wait: nothing here is written by the preceding kernel (header's preconditions)
    const int64_t row = load_index(a.cache_rows, a.cache_rows_int32, n);
    const int64_t pos = load_index(a.positions, a.positions_int32, n);
    const int64_t len64 = load_index(a.lengths, a.lengths_int32, n);
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

    wait_for_inputs();  // the QKV projection is done
    let_next_kernel_start();
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

size_t smem_bytes(int64_t heads_per_block, int64_t head_dim, int64_t cache_len, size_t esize) {
    return (size_t)cache_len * (2 * head_dim + kKPad) * esize +
           sizeof(float) * ((size_t)heads_per_block * head_dim + head_dim + (size_t)heads_per_block * cache_len);
}

}  // namespace

const char* launch_rope_append_attention(void* out, void* k_cache, void* v_cache, const void* qkv,
                                         const void* positions, bool positions_int32, const void* cache_rows,
                                         bool cache_rows_int32, const void* lengths, bool lengths_int32,
                                         const float* inv_freq, int64_t rows, int64_t heads, int64_t kv_heads,
                                         int64_t head_dim, int64_t cache_batch, int64_t cache_len, float scale,
                                         int heads_per_block, int threads, int dtype, uintptr_t stream) {
    if (rows == 0) return nullptr;
    if (rows < 0 || rows > 65535) return "rope_append_attention: rows must be in [0, 65535]";
    if (head_dim % 16 != 0 || head_dim > kShortAttnMaxHeadDim || cache_len < 1 || cache_len > kShortAttnMaxLen)
        return "rope_append_attention: head_dim or cache length out of the kernel's range";
    const int64_t rep = heads / kv_heads;
    if (heads_per_block == 0) heads_per_block = rows >= kShortAttnGroupRows ? (int)rep : 1;
    if (heads_per_block < 1 || rep % heads_per_block != 0)
        return "rope_append_attention: heads_per_block must divide heads / kv_heads";
    if (threads == 0) threads = kShortAttnDefaultThreads;
    if (threads % 32 != 0 || threads < 32 || threads > kShortAttnMaxThreads)
        return "rope_append_attention: threads must be a multiple of 32 in [32, 256]";
    ShortAttnArgs a;
    a.out = out;
    a.k_cache = k_cache;
    a.v_cache = v_cache;
    a.qkv = qkv;
    a.positions = positions;
    a.cache_rows = cache_rows;
    a.lengths = lengths;
    a.inv_freq = inv_freq;
    a.positions_int32 = positions_int32;
    a.cache_rows_int32 = cache_rows_int32;
    a.lengths_int32 = lengths_int32;
    a.heads = (int)heads;
    a.kv_heads = (int)kv_heads;
    a.head_dim = (int)head_dim;
    a.heads_per_block = heads_per_block;
    a.cache_batch = cache_batch;
    a.cache_len = (int)cache_len;
    a.scale_log2 = scale * kLog2e;
    const dim3 grid((unsigned)(heads / heads_per_block), (unsigned)rows);
    const auto st = reinterpret_cast<cudaStream_t>(stream);
    const size_t esize = 2;  // bf16 or fp16
    const size_t smem = smem_bytes(heads_per_block, head_dim, cache_len, esize);
    if (smem > 48 * 1024) return "rope_append_attention: shared memory above 48 KB";
    switch (dtype) {
        case SESEME_BF16:
            return launch_error(launch(rope_append_attention_kernel<__nv_bfloat16>, grid, dim3(threads), smem, st, a));
        case SESEME_F16:
            return launch_error(launch(rope_append_attention_kernel<__half>, grid, dim3(threads), smem, st, a));
        default:
            return "rope_append_attention: dtype must be bfloat16 or float16";
    }
}

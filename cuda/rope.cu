// RoPE + KV-cache append: the step between the fused QKV projection and decode attention.
//
// One pass over qkv: q and k are rotated (Llama rotate-half layout, Llama-3-scaled frequencies given as
// inv_freq), q goes to its own buffer for the attention kernel, the rotated k and the raw v go straight into
// the static caches at (cache row, position). Unfused this is ~10 elementwise kernels plus two index_put.
//
// Work item = one head's P-element chunk of the first half and the matching chunk of the second half, so a
// thread has both operands of its rotation and writes both results; P = 16 bytes' worth when head_dim / 2
// allows (8 bf16: hd 64 -> 4 items per head). v heads are the same items without the rotation, so one flat
// index covers the whole (rows, heads + 2 kv_heads, chunks) space and a row of CSM-1B's backbone is 192
// threads. The angle is float(position) * inv_freq in fp32 and cos/sin are the accurate sincosf (angles reach
// ~2048 rad), as torch computes them in the reference; the rotation is done in fp32 and rounded once.
#include "rope.cuh"
#include "launch.cuh"
#include "numeric.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

constexpr int kDefaultThreads = 256;

// ----------------------------------------------------------------------------------------------------
// kernels





// P elements per chunk; head_dim / 2 is a multiple of P and every pointer is P-element aligned.
template <typename T, int P>
__global__ void __launch_bounds__(kRopeMaxThreads)
    rope_append_kernel(T* __restrict__ q_out, T* __restrict__ k_cache, T* __restrict__ v_cache,
                       const T* __restrict__ qkv, const void* __restrict__ positions, bool positions_int32,
                       const void* __restrict__ cache_rows, bool cache_rows_int32,
                       const float* __restrict__ inv_freq, int64_t items, int heads, int kv_heads, int head_dim,
                       int64_t cache_batch, int64_t cache_len) {
    wait_for_inputs();  // before any read of activations or write (cuda/launch.cuh)
    let_next_kernel_start();
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= items) return;
    const int half = head_dim / 2;
    const int chunks = half / P;
    const int heads_all = heads + 2 * kv_heads;
    const int64_t n = i / (heads_all * chunks);
    const int rem = (int)(i - n * heads_all * chunks);
    const int a = rem / chunks;            // head within the qkv row: q heads, then k heads, then v heads
    const int j = (rem - a * chunks) * P;  // first frequency index of this chunk

    const T* src = qkv + n * heads_all * head_dim + (int64_t)a * head_dim + j;
    Pack<T, P> x1 = *reinterpret_cast<const Pack<T, P>*>(src);
    Pack<T, P> x2 = *reinterpret_cast<const Pack<T, P>*>(src + half);

    const int64_t pos = load_index(positions, positions_int32, n);
    T* dst;
    if (a < heads) {
        dst = q_out + (n * heads + a) * head_dim + j;
    } else {
        const int64_t row = load_index(cache_rows, cache_rows_int32, n);
        if (row < 0 || row >= cache_batch || pos < 0 || pos >= cache_len) return;
        const int g = a < heads + kv_heads ? a - heads : a - heads - kv_heads;
        T* cache = a < heads + kv_heads ? k_cache : v_cache;
        dst = cache + ((row * cache_len + pos) * kv_heads + g) * head_dim + j;
    }
    if (a < heads + kv_heads) {
        const float p = (float)pos;  // exact below 2^24, as torch's positions.float()
#pragma unroll
        for (int e = 0; e < P; e++) {
            float s, c;
            sincosf(p * inv_freq[j + e], &s, &c);
            rotate_pair(x1.v[e], x2.v[e], c, s);
        }
    }
    *reinterpret_cast<Pack<T, P>*>(dst) = x1;
    *reinterpret_cast<Pack<T, P>*>(dst + half) = x2;
}

// ----------------------------------------------------------------------------------------------------
// launchers

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T, int P>
const char* launch_p(void* q_out, void* k_cache, void* v_cache, const void* qkv, const void* positions,
                     bool positions_int32, const void* cache_rows, bool cache_rows_int32, const float* inv_freq,
                     int64_t rows, int heads, int kv_heads, int head_dim, int64_t cache_batch, int64_t cache_len,
                     int threads, cudaStream_t stream) {
    const int64_t items = rows * (heads + 2 * kv_heads) * (head_dim / 2 / P);
    const int64_t blocks = (items + threads - 1) / threads;
    if (blocks > 0x7fffffff) return "rope_append: too many rows";
    return launch_error(launch(rope_append_kernel<T, P>, dim3((unsigned)blocks), dim3(threads), 0, stream, (T*)q_out,
                               (T*)k_cache, (T*)v_cache, (const T*)qkv, positions, positions_int32, cache_rows,
                               cache_rows_int32, inv_freq, items, heads, kv_heads, head_dim, cache_batch, cache_len));
}

template <typename T>
const char* launch_typed(void* q_out, void* k_cache, void* v_cache, const void* qkv, const void* positions,
                         bool positions_int32, const void* cache_rows, bool cache_rows_int32,
                         const float* inv_freq, int64_t rows, int heads, int kv_heads, int head_dim,
                         int64_t cache_batch, int64_t cache_len, int threads, cudaStream_t stream) {
    // The widest chunk (up to 16 bytes) that divides half a head and that every base pointer is aligned to;
    // row and head strides are multiples of half a head, so then every access is aligned.
    const int half = head_dim / 2;
    int p = 16 / (int)sizeof(T);
    while (p > 1 && (half % p != 0 || !aligned(q_out, p * sizeof(T)) || !aligned(k_cache, p * sizeof(T)) ||
                     !aligned(v_cache, p * sizeof(T)) || !aligned(qkv, p * sizeof(T))))
        p /= 2;
#define SESEME_ROPE_LAUNCH(P)                                                                                 \
    return launch_p<T, P>(q_out, k_cache, v_cache, qkv, positions, positions_int32, cache_rows,              \
                          cache_rows_int32, inv_freq, rows, heads, kv_heads, head_dim, cache_batch, cache_len, \
                          threads, stream)
    switch (p) {
        case 8: if constexpr (sizeof(T) <= 2) { SESEME_ROPE_LAUNCH(8); } break;
        case 4: SESEME_ROPE_LAUNCH(4);
        case 2: SESEME_ROPE_LAUNCH(2);
        default: SESEME_ROPE_LAUNCH(1);
    }
#undef SESEME_ROPE_LAUNCH
    return "rope_append: internal error (chunk width)";
}

}  // namespace

const char* launch_rope_append(void* q_out, void* k_cache, void* v_cache, const void* qkv, const void* positions,
                               bool positions_int32, const void* cache_rows, bool cache_rows_int32,
                               const float* inv_freq, int64_t rows, int64_t heads, int64_t kv_heads,
                               int64_t head_dim, int64_t cache_batch, int64_t cache_len, int dtype, int threads,
                               uintptr_t stream) {
    if (rows == 0) return nullptr;  // a grid of 0 blocks is a launch error, an empty batch is not
    if (head_dim < 2 || head_dim % 2 != 0 || head_dim > kRopeMaxHeadDim)
        return "rope_append: head_dim must be even in [2, 256]";
    if (heads < 1 || kv_heads < 1 || heads + 2 * kv_heads > 65536) return "rope_append: bad head counts";
    if (threads == 0) threads = kDefaultThreads;
    if (threads % 32 != 0 || threads < 32 || threads > kRopeMaxThreads)
        return "rope_append: threads must be a multiple of 32 in [32, 1024]";
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
#define SESEME_ROPE_TYPED(T)                                                                                   \
    return launch_typed<T>(q_out, k_cache, v_cache, qkv, positions, positions_int32, cache_rows,              \
                           cache_rows_int32, inv_freq, rows, (int)heads, (int)kv_heads, (int)head_dim,        \
                           cache_batch, cache_len, threads, s)
    switch (dtype) {
        case SESEME_F32: SESEME_ROPE_TYPED(float);
        case SESEME_F16: SESEME_ROPE_TYPED(__half);
        case SESEME_BF16: SESEME_ROPE_TYPED(__nv_bfloat16);
        default: return "rope_append: unsupported dtype code";
    }
#undef SESEME_ROPE_TYPED
}

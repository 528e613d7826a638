// Decode attention over the static KV cache: N query rows, each attending to the first lengths[n] slots of
// its cache row, GQA (query head h reads KV head h / (heads / kv_heads)). Flash-decoding on CUDA cores:
// at decode sizes the work is reading K and V once, so the design is about bytes in flight, not FLOPs.
//
// Block = (split, KV head [x head chunk], row). A block reads its KV head's keys and values ONCE for all the
// query heads that share them (4 in both CSM stacks). Within a block, a "lane group" of head_dim / 8 lanes
// (rounded up to a power of two) covers one key: each lane holds one 16-byte slice of K and V, so a warp
// covers 32 / (head_dim / 8) consecutive keys per load. Every loop iteration a lane group loads
// keys_per_iter keys and values (issued together in the PTX; see load_stream), reduces the q.k slices with
// shuffles inside the group, and folds the scores into its own online softmax (running max m, sum l, accumulator
// over its 8 dims, in fp32 and base 2: q is prescaled by scale * log2(e)). Groups never synchronise in the
// loop; at the end their states merge by shuffles across groups of a warp, then across warps in shared
// memory, one query head at a time.
//
// Split-KV: the graph is static, so the number of splits is a launch constant chosen from the cache length
// and N, but each split's key range comes from lengths[n] on the device: the row's keys are cut into
// num_splits equal chunks (rounded up to one block-iteration), so short rows use few splits. A split with
// no keys writes the empty partial (m = -inf, l = 0) and nothing else; the combine kernel skips those.
// Partials hold the normalised output plus (m, l), so the combine is out = sum_s w_s o_s / sum_s w_s with
// w_s = l_s 2^(m_s - max m). Slots at or beyond lengths[n] are never loaded (a lane past the end of its range
// re-reads the range's last key and gets score -inf), so whatever they hold cannot reach the result.
//
// Registers (sm_90, ptxas 13.0): 122-196 for CSM's shapes (4 heads per block, keys_per_iter 1-8), no spills
// in any instantiation; keys_per_iter * heads per block > 32 is rejected (it would spill).
#include "attention.cuh"
#include "launch.cuh"
#include "numeric.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

namespace {

constexpr unsigned kFull = 0xffffffffu;

// ----------------------------------------------------------------------------------------------------
// kernels

struct AttnArgs {
    void* out;
    float* ws_o;   // [splits][rows][heads][head_dim], null with one split
    float* ws_ml;  // [splits][rows][heads][2]
    const void* q;
    const void* k_cache;
    const void* v_cache;
    const void* cache_rows;
    const void* lengths;
    bool cache_rows_int32;
    bool lengths_int32;
    int rows, heads, kv_heads, head_dim;
    int heads_per_block, head_chunks;  // query heads of one KV head are split into chunks of <= 8
    int64_t cache_batch;
    int cache_len;
    float scale_log2;  // scale * log2(e)
};




// A 16-byte read-only load that does not allocate in L1 (each K/V byte is read once). Note (SASS, nvcc 13,
// sm_90): the PTX issues an iteration's K and V loads together, but ptxas sinks the V loads below the q.k
// shuffles, so a warp has ~half its bytes in flight at a time and relies on its neighbours to cover.
__device__ __forceinline__ uint4 load_stream(const void* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// Online-softmax state merge in base 2; an empty state has m = -inf, l = 0, acc = 0. `base` avoids
// (-inf) - (-inf) when both are empty.
__device__ __forceinline__ float safe_base(float m) { return m == -INFINITY ? 0.f : m; }

// LP: lanes per key (head_dim / 8 rounded up to a power of two); REP: query heads per block (power of two,
// the chunk's real count may be lower); U: keys each lane group loads per iteration.
template <typename T, int LP, int REP, int U>
__global__ void __launch_bounds__(kAttnMaxThreads, 1) decode_attention_kernel(const AttnArgs a) {
    wait_for_inputs();  // before any read of activations or write (cuda/launch.cuh)
    let_next_kernel_start();
    extern __shared__ float smem[];  // per warp: m, l, acc[LP * 8]
    const int split = blockIdx.x, num_splits = gridDim.x;
    const int g = blockIdx.y / a.head_chunks, chunk = blockIdx.y - g * a.head_chunks;
    const int n = blockIdx.z;
    const int rep = a.heads / a.kv_heads;
    const int h0 = g * rep + chunk * a.heads_per_block;  // first query head of this block
    const int nh = min(a.heads_per_block, rep - chunk * a.heads_per_block);
    const int sub = threadIdx.x % LP, grp = threadIdx.x / LP, groups = blockDim.x / LP;
    const int d0 = sub * 8;
    const bool dim_ok = d0 < a.head_dim;

    const int64_t row = load_index(a.cache_rows, a.cache_rows_int32, n);
    const int64_t len64 = load_index(a.lengths, a.lengths_int32, n);
    const bool row_ok = row >= 0 && row < a.cache_batch;
    const int len = row_ok ? (int)min(max(len64, (int64_t)0), (int64_t)a.cache_len) : 0;
    const int step = groups * U;
    int per = (len + num_splits - 1) / num_splits;
    per = (per + step - 1) / step * step;
    const int begin = split * per;
    const int end = min(len, begin + per);

    if (num_splits > 1 && begin >= end) {  // nothing to read: the empty partial, which the combine skips
        if (threadIdx.x < nh) {
            float* ml = a.ws_ml + 2 * (((int64_t)split * a.rows + n) * a.heads + h0 + threadIdx.x);
            ml[0] = -INFINITY;
            ml[1] = 0.f;
        }
        return;
    }

    float qf[REP][8];
#pragma unroll
    for (int r = 0; r < REP; r++) {
        if (r < nh && dim_ok) {
            const T* qp = static_cast<const T*>(a.q) + ((int64_t)n * a.heads + h0 + r) * a.head_dim + d0;
            const uint4 raw = __ldg(reinterpret_cast<const uint4*>(qp));
            unpack8<T>(raw, qf[r]);
#pragma unroll
            for (int e = 0; e < 8; e++) qf[r][e] *= a.scale_log2;
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++) qf[r][e] = 0.f;
        }
    }

    float m[REP], l[REP], acc[REP][8];
#pragma unroll
    for (int r = 0; r < REP; r++) {
        m[r] = -INFINITY;
        l[r] = 0.f;
#pragma unroll
        for (int e = 0; e < 8; e++) acc[r][e] = 0.f;
    }

    // Lanes beyond head_dim read dims 0..7 instead (their q is 0 and their dims are never stored), and keys
    // beyond `end` read key end - 1 (their score is set to -inf below): every load is unconditional and
    // stays inside the first `end` slots of this cache row.
    const int key_stride = a.kv_heads * a.head_dim;  // a cache row has < 2^31 elements (launcher)
    const int64_t base = (row_ok ? row : 0) * a.cache_len * key_stride + g * a.head_dim + (dim_ok ? d0 : 0);
    const T* kp = static_cast<const T*>(a.k_cache) + base;
    const T* vp = static_cast<const T*>(a.v_cache) + base;

    for (int kb = begin; kb < end; kb += step) {  // block-uniform trip count: shuffles stay converged
        uint4 kr[U], vr[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int j = min(kb + u * groups + grp, end - 1);
            kr[u] = load_stream(kp + j * key_stride);
            vr[u] = load_stream(vp + j * key_stride);
        }
        float s[U][REP];
#pragma unroll
        for (int u = 0; u < U; u++) {
            float kf[8];
            unpack8<T>(kr[u], kf);
#pragma unroll
            for (int r = 0; r < REP; r++) {
                float dot = 0.f;
#pragma unroll
                for (int e = 0; e < 8; e++) dot = fmaf(qf[r][e], kf[e], dot);
                s[u][r] = dot;
            }
        }
#pragma unroll
        for (int off = LP / 2; off > 0; off /= 2) {
#pragma unroll
            for (int u = 0; u < U; u++) {
#pragma unroll
                for (int r = 0; r < REP; r++) s[u][r] += __shfl_xor_sync(kFull, s[u][r], off);
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (kb + u * groups + grp >= end) {
#pragma unroll
                for (int r = 0; r < REP; r++) s[u][r] = -INFINITY;
            }
        }
        float vf[U][8];
#pragma unroll
        for (int u = 0; u < U; u++) unpack8<T>(vr[u], vf[u]);
#pragma unroll
        for (int r = 0; r < REP; r++) {
            float mx = m[r];
#pragma unroll
            for (int u = 0; u < U; u++) mx = fmaxf(mx, s[u][r]);
            const float b = safe_base(mx);
            const float alpha = fast_exp2(m[r] - b);
            float p[U], psum = 0.f;
#pragma unroll
            for (int u = 0; u < U; u++) {
                p[u] = fast_exp2(s[u][r] - b);
                psum += p[u];
            }
            l[r] = l[r] * alpha + psum;
#pragma unroll
            for (int e = 0; e < 8; e++) {
                float o = acc[r][e] * alpha;
#pragma unroll
                for (int u = 0; u < U; u++) o = fmaf(p[u], vf[u][e], o);
                acc[r][e] = o;
            }
            m[r] = mx;
        }
    }

    // Merge the lane groups of each warp (lanes LP apart hold the same dims of different keys).
#pragma unroll
    for (int off = LP; off < 32; off *= 2) {
#pragma unroll
        for (int r = 0; r < REP; r++) {
            const float mo = __shfl_xor_sync(kFull, m[r], off);
            const float lo = __shfl_xor_sync(kFull, l[r], off);
            const float mx = fmaxf(m[r], mo);
            const float b = safe_base(mx);
            const float sa = fast_exp2(m[r] - b), so = fast_exp2(mo - b);
            l[r] = l[r] * sa + lo * so;
#pragma unroll
            for (int e = 0; e < 8; e++) acc[r][e] = acc[r][e] * sa + __shfl_xor_sync(kFull, acc[r][e], off) * so;
            m[r] = mx;
        }
    }

    // Merge the warps through shared memory, one query head at a time, and write the head.
    const int warps = blockDim.x / 32, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    constexpr int kStride = LP * 8 + 2;
#pragma unroll
    for (int r = 0; r < REP; r++) {
        if (r >= nh) break;  // block-uniform
        if (lane < LP) {
            float* sp = smem + warp * kStride;
            if (lane == 0) {
                sp[0] = m[r];
                sp[1] = l[r];
            }
#pragma unroll
            for (int e = 0; e < 8; e++) sp[2 + d0 + e] = acc[r][e];
        }
        __syncthreads();
        float mx = -INFINITY;
        for (int w = 0; w < warps; w++) mx = fmaxf(mx, smem[w * kStride]);
        const float b = safe_base(mx);
        float lsum = 0.f;
        for (int w = 0; w < warps; w++) lsum += smem[w * kStride + 1] * fast_exp2(smem[w * kStride] - b);
        const int64_t item = ((int64_t)split * a.rows + n) * a.heads + h0 + r;  // split 0 = out's index
        for (int d = threadIdx.x; d < a.head_dim; d += blockDim.x) {
            float o = 0.f;
            for (int w = 0; w < warps; w++) o += smem[w * kStride + 2 + d] * fast_exp2(smem[w * kStride] - b);
            o = lsum != 0.f ? o / lsum : 0.f;  // 0 only with no keys; a NaN from the data stays NaN
            if (num_splits == 1) {
                static_cast<T*>(a.out)[item * a.head_dim + d] = from_f32<T>(o);
            } else {
                a.ws_o[item * a.head_dim + d] = o;
            }
        }
        if (num_splits > 1 && threadIdx.x == 0) {
            a.ws_ml[2 * item] = mx;
            a.ws_ml[2 * item + 1] = lsum;
        }
        __syncthreads();
    }
}

// One thread per 4 output elements: out = sum_s w_s o_s / sum_s w_s over the splits with l_s > 0.
template <typename T>
__global__ void attention_combine_kernel(T* __restrict__ out, const float* __restrict__ ws_o,
                                         const float* __restrict__ ws_ml, int64_t items, int head_dim,
                                         int num_splits) {
    wait_for_inputs();  // before any read of activations or write (cuda/launch.cuh)
    let_next_kernel_start();
    const int quads = head_dim / 4;
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= items * quads) return;
    const int64_t item = i / quads;
    const int c = (int)(i - item * quads) * 4;
    float mx = -INFINITY;
    for (int s = 0; s < num_splits; s++) mx = fmaxf(mx, ws_ml[2 * (s * items + item)]);
    float lsum = 0.f, o[4] = {0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < num_splits; s++) {
        const float2 ml = *reinterpret_cast<const float2*>(ws_ml + 2 * (s * items + item));
        if (ml.y != 0.f) {  // skips empty splits (l = 0, m = -inf); a NaN partial stays in, as NaN
            const float w = ml.y * fast_exp2(ml.x - mx);
            const float4 v = *reinterpret_cast<const float4*>(ws_o + (s * items + item) * head_dim + c);
            lsum += w;
            o[0] = fmaf(w, v.x, o[0]);
            o[1] = fmaf(w, v.y, o[1]);
            o[2] = fmaf(w, v.z, o[2]);
            o[3] = fmaf(w, v.w, o[3]);
        }
    }
    Pack<T, 4> r;
#pragma unroll
    for (int e = 0; e < 4; e++) r.v[e] = from_f32<T>(lsum != 0.f ? o[e] / lsum : 0.f);
    *reinterpret_cast<Pack<T, 4>*>(out + item * head_dim + c) = r;
}

// ----------------------------------------------------------------------------------------------------
// launchers

template <typename T, int LP, int REP, int U>
const char* launch_kernel(const AttnArgs& a, dim3 grid, int threads, cudaStream_t stream) {
    if constexpr (REP * U > kAttnMaxRepTimesKeys) {  // would spill: not instantiated
        return "decode_attention: keys_per_iter * heads per block (rounded up to a power of two) must be <= 32";
    } else {
        const size_t smem = (size_t)(threads / 32) * (LP * 8 + 2) * sizeof(float);
        return launch_error(launch(decode_attention_kernel<T, LP, REP, U>, grid, dim3(threads), smem, stream, a));
    }
}

template <typename T, int LP, int REP>
const char* launch_u(int u, const AttnArgs& a, dim3 grid, int threads, cudaStream_t stream) {
    switch (u) {
        case 1: return launch_kernel<T, LP, REP, 1>(a, grid, threads, stream);
        case 2: return launch_kernel<T, LP, REP, 2>(a, grid, threads, stream);
        case 4: return launch_kernel<T, LP, REP, 4>(a, grid, threads, stream);
        case 8: return launch_kernel<T, LP, REP, 8>(a, grid, threads, stream);
        default: return "decode_attention: keys_per_iter must be 1, 2, 4 or 8";
    }
}

template <typename T, int LP>
const char* launch_rep(int rep, int u, const AttnArgs& a, dim3 grid, int threads, cudaStream_t stream) {
    switch (rep) {
        case 1: return launch_u<T, LP, 1>(u, a, grid, threads, stream);
        case 2: return launch_u<T, LP, 2>(u, a, grid, threads, stream);
        case 4: return launch_u<T, LP, 4>(u, a, grid, threads, stream);
        case 8: return launch_u<T, LP, 8>(u, a, grid, threads, stream);
        default: return "decode_attention: internal error (heads per block)";
    }
}

template <typename T>
const char* launch_typed(const AttnArgs& a, int num_splits, int threads, int u, cudaStream_t stream) {
    int lp = 1;  // lanes per key: head_dim / 8 rounded up to a power of two
    while (lp * 8 < a.head_dim) lp *= 2;
    int rep = 1;  // heads per block rounded up to a power of two
    while (rep < a.heads_per_block) rep *= 2;
    const dim3 grid((unsigned)num_splits, (unsigned)(a.kv_heads * a.head_chunks), (unsigned)a.rows);
    const char* err;
    switch (lp) {
        case 1: err = launch_rep<T, 1>(rep, u, a, grid, threads, stream); break;
        case 2: err = launch_rep<T, 2>(rep, u, a, grid, threads, stream); break;
        case 4: err = launch_rep<T, 4>(rep, u, a, grid, threads, stream); break;
        case 8: err = launch_rep<T, 8>(rep, u, a, grid, threads, stream); break;
        case 16: err = launch_rep<T, 16>(rep, u, a, grid, threads, stream); break;
        case 32: err = launch_rep<T, 32>(rep, u, a, grid, threads, stream); break;
        default: return "decode_attention: internal error (lanes per key)";
    }
    if (err != nullptr || num_splits == 1) return err;
    const int64_t items = (int64_t)a.rows * a.heads;
    const int64_t total = items * (a.head_dim / 4);
    constexpr int kCombineThreads = 256;
    return launch_error(launch(attention_combine_kernel<T>, dim3((unsigned)((total + kCombineThreads - 1) / kCombineThreads)),
                               dim3(kCombineThreads), 0, stream, static_cast<T*>(a.out), a.ws_o, a.ws_ml, items,
                               a.head_dim, num_splits));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

const char* launch_decode_attention(void* out, const void* q, const void* k_cache, const void* v_cache,
                                    const void* cache_rows, bool cache_rows_int32, const void* lengths,
                                    bool lengths_int32, float* workspace, int64_t rows, int64_t heads,
                                    int64_t kv_heads, int64_t head_dim, int64_t cache_batch, int64_t cache_len,
                                    float scale, int num_splits, int threads, int keys_per_iter, int dtype,
                                    uintptr_t stream) {
    if (rows == 0) return nullptr;  // a grid of 0 blocks is a launch error, an empty batch is not
    if (threads == 0) threads = kAttnDefaultThreads;
    if (keys_per_iter == 0) keys_per_iter = kAttnDefaultKeysPerIter;
    if (rows < 0 || rows > 65535) return "decode_attention: rows must be in [0, 65535]";
    if (heads < 1 || kv_heads < 1 || heads % kv_heads != 0) return "decode_attention: heads % kv_heads != 0";
    if (head_dim < 8 || head_dim % 8 != 0 || head_dim > kAttnMaxHeadDim)
        return "decode_attention: head_dim must be a multiple of 8 in [8, 256]";
    if (cache_batch < 1 || cache_len < 1 || cache_len > (1 << 24))
        return "decode_attention: cache_len must be in [1, 2^24]";
    if (cache_len * kv_heads * head_dim > 0x7fffffff) return "decode_attention: a cache row must have < 2^31 elements";
    if (num_splits < 1 || num_splits > kAttnMaxSplits) return "decode_attention: num_splits must be in [1, 64]";
    if (threads % 32 != 0 || threads < 32 || threads > kAttnMaxThreads)
        return "decode_attention: threads must be a multiple of 32 in [32, 256]";
    if (num_splits > 1 && (workspace == nullptr || !aligned16(workspace)))
        return "decode_attention: num_splits > 1 needs a 16-byte aligned workspace";
    if (!aligned16(out) || !aligned16(q) || !aligned16(k_cache) || !aligned16(v_cache))
        return "decode_attention: q, out and the caches must be 16-byte aligned";

    AttnArgs a;
    a.out = out;
    a.ws_o = num_splits > 1 ? workspace : nullptr;
    a.ws_ml = num_splits > 1 ? workspace + num_splits * rows * heads * head_dim : nullptr;
    a.q = q;
    a.k_cache = k_cache;
    a.v_cache = v_cache;
    a.cache_rows = cache_rows;
    a.lengths = lengths;
    a.cache_rows_int32 = cache_rows_int32;
    a.lengths_int32 = lengths_int32;
    a.rows = (int)rows;
    a.heads = (int)heads;
    a.kv_heads = (int)kv_heads;
    a.head_dim = (int)head_dim;
    const int rep = (int)(heads / kv_heads);
    a.heads_per_block = rep < 8 ? rep : 8;
    a.head_chunks = (rep + a.heads_per_block - 1) / a.heads_per_block;
    if ((int64_t)kv_heads * a.head_chunks > 65535) return "decode_attention: too many heads";
    a.cache_batch = cache_batch;
    a.cache_len = (int)cache_len;
    a.scale_log2 = scale * kLog2e;

    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    switch (dtype) {
        case SESEME_F16: return launch_typed<__half>(a, num_splits, threads, keys_per_iter, s);
        case SESEME_BF16: return launch_typed<__nv_bfloat16>(a, num_splits, threads, keys_per_iter, s);
        default: return "decode_attention: unsupported dtype code (bf16 and fp16 only)";
    }
}

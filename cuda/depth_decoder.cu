// Persistent depth decoder: the depth steps 2..31 of a frame for up to 4 rows in one launch (issue 16, step 1).
//
// Run as separate kernels, a one-token depth step is ~26 launches (per layer: QKV, attention, o, gate/up, down;
// then the head and the draw) and at batch 1 each boundary costs ~2 us of ramp-up and drain on top of its bytes:
// about half of a 4 ms frame (cuda/NOTES.md). Here one block per SM stays resident for all the steps and the
// phases are separated by a grid-wide barrier (an arrival counter and a generation word in global memory):
//   per layer   QKV GEMV (input normed in the block) | RoPE + append + attention (one block per (head, row),
//               the short-cache code of cuda/rope_append_attention.cu) | o GEMV + residual | gate/up GEMV +
//               SwiGLU (input normed) | down GEMV + residual
//   per step    head GEMV (input normed with the stack's final norm) | the draw of cuda/sampling.cu (one block
//               per row), which also copies the code's projected embedding into h, the next step's input
// Every phase reads its input vector whole (each output needs all of it), so the barriers are where the data
// dependences are; what a barrier would otherwise leave idle is overlapped: before it, every warp asks L2 for the
// first weight lines it will stream in the next phase, and the attention blocks issue their cp.async copies of the
// cached K/V slots at the start of the QKV phase.
//
// GEMV phases: the input rows (n x k, at most 64 KB) are staged in shared memory once per block (through L2:
// other blocks wrote them in this launch, so never the non-coherent read-only path), normalised there with the
// rounding of cuda/rmsnorm.cu where the layer norms its input. A warp owns one output row (a gate row and its up
// row for SwiGLU) and streams it with 16-byte L1-bypassing loads, kU per lane in flight, the next chunk's loads
// issued before the current chunk's multiply (two register buffers). Where the grid has at least twice as many
// warps as the phase has rows and k has chunks enough (a 200-row projection of k = 4,096 in the tests; CSM's
// 1,024-row down projection on 132 x 8 warps does not qualify), `ksplit` warps of a block share a row, each
// taking every ksplit-th chunk of k, and add up through shared memory. fp32 accumulation, one rounding (the
// epilogue of cuda/linear.cuh).
//
// Co-residency: the grid is at most one block per SM with the occupancy checked, so every block is resident
// (the kernel before it in the stream only delays some blocks until it drains). The kernel lets its successor
// launch (PDL) only after the first barrier, when all of its blocks are resident.
#include "depth_decoder.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launch.cuh"
#include "linear.cuh"
#include "numeric.cuh"
#include "sampling_device.cuh"
#include "short_attention_device.cuh"

namespace {

// ----------------------------------------------------------------------------------------------------
// kernels

using seseme_short_attention::ShortAttnArgs;
using seseme_short_attention::ShortAttnBlock;

constexpr unsigned kAll = 0xffffffffu;
constexpr int kWarps = kDepthThreads / 32;
constexpr int kU = 4;                  // 16-byte weight loads per lane and weight row in flight
constexpr int kChunk = 32 * kU;        // 16-byte packs of a weight row per warp and chunk
constexpr int kPartials = 2 * kDepthMaxRows;  // sums per warp in the ksplit reduction

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Grid-wide barrier: words[0] counts arrivals, words[1] is the generation. The last block to arrive resets the
// count and bumps the generation; the others spin on it. The fences make every block's writes before the
// barrier visible to every block after it; thread 0 acts for its block (the __syncthreads around it order the
// other threads). `generation` is only meaningful in thread 0.
struct GridBarrier {
    unsigned* words;
    unsigned generation;

    __device__ void sync() {
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            if (atomicAdd(words, 1u) == gridDim.x - 1) {
                atomicExch(words, 0u);
                __threadfence();
                atomicAdd(words + 1, 1u);
            } else {
                while (load_acquire(words + 1) == generation) {
                }
            }
            generation++;
            __threadfence();
        }
        __syncthreads();
    }
};

// How many warps of a block share an output row: the most (a power of two dividing the chunks of k, at most a
// block's warps) that still give every row a warp group in one pass over the grid.
__device__ __forceinline__ int pick_ksplit(int m, int nchunks) {
    int ks = 1;
    while (2 * ks <= kWarps && nchunks % (2 * ks) == 0 && (int64_t)gridDim.x * (kWarps / (2 * ks)) >= m) ks *= 2;
    return ks;
}

// The x rows (n of k elements, 16-byte packs) into shared memory xs, read through L2; NORM: normalised in place
// as cuda/rmsnorm.cu rounds (sum of squares in fp32 over the raw row, then w * round(x * rsqrt(mean + eps))).
// red: kWarps * NT floats of shared memory. Every thread of the block calls it; ends with a __syncthreads.
template <typename T, int NT, bool NORM>
__device__ void stage_x(const T* x, int k, int n, const T* __restrict__ norm_w, float eps, T* xs, float* red) {
    const int kp = k / 8;
    float ss[NT];
#pragma unroll
    for (int j = 0; j < NT; j++) ss[j] = 0.f;
    for (int p = threadIdx.x; p < kp; p += blockDim.x) {
#pragma unroll
        for (int j = 0; j < NT; j++) {
            if (j >= n) break;
            const uint4 v = __ldcg(reinterpret_cast<const uint4*>(x + (size_t)j * k) + p);
            reinterpret_cast<uint4*>(xs + (size_t)j * k)[p] = v;
            if constexpr (NORM) {
                float f[8];
                unpack8<T>(v, f);
#pragma unroll
                for (int e = 0; e < 8; e++) ss[j] = fmaf(f[e], f[e], ss[j]);
            }
        }
    }
    if constexpr (NORM) {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
        for (int j = 0; j < NT; j++) {
#pragma unroll
            for (int off = 16; off > 0; off /= 2) ss[j] += __shfl_xor_sync(kAll, ss[j], off);
            if (lane == 0) red[warp * NT + j] = ss[j];
        }
        __syncthreads();
        float inv[NT];
#pragma unroll
        for (int j = 0; j < NT; j++) {
            float s = 0.f;
            for (int w = 0; w < kWarps; w++) s += red[w * NT + j];
            inv[j] = rsqrtf(s / (float)k + eps);
        }
        for (int p = threadIdx.x; p < kp; p += blockDim.x) {
            const uint4 wv = __ldg(reinterpret_cast<const uint4*>(norm_w) + p);
#pragma unroll
            for (int j = 0; j < NT; j++) {
                if (j >= n) break;
                uint4* slot = reinterpret_cast<uint4*>(xs + (size_t)j * k) + p;
                float f[8];
                seseme_linear::norm8(*slot, wv, inv[j], f, T());
                Pack<T, 8> r;
#pragma unroll
                for (int e = 0; e < 8; e++) r.v[e] = from_f32<T>(f[e]);  // exact: f holds rounded values
                *reinterpret_cast<Pack<T, 8>*>(slot) = r;
            }
        }
    }
    __syncthreads();
}

// The rows a warp streams in a GEMV phase: item t = (pass t / cpw, chunk ks + (t % cpw) * ksplit).
struct GemvPlan {
    int m, k, kp, ksplit, ks, cpw, items, rows_per_pass;

    __device__ GemvPlan(int m_, int k_) : m(m_), k(k_), kp(k_ / 8) {
        const int warp = threadIdx.x >> 5;
        const int nchunks = (kp + kChunk - 1) / kChunk;
        ksplit = pick_ksplit(m, nchunks);
        ks = warp % ksplit;
        cpw = nchunks / ksplit;
        rows_per_pass = gridDim.x * (kWarps / ksplit);
        items = (m + rows_per_pass - 1) / rows_per_pass * cpw;
    }
    __device__ int row(int t) const {
        return t / cpw * rows_per_pass + ((threadIdx.x >> 5) / ksplit) * gridDim.x + blockIdx.x;
    }
    __device__ int chunk(int t) const { return ks + (t % cpw) * ksplit; }
};

// Ask L2 for the first chunk of weight rows this warp will stream in a GEMV phase (before the barrier in front
// of it: weights are never written, cuda/launch.cuh's rule 1).
template <typename T, bool SWIGLU>
__device__ __forceinline__ void gemv_prefetch(const T* w, int m, int k) {
    const GemvPlan plan(m, k);
    const int lane = threadIdx.x & 31, row = plan.row(0);
    constexpr int kLines = kChunk * 16 / 128;  // 128-byte lines of a chunk
    const int i = lane / kLines, line = lane % kLines;
    if (row >= m || plan.items == 0 || i >= (SWIGLU ? 2 : 1)) return;
    const int64_t e = (int64_t)plan.chunk(0) * kChunk * 8 + line * 64;  // elements (64 per 128-byte line)
    if (e < k) prefetch_l2(w + (size_t)(row + i * m) * k + e);
}

// out[j, row] (+ residual[j, row]) = w[row] . xs[j] for rows < m and j < n, or its SwiGLU with w = [gate; up]
// (2m rows). xs: the staged input rows (shared memory); partial: kWarps * kPartials floats of shared memory.
// Every thread of the block calls it (the ksplit reduction synchronises the block).
template <typename T, int NT, bool SWIGLU>
__device__ void gemv(const T* __restrict__ w, int m, int k, const T* xs, int n, T* out, const T* residual,
                     float* partial) {
    constexpr int RW = SWIGLU ? 2 : 1;
    const GemvPlan plan(m, k);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float acc[RW][NT];
#pragma unroll
    for (int i = 0; i < RW; i++)
#pragma unroll
        for (int j = 0; j < NT; j++) acc[i][j] = 0.f;

    auto load = [&](int t, uint4 (&wv)[RW][kU]) {
        const int row = plan.row(t), p0 = plan.chunk(t) * kChunk + lane;
        if (row >= m) return;
#pragma unroll
        for (int i = 0; i < RW; i++) {
            const T* wr = w + (size_t)(row + i * m) * k;
#pragma unroll
            for (int u = 0; u < kU; u++) {
                const int p = p0 + u * 32;
                wv[i][u] = p < plan.kp ? seseme_linear::ld_stream(wr + (size_t)p * 8) : make_uint4(0, 0, 0, 0);
            }
        }
    };
    auto finish_row = [&](int row) {
#pragma unroll
        for (int i = 0; i < RW; i++)
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int off = 16; off > 0; off /= 2) acc[i][j] += __shfl_xor_sync(kAll, acc[i][j], off);
        if (plan.ksplit > 1) {  // uniform across the block
            if (lane == 0)
#pragma unroll
                for (int i = 0; i < RW; i++)
#pragma unroll
                    for (int j = 0; j < NT; j++) partial[warp * kPartials + i * NT + j] = acc[i][j];
            __syncthreads();
            if (plan.ks == 0 && lane == 0) {
#pragma unroll
                for (int i = 0; i < RW; i++)
#pragma unroll
                    for (int j = 0; j < NT; j++) {
                        float s = 0.f;
                        for (int q = 0; q < plan.ksplit; q++) s += partial[(warp + q) * kPartials + i * NT + j];
                        acc[i][j] = s;
                    }
            }
            __syncthreads();
        }
        if (plan.ks == 0 && lane == 0 && row < m) {
#pragma unroll
            for (int j = 0; j < NT; j++) {
                if (j >= n) break;
                seseme_linear::store_out<T, SWIGLU>(out, residual, (size_t)j * m + row, acc[0][j],
                                                    SWIGLU ? acc[RW - 1][j] : 0.f);
            }
        }
#pragma unroll
        for (int i = 0; i < RW; i++)
#pragma unroll
            for (int j = 0; j < NT; j++) acc[i][j] = 0.f;
    };
    auto compute = [&](int t, const uint4 (&wv)[RW][kU]) {
        const int row = plan.row(t), p0 = plan.chunk(t) * kChunk + lane;
        if (row < m) {
#pragma unroll
            for (int u = 0; u < kU; u++) {
                const int p = p0 + u * 32;
                if (p >= plan.kp) break;
                float wf[RW][8];
#pragma unroll
                for (int i = 0; i < RW; i++) unpack8<T>(wv[i][u], wf[i]);
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    if (j >= n) break;
                    float xf[8];
                    unpack8<T>(reinterpret_cast<const uint4*>(xs + (size_t)j * k)[p], xf);
#pragma unroll
                    for (int i = 0; i < RW; i++)
#pragma unroll
                        for (int e = 0; e < 8; e++) acc[i][j] = fmaf(wf[i][e], xf[e], acc[i][j]);
                }
            }
        }
        if (t % plan.cpw == plan.cpw - 1) finish_row(row);  // the row's last chunk: uniform across the block
    };

    // Two register buffers: the loads of item t + 1 are in flight while item t is multiplied.
    uint4 wa[RW][kU], wb[RW][kU];
    if (plan.items > 0) load(0, wa);
    for (int t = 0; t < plan.items; t += 2) {
        if (t + 1 < plan.items) load(t + 1, wb);
        compute(t, wa);
        if (t + 1 >= plan.items) break;
        if (t + 2 < plan.items) load(t + 2, wa);
        compute(t + 1, wb);
    }
}

template <typename T>
__device__ __forceinline__ ShortAttnArgs attention_args(const DepthStepsArgs& a, const DepthLayer& layer) {
    ShortAttnArgs s = {};
    s.out = a.attn;
    s.k_cache = layer.k_cache;
    s.v_cache = layer.v_cache;
    s.qkv = a.qkv;
    s.inv_freq = a.inv_freq;
    s.heads = a.heads_q;
    s.kv_heads = a.kv_heads;
    s.head_dim = a.head_dim;
    s.heads_per_block = 1;
    s.cache_batch = a.cache_batch;
    s.cache_len = a.cache_len;
    s.scale_log2 = a.scale * kLog2e;
    return s;
}

__host__ __device__ __forceinline__ size_t align16(size_t b) { return (b + 15) / 16 * 16; }

// Shared memory: [x rows or the draw's logits | the attention block's | reduction floats].
__host__ __device__ __forceinline__ size_t x_bytes(int nt, int dim, int q, int ffn, int vocab, size_t esize) {
    const int max_k = dim > q ? (dim > ffn ? dim : ffn) : (q > ffn ? q : ffn);
    const size_t xs = (size_t)nt * max_k * esize, draw = (size_t)(vocab + 3) / 4 * 16;
    return align16(xs > draw ? xs : draw);
}
__host__ __device__ __forceinline__ size_t attn_bytes(int head_dim, int cache_len, size_t esize) {
    return align16(seseme_short_attention::smem_bytes(1, head_dim, cache_len, esize));
}
constexpr size_t kRedBytes = sizeof(float) * kWarps * kPartials;

template <typename T, int NT>
__global__ void __launch_bounds__(kDepthThreads, 1) depth_steps_kernel(const DepthStepsArgs a) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int q = a.heads_q * a.head_dim, qkv_dim = q + 2 * a.kv_heads * a.head_dim;
    const size_t xb = x_bytes(NT, a.dim, q, a.ffn, a.vocab, sizeof(T));
    T* xs = reinterpret_cast<T*>(smem);
    unsigned char* attn_smem = smem + xb;
    float* red = reinterpret_cast<float*>(attn_smem + attn_bytes(a.head_dim, a.cache_len, sizeof(T)));

    T* h = static_cast<T*>(a.h);
    T* qkv = static_cast<T*>(a.qkv);
    T* attn = static_cast<T*>(a.attn);
    T* act = static_cast<T*>(a.act);
    const bool attends = (int)blockIdx.x < a.heads_q * a.n;  // block = (head, row) of the attention phase
    const int att_row = blockIdx.x / a.heads_q, att_head = blockIdx.x % a.heads_q;

    gemv_prefetch<T, false>(static_cast<const T*>(a.layers[0].wqkv), qkv_dim, a.dim);
    wait_for_inputs();  // h, the caches' first slots and the row settings come from earlier kernels
    GridBarrier bar{a.barrier, 0u};
    if (threadIdx.x == 0) bar.generation = load_acquire(a.barrier + 1);
    bool released = false;

    for (int i = a.first_step; i < a.num_codebooks; i++) {
        for (int l = 0; l < a.num_layers; l++) {
            const DepthLayer& L = a.layers[l];
            const ShortAttnArgs sa = attention_args<T>(a, L);
            ShortAttnBlock ab = {};
            if (attends) ab = seseme_short_attention::short_attention_start<T>(sa, attn_smem, att_row, att_head,
                                                                               att_row, i, i + 1);
            stage_x<T, NT, true>(h, a.dim, a.n, static_cast<const T*>(L.attn_norm), a.eps, xs, red);
            gemv<T, NT, false>(static_cast<const T*>(L.wqkv), qkv_dim, a.dim, xs, a.n, qkv, nullptr, red);
            gemv_prefetch<T, false>(static_cast<const T*>(L.wo), a.dim, q);
            bar.sync();
            if (!released) {
                let_next_kernel_start();
                released = true;
            }

            if (attends) seseme_short_attention::short_attention_finish<T>(sa, attn_smem, ab);
            bar.sync();

            stage_x<T, NT, false>(attn, q, a.n, nullptr, 0.f, xs, red);
            gemv<T, NT, false>(static_cast<const T*>(L.wo), a.dim, q, xs, a.n, h, h, red);
            gemv_prefetch<T, true>(static_cast<const T*>(L.w_gate_up), a.ffn, a.dim);
            bar.sync();

            stage_x<T, NT, true>(h, a.dim, a.n, static_cast<const T*>(L.mlp_norm), a.eps, xs, red);
            gemv<T, NT, true>(static_cast<const T*>(L.w_gate_up), a.ffn, a.dim, xs, a.n, act, nullptr, red);
            gemv_prefetch<T, false>(static_cast<const T*>(L.w_down), a.dim, a.ffn);
            bar.sync();

            stage_x<T, NT, false>(act, a.ffn, a.n, nullptr, 0.f, xs, red);
            gemv<T, NT, false>(static_cast<const T*>(L.w_down), a.dim, a.ffn, xs, a.n, h, h, red);
            if (l + 1 < a.num_layers)
                gemv_prefetch<T, false>(static_cast<const T*>(a.layers[l + 1].wqkv), qkv_dim, a.dim);
            else
                gemv_prefetch<T, false>(static_cast<const T*>(a.heads) + (size_t)(i - 1) * a.head_stride, a.vocab,
                                        a.dim);
            bar.sync();
        }

        // The head of codebook i over the stack's normed output, then the draw.
        const T* head = static_cast<const T*>(a.heads) + (size_t)(i - 1) * a.head_stride;
        T* logits = static_cast<T*>(a.logits) + (size_t)i * a.logits_step_stride;
        stage_x<T, NT, true>(h, a.dim, a.n, static_cast<const T*>(a.final_norm), a.eps, xs, red);
        gemv<T, NT, false>(head, a.vocab, a.dim, xs, a.n, logits, nullptr, red);
        if (i + 1 < a.num_codebooks)
            gemv_prefetch<T, false>(static_cast<const T*>(a.layers[0].wqkv), qkv_dim, a.dim);
        bar.sync();

        if ((int)blockIdx.x < a.n) {
            const int r = blockIdx.x;
            const unsigned long long best = seseme_sampling::sample_row<T>(
                logits + (size_t)r * a.vocab, a.vocab, a.temperature[r], a.topk[r], a.seeds + r, a.counters + r,
                (uint32_t)i, reinterpret_cast<float4*>(xs));
            int64_t code = a.forced != nullptr ? a.forced[(size_t)i * a.forced_stride + r]
                                               : (int64_t)seseme_sampling::unpack_index(best);
            code = code < 0 ? 0 : code >= a.vocab ? a.vocab - 1 : code;
            if (threadIdx.x == 0) a.codes[(size_t)i * a.codes_stride + r] = code;
            if (i + 1 < a.num_codebooks) {  // the next step's input: the code's projected embedding
                const uint4* src = reinterpret_cast<const uint4*>(static_cast<const T*>(a.embed) +
                                                                  ((size_t)i * a.vocab + code) * a.dim);
                uint4* dst = reinterpret_cast<uint4*>(h + (size_t)r * a.dim);
                for (int e = threadIdx.x; e < a.dim / 8; e += blockDim.x) dst[e] = __ldg(src + e);
            }
        }
        if (i + 1 < a.num_codebooks) bar.sync();
    }
}

// ----------------------------------------------------------------------------------------------------
// launchers

size_t smem_total(int nt, const DepthStepsArgs& a) {
    const size_t esize = 2;
    return x_bytes(nt, a.dim, a.heads_q * a.head_dim, a.ffn, a.vocab, esize) +
           attn_bytes(a.head_dim, a.cache_len, esize) + kRedBytes;
}

// Per device: the shared memory the kernel was allowed and the blocks per SM it then fits, queried once (the
// engine's first, eager frame does it; CUDA-graph capture then finds them cached), and the SM count.
struct LaunchLimits {
    size_t smem = 0;
    int per_sm = 0, sms = 0;
};

template <typename T, int NT>
const char* launch_typed(const DepthStepsArgs& a, int blocks, cudaStream_t stream) {
    const auto kernel = depth_steps_kernel<T, NT>;
    const size_t smem = smem_total(NT, a);
    static LaunchLimits limits[64];
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return launch_error(cudaGetLastError());
    if (device < 0 || device >= 64) return "depth_steps: device index out of range";
    LaunchLimits& lim = limits[device];
    if (lim.smem < smem) {
        if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess ||
            cudaDeviceGetAttribute(&lim.sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&lim.per_sm, kernel, kDepthThreads, smem) != cudaSuccess)
            return launch_error(cudaGetLastError());
        lim.smem = smem;
    }
    if (lim.per_sm < 1) return "depth_steps: the kernel does not fit on an SM (shared memory or registers)";
    if (blocks == 0) blocks = lim.sms;
    // Every block must be resident at once (the grid barrier), and the attention and draw phases need a block per
    // (head, row) and per row.
    if (blocks > lim.sms * lim.per_sm) return "depth_steps: more blocks than can be resident at once";
    if (blocks < a.heads_q * a.n) return "depth_steps: fewer blocks than (query head, row) pairs";
    return launch_error(launch(kernel, dim3((unsigned)blocks), dim3(kDepthThreads), smem, stream, a));
}

}  // namespace

const char* depth_steps_shape_error(int n, int num_layers, int dim, int heads_q, int kv_heads, int head_dim, int ffn,
                                    int vocab, int first_step, int num_codebooks, int64_t cache_len,
                                    int64_t cache_batch, int dtype) {
    if (dtype != SESEME_BF16 && dtype != SESEME_F16) return "depth_steps: dtype must be bfloat16 or float16";
    if (n < 1 || n > kDepthMaxRows) return "depth_steps: rows must be in [1, 4]";
    if (num_layers < 1 || num_layers > kDepthMaxLayers) return "depth_steps: layers must be in [1, 8]";
    if (dim < 8 || dim % 8 || ffn < 8 || ffn % 8) return "depth_steps: dim and ffn must be positive multiples of 8";
    if (head_dim < 16 || head_dim % 16 || head_dim > kDepthMaxHeadDim)
        return "depth_steps: head_dim must be a multiple of 16 in [16, 128]";
    if (heads_q < 1 || kv_heads < 1 || heads_q % kv_heads) return "depth_steps: heads must be a multiple of kv_heads";
    if (vocab < 1 || vocab > kDepthMaxVocab) return "depth_steps: vocab must be in [1, 8192]";
    if (first_step < 1 || first_step >= num_codebooks) return "depth_steps: first_step must be in [1, codebooks)";
    if (cache_len > kDepthMaxCache || num_codebooks > cache_len)
        return "depth_steps: the cache must hold every step (codebooks <= cache length <= 64)";
    if (cache_batch < n) return "depth_steps: the cache has fewer rows than the batch";
    DepthStepsArgs probe = {};
    probe.dim = dim;
    probe.heads_q = heads_q;
    probe.head_dim = head_dim;
    probe.ffn = ffn;
    probe.vocab = vocab;
    probe.cache_len = (int)cache_len;
    const int nt = n <= 1 ? 1 : n <= 2 ? 2 : 4;
    // sm_90 gives a block 227 KB of shared memory, its static arrays (the draw's and the reductions', ptxas:
    // 1,296 B) included.
    constexpr size_t kStaticSmemBound = 2048;
    if (smem_total(nt, probe) > 227 * 1024 - kStaticSmemBound)
        return "depth_steps: rows of dim / ffn too large for shared memory";
    return nullptr;
}

const char* launch_depth_steps(const DepthStepsArgs& a, int blocks, uintptr_t stream) {
    const char* err = depth_steps_shape_error(a.n, a.num_layers, a.dim, a.heads_q, a.kv_heads, a.head_dim, a.ffn,
                                              a.vocab, a.first_step, a.num_codebooks, a.cache_len, a.cache_batch,
                                              a.dtype);
    if (err != nullptr) return err;
    if (blocks < 0) return "depth_steps: blocks must be >= 0";
    const auto s = reinterpret_cast<cudaStream_t>(stream);
    if (a.dtype == SESEME_BF16) {
        if (a.n <= 1) return launch_typed<__nv_bfloat16, 1>(a, blocks, s);
        if (a.n <= 2) return launch_typed<__nv_bfloat16, 2>(a, blocks, s);
        return launch_typed<__nv_bfloat16, 4>(a, blocks, s);
    }
    if (a.n <= 1) return launch_typed<__half, 1>(a, blocks, s);
    if (a.n <= 2) return launch_typed<__half, 2>(a, blocks, s);
    return launch_typed<__half, 4>(a, blocks, s);
}

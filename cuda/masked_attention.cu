// Attention of a few queries over a short, masked key set, in fp32: Mimi's streaming decoder (8 layers) attends
// its 2 new 25 Hz steps over a 250-slot ring KV cache, with a boolean mask saying which slots are valid and in
// its context. PyTorch runs that as a general memory-efficient attention (cutlass, fp32) at ~0.9 TB/s: 40% of a
// 576-slot Mimi frame on the H200 (BENCHMARKS.md run 14). The work is only reading K and V once.
//
// One block per (batch, head), 8 warps. D/4 lanes hold one key row as float4s (a group), so a warp reads
// 32/(D/4) rows at a time, coalesced:
//   1. scores: each group dots its row with the T queries (in registers, pre-scaled), reduced over the group's
//      lanes; masked keys score -inf. Scores live in shared memory (T x C floats).
//   2. softmax: warp t normalises query t's scores in place (a query with no key: all weights 0).
//   3. values: each group accumulates weight * row into T float4s; reduced over the warp's groups by shuffles,
//      then over the warps through shared memory.
// A key row that no query attends is never read, nor a value row whose weights are all 0: a stream's ring is only
// as full as the audio it has decoded (a 4 s stream has filled 100 of its 250 slots), and the reads are the
// kernel's whole cost. It also keeps whatever an unfilled slot holds (even NaN) out of the result.
#include "masked_attention.cuh"
#include "launch.cuh"

#include <cuda_runtime.h>

#include <cmath>

namespace {

constexpr int kT = kMaskedAttnMaxQueries;
constexpr int kWarps = kMaskedAttnThreads / 32;

// ----------------------------------------------------------------------------------------------------
// kernels

__host__ __device__ __forceinline__ int64_t scores_floats(int64_t T, int64_t C) { return (T * C + 3) / 4 * 4; }

__device__ __forceinline__ float dot4(const float4& a, const float4& b) {
    return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}

// 5 blocks per SM: without the hint ptxas takes 48-50 registers (D = 32, 64), which rounds to 4 blocks of 256
// threads; with it, 46 and no spills (sm_90), as before the skips of commit 60315c3.
template <int D>
__global__ void __launch_bounds__(kMaskedAttnThreads, 5) masked_attention_kernel(MaskedAttentionArgs a) {
    constexpr int L = D / 4;          // lanes per key row
    constexpr int G = 32 / L;         // rows per warp at a time
    constexpr int kRowsPerPass = kWarps * G;
    extern __shared__ float4 smem4[];  // scores [T][C] (padded to whole float4s), then partials [kWarps][T][D]
    float* scores = reinterpret_cast<float*>(smem4);
    float* partial = scores + scores_floats(a.T, a.C);

    wait_for_inputs();  // q, k, v and the mask come from the kernels just before (cuda/launch.cuh)
    let_next_kernel_start();

    const int64_t b = blockIdx.x / a.H, h = blockIdx.x % a.H;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int sub = lane % L, group = lane / L;
    const int T = (int)a.T, C = (int)a.C;
    const float* q = a.q + b * a.q_s[0] + h * a.q_s[1] + sub * 4;
    const float* k = a.k + b * a.k_s[0] + h * a.k_s[1] + sub * 4;
    const float* v = a.v + b * a.v_s[0] + h * a.v_s[1] + sub * 4;
    const bool* mask = a.mask + b * a.mask_s[0] + h * a.mask_s[1];

    float4 qf[kT];
#pragma unroll
    for (int t = 0; t < kT; t++) {
        qf[t] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (t < T) {
            const float4 x = *reinterpret_cast<const float4*>(q + t * a.q_s[2]);
            qf[t] = make_float4(x.x * a.scale, x.y * a.scale, x.z * a.scale, x.w * a.scale);
        }
    }

    // 1. scores (the bound is uniform across the warp: every lane takes part in the shuffles)
    for (int c0 = warp * G; c0 < C; c0 += kRowsPerPass) {
        const int c = c0 + group;
        bool attends[kT];  // uniform over the group's lanes (one row), so the load below is too
        bool any = false;
#pragma unroll
        for (int t = 0; t < kT; t++) {
            attends[t] = t < T && c < C && mask[t * a.mask_s[2] + c * a.mask_s[3]];
            any |= attends[t];
        }
        const float4 kr = any ? *reinterpret_cast<const float4*>(k + c * a.k_s[2]) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int t = 0; t < kT; t++) {
            if (t >= T) break;
            float s = dot4(qf[t], kr);
#pragma unroll
            for (int off = L / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
            if (c < C && sub == 0) scores[t * C + c] = attends[t] ? s : -INFINITY;
        }
    }
    __syncthreads();

    // 2. softmax, one warp per query
    if (warp < T) {
        float* row = scores + warp * C;
        float m = -INFINITY;
        for (int c = lane; c < C; c += 32) m = fmaxf(m, row[c]);
#pragma unroll
        for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
        float sum = 0.f;
        for (int c = lane; c < C; c += 32) {
            const float e = m == -INFINITY ? 0.f : __expf(row[c] - m);
            row[c] = e;
            sum += e;
        }
#pragma unroll
        for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        for (int c = lane; c < C; c += 32) row[c] *= inv;
    }
    __syncthreads();

    // 3. weighted sum of the value rows
    float4 acc[kT];
#pragma unroll
    for (int t = 0; t < kT; t++) acc[t] = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int c = warp * G + group; c < C; c += kRowsPerPass) {
        float w[kT];
        bool any = false;
#pragma unroll
        for (int t = 0; t < kT; t++) {
            w[t] = t < T ? scores[t * C + c] : 0.f;
            any |= w[t] != 0.f;
        }
        if (!any) continue;  // no shuffles in this loop, so a group may skip its row alone
        const float4 vr = *reinterpret_cast<const float4*>(v + c * a.v_s[2]);
#pragma unroll
        for (int t = 0; t < kT; t++) {
            if (t >= T) break;
            acc[t].x += w[t] * vr.x;
            acc[t].y += w[t] * vr.y;
            acc[t].z += w[t] * vr.z;
            acc[t].w += w[t] * vr.w;
        }
    }
#pragma unroll
    for (int t = 0; t < kT; t++) {
#pragma unroll
        for (int off = L; off < 32; off *= 2) {
            acc[t].x += __shfl_xor_sync(0xffffffffu, acc[t].x, off);
            acc[t].y += __shfl_xor_sync(0xffffffffu, acc[t].y, off);
            acc[t].z += __shfl_xor_sync(0xffffffffu, acc[t].z, off);
            acc[t].w += __shfl_xor_sync(0xffffffffu, acc[t].w, off);
        }
        if (t < T && group == 0) *reinterpret_cast<float4*>(partial + (warp * T + t) * D + sub * 4) = acc[t];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < T * L; i += blockDim.x) {
        const int t = i / L, s4 = (i % L) * 4;
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int w = 0; w < kWarps; w++) {
            const float4 p = *reinterpret_cast<const float4*>(partial + (w * T + t) * D + s4);
            o.x += p.x;
            o.y += p.y;
            o.z += p.z;
            o.w += p.w;
        }
        *reinterpret_cast<float4*>(a.out + b * a.out_s[0] + h * a.out_s[1] + t * a.out_s[2] + s4) = o;
    }
}

// ----------------------------------------------------------------------------------------------------
// launchers

template <int D>
const char* launch_d(const MaskedAttentionArgs& a, cudaStream_t stream) {
    const size_t smem = sizeof(float) * (size_t)(scores_floats(a.T, a.C) + kWarps * a.T * D);
    return launch_error(launch(masked_attention_kernel<D>, dim3((unsigned)(a.B * a.H)), dim3(kMaskedAttnThreads),
                               smem, stream, a));
}

}  // namespace

const char* launch_masked_attention(const MaskedAttentionArgs& a, uintptr_t stream) {
    if (a.B * a.H == 0) return nullptr;  // a grid of 0 blocks is a launch error, an empty batch is not
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    switch (a.D) {
        case 32: return launch_d<32>(a, s);
        case 64: return launch_d<64>(a, s);
        case 128: return launch_d<128>(a, s);
        default: return "masked_attention: head dim must be 32, 64 or 128";
    }
}

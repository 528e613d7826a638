// GEMV path of the decode linear layer (n = 1..8 rows of x): memory-bound, CUDA cores.
//
// Each warp owns R output rows (R gate rows + the R matching up rows for SwiGLU) and streams them with 16-byte
// loads, U loads per weight row in flight per lane, L1 bypassed (every weight byte is used once). x is tiny
// (n * k * 2 <= 128 KB) and read through the read-only path, where it stays in L1 for the other warps; one x
// load serves all R rows of the warp, which is why R grows with n. Accumulation is fp32; the R * NT sums of a
// warp are reduced with a transpose-reduce (31 shuffles for 32 sums, not 5 each). `split_k` warps of a block
// share one row group, each taking every split_k-th chunk of K, and add up through shared memory: small-m,
// large-k shapes get enough warps without a global workspace. A warp's first weight step is loaded into
// registers before the kernel waits for its predecessor (programmatic dependent launch, cuda/launch.cuh): the
// small layers, one step per warp, have read all their weights by the time x is ready.
//
// fp8 weights (FP8, launch_linear_fp8): the same kernel with e4m3 weight rows of k bytes, so a 16-byte load holds
// 16 weights and meets two x packs. They are converted to fp32 in registers (exact), accumulated against x in fp32,
// and each row's sum is multiplied once by its fp32 scale (loaded with the first weight step, before the wait)
// ahead of the residual or SwiGLU epilogue. Half the weight bytes of bf16 for the same launch structure; configs
// mean the same (rows, unroll = 16-byte loads in flight per row and lane, split_k).
//
// Fused RMSNorm (NORM, norm_w != null): x is replaced by rms_norm(x, norm_w, eps) on the fly. Each block first
// reduces sum(x^2) of every x row (all its threads, one x read from L2/L1, fp32) - after issuing its first weight
// step, so that DRAM latency overlaps the reduction - then normalises each x pack as it loads it, rounding as
// transformers' LlamaRMSNorm (and cuda/rmsnorm.cu) do: w * round(x * rsqrt(sum / k + eps)), rounded again.
#include <type_traits>

#include "linear.cuh"

namespace seseme_linear {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// ----------------------------------------------------------------------------------------------------
// kernels

// Transpose-reduce of C values per lane over the lanes of the warp. Each stage halves the values a lane keeps:
// lanes with bit OFF set keep the upper half and send the lower. Afterwards a lane holds max(1, C/32) complete
// sums in v[0..], for the value indices lane_base(lane) + j.
template <int C, int OFF, int V>
__device__ __forceinline__ void transpose_reduce(float (&v)[V], int lane) {
    if constexpr (OFF > 0) {
        if constexpr (C > 1) {
            constexpr int H = C / 2;
            const bool upper = (lane & OFF) != 0;
#pragma unroll
            for (int i = 0; i < H; i++) {
                const float send = upper ? v[i] : v[i + H];
                const float keep = upper ? v[i + H] : v[i];
                v[i] = keep + __shfl_xor_sync(kFull, send, OFF);
            }
            transpose_reduce<H, OFF / 2>(v, lane);
        } else {
            v[0] += __shfl_xor_sync(kFull, v[0], OFF);
            transpose_reduce<1, OFF / 2>(v, lane);
        }
    }
}

// Stages that halve the value count: min(5, log2(V)).
template <int V>
constexpr int kHalvings = V >= 32 ? 5 : V >= 16 ? 4 : V >= 8 ? 3 : V >= 4 ? 2 : V >= 2 ? 1 : 0;

template <int V>
__device__ __forceinline__ int lane_base(int lane) {
    int base = 0;
#pragma unroll
    for (int s = 0; s < kHalvings<V>; s++)
        if (lane & (16 >> s)) base += V >> (s + 1);
    return base;
}

// Pack xp (8 elements) of x row j; zeros when j >= n or !ok, i.e. past the row (uniform branches).
template <typename T>
__device__ __forceinline__ uint4 load_x(const T* __restrict__ x, int k, int j, int xp, bool ok, int n) {
    if (j >= n || !ok) return make_uint4(0, 0, 0, 0);
    return __ldg(reinterpret_cast<const uint4*>(x + (size_t)j * k) + xp);
}

// Weights h*8 .. h*8+7 of a 16-byte weight pack as floats: the whole pack (h = 0) for 16-bit weights, either
// half for fp8.
template <typename T, bool FP8>
__device__ __forceinline__ void unpack_w(const uint4& raw, int h, float (&f)[8]) {
    if constexpr (FP8) unpack8_e4m3(h == 0 ? raw.x : raw.z, h == 0 ? raw.y : raw.w, f);
    else unpack8<T>(raw, f);
}

// Grid: one block per `warps / split_k` row groups of R output rows. Rows past m are clamped to row m - 1
// (loaded, never stored) so the loads need no guard. out may alias residual, never x or weight.
// NORM: norm_w (k) is the RMSNorm weight; x is normalised on the fly (see the top of the file).
// FP8: weight_ is e4m3 (one byte per weight) and scale holds one fp32 per weight row; else weight_ is T and
// scale unused.
template <typename T, bool FP8, int NT, int R, int U, bool SWIGLU, bool NORM>
__global__ void __launch_bounds__(256, 1) gemv_kernel(T* out, const T* __restrict__ x, const void* __restrict__ weight_,
                                                  const float* __restrict__ scale, const T* residual, int n, int m,
                                                  int k, int split_k, const T* __restrict__ norm_w, float eps) {
    using W = std::conditional_t<FP8, uint8_t, T>;
    constexpr int XP = FP8 ? 2 : 1;         // x packs (8 elements) per 16-byte weight pack
    constexpr int E = 8 * XP;               // weights per 16-byte pack
    const W* __restrict__ weight = static_cast<const W*>(weight_);
    constexpr int RW = SWIGLU ? 2 * R : R;  // weight rows per warp: value index = row * NT + x row
    constexpr int V = RW * NT;
    constexpr int C = V > 32 ? V / 32 : 1;  // sums per lane after the reduce
    __shared__ float partial[8 * 64];       // split_k: [warp][value], warps <= 8, V <= 64
    static_assert(V <= 64, "too many sums per warp");

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int ks = warp % split_k;
    const int row0 = (blockIdx.x * (blockDim.x / 32 / split_k) + warp / split_k) * R;
    const int npk = k / E;             // 16-byte weight packs per row (x rows have XP times as many)
    constexpr int kChunk = 32 * U;     // packs per warp per step
    const int nchunks = (npk + kChunk - 1) / kChunk;

    const W* wrow[RW];
#pragma unroll
    for (int i = 0; i < RW; i++) {
        const int r = min(row0 + i % R, m - 1);
        wrow[i] = weight + (size_t)(i >= R ? r + m : r) * k;
    }

    float acc[RW][NT];
#pragma unroll
    for (int i = 0; i < RW; i++)
#pragma unroll
        for (int j = 0; j < NT; j++) acc[i][j] = 0.f;

    // x loads go out right behind the weight loads when their registers fit, so their L1 latency hides under
    // the weights' DRAM latency instead of following it (not for the largest NORM tile: it would spill).
    constexpr bool kPreloadX = NT * U * XP <= 16 && !(NORM && V >= 64);

    // A warp's weight steps are c = ks, ks + split_k, ... (< nchunks). Weights are never written during a
    // frame, so the first step is loaded into registers and the second asked of L2 before waiting for the
    // previous kernel (cuda/launch.cuh, rule 1): for the small layers (one step per warp) the whole weight read
    // overlaps the previous kernel, and after the wait only x is loaded.
    uint4 wv[RW][U];
    auto load_weights = [&](int c) {
        const int p0 = c * kChunk + lane;
        const bool full = (c + 1) * kChunk <= npk;
#pragma unroll
        for (int i = 0; i < RW; i++)
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int p = p0 + u * 32;
                wv[i][u] = (full || p < npk) ? ld_stream(wrow[i] + (size_t)p * E) : make_uint4(0, 0, 0, 0);
            }
    };
    if (ks < nchunks) load_weights(ks);
    if (ks + split_k < nchunks && (lane & 7) == 0) {  // one lane per 128-byte line
        const int p0 = (ks + split_k) * kChunk + lane;
#pragma unroll
        for (int i = 0; i < RW; i++)
#pragma unroll
            for (int u = 0; u < U; u++)
                if (p0 + u * 32 < npk) prefetch_l2(wrow[i] + (size_t)(p0 + u * 32) * E);
    }
    // FP8: after the reduce a lane holds the sums of values lane_base .. + C - 1; their rows' scales, read now.
    float sc[FP8 ? C : 1];
    if constexpr (FP8) {
#pragma unroll
        for (int j = 0; j < C; j++) {
            const int i = (lane_base<V>(lane) + j) / NT, r = min(row0 + i % R, m - 1);
            sc[j] = __ldg(scale + (i >= R ? r + m : r));
        }
    }
    wait_for_inputs();
    let_next_kernel_start();

    // NORM: 1 / rms of each x row (the same in every thread), reduced by the whole block while the first weight
    // step is still in flight.
    float inv[NORM ? NT : 1];
    if constexpr (NORM) {
        __shared__ float sq_part[8][NT];  // [warp][x row]
        float ss[NT];
#pragma unroll
        for (int j = 0; j < NT; j++) ss[j] = 0.f;
        for (int p = threadIdx.x; p < npk * XP; p += blockDim.x) {
#pragma unroll
            for (int j = 0; j < NT; j++) {
                if (j >= n) break;  // uniform
                float f[8];
                unpack8<T>(__ldg(reinterpret_cast<const uint4*>(x + (size_t)j * k) + p), f);
#pragma unroll
                for (int e = 0; e < 8; e++) ss[j] = fmaf(f[e], f[e], ss[j]);
            }
        }
#pragma unroll
        for (int j = 0; j < NT; j++) {
#pragma unroll
            for (int off = 16; off > 0; off /= 2) ss[j] += __shfl_xor_sync(kFull, ss[j], off);
            if (lane == 0) sq_part[warp][j] = ss[j];
        }
        __syncthreads();
        const int nwarps = blockDim.x / 32;
#pragma unroll
        for (int j = 0; j < NT; j++) {
            float s = 0.f;
            for (int w = 0; w < nwarps; w++) s += sq_part[w][j];
            inv[j] = rsqrtf(s / (float)k + eps);
        }
    }

    for (int c = ks; c < nchunks; c += split_k) {
        const int p0 = c * kChunk + lane;
        const bool full = (c + 1) * kChunk <= npk;
        if (c != ks) load_weights(c);  // all weight loads of the step issued before the first use
        // x pack u * XP + h of a step meets half h of weight pack u (all of it for 16-bit weights).
        uint4 xv[kPreloadX ? NT : 1][kPreloadX ? U * XP : 1];
        uint4 nv[NORM ? U * XP : 1];  // norm weight packs, shared by the x rows
        if constexpr (kPreloadX) {
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int u = 0; u < U; u++)
#pragma unroll
                    for (int h = 0; h < XP; h++)
                        xv[j][u * XP + h] = load_x(x, k, j, (p0 + u * 32) * XP + h, full || p0 + u * 32 < npk, n);
        }
        if constexpr (NORM) {
#pragma unroll
            for (int u = 0; u < U; u++)
#pragma unroll
                for (int h = 0; h < XP; h++)
                    nv[u * XP + h] = load_x(norm_w, k, 0, (p0 + u * 32) * XP + h, full || p0 + u * 32 < npk, 1);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const bool ok = full || p0 + u * 32 < npk;
#pragma unroll
            for (int h = 0; h < XP; h++) {
                const int xp_index = (p0 + u * 32) * XP + h;
                float wf[RW][8];
#pragma unroll
                for (int i = 0; i < RW; i++) unpack_w<T, FP8>(wv[i][u], h, wf[i]);
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    if (j >= n) break;  // uniform across the block
                    float xf[8];
                    if constexpr (NORM) {
                        uint4 xp;
                        if constexpr (kPreloadX) xp = xv[j][u * XP + h];
                        else xp = load_x(x, k, j, xp_index, ok, n);
                        norm8(xp, nv[u * XP + h], inv[j], xf, T());
                    } else if constexpr (kPreloadX) {
                        unpack8<T>(xv[j][u * XP + h], xf);
                    } else {
                        unpack8<T>(load_x(x, k, j, xp_index, ok, n), xf);
                    }
#pragma unroll
                    for (int i = 0; i < RW; i++)
#pragma unroll
                        for (int e = 0; e < 8; e++) acc[i][j] = fmaf(wf[i][e], xf[e], acc[i][j]);
                }
            }
        }
    }

    float v[V];
#pragma unroll
    for (int i = 0; i < RW; i++)
#pragma unroll
        for (int j = 0; j < NT; j++) v[i * NT + j] = acc[i][j];
    transpose_reduce<V, 16>(v, lane);
    const int base = lane_base<V>(lane);
    const bool writer = (lane & ((32 >> kHalvings<V>) - 1)) == 0;

    if (split_k > 1) {  // uniform across the block
        if (writer)
#pragma unroll
            for (int j = 0; j < C; j++) partial[warp * V + base + j] = v[j];
        __syncthreads();
        if (ks != 0) return;
#pragma unroll
        for (int j = 0; j < C; j++) {
            float s = 0.f;
            for (int q = 0; q < split_k; q++) s += partial[(warp + q) * V + base + j];
            v[j] = s;
        }
    }

    if constexpr (FP8) {
#pragma unroll
        for (int j = 0; j < C; j++) v[j] *= sc[j];
    }

    // SwiGLU: the up sums (upper half of the value indices) sit in the lanes with bit 16 set, 16 lanes away
    // from their gate sums, because the first halving stage split on bit 16.
#pragma unroll
    for (int j = 0; j < C; j++) {
        const float up = SWIGLU ? __shfl_xor_sync(kFull, v[j], 16) : 0.f;
        const int vi = base + j;
        if (writer && (!SWIGLU || (lane & 16) == 0)) {
            const int row = row0 + vi / NT, xr = vi % NT;
            if (xr < n && row < m) store_out<T, SWIGLU>(out, residual, (size_t)xr * m + row, v[j], up);
        }
    }
}

// ----------------------------------------------------------------------------------------------------
// launchers

template <typename T, bool FP8, int NT, int R, int U, bool SWIGLU>
const char* run(const Args& a) {
    const int groups = a.cfg.warps / a.cfg.split_k;
    const int64_t row_groups = (a.m + R - 1) / R;
    const int64_t blocks = (row_groups + groups - 1) / groups;
    const bool norm = a.norm_weight != nullptr;
    return launch_error(launch(norm ? gemv_kernel<T, FP8, NT, R, U, SWIGLU, true>
                                    : gemv_kernel<T, FP8, NT, R, U, SWIGLU, false>,
                               dim3((unsigned)blocks), dim3(a.cfg.warps * 32), 0, a.stream, (T*)a.out, (const T*)a.x,
                               a.weight, a.scale, (const T*)a.residual, a.n, a.m, a.k, a.cfg.split_k,
                               (const T*)a.norm_weight, norm ? a.norm_eps : 0.f));
}

// The (rows, unroll) pairs compiled: weight loads in flight per lane = rows * unroll (* 2 for SwiGLU) <= 16.
template <typename T, bool FP8, int NT, bool SWIGLU>
const char* pick_rows(const Args& a) {
    const int r = a.cfg.rows, u = a.cfg.unroll;
#define SESEME_GEMV_CASE(R_, U_) \
    if (r == R_ && u == U_) return run<T, FP8, NT, R_, U_, SWIGLU>(a);
    SESEME_GEMV_CASE(1, 2) SESEME_GEMV_CASE(1, 4) SESEME_GEMV_CASE(1, 8)
    SESEME_GEMV_CASE(2, 2) SESEME_GEMV_CASE(2, 4) SESEME_GEMV_CASE(4, 2)
    if constexpr (!SWIGLU) {
        SESEME_GEMV_CASE(2, 8) SESEME_GEMV_CASE(4, 4)
    }
#undef SESEME_GEMV_CASE
    return "linear: GEMV rows/unroll pair not compiled";
}

template <typename T, bool FP8, bool SWIGLU>
const char* pick_nt(const Args& a) {
    if (a.n <= 1) return pick_rows<T, FP8, 1, SWIGLU>(a);
    if (a.n <= 2) return pick_rows<T, FP8, 2, SWIGLU>(a);
    if (a.n <= 4) return pick_rows<T, FP8, 4, SWIGLU>(a);
    return pick_rows<T, FP8, 8, SWIGLU>(a);
}

}  // namespace

const char* launch_gemv(const Args& a) {
    if (a.scale != nullptr) {  // fp8 weights: bf16 activations only (fewer kernels to compile)
        if (a.dtype == SESEME_BF16)
            return a.swiglu ? pick_nt<__nv_bfloat16, true, true>(a) : pick_nt<__nv_bfloat16, true, false>(a);
        return "linear_fp8: unsupported dtype code (bf16 only)";
    }
    if (a.dtype == SESEME_BF16)
        return a.swiglu ? pick_nt<__nv_bfloat16, false, true>(a) : pick_nt<__nv_bfloat16, false, false>(a);
    if (a.dtype == SESEME_F16) return a.swiglu ? pick_nt<__half, false, true>(a) : pick_nt<__half, false, false>(a);
    return "linear: unsupported dtype code (bf16 and fp16 only)";
}

}  // namespace seseme_linear

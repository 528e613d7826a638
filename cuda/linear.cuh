// Weight GEMV / skinny GEMM for decode (cuda/linear.cu, linear_gemv.cu, linear_mma.cu).
// The top part is plain C++, so cpp/bind_linear.cpp can include it in a build without CUDA; the part under
// __CUDACC__ is shared by the kernel files only.
//
//   out (n, m) = x (n, k) @ weight (m, k)^T  [+ residual (n, m)]           (plain)
//   out (n, f) = silu(x @ Wg^T) * (x @ Wu^T),  weight = cat([Wg, Wu]) (2f, k)  (swiglu)
// All tensors contiguous row-major in one storage dtype (bf16 or fp16); fp32 accumulation, one rounding.
// Optionally (GEMV kernel only) x is first replaced by rms_norm(x, norm_weight, eps) on the fly, rounded as
// cuda/rmsnorm.cu rounds it: norm_weight * round(x * rsqrt(mean(x^2) + eps)), rounded again.
#pragma once

#include <cstdint>

#include "common.cuh"

// Launch parameters, chosen per shape in Python (seseme_cli.ops.linear.default_config) or by the autotuner.
struct LinearConfig {
    int kernel = 0;   // 0: GEMV (n <= 8, CUDA cores), 1: MMA (n <= 64, tensor cores)
    int warps = 4;    // warps per block, 1..8
    int rows = 1;     // GEMV: output rows per warp (1, 2, 4); MMA: 16-row weight tiles per warp (1, 2, 4)
    int split_k = 1;  // GEMV: warps of a block sharing one row group, each a slice of K (no workspace);
                      // MMA: blocks splitting K, reduced through the workspace (1..16)
    int unroll = 8;   // GEMV: 16-byte weight loads in flight per weight row per lane (2, 4, 8)
    int stages = 3;   // MMA: cp.async pipeline depth (2, 3, 4)
};

enum : int { LINEAR_GEMV = 0, LINEAR_MMA = 1 };

constexpr int kLinearGemvMaxN = 8;
constexpr int kLinearMmaMaxN = 64;
// The MMA split-K workspace starts with this many int32 tile counters (zero between calls: the last block
// of each tile resets its counter), then the fp32 partial sums. A fixed counter region lets one workspace
// serve calls of any shape.
constexpr int64_t kLinearMaxCounters = 8192;

inline bool linear_pow2_upto(int v, int hi) { return v >= 1 && v <= hi && (v & (v - 1)) == 0; }

// x rows per MMA block, padded: 8, 16, 32 or 64.
inline int linear_mma_npad(int64_t n) { return n <= 8 ? 8 : n <= 16 ? 16 : n <= 32 ? 32 : 64; }

// MMA row tiles and K slices as the launcher makes them (every slice gets >= 1 chunk of 64 k).
inline void linear_mma_grid(int64_t m, int64_t k, bool swiglu, const LinearConfig& cfg, int64_t* tiles,
                            int64_t* splits) {
    const int64_t rows_out = (int64_t)cfg.warps * 16 * cfg.rows / (swiglu ? 2 : 1);
    *tiles = (m + rows_out - 1) / rows_out;
    const int64_t nchunks = (k + 63) / 64;
    const int64_t per_split = (nchunks + cfg.split_k - 1) / cfg.split_k;
    *splits = (nchunks + per_split - 1) / per_split;
}

// nullptr if cfg can run this problem, else a static message saying what is wrong (the binding raises
// ValueError). Checks only the config against (n, m, k, swiglu); pointers and alignment are checked at launch.
// seseme_cli.ops.linear.LinearConfig.check applies the same rules (a test holds them equal).
inline const char* linear_config_error(int64_t n, int64_t m, int64_t k, bool swiglu, const LinearConfig& cfg) {
    constexpr int64_t kMax = 2147483647;
    if (n < 1 || m < 1 || k < 1) return "linear: n, m and k must be >= 1";
    if (m > kMax / 2 || k > kMax || n * k > kMax || n * m > kMax) return "linear: sizes too large for 32-bit indexing";
    if (k % 8 != 0) return "linear: k must be a multiple of 8 for the kernels";
    if (!linear_pow2_upto(cfg.warps, 8)) return "linear: warps must be 1, 2, 4 or 8";
    if (cfg.kernel == LINEAR_GEMV) {
        if (n > kLinearGemvMaxN) return "linear: the GEMV kernel takes n <= 8";
        if (!linear_pow2_upto(cfg.rows, 4)) return "linear: GEMV rows (output rows per warp) must be 1, 2 or 4";
        if (cfg.unroll != 2 && cfg.unroll != 4 && cfg.unroll != 8) return "linear: GEMV unroll must be 2, 4 or 8";
        if (cfg.rows * cfg.unroll * (swiglu ? 2 : 1) > 16)
            return "linear: GEMV rows * unroll (* 2 for swiglu) must be <= 16 (loads in flight per lane)";
        if (!linear_pow2_upto(cfg.split_k, 8) || cfg.warps % cfg.split_k != 0)
            return "linear: GEMV split_k must be a power of two dividing warps";
        return nullptr;
    }
    if (cfg.kernel == LINEAR_MMA) {
        if (n > kLinearMmaMaxN) return "linear: the MMA kernel takes n <= 64";
        if (!linear_pow2_upto(cfg.rows, 4)) return "linear: MMA rows (16-row tiles per warp) must be 1, 2 or 4";
        if (swiglu && cfg.rows < 2) return "linear: MMA with swiglu needs rows >= 2 (gate and up tiles per warp)";
        if (cfg.rows * linear_mma_npad(n) > 128) return "linear: MMA rows * padded n / 8 must be <= 16 (accumulators)";
        if (cfg.stages < 2 || cfg.stages > 4) return "linear: MMA stages must be 2, 3 or 4";
        if (cfg.split_k < 1 || cfg.split_k > 16) return "linear: MMA split_k must be in 1..16";
        if ((int64_t)cfg.stages * (cfg.warps * 16 * cfg.rows + linear_mma_npad(n)) * 128 > 227 * 1024)
            return "linear: MMA config needs more than 227 KB of shared memory";
        int64_t tiles, splits;
        linear_mma_grid(m, k, swiglu, cfg, &tiles, &splits);
        if (splits > 1 && tiles > kLinearMaxCounters) return "linear: too many row tiles for split-K";
        return nullptr;
    }
    return "linear: kernel must be 0 (GEMV) or 1 (MMA)";
}

// The fp8-weight GEMV (launch_linear_fp8) takes GEMV configs only, and rows of whole 16-byte packs (k % 16 == 0).
// seseme_cli.ops.linear_fp8 applies the same rules.
inline const char* linear_fp8_config_error(int64_t n, int64_t m, int64_t k, bool swiglu, const LinearConfig& cfg) {
    if (cfg.kernel != LINEAR_GEMV) return "linear_fp8: only the GEMV kernel takes fp8 weights";
    if (k % 16 != 0) return "linear_fp8: k must be a multiple of 16 for the fp8 GEMV";
    return linear_config_error(n, m, k, swiglu, cfg);
}

// Workspace bytes that launch_linear needs for this problem and config (0 when none: no split-K).
inline int64_t linear_workspace_bytes(int64_t n, int64_t m, int64_t k, bool swiglu, const LinearConfig& cfg) {
    if (cfg.kernel != LINEAR_MMA || linear_config_error(n, m, k, swiglu, cfg) != nullptr) return 0;
    int64_t tiles, splits;
    linear_mma_grid(m, k, swiglu, cfg, &tiles, &splits);
    if (splits <= 1) return 0;
    const int64_t partial_floats = (int64_t)cfg.warps * 32 * cfg.rows * linear_mma_npad(n) / 2;  // per block
    return kLinearMaxCounters * 4 + splits * tiles * partial_floats * 4;
}

// m = output columns (f for swiglu; weight then has 2f rows). residual may be null (never with swiglu) and may
// equal out (in place); x must not overlap out. Needs x and weight 16-byte aligned and k % 8 == 0, out and
// residual element-aligned. workspace: zero-initialised device memory of at least linear_workspace_bytes,
// used by one stream at a time. norm_weight (k elements, 16-byte aligned) or null: fused RMSNorm of x with
// norm_eps, GEMV config only. Returns nullptr or a static error message. Asynchronous; no allocation.
const char* launch_linear(void* out, const void* x, const void* weight, const void* residual, void* workspace,
                          int64_t workspace_bytes, int64_t n, int64_t m, int64_t k, bool swiglu, int dtype,
                          const LinearConfig& cfg, uintptr_t stream, const void* norm_weight = nullptr,
                          float norm_eps = 0.f);

// Weight-only fp8 variant of the GEMV: weight (m or 2f, k) float8 e4m3 (one byte each), scale (m or 2f) fp32 per
// output channel (row of weight), so W = weight * scale[:, None]; x, residual, norm_weight and out bf16. Each
// row's sum is accumulated in fp32 over the e4m3 values (exact in fp32) and multiplied by the row's scale once,
// before the residual or the SwiGLU epilogue; one rounding. Needs k % 16 == 0, x and weight 16-byte aligned, a
// GEMV config (linear_fp8_config_error); otherwise as launch_linear. No workspace (the GEMV never splits
// across blocks).
const char* launch_linear_fp8(void* out, const void* x, const void* weight, const float* scale, const void* residual,
                              int64_t n, int64_t m, int64_t k, bool swiglu, int dtype, const LinearConfig& cfg,
                              uintptr_t stream, const void* norm_weight = nullptr, float norm_eps = 0.f);

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launch.cuh"
#include "numeric.cuh"

namespace seseme_linear {

// What a kernel launcher gets; sizes already checked by launch_linear.
struct Args {
    void* out;
    const void* x;
    const void* weight;
    const float* scale;  // null: weight in the storage dtype; else fp8 e4m3 weights with these row scales (GEMV)
    const void* residual;
    void* workspace;
    const void* norm_weight;  // null: no fused RMSNorm (GEMV only)
    float norm_eps;
    int n, m, k;  // m = output columns (f for swiglu)
    bool swiglu;
    int dtype;
    LinearConfig cfg;
    cudaStream_t stream;
};

const char* launch_gemv(const Args& a);
const char* launch_mma(const Args& a);

__device__ __forceinline__ float silu(float v) { return v / (1.f + __expf(-v)); }

// Streamed once per call: skip L1, ask L2 to fetch 256 B around the line.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

// x pack xv normalised: round(round(x * inv) * w) per element, as floats. Both products as torch rounds them:
// the first in fp32, the second exact in fp32 (bf16 * bf16 and fp16 * fp16 fit), then rounded once, which is what
// the packed mul.{bf16,f16}x2 does.
__device__ __forceinline__ void norm8(const uint4& xv, const uint4& wv, float inv, float (&f)[8], __nv_bfloat16) {
    const uint32_t xw[4] = {xv.x, xv.y, xv.z, xv.w}, ww[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        __nv_bfloat162 h = __floats2bfloat162_rn(__uint_as_float(xw[i] << 16) * inv,
                                                 __uint_as_float(xw[i] & 0xffff0000u) * inv);
        h = __hmul2(h, *reinterpret_cast<const __nv_bfloat162*>(&ww[i]));
        const uint32_t u = *reinterpret_cast<const uint32_t*>(&h);
        f[2 * i] = __uint_as_float(u << 16);
        f[2 * i + 1] = __uint_as_float(u & 0xffff0000u);
    }
}

__device__ __forceinline__ void norm8(const uint4& xv, const uint4& wv, float inv, float (&f)[8], __half) {
    const uint32_t xw[4] = {xv.x, xv.y, xv.z, xv.w}, ww[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float2 t = __half22float2(*reinterpret_cast<const __half2*>(&xw[i]));
        __half2 h = __floats2half2_rn(t.x * inv, t.y * inv);
        h = __hmul2(h, *reinterpret_cast<const __half2*>(&ww[i]));
        const float2 r = __half22float2(h);
        f[2 * i] = r.x;
        f[2 * i + 1] = r.y;
    }
}

// The epilogue every kernel shares: one output element from its fp32 accumulator(s), rounded once.
template <typename T, bool SWIGLU>
__device__ __forceinline__ void store_out(T* out, const T* residual, size_t idx, float acc, float up) {
    float y = SWIGLU ? silu(acc) * up : acc;
    if (!SWIGLU && residual != nullptr) y += to_f32(residual[idx]);
    out[idx] = from_f32<T>(y);
}

}  // namespace seseme_linear
#endif

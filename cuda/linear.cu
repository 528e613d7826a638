// Decode linear layer: y = x @ W^T (+ residual) or SwiGLU(x @ [Wg; Wu]^T), for n = 1..64 rows of x; and its
// weight-only fp8 variant (launch_linear_fp8: e4m3 weights with per-row scales, the GEMV only).
// ~95% of the bytes a frame reads go through here. Two kernels (see their files for the design):
//   linear_gemv.cu  n <= 8: CUDA-core GEMV, memory-bound, one warp per few weight rows
//   linear_mma.cu   n <= 64: tensor-core skinny GEMM (mma.sync), cp.async pipeline, optional split-K
// This file checks pointers and dispatches; config checks and workspace sizes are in linear.cuh (plain C++, so
// the binding has them in a CPU build too). The choice of config per shape lives in Python
// (seseme_cli.ops.linear.default_config), where the autotuner can replace it.
#include "linear.cuh"

using namespace seseme_linear;

namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

const char* launch_linear(void* out, const void* x, const void* weight, const void* residual, void* workspace,
                          int64_t workspace_bytes, int64_t n, int64_t m, int64_t k, bool swiglu, int dtype,
                          const LinearConfig& cfg, uintptr_t stream, const void* norm_weight, float norm_eps) {
    if (const char* err = linear_config_error(n, m, k, swiglu, cfg)) return err;
    if (dtype != SESEME_BF16 && dtype != SESEME_F16) return "linear: unsupported dtype (bf16 and fp16 only)";
    if (out == nullptr || x == nullptr || weight == nullptr) return "linear: null out, x or weight";
    if (swiglu && residual != nullptr) return "linear: swiglu takes no residual";
    if (!aligned16(x) || !aligned16(weight)) return "linear: x and weight must be 16-byte aligned";
    if (norm_weight != nullptr && (cfg.kernel != LINEAR_GEMV || !aligned16(norm_weight)))
        return "linear: the fused RMSNorm needs the GEMV kernel and a 16-byte aligned norm_weight";
    const int64_t need = linear_workspace_bytes(n, m, k, swiglu, cfg);
    if (need > 0 && (workspace == nullptr || workspace_bytes < need || !aligned16(workspace)))
        return "linear: this config splits K and needs a 16-byte aligned workspace of linear_workspace_bytes";
    const Args a{out, x, weight, nullptr, residual, workspace, norm_weight, norm_eps, (int)n, (int)m, (int)k, swiglu, dtype, cfg,
                 reinterpret_cast<cudaStream_t>(stream)};
    return cfg.kernel == LINEAR_GEMV ? launch_gemv(a) : launch_mma(a);
}

const char* launch_linear_fp8(void* out, const void* x, const void* weight, const float* scale, const void* residual,
                              int64_t n, int64_t m, int64_t k, bool swiglu, int dtype, const LinearConfig& cfg,
                              uintptr_t stream, const void* norm_weight, float norm_eps) {
    if (const char* err = linear_fp8_config_error(n, m, k, swiglu, cfg)) return err;
    if (dtype != SESEME_BF16) return "linear_fp8: x must be bf16";
    if (out == nullptr || x == nullptr || weight == nullptr || scale == nullptr)
        return "linear_fp8: null out, x, weight or scale";
    if (swiglu && residual != nullptr) return "linear_fp8: swiglu takes no residual";
    if (!aligned16(x) || !aligned16(weight)) return "linear_fp8: x and weight must be 16-byte aligned";
    if (reinterpret_cast<uintptr_t>(scale) % 4 != 0) return "linear_fp8: scale must be 4-byte aligned";
    if (norm_weight != nullptr && !aligned16(norm_weight)) return "linear_fp8: norm_weight must be 16-byte aligned";
    const Args a{out, x, weight, scale, residual, nullptr, norm_weight, norm_eps, (int)n, (int)m, (int)k, swiglu, dtype,
                 cfg, reinterpret_cast<cudaStream_t>(stream)};
    return launch_gemv(a);
}

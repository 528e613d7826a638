// Binding of the decode linear layer (cuda/linear*.cu): seseme_cli._kernels.linear, linear_fp8 and their config
// helpers.
// The config checks and workspace sizes are plain C++ (cuda/linear.cuh), so they work in a CPU build too.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "../cuda/linear.cuh"
#include "check.h"
#include "families.h"

namespace {

using namespace seseme;

LinearConfig make_config(int kernel, int warps, int rows, int split_k, int unroll, int stages) {
    LinearConfig c;
    c.kernel = kernel, c.warps = warps, c.rows = rows, c.split_k = split_k, c.unroll = unroll, c.stages = stages;
    return c;
}

void linear(uintptr_t out, uintptr_t x, uintptr_t weight, uintptr_t residual, uintptr_t workspace,
            int64_t workspace_bytes, int64_t n, int64_t m, int64_t k, bool swiglu, int dtype, int kernel, int warps,
            int rows, int split_k, int unroll, int stages, uintptr_t stream, uintptr_t norm_weight, float norm_eps) {
#if !SESEME_WITH_CUDA
    no_cuda();
#else
    check(dtype == SESEME_BF16 || dtype == SESEME_F16, "linear: dtype must be bfloat16 or float16");
    const LinearConfig cfg = make_config(kernel, warps, rows, split_k, unroll, stages);
    if (const char* err = linear_config_error(n, m, k, swiglu, cfg)) throw py::value_error(err);
    check(out != 0 && x != 0 && weight != 0, "linear: out, x and weight must be non-null device pointers");
    check(!(swiglu && residual != 0), "linear: swiglu takes no residual");
    check(x % 16 == 0 && weight % 16 == 0, "linear: x and weight must be 16-byte aligned");
    check_ptr("out", out, 2);
    check_ptr("residual", residual, 2);
    check(norm_weight == 0 || (kernel == LINEAR_GEMV && norm_weight % 16 == 0),
          "linear: the fused RMSNorm (norm_weight) needs the GEMV kernel and a 16-byte aligned norm_weight");
    const int64_t need = linear_workspace_bytes(n, m, k, swiglu, cfg);
    check(need == 0 || (workspace != 0 && workspace % 16 == 0 && workspace_bytes >= need),
          "linear: this config splits K and needs a 16-byte aligned, zero-initialised workspace of " +
              std::to_string(need) + " bytes, got " + std::to_string(workspace == 0 ? 0 : workspace_bytes));
    check_launch("linear",
                 launch_linear(reinterpret_cast<void*>(out), reinterpret_cast<const void*>(x),
                               reinterpret_cast<const void*>(weight), reinterpret_cast<const void*>(residual),
                               reinterpret_cast<void*>(workspace), workspace_bytes, n, m, k, swiglu, dtype, cfg,
                               stream, reinterpret_cast<const void*>(norm_weight), norm_eps));
#endif
}

void linear_fp8(uintptr_t out, uintptr_t x, uintptr_t weight, uintptr_t scale, uintptr_t residual, int64_t n, int64_t m,
                int64_t k, bool swiglu, int dtype, int kernel, int warps, int rows, int split_k, int unroll, int stages,
                uintptr_t stream, uintptr_t norm_weight, float norm_eps) {
#if !SESEME_WITH_CUDA
    no_cuda();
#else
    check(dtype == SESEME_BF16, "linear_fp8: x must be bfloat16");
    const LinearConfig cfg = make_config(kernel, warps, rows, split_k, unroll, stages);
    if (const char* err = linear_fp8_config_error(n, m, k, swiglu, cfg)) throw py::value_error(err);
    check(out != 0 && x != 0 && weight != 0 && scale != 0,
          "linear_fp8: out, x, weight and scale must be non-null device pointers");
    check(!(swiglu && residual != 0), "linear_fp8: swiglu takes no residual");
    check(x % 16 == 0 && weight % 16 == 0, "linear_fp8: x and weight must be 16-byte aligned");
    check_ptr("scale", scale, 4);
    check_ptr("out", out, 2);
    check_ptr("residual", residual, 2);
    check(norm_weight % 16 == 0, "linear_fp8: norm_weight must be 16-byte aligned");
    check_launch("linear_fp8",
                 launch_linear_fp8(reinterpret_cast<void*>(out), reinterpret_cast<const void*>(x),
                                   reinterpret_cast<const void*>(weight), reinterpret_cast<const float*>(scale),
                                   reinterpret_cast<const void*>(residual), n, m, k, swiglu, dtype, cfg, stream,
                                   reinterpret_cast<const void*>(norm_weight), norm_eps));
#endif
}

py::object config_error(int64_t n, int64_t m, int64_t k, bool swiglu, int kernel, int warps, int rows, int split_k,
                        int unroll, int stages) {
    const char* err = linear_config_error(n, m, k, swiglu, make_config(kernel, warps, rows, split_k, unroll, stages));
    return err == nullptr ? py::object(py::none()) : py::object(py::str(err));
}

py::object fp8_config_error(int64_t n, int64_t m, int64_t k, bool swiglu, int kernel, int warps, int rows, int split_k,
                            int unroll, int stages) {
    const char* err =
        linear_fp8_config_error(n, m, k, swiglu, make_config(kernel, warps, rows, split_k, unroll, stages));
    return err == nullptr ? py::object(py::none()) : py::object(py::str(err));
}

int64_t workspace_bytes(int64_t n, int64_t m, int64_t k, bool swiglu, int kernel, int warps, int rows, int split_k,
                        int unroll, int stages) {
    return linear_workspace_bytes(n, m, k, swiglu, make_config(kernel, warps, rows, split_k, unroll, stages));
}

}  // namespace

void bind_linear(pybind11::module_& m) {
    namespace py = pybind11;
    m.def("linear", &linear, py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("residual"),
          py::arg("workspace"), py::arg("workspace_bytes"), py::arg("n"), py::arg("m"), py::arg("k"),
          py::arg("swiglu"), py::arg("dtype"), py::arg("kernel"), py::arg("warps"), py::arg("rows"),
          py::arg("split_k"), py::arg("unroll"), py::arg("stages"), py::arg("stream"), py::arg("norm_weight") = 0,
          py::arg("norm_eps") = 0.f,
          "out (n, m) = x (n, k) @ weight (m, k)^T [+ residual], or with swiglu out (n, m) = silu(x Wg^T) * "
          "(x Wu^T) for weight (2m, k) = [Wg; Wu]. Pointers 0 for none. Asynchronous on `stream`. norm_weight "
          "(k,): x is first RMS-normalised with it and norm_eps, on the fly (GEMV kernel only).");
    m.def("linear_fp8", &linear_fp8, py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("scale"),
          py::arg("residual"), py::arg("n"), py::arg("m"), py::arg("k"), py::arg("swiglu"), py::arg("dtype"),
          py::arg("kernel"), py::arg("warps"), py::arg("rows"), py::arg("split_k"), py::arg("unroll"),
          py::arg("stages"), py::arg("stream"), py::arg("norm_weight") = 0, py::arg("norm_eps") = 0.f,
          "linear with fp8 e4m3 weights (m or 2m rows, k bytes each) and an fp32 scale per weight row: out = x @ "
          "(weight * scale[:, None])^T [+ residual], or its SwiGLU. bf16 x/out; GEMV configs only; k % 16 == 0.");
    m.def("linear_fp8_config_error", &fp8_config_error, py::arg("n"), py::arg("m"), py::arg("k"), py::arg("swiglu"),
          py::arg("kernel"), py::arg("warps"), py::arg("rows"), py::arg("split_k"), py::arg("unroll"),
          py::arg("stages"), "None if the fp8 GEMV config can run this problem, else why not.");
    m.def("linear_config_error", &config_error, py::arg("n"), py::arg("m"), py::arg("k"), py::arg("swiglu"),
          py::arg("kernel"), py::arg("warps"), py::arg("rows"), py::arg("split_k"), py::arg("unroll"),
          py::arg("stages"), "None if the linear launch config can run this problem, else why not.");
    m.def("linear_workspace_bytes", &workspace_bytes, py::arg("n"), py::arg("m"), py::arg("k"), py::arg("swiglu"),
          py::arg("kernel"), py::arg("warps"), py::arg("rows"), py::arg("split_k"), py::arg("unroll"),
          py::arg("stages"), "Bytes of zero-initialised workspace the config needs (0: none).");
}

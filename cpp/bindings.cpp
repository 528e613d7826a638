// Python binding of the CUDA kernels: module seseme_cli._kernels.
//
// No libtorch: Python passes raw device pointers (ints from tensor.data_ptr()), sizes, a dtype code and a CUDA
// stream handle (torch.cuda.current_stream().cuda_stream). This layer only checks arguments, with messages
// a person can act on, and turns a launcher's error string into an exception. Kernel code lives in cuda/.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>

#include "../cuda/pdl_probe.cuh"
#include "../cuda/rmsnorm.cuh"
#include "../cuda/silu_mul.cuh"
#include "check.h"
#include "families.h"

#ifndef SESEME_WITH_CUDA
#define SESEME_WITH_CUDA 0
#endif
#if SESEME_WITH_CUDA
#include <cuda_runtime.h>
#endif

#ifndef SESEME_VERSION
#define SESEME_VERSION "0.0.0"
#endif

namespace py = pybind11;

namespace {

using namespace seseme;

int device_count() {
#if SESEME_WITH_CUDA
    int n = 0;
    // No driver, or one too old for our runtime, means no usable device: report 0 rather than raise.
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear it so the next launch does not report it
        return 0;
    }
    return n;
#else
    return 0;
#endif
}

void rms_norm(uintptr_t out, uintptr_t x, uintptr_t residual, uintptr_t residual_out, uintptr_t weight,
              int64_t rows, int64_t dim, double eps, int dtype, uintptr_t stream) {
#if !SESEME_WITH_CUDA
    no_cuda();
#else
    const int64_t esize = element_size(dtype);
    check(rows >= 0 && rows <= std::numeric_limits<int32_t>::max(),
          "rms_norm: rows must be in [0, 2^31), got " + std::to_string(rows));
    check(dim > 0 && dim <= std::numeric_limits<int32_t>::max(),
          "rms_norm: dim must be in [1, 2^31), got " + std::to_string(dim));
    check(std::isfinite(eps) && eps >= 0, "rms_norm: eps must be finite and >= 0");
    check(out != 0 && x != 0 && weight != 0, "rms_norm: out, x and weight must be non-null device pointers");
    check((residual == 0) == (residual_out == 0),
          "rms_norm: residual and residual_out must be given together (both non-zero) or not at all");
    check_ptr("out", out, esize);
    check_ptr("x", x, esize);
    check_ptr("weight", weight, esize);
    check_ptr("residual", residual, esize);
    check_ptr("residual_out", residual_out, esize);
    const char* err = launch_rms_norm(reinterpret_cast<void*>(out), reinterpret_cast<const void*>(x),
                                      reinterpret_cast<const void*>(residual),
                                      reinterpret_cast<void*>(residual_out), reinterpret_cast<const void*>(weight),
                                      rows, dim, static_cast<float>(eps), dtype, stream);
    if (err != nullptr) throw std::runtime_error(std::string("rms_norm launch failed: ") + err);
#endif
}

void silu_mul(uintptr_t out, uintptr_t gate_up, int64_t rows, int64_t f, int dtype, uintptr_t stream) {
#if !SESEME_WITH_CUDA
    no_cuda();
#else
    const int64_t esize = element_size(dtype);
    check(rows >= 0 && rows <= std::numeric_limits<int32_t>::max(),
          "silu_mul: rows must be in [0, 2^31), got " + std::to_string(rows));
    check(f >= 0 && f <= std::numeric_limits<int32_t>::max(), "silu_mul: f must be in [0, 2^31), got " + std::to_string(f));
    check(out != 0 && gate_up != 0, "silu_mul: out and gate_up must be non-null device pointers");
    check_ptr("out", out, esize);
    check_ptr("gate_up", gate_up, esize);
    const char* err = launch_silu_mul(reinterpret_cast<void*>(out), reinterpret_cast<const void*>(gate_up), rows, f,
                                      dtype, stream);
    if (err != nullptr) throw std::runtime_error(std::string("silu_mul launch failed: ") + err);
#endif
}

void pdl_probe(uintptr_t times, int64_t spin_ns, uintptr_t stream) {
#if !SESEME_WITH_CUDA
    no_cuda();
#else
    check(times != 0 && times % 8 == 0, "pdl_probe: times must be an aligned device pointer to 3 int64");
    check(spin_ns >= 0 && spin_ns <= 1000000000, "pdl_probe: spin_ns must be in [0, 1e9]");
    const char* err = launch_pdl_probe(reinterpret_cast<int64_t*>(times), spin_ns, stream);
    if (err != nullptr) throw std::runtime_error(std::string("pdl_probe launch failed: ") + err);
#endif
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
    m.doc() = "seseme CUDA kernels; pointers, sizes and stream handles come from seseme_cli.ops";
    m.attr("has_cuda") = py::bool_(kHasCuda);
    m.attr("version") = SESEME_VERSION;
    m.attr("dtype_codes") = std::map<std::string, int>{
        {"float32", SESEME_F32}, {"float16", SESEME_F16}, {"bfloat16", SESEME_BF16}};

    m.def("device_count", &device_count, "Number of CUDA devices our runtime sees (0 without CUDA or driver).");
    m.def("rms_norm", &rms_norm, py::arg("out"), py::arg("x"), py::arg("residual"), py::arg("residual_out"),
          py::arg("weight"), py::arg("rows"), py::arg("dim"), py::arg("eps"), py::arg("dtype"), py::arg("stream"),
          "Fused residual add + RMSNorm over (rows, dim) contiguous tensors; residual/residual_out 0 for none. "
          "Asynchronous on `stream`.");

    m.def("silu_mul", &silu_mul, py::arg("out"), py::arg("gate_up"), py::arg("rows"), py::arg("f"), py::arg("dtype"),
          py::arg("stream"), "out (rows, f) = silu(gate_up[:, :f]) * gate_up[:, f:], contiguous; asynchronous on `stream`.");

    m.def("pdl_probe", &pdl_probe, py::arg("times"), py::arg("spin_ns"), py::arg("stream"),
          "Two kernels showing whether programmatic dependent launch overlaps them (cuda/pdl_probe.cuh).");

    // Each kernel family binds its own functions (cpp/bind_<family>.cpp); one line each.
    // families: calls
    bind_attention(m);
    bind_depth_decoder(m);
    bind_linear(m);
    bind_sampling(m);
}

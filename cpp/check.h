// Argument checks shared by the pybind11 bindings: readable messages, raised as Python ValueError.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../cuda/common.cuh"

#ifndef SESEME_WITH_CUDA
#define SESEME_WITH_CUDA 0
#endif

namespace seseme {

namespace py = pybind11;

constexpr bool kHasCuda = SESEME_WITH_CUDA != 0;

[[noreturn]] inline void no_cuda() { throw std::runtime_error("seseme was built without CUDA"); }

inline void check(bool ok, const std::string& msg) {
    if (!ok) throw py::value_error(msg);
}

inline int64_t element_size(int dtype) {
    switch (dtype) {
        case SESEME_F32: return 4;
        case SESEME_F16: return 2;
        case SESEME_BF16: return 2;
        default: throw py::value_error("unknown dtype code " + std::to_string(dtype) + " (see dtype_codes)");
    }
}

inline void check_ptr(const char* name, uintptr_t ptr, int64_t esize) {
    check(ptr % esize == 0, std::string(name) + " pointer is not aligned to its element size");
}

// A launcher's error string (nullptr = success) becomes a RuntimeError naming the op.
inline void check_launch(const char* op, const char* err) {
    if (err != nullptr) throw std::runtime_error(std::string(op) + " launch failed: " + err);
}

}  // namespace seseme

// Launcher for the fused residual-add + RMSNorm kernel (cuda/rmsnorm.cu).
// Plain C++ types only, so cpp/bindings.cpp can include this header in a build without CUDA.
#pragma once

#include <cstdint>

#include "common.cuh"

// out = weight * rmsnorm(s) with s = x (+ residual), all tensors (rows, dim) contiguous in `dtype`,
// weight (dim,) in `dtype`. With a residual, the rounded sum s is also stored to residual_out.
// residual and residual_out are both null or both non-null. Elementwise aliasing (out == x,
// residual_out == residual, ...) is allowed: every element is read and written by the same thread.
// Returns nullptr on success, else a static error message (launch error or bad dtype).
const char* launch_rms_norm(void* out, const void* x, const void* residual, void* residual_out,
                            const void* weight, int64_t rows, int64_t dim, float eps, int dtype,
                            uintptr_t stream);

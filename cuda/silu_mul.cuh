// Launcher for the SwiGLU product kernel (cuda/silu_mul.cu).
// Plain C++ types only, so cpp/bindings.cpp can include this header in a build without CUDA.
#pragma once

#include <cstdint>

#include "common.cuh"

// out[r, j] = silu(gate_up[r, j]) * gate_up[r, f + j] for r < rows, j < f: gate_up (rows, 2f) and out (rows, f),
// both contiguous in `dtype`, not overlapping. Rounded as PyTorch's silu-then-mul in that dtype: silu once to the
// dtype, the product once more.
// Returns nullptr on success, else a static error message (launch error or bad dtype).
const char* launch_silu_mul(void* out, const void* gate_up, int64_t rows, int64_t f, int dtype, uintptr_t stream);

// Definitions shared by every kernel family and by the pybind11 layer.
// Plain C++ types only, so cpp/ can include it in a build without CUDA.
#pragma once

#include <cstdint>

// Storage dtype codes shared with Python (exported as _kernels.dtype_codes).
enum SesemeDtype : int {
    SESEME_F32 = 0,
    SESEME_F16 = 1,
    SESEME_BF16 = 2,
};

// Device helpers shared by the kernel families: 16-byte packs and the storage <-> fp32 conversions.
// CUDA only (cpp/ includes common.cuh, never this file).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

// N elements moved as one load/store; 16 bytes when N * sizeof(T) == 16.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
    T v[N];
};

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round to nearest even, as torch does when it stores a float result in a half type.
template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Index tensors come as int32 or int64 (whatever the caller had); read either as int64.
__device__ __forceinline__ int64_t load_index(const void* p, bool is_int32, int64_t i) {
    return is_int32 ? (int64_t) static_cast<const int32_t*>(p)[i] : static_cast<const int64_t*>(p)[i];
}

// 8 elements of a 16-byte raw load as floats. bf16 -> fp32 is a shift or a mask per element.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&f)[8]);
template <>
__device__ __forceinline__ void unpack8<__nv_bfloat16>(const uint4& raw, float (&f)[8]) {
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {  // bf16 is the top half of an fp32
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
template <>
__device__ __forceinline__ void unpack8<__half>(const uint4& raw, float (&f)[8]) {
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}

// 8 float8 e4m3 values, element 0 in the low byte of lo, as floats. Exact: every e4m3 value is an fp16 value (sm_89+
// converts a pair with one cvt.rn.f16x2.e4m3x2; cuda_fp8.h falls back to integer code on older GPUs).
__device__ __forceinline__ void unpack8_e4m3(uint32_t lo, uint32_t hi, float (&f)[8]) {
    const uint32_t w[2] = {lo, hi};
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const __half2 v(__nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(w[i] >> (16 * h)), __NV_E4M3));
            const float2 t = __half22float2(v);
            f[4 * i + 2 * h] = t.x;
            f[4 * i + 2 * h + 1] = t.y;
        }
}

// Rotate-half RoPE of one element pair (x1 in a head's first half, x2 its partner in the second) by the angle
// with cosine c and sine s: in fp32, each result rounded once. rope.cu and rope_append_attention.cu both use
// it, so the two write the same bits to a KV cache (a test checks).
template <typename T>
__device__ __forceinline__ void rotate_pair(T& x1, T& x2, float c, float s) {
    const float u1 = to_f32(x1), u2 = to_f32(x2);
    x1 = from_f32<T>(u1 * c - u2 * s);
    x2 = from_f32<T>(u2 * c + u1 * s);
}

// The softmaxes work in base 2 (scores pre-scaled by log2(e)), attention.cu and rope_append_attention.cu.
constexpr float kLog2e = 1.4426950408889634f;

// 2^x with the single MUFU instruction (exp2f adds a denormal-range fix-up we do not need: a softmax weight
// below 2^-126 is 0 here). 2^-inf = 0.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

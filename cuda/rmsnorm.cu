// Fused residual add + RMSNorm, the norm in front of every attention and MLP block (and the final norm).
//
// Semantics equal transformers' LlamaRMSNorm in the pre-norm residual form:
//   s   = (x + residual) rounded to the storage dtype      (stored to residual_out)
//   out = weight * (s.float() * rsqrt(mean(s.float()^2) + eps)).to(dtype)
// The product with weight is rounded once more, exactly like `self.weight * hidden_states.to(input_dtype)`.
//
// One block per row. At our sizes (dim 1024 / 2048) a row is one 16-byte pack per thread, so the whole row
// sits in registers between the sum-of-squares pass and the output pass; longer rows keep their first
// kCache packs in registers and read the rest back (from L1/L2: this thread just touched them).
#include "rmsnorm.cuh"
#include "launch.cuh"
#include "numeric.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

constexpr int kMaxThreads = 256;  // a 2048-wide bf16 row is 256 packs: one each
constexpr int kCache = 4;         // packs per thread kept in registers

// ----------------------------------------------------------------------------------------------------
// kernels


template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
    return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
    *reinterpret_cast<Pack<T, N>*>(p) = v;
}



__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

// blockDim.x is a multiple of 32. Every warp reduces the partials, so every thread gets the total.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x / 32) ? partial[lane] : 0.f;
    return warp_sum(v);
}

// Pack i of s = x (+ residual) as floats in s[]; stores the rounded sum to residual_out. Returns sum(s^2).
template <typename T, int N>
__device__ __forceinline__ float load_s(float (&s)[N], const T* x, const T* residual, T* residual_out, int i) {
    Pack<T, N> p = load_pack<T, N>(x + i * N);
    if (residual != nullptr) {
        const Pack<T, N> r = load_pack<T, N>(residual + i * N);
#pragma unroll
        for (int k = 0; k < N; k++) p.v[k] = from_f32<T>(to_f32(p.v[k]) + to_f32(r.v[k]));
        store_pack<T, N>(residual_out + i * N, p);
    }
    float sumsq = 0.f;
#pragma unroll
    for (int k = 0; k < N; k++) {
        s[k] = to_f32(p.v[k]);
        sumsq += s[k] * s[k];
    }
    return sumsq;
}

template <typename T, int N>
__device__ __forceinline__ void store_out(T* out, const T* weight, const float (&s)[N], float rstd, int i) {
    const Pack<T, N> w = load_pack<T, N>(weight + i * N);
    Pack<T, N> o;
#pragma unroll
    for (int k = 0; k < N; k++) o.v[k] = from_f32<T>(to_f32(w.v[k]) * to_f32(from_f32<T>(s[k] * rstd)));
    store_pack<T, N>(out + i * N, o);
}

// No __restrict__: callers may alias elementwise (out == x, residual_out == residual), which is safe
// because pass 2 visits exactly the elements this thread visited in pass 1.
template <typename T, int N>
__global__ void rms_norm_kernel(T* out, const T* x, const T* residual, T* residual_out, const T* weight,
                                int dim, float eps) {
    wait_for_inputs();  // before any read of activations or write (cuda/launch.cuh)
    let_next_kernel_start();
    const size_t row = (size_t)blockIdx.x * dim;
    const int npacks = dim / N;
    x += row;
    out += row;
    if (residual != nullptr) {
        residual += row;
        residual_out += row;
    }
    // where s lives in memory, for the packs beyond the register cache
    const T* s_mem = residual != nullptr ? residual_out : x;

    float cache[kCache][N];
    float sumsq = 0.f;
#pragma unroll
    for (int c = 0; c < kCache; c++) {
        const int i = threadIdx.x + c * blockDim.x;
        if (i < npacks) sumsq += load_s<T, N>(cache[c], x, residual, residual_out, i);
    }
    for (int i = threadIdx.x + kCache * blockDim.x; i < npacks; i += blockDim.x) {
        float s[N];
        sumsq += load_s<T, N>(s, x, residual, residual_out, i);
    }

    const float rstd = rsqrtf(block_sum(sumsq) / (float)dim + eps);

#pragma unroll
    for (int c = 0; c < kCache; c++) {
        const int i = threadIdx.x + c * blockDim.x;
        if (i < npacks) store_out<T, N>(out, weight, cache[c], rstd, i);
    }
    for (int i = threadIdx.x + kCache * blockDim.x; i < npacks; i += blockDim.x) {
        float s[N];
        load_s<T, N>(s, s_mem, nullptr, nullptr, i);
        store_out<T, N>(out, weight, s, rstd, i);
    }
}

// ----------------------------------------------------------------------------------------------------
// launchers

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
const char* launch_typed(void* out, const void* x, const void* residual, void* residual_out,
                         const void* weight, int64_t rows, int64_t dim, float eps, cudaStream_t stream) {
    constexpr int N = 16 / sizeof(T);
    // 16-byte packs need every row start 16-byte aligned; otherwise fall back to one element at a time.
    const bool vec = dim % N == 0 && aligned16(out) && aligned16(x) && aligned16(weight) &&
                     (residual == nullptr || (aligned16(residual) && aligned16(residual_out)));
    const int npacks = (int)(vec ? dim / N : dim);
    const int threads = npacks >= kMaxThreads ? kMaxThreads : (npacks + 31) / 32 * 32;
    return launch_error(launch(vec ? rms_norm_kernel<T, N> : rms_norm_kernel<T, 1>, dim3((unsigned)rows), dim3(threads), 0,
                               stream, (T*)out, (const T*)x, (const T*)residual, (T*)residual_out, (const T*)weight,
                               (int)dim, eps));
}

}  // namespace

const char* launch_rms_norm(void* out, const void* x, const void* residual, void* residual_out,
                            const void* weight, int64_t rows, int64_t dim, float eps, int dtype,
                            uintptr_t stream) {
    if (rows == 0) return nullptr;  // a grid of 0 blocks is a launch error, an empty batch is not
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    switch (dtype) {
        case SESEME_F32: return launch_typed<float>(out, x, residual, residual_out, weight, rows, dim, eps, s);
        case SESEME_F16: return launch_typed<__half>(out, x, residual, residual_out, weight, rows, dim, eps, s);
        case SESEME_BF16:
            return launch_typed<__nv_bfloat16>(out, x, residual, residual_out, weight, rows, dim, eps, s);
        default: return "rms_norm: unsupported dtype code";
    }
}

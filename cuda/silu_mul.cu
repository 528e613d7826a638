// The SwiGLU product after one GEMM for gate and up together: out = silu(gate) * up, from the GEMM's (rows, 2f)
// output into (rows, f). Above the MMA kernel's 64 rows (batches > 64, prefill chunks) this ran as PyTorch's silu
// in place on the gate half and a multiply: two passes over strided halves, both on PyTorch's non-vectorized
// elementwise kernel (12 + 11 us per call at 512 x 8192 on an H100, 140 calls a frame; BENCHMARKS.md run 18b).
// Here one thread takes a 16-byte pack of gate and the matching pack of up and writes one pack of out.
//
// Rounding as the two PyTorch ops it replaces: s = silu(g) computed in fp32 and rounded to the dtype, then
// out = (s * u) in fp32 rounded once more.
#include "silu_mul.cuh"
#include "launch.cuh"
#include "numeric.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;

template <typename T, int N>
__global__ void silu_mul_kernel(T* __restrict__ out, const T* __restrict__ gate_up, int64_t rows, int64_t f) {
    wait_for_inputs();  // gate_up is the GEMM's output (cuda/launch.cuh)
    let_next_kernel_start();
    const int64_t packs_per_row = f / N;
    const int64_t total = rows * packs_per_row;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / packs_per_row, col = (i % packs_per_row) * N;
        const T* g = gate_up + row * 2 * f + col;
        const Pack<T, N> gp = *reinterpret_cast<const Pack<T, N>*>(g);
        const Pack<T, N> up = *reinterpret_cast<const Pack<T, N>*>(g + f);
        Pack<T, N> o;
#pragma unroll
        for (int k = 0; k < N; k++) {
            const float x = to_f32(gp.v[k]);
            const float s = to_f32(from_f32<T>(x / (1.0f + expf(-x))));
            o.v[k] = from_f32<T>(s * to_f32(up.v[k]));
        }
        *reinterpret_cast<Pack<T, N>*>(out + row * f + col) = o;
    }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
const char* launch_typed(void* out, const void* gate_up, int64_t rows, int64_t f, cudaStream_t stream) {
    constexpr int N = 16 / sizeof(T);
    const bool vec = f % N == 0 && aligned16(out) && aligned16(gate_up);
    const int64_t total = rows * (vec ? f / N : f);
    const int64_t wanted = (total + kThreads - 1) / kThreads;  // one pack per thread (8192 blocks at 2048 x 8192)
    const unsigned blocks = (unsigned)(wanted < kMaxBlocks ? wanted : kMaxBlocks);  // grid-stride beyond that
    return launch_error(launch(vec ? silu_mul_kernel<T, N> : silu_mul_kernel<T, 1>, dim3(blocks), dim3(kThreads), 0,
                               stream, (T*)out, (const T*)gate_up, rows, f));
}

}  // namespace

const char* launch_silu_mul(void* out, const void* gate_up, int64_t rows, int64_t f, int dtype, uintptr_t stream) {
    if (rows == 0 || f == 0) return nullptr;  // nothing to do; a grid of 0 blocks would be a launch error
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    switch (dtype) {
        case SESEME_F32: return launch_typed<float>(out, gate_up, rows, f, s);
        case SESEME_F16: return launch_typed<__half>(out, gate_up, rows, f, s);
        case SESEME_BF16: return launch_typed<__nv_bfloat16>(out, gate_up, rows, f, s);
        default: return "silu_mul: unsupported dtype code";
    }
}

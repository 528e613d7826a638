// Audio-embedding gather-sum: the input of the backbone for an audio frame is the sum of its 32 code
// embeddings, row codes[n, k] + k * vocab of one (32 * vocab, dim) table. Unfused, that is a gather of
// (N, 32, dim) to memory and a sum; here each output element is read once per codebook and written once.
//
// Grid (rows, dim chunks): a block covers `blockDim.x` 16-byte packs of one output row, so even a single
// row spreads over a few SMs. Each thread sums its pack over the codebooks in fp32 (in codebook order, so
// the result is deterministic) with 16 independent loads in flight, then rounds once, like torch's sum of
// the gathered rows. The table is read through the read-only path; a frame touches 32 scattered rows, so
// there is no reuse to stage.
#include "embedding.cuh"
#include "launch.cuh"
#include "numeric.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

constexpr int kUnroll = 16;          // loads in flight per thread
constexpr int kDefaultThreads = 64;  // 4 blocks per 2048-wide bf16 row: a single row still uses 4 SMs

// ----------------------------------------------------------------------------------------------------
// kernels




// N elements per pack: 16 bytes when the row width and pointers allow, else 1.
// The launch bounds matter: without them ptxas holds the kernel to 32 registers and interleaves the loads
// with the adds, leaving only 2-3 loads in flight; with room for 128 it issues all kUnroll loads first.
template <typename T, int N, typename Code>
__global__ void __launch_bounds__(kEmbedMaxThreads, 2)
    embed_codes_kernel(T* __restrict__ out, const Code* __restrict__ codes, const T* __restrict__ table,
                       int num_codebooks, int vocab, int dim) {
    wait_for_inputs();  // before any read of activations or write (cuda/launch.cuh)
    let_next_kernel_start();
    __shared__ int64_t offset[kEmbedMaxCodebooks];  // element offset of each codebook's table row
    const int row = blockIdx.x;
    for (int k = threadIdx.x; k < num_codebooks; k += blockDim.x) {
        int64_t c = (int64_t)codes[(int64_t)row * num_codebooks + k];
        c = c < 0 ? 0 : c >= vocab ? vocab - 1 : c;  // out of range is a caller bug: clamp, never read outside
        offset[k] = (c + (int64_t)k * vocab) * dim;
    }
    __syncthreads();
    const int p = blockIdx.y * blockDim.x + threadIdx.x;
    if (p >= dim / N) return;
    const T* src = table + (int64_t)p * N;

    float acc[N];
#pragma unroll
    for (int j = 0; j < N; j++) acc[j] = 0.f;
    int k = 0;
    for (; k + kUnroll <= num_codebooks; k += kUnroll) {
        Pack<T, N> v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; u++) v[u] = *reinterpret_cast<const Pack<T, N>*>(src + offset[k + u]);
#pragma unroll
        for (int u = 0; u < kUnroll; u++)
#pragma unroll
            for (int j = 0; j < N; j++) acc[j] += to_f32(v[u].v[j]);
    }
    for (; k < num_codebooks; k++) {
        const Pack<T, N> v = *reinterpret_cast<const Pack<T, N>*>(src + offset[k]);
#pragma unroll
        for (int j = 0; j < N; j++) acc[j] += to_f32(v.v[j]);
    }
    Pack<T, N> o;
#pragma unroll
    for (int j = 0; j < N; j++) o.v[j] = from_f32<T>(acc[j]);
    *reinterpret_cast<Pack<T, N>*>(out + (int64_t)row * dim + (int64_t)p * N) = o;
}

// ----------------------------------------------------------------------------------------------------
// launchers

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int N, typename Code>
cudaError_t launch_shape(T* out, const Code* codes, const T* table, int64_t rows, int64_t num_codebooks, int64_t vocab,
                  int64_t dim, int threads, cudaStream_t stream) {
    const int64_t npacks = dim / N;
    if (threads == 0) {
        threads = (int)((npacks + 31) / 32 * 32);
        threads = threads > kDefaultThreads ? kDefaultThreads : threads;
    }
    const dim3 grid((unsigned)rows, (unsigned)((npacks + threads - 1) / threads));
    return launch(embed_codes_kernel<T, N, Code>, grid, dim3(threads), 0, stream, out, codes, table, (int)num_codebooks,
                  (int)vocab, (int)dim);
}

template <typename T, typename Code>
const char* launch_typed(void* out, const void* codes, const void* table, int64_t rows, int64_t num_codebooks,
                         int64_t vocab, int64_t dim, int threads, cudaStream_t stream) {
    constexpr int N = 16 / sizeof(T);
    const bool vec = dim % N == 0 && aligned16(out) && aligned16(table);
    return launch_error((vec ? launch_shape<T, N, Code> : launch_shape<T, 1, Code>)(
        (T*)out, (const Code*)codes, (const T*)table, rows, num_codebooks, vocab, dim, threads, stream));
}

template <typename T>
const char* launch_code_type(void* out, const void* codes, bool codes_int32, const void* table, int64_t rows,
                             int64_t num_codebooks, int64_t vocab, int64_t dim, int threads, cudaStream_t stream) {
    if (codes_int32)
        return launch_typed<T, int32_t>(out, codes, table, rows, num_codebooks, vocab, dim, threads, stream);
    return launch_typed<T, int64_t>(out, codes, table, rows, num_codebooks, vocab, dim, threads, stream);
}

}  // namespace

const char* launch_embed_codes(void* out, const void* codes, bool codes_int32, const void* table, int64_t rows,
                               int64_t num_codebooks, int64_t vocab, int64_t dim, int dtype, int threads,
                               uintptr_t stream) {
    if (rows == 0) return nullptr;  // a grid of 0 blocks is a launch error, an empty batch is not
    if (num_codebooks < 1 || num_codebooks > kEmbedMaxCodebooks) return "embed_codes: num_codebooks out of range";
    if (vocab < 1 || dim < 1 || rows > 0x7fffffff) return "embed_codes: bad sizes";
    if (threads != 0 && (threads % 32 != 0 || threads < 32 || threads > kEmbedMaxThreads))
        return "embed_codes: threads must be a multiple of 32 in [32, kEmbedMaxThreads]";
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    switch (dtype) {
        case SESEME_F32:
            return launch_code_type<float>(out, codes, codes_int32, table, rows, num_codebooks, vocab, dim, threads, s);
        case SESEME_F16:
            return launch_code_type<__half>(out, codes, codes_int32, table, rows, num_codebooks, vocab, dim, threads,
                                            s);
        case SESEME_BF16:
            return launch_code_type<__nv_bfloat16>(out, codes, codes_int32, table, rows, num_codebooks, vocab, dim,
                                                   threads, s);
        default: return "embed_codes: unsupported dtype code";
    }
}

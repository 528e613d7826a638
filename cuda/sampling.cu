// Fused temperature + top-k + sampling: one kernel turns a row of logits into one code, with no host sync.
//
// The random numbers come from Philox4x32-10 (Random123), a counter-based generator: the draw for vocab
// entry i of a row is a pure function of (seed, frame counter, codebook, i), so the RNG state is two device
// tensors the engine advances itself, a CUDA graph replays it faithfully, and a row's result does not depend
// on its batch position. Sampling is an exponential race (= Gumbel-max): argmax_i l_i/T - log(E_i), E_i ~
// Exp(1), which picks i with probability softmax(l/T)_i over the kept set; no normalisation pass is needed.
// ops/sampling.py holds the reference (same Philox in torch int64 arithmetic) that this kernel must equal.
//
// One block per row. The row is staged in shared memory as fp32 (exact for bf16/fp16). The top-k threshold
// is found by radix select on the order-preserving integer image of the logits: 8 bits per pass, one
// shared-memory histogram per pass (warp-aggregated atomics: logits crowd into a few exponent bins), so
// 2 passes for 16-bit logits and at most 4 for fp32, stopping early once the k-th largest's bin is kept
// whole. Each thread then draws one Philox block per 4 consecutive entries and the block takes the argmax
// of (race key, -index) packed into one 64-bit integer, which also settles ties towards the first index.
//
// Optionally the block then copies row `code` of an embedding table into the row's output (the depth decoder's
// next input): one launch per codebook instead of two.
#include "sampling.cuh"
#include "sampling_device.cuh"
#include "launch.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

using namespace seseme_sampling;

// ----------------------------------------------------------------------------------------------------
// kernels

// The launch bounds keep the kernel launchable at the largest block size (<= 64 registers per thread;
// without the 1, ptxas aims at two such blocks per SM, squeezes to 32 registers and spills).
template <typename T>
__global__ void __launch_bounds__(kSampleMaxThreads, 1)
    sample_topk_philox_kernel(int64_t* __restrict__ out, const T* __restrict__ logits, int vocab, int64_t row_stride,
                              const float* __restrict__ temperature, const int32_t* __restrict__ topk,
                              const int64_t* __restrict__ seeds, const int64_t* __restrict__ counters,
                              uint32_t codebook, SampleEmbed embed) {
    wait_for_inputs();  // before any read of activations or write (cuda/launch.cuh)
    let_next_kernel_start();
    extern __shared__ float4 xs4[];  // the row as fp32, padded to whole groups of 4
    const int row = blockIdx.x;
    const unsigned long long best = sample_row<T>(logits + row * row_stride, vocab, temperature[row], topk[row],
                                                  seeds + row, counters + row, codebook, xs4);
    finish_row(best, out, row, embed);
}

// ----------------------------------------------------------------------------------------------------
// launchers

template <typename T>
const char* launch_typed(int64_t* out, const void* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                         const float* temperature, const int32_t* topk, const int64_t* seeds,
                         const int64_t* counters, uint32_t codebook, const SampleEmbed& embed, int threads,
                         cudaStream_t stream) {
    const int groups = (int)((vocab + 3) / 4);
    if (threads == 0) {  // one Philox group per thread
        threads = (groups + 31) / 32 * 32;
        threads = threads < 32 ? 32 : threads > kSampleMaxThreads ? kSampleMaxThreads : threads;
    }
    const size_t smem = (size_t)groups * sizeof(float4);
    return launch_error(launch(sample_topk_philox_kernel<T>, dim3((unsigned)rows), dim3(threads), smem, stream, out,
                               (const T*)logits, (int)vocab, row_stride, temperature, topk, seeds, counters, codebook,
                               embed));
}

}  // namespace

const char* launch_sample_topk_philox(int64_t* out, const void* logits, int64_t rows, int64_t vocab,
                                      int64_t row_stride, const float* temperature, const int32_t* topk,
                                      const int64_t* seeds, const int64_t* counters, uint32_t codebook,
                                      const SampleEmbed& embed, int dtype, int threads, uintptr_t stream) {
    if (rows == 0) return nullptr;  // a grid of 0 blocks is a launch error, an empty batch is not
    if (vocab < 1 || vocab > kSampleMaxVocab) return "sample_topk_philox: vocab out of range";
    if (threads != 0 && (threads % 32 != 0 || threads < 32 || threads > kSampleMaxThreads))
        return "sample_topk_philox: threads must be a multiple of 32 in [32, kSampleMaxThreads]";
    if (embed.table != nullptr &&
        (embed.out == nullptr || embed.row_bytes <= 0 || embed.row_bytes % 16 || embed.out_stride_bytes % 16 ||
         (rows > 1 && embed.out_stride_bytes < embed.row_bytes) || reinterpret_cast<uintptr_t>(embed.table) % 16 ||
         reinterpret_cast<uintptr_t>(embed.out) % 16))
        return "sample_topk_philox: embedding rows, stride and addresses must be multiples of 16 bytes";
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    switch (dtype) {
        case SESEME_F32:
            return launch_typed<float>(out, logits, rows, vocab, row_stride, temperature, topk, seeds, counters,
                                       codebook, embed, threads, s);
        case SESEME_F16:
            return launch_typed<__half>(out, logits, rows, vocab, row_stride, temperature, topk, seeds, counters,
                                        codebook, embed, threads, s);
        case SESEME_BF16:
            return launch_typed<__nv_bfloat16>(out, logits, rows, vocab, row_stride, temperature, topk, seeds,
                                               counters, codebook, embed, threads, s);
        default: return "sample_topk_philox: unsupported dtype code";
    }
}

// Launcher for the fused temperature + top-k + Philox sampling kernel (cuda/sampling.cu).
// Plain C++ types only, so cpp/bind_sampling.cpp can include this header in a build without CUDA.
#pragma once

#include <cstdint>

#include "common.cuh"

// Largest vocabulary the kernel stages in shared memory (32 KB of fp32); the Python side sends larger
// ones to the reference. CSM samples 2051-way.
constexpr int64_t kSampleMaxVocab = 8192;
// Most threads per block.
constexpr int kSampleMaxThreads = 1024;

// Optional epilogue of a draw: copy row `code` of `table` (row_bytes) to out + row * out_stride_bytes, so the
// depth decoder's next input needs no kernel of its own. table == nullptr: none. row_bytes, out_stride_bytes
// and both addresses are multiples of 16.
struct SampleEmbed {
    const void* table = nullptr;
    void* out = nullptr;
    int64_t row_bytes = 0;
    int64_t out_stride_bytes = 0;
};

// One draw per row of logits (rows, vocab) in `dtype`, row r at logits + r * row_stride elements:
//   temperature[r] <= 0 (or NaN) or topk[r] == 1  -> argmax of the raw logits (first index among ties);
//   else keep every logit >= the k-th largest (k = topk[r]; k <= 0 or k >= vocab keeps all), and return
//   argmax over kept i of  l_i / T - log(-log(U_i))  (first index among ties), where U_i is word i % 4 of
//   Philox4x32-10(counter = (i / 4, codebook, counters[r] lo, hi), key = (seeds[r] lo, hi)) mapped to
//   ((u >> 8) + 1) * 2^-24 in (0, 1]; a NaN key (-inf logit, U = 1) counts as -inf. NaN logits: any index.
// temperature fp32, topk int32, seeds/counters/out int64, all (rows,). Reads nothing but these (and the
// embedding table); writes out[r] (and the embedding output row) only. threads: threads per block, a multiple
// of 32 in [32, kSampleMaxThreads], or 0 for the default (one Philox group of 4 entries per thread).
// Returns nullptr on success, else a static error message.
const char* launch_sample_topk_philox(int64_t* out, const void* logits, int64_t rows, int64_t vocab,
                                      int64_t row_stride, const float* temperature, const int32_t* topk,
                                      const int64_t* seeds, const int64_t* counters, uint32_t codebook,
                                      const SampleEmbed& embed, int dtype, int threads, uintptr_t stream);

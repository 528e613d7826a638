// Launcher for the audio-embedding gather-sum kernel (cuda/embedding.cu).
// Plain C++ types only, so cpp/bind_sampling.cpp can include this header in a build without CUDA.
#pragma once

#include <cstdint>

#include "common.cuh"

// Most codebooks per row the kernel takes (their table offsets sit in shared memory); CSM has 32.
constexpr int64_t kEmbedMaxCodebooks = 256;
// Most threads per block (the kernel's register budget assumes it).
constexpr int kEmbedMaxThreads = 256;

// out[n, :] = sum_k table[codes[n, k] + k * vocab, :] for n < rows, k < num_codebooks, accumulated in fp32
// and rounded once to `dtype`. codes (rows, num_codebooks) contiguous, int64 (codes_int32 false) or int32;
// table (num_codebooks * vocab, dim) and out (rows, dim) contiguous in `dtype`. A code outside [0, vocab) is a
// caller bug: the kernel clamps it into range (never reads outside the table; the reference raises instead).
// threads: threads per block, a multiple of 32 in [32, kEmbedMaxThreads], or 0 for the default; the grid
// covers dim in chunks of `threads` 16-byte packs. Returns nullptr on success, else a static error message.
const char* launch_embed_codes(void* out, const void* codes, bool codes_int32, const void* table, int64_t rows,
                               int64_t num_codebooks, int64_t vocab, int64_t dim, int dtype, int threads,
                               uintptr_t stream);

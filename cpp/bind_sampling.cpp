// Bindings of the sampling family (cuda/sampling.cu) and the audio-embedding gather-sum (cuda/embedding.cu):
// the two ops around each depth-decoder step. Checks only; the Python side (seseme_cli.ops.sampling /
// .embedding) has already matched shapes, dtypes and devices of the tensors behind these pointers.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <string>

#include "../cuda/embedding.cuh"
#include "../cuda/sampling.cuh"
#include "check.h"
#include "families.h"

namespace py = pybind11;

namespace {

using namespace seseme;

void check_threads(const char* op, int threads, int max_threads) {
    check(threads == 0 || (threads % 32 == 0 && threads >= 32 && threads <= max_threads),
          std::string(op) + ": threads must be 0 (default) or a multiple of 32 in [32, " + std::to_string(max_threads) +
              "], got " + std::to_string(threads));
}

void sample_topk_philox(uintptr_t out, uintptr_t logits, int64_t rows, int64_t vocab, int64_t row_stride,
                        uintptr_t temperature, uintptr_t topk, uintptr_t seeds, uintptr_t counters, int64_t codebook,
                        int dtype, int threads, uintptr_t stream, uintptr_t embed_table, uintptr_t embed_out,
                        int64_t embed_row_bytes, int64_t embed_out_stride_bytes) {
    const int64_t esize = element_size(dtype);
    check(rows >= 0 && rows <= std::numeric_limits<int32_t>::max(),
          "sample_topk_philox: rows must be in [0, 2^31), got " + std::to_string(rows));
    check(vocab >= 1 && vocab <= kSampleMaxVocab, "sample_topk_philox: vocab must be in [1, " +
                                                      std::to_string(kSampleMaxVocab) + "], got " +
                                                      std::to_string(vocab));
    check(row_stride >= vocab, "sample_topk_philox: row_stride must be >= vocab, got " + std::to_string(row_stride));
    check(codebook >= 0 && codebook <= std::numeric_limits<uint32_t>::max(),
          "sample_topk_philox: codebook must be in [0, 2^32), got " + std::to_string(codebook));
    check_threads("sample_topk_philox", threads, kSampleMaxThreads);
    check(out != 0 && logits != 0 && temperature != 0 && topk != 0 && seeds != 0 && counters != 0,
          "sample_topk_philox: all pointers must be non-null device pointers");
    check_ptr("logits", logits, esize);
    check_ptr("temperature", temperature, 4);
    check_ptr("topk", topk, 4);
    check_ptr("seeds", seeds, 8);
    check_ptr("counters", counters, 8);
    check_ptr("out", out, 8);
    SampleEmbed embed;
    if (embed_table != 0) {
        check(embed_out != 0 && embed_row_bytes > 0 && embed_row_bytes % 16 == 0 && embed_out_stride_bytes % 16 == 0 &&
                  (rows <= 1 || embed_out_stride_bytes >= embed_row_bytes),
              "sample_topk_philox: embedding rows and output stride must be multiples of 16 bytes, got " +
                  std::to_string(embed_row_bytes) + " and " + std::to_string(embed_out_stride_bytes));
        check_ptr("embed_table", embed_table, 16);
        check_ptr("embed_out", embed_out, 16);
        embed = SampleEmbed{reinterpret_cast<const void*>(embed_table), reinterpret_cast<void*>(embed_out),
                            embed_row_bytes, embed_out_stride_bytes};
    }
#if !SESEME_WITH_CUDA
    no_cuda();
#else
    check_launch("sample_topk_philox",
                 launch_sample_topk_philox(reinterpret_cast<int64_t*>(out), reinterpret_cast<const void*>(logits),
                                           rows, vocab, row_stride, reinterpret_cast<const float*>(temperature),
                                           reinterpret_cast<const int32_t*>(topk),
                                           reinterpret_cast<const int64_t*>(seeds),
                                           reinterpret_cast<const int64_t*>(counters),
                                           static_cast<uint32_t>(codebook), embed, dtype, threads, stream));
#endif
}

void embed_codes(uintptr_t out, uintptr_t codes, bool codes_int32, uintptr_t table, int64_t rows,
                 int64_t num_codebooks, int64_t vocab, int64_t dim, int dtype, int threads, uintptr_t stream) {
    const int64_t esize = element_size(dtype);
    check(rows >= 0 && rows <= std::numeric_limits<int32_t>::max(),
          "embed_codes: rows must be in [0, 2^31), got " + std::to_string(rows));
    check(num_codebooks >= 1 && num_codebooks <= kEmbedMaxCodebooks,
          "embed_codes: num_codebooks must be in [1, " + std::to_string(kEmbedMaxCodebooks) + "], got " +
              std::to_string(num_codebooks));
    check(vocab >= 1 && vocab * num_codebooks <= std::numeric_limits<int32_t>::max(),
          "embed_codes: vocab must be >= 1 with num_codebooks * vocab < 2^31, got " + std::to_string(vocab));
    check(dim >= 1 && dim <= (1 << 24), "embed_codes: dim must be in [1, 2^24], got " + std::to_string(dim));
    check_threads("embed_codes", threads, kEmbedMaxThreads);
    check(out != 0 && codes != 0 && table != 0, "embed_codes: out, codes and table must be non-null device pointers");
    check_ptr("out", out, esize);
    check_ptr("table", table, esize);
    check_ptr("codes", codes, codes_int32 ? 4 : 8);
#if !SESEME_WITH_CUDA
    no_cuda();
#else
    check_launch("embed_codes", launch_embed_codes(reinterpret_cast<void*>(out), reinterpret_cast<const void*>(codes),
                                                   codes_int32, reinterpret_cast<const void*>(table), rows,
                                                   num_codebooks, vocab, dim, dtype, threads, stream));
#endif
}

}  // namespace

void bind_sampling(py::module_& m) {
    m.attr("sample_max_vocab") = kSampleMaxVocab;
    m.attr("sample_max_threads") = kSampleMaxThreads;
    m.attr("embed_max_codebooks") = kEmbedMaxCodebooks;
    m.attr("embed_max_threads") = kEmbedMaxThreads;
    m.def("sample_topk_philox", &sample_topk_philox, py::arg("out"), py::arg("logits"), py::arg("rows"),
          py::arg("vocab"), py::arg("row_stride"), py::arg("temperature"), py::arg("topk"), py::arg("seeds"),
          py::arg("counters"), py::arg("codebook"), py::arg("dtype"), py::arg("threads"), py::arg("stream"),
          py::arg("embed_table") = 0, py::arg("embed_out") = 0, py::arg("embed_row_bytes") = 0,
          py::arg("embed_out_stride_bytes") = 0,
          "Temperature + top-k + Philox exponential-race sampling, one int64 code per row of logits; "
          "threads 0 for the default. With embed_table, also copies row `code` of it to embed_out + row * "
          "embed_out_stride_bytes. Asynchronous on `stream`.");
    m.def("embed_codes", &embed_codes, py::arg("out"), py::arg("codes"), py::arg("codes_int32"), py::arg("table"),
          py::arg("rows"), py::arg("num_codebooks"), py::arg("vocab"), py::arg("dim"), py::arg("dtype"),
          py::arg("threads"), py::arg("stream"),
          "out[n] = sum_k table[codes[n, k] + k * vocab] in fp32, rounded once; out-of-range codes are clamped. "
          "threads 0 for the default. Asynchronous on `stream`.");
}

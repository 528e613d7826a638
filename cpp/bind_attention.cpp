// Bindings of the attention family: RoPE + KV-cache append (cuda/rope.cu), decode attention over the
// static KV cache (cuda/attention.cu), both in one kernel for short caches (cuda/rope_append_attention.cu), and
// Mimi's few-query attention under a boolean mask (cuda/masked_attention.cu).
// Checks only; the Python side (seseme_cli.ops.attention) has already
// matched shapes, dtypes and devices of the tensors behind these pointers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "../cuda/attention.cuh"
#include "../cuda/masked_attention.cuh"
#include "../cuda/rope.cuh"
#include "../cuda/rope_append_attention.cuh"
#include "check.h"
#include "families.h"

namespace py = pybind11;

namespace {

using namespace seseme;

void check_shape(const char* op, int64_t rows, int64_t heads, int64_t kv_heads, int64_t cache_batch,
                 int64_t cache_len) {
    const std::string o(op);
    check(rows >= 0 && rows <= std::numeric_limits<int32_t>::max(),
          o + ": rows must be in [0, 2^31), got " + std::to_string(rows));
    check(heads >= 1 && kv_heads >= 1 && heads % kv_heads == 0 && heads + 2 * kv_heads <= 65536,
          o + ": heads must be a positive multiple of kv_heads (heads + 2 kv_heads <= 65536), got " +
              std::to_string(heads) + " and " + std::to_string(kv_heads));
    check(cache_batch >= 1 && cache_len >= 1 && cache_len <= (1 << 24),
          o + ": cache must have batch >= 1 and length in [1, 2^24], got " + std::to_string(cache_batch) + " x " +
              std::to_string(cache_len));
}

void rope_append(uintptr_t q_out, uintptr_t k_cache, uintptr_t v_cache, uintptr_t qkv, uintptr_t positions,
                 bool positions_int32, uintptr_t cache_rows, bool cache_rows_int32, uintptr_t inv_freq,
                 int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t cache_batch,
                 int64_t cache_len, int dtype, int threads, uintptr_t stream) {
    const int64_t esize = element_size(dtype);
    check_shape("rope_append", rows, heads, kv_heads, cache_batch, cache_len);
    check(head_dim >= 2 && head_dim % 2 == 0 && head_dim <= kRopeMaxHeadDim,
          "rope_append: head_dim must be even in [2, " + std::to_string(kRopeMaxHeadDim) + "], got " +
              std::to_string(head_dim));
    check(threads == 0 || (threads % 32 == 0 && threads >= 32 && threads <= kRopeMaxThreads),
          "rope_append: threads must be 0 (default) or a multiple of 32 in [32, " +
              std::to_string(kRopeMaxThreads) + "], got " + std::to_string(threads));
    check(q_out != 0 && k_cache != 0 && v_cache != 0 && qkv != 0 && positions != 0 && cache_rows != 0 &&
              inv_freq != 0,
          "rope_append: all pointers must be non-null device pointers");
    check_ptr("q_out", q_out, esize);
    check_ptr("k_cache", k_cache, esize);
    check_ptr("v_cache", v_cache, esize);
    check_ptr("qkv", qkv, esize);
    check_ptr("positions", positions, positions_int32 ? 4 : 8);
    check_ptr("cache_rows", cache_rows, cache_rows_int32 ? 4 : 8);
    check_ptr("inv_freq", inv_freq, 4);
#if !SESEME_WITH_CUDA
    no_cuda();
#else
    check_launch("rope_append",
                 launch_rope_append(reinterpret_cast<void*>(q_out), reinterpret_cast<void*>(k_cache),
                                    reinterpret_cast<void*>(v_cache), reinterpret_cast<const void*>(qkv),
                                    reinterpret_cast<const void*>(positions), positions_int32,
                                    reinterpret_cast<const void*>(cache_rows), cache_rows_int32,
                                    reinterpret_cast<const float*>(inv_freq), rows, heads, kv_heads, head_dim,
                                    cache_batch, cache_len, dtype, threads, stream));
#endif
}

void decode_attention(uintptr_t out, uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t cache_rows,
                      bool cache_rows_int32, uintptr_t lengths, bool lengths_int32, uintptr_t workspace,
                      int64_t workspace_floats, int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim,
                      int64_t cache_batch, int64_t cache_len, double scale, int num_splits, int threads,
                      int keys_per_iter, int dtype, uintptr_t stream) {
    check(dtype == SESEME_BF16 || dtype == SESEME_F16, "decode_attention: dtype must be bfloat16 or float16");
    check_shape("decode_attention", rows, heads, kv_heads, cache_batch, cache_len);
    check(rows <= 65535, "decode_attention: rows must be <= 65535, got " + std::to_string(rows));
    check(head_dim >= 8 && head_dim % 8 == 0 && head_dim <= kAttnMaxHeadDim,
          "decode_attention: head_dim must be a multiple of 8 in [8, " + std::to_string(kAttnMaxHeadDim) +
              "], got " + std::to_string(head_dim));
    check(cache_len * kv_heads * head_dim <= std::numeric_limits<int32_t>::max(),
          "decode_attention: a cache row (cache_len * kv_heads * head_dim) must have < 2^31 elements");
    check(std::isfinite(scale), "decode_attention: scale must be finite");
    check(num_splits >= 1 && num_splits <= kAttnMaxSplits,
          "decode_attention: num_splits must be in [1, " + std::to_string(kAttnMaxSplits) + "], got " +
              std::to_string(num_splits));
    check(threads == 0 || (threads % 32 == 0 && threads >= 32 && threads <= kAttnMaxThreads),
          "decode_attention: threads must be 0 (default) or a multiple of 32 in [32, " +
              std::to_string(kAttnMaxThreads) + "], got " + std::to_string(threads));
    int rep = 1;  // query heads per block, rounded up to a power of two, as the launcher does
    while (rep < heads / kv_heads && rep < 8) rep *= 2;
    check(keys_per_iter == 0 ||
              ((keys_per_iter == 1 || keys_per_iter == 2 || keys_per_iter == 4 || keys_per_iter == 8) &&
               keys_per_iter * rep <= kAttnMaxRepTimesKeys),
          "decode_attention: keys_per_iter must be 0 (default) or one of 1, 2, 4, 8 with keys_per_iter * " +
              std::to_string(rep) + " <= " + std::to_string(kAttnMaxRepTimesKeys) + ", got " +
              std::to_string(keys_per_iter));
    check(out != 0 && q != 0 && k_cache != 0 && v_cache != 0 && cache_rows != 0 && lengths != 0,
          "decode_attention: out, q, caches, cache_rows and lengths must be non-null device pointers");
    check(out % 16 == 0 && q % 16 == 0 && k_cache % 16 == 0 && v_cache % 16 == 0,
          "decode_attention: out, q and the caches must be 16-byte aligned");
    check_ptr("cache_rows", cache_rows, cache_rows_int32 ? 4 : 8);
    check_ptr("lengths", lengths, lengths_int32 ? 4 : 8);
    if (num_splits > 1) {
        const int64_t need = attention_workspace_floats(rows, heads, head_dim, num_splits);
        check(workspace != 0 && workspace % 16 == 0,
              "decode_attention: num_splits > 1 needs a 16-byte aligned fp32 workspace");
        check(workspace_floats >= need, "decode_attention: workspace holds " + std::to_string(workspace_floats) +
                                            " floats, " + std::to_string(num_splits) + " splits need " +
                                            std::to_string(need));
    }
#if !SESEME_WITH_CUDA
    no_cuda();
#else
    check_launch("decode_attention",
                 launch_decode_attention(reinterpret_cast<void*>(out), reinterpret_cast<const void*>(q),
                                         reinterpret_cast<const void*>(k_cache),
                                         reinterpret_cast<const void*>(v_cache),
                                         reinterpret_cast<const void*>(cache_rows), cache_rows_int32,
                                         reinterpret_cast<const void*>(lengths), lengths_int32,
                                         reinterpret_cast<float*>(workspace), rows, heads, kv_heads, head_dim,
                                         cache_batch, cache_len, static_cast<float>(scale), num_splits, threads,
                                         keys_per_iter, dtype, stream));
#endif
}

void rope_append_attention(uintptr_t out, uintptr_t k_cache, uintptr_t v_cache, uintptr_t qkv, uintptr_t positions,
                           bool positions_int32, uintptr_t cache_rows, bool cache_rows_int32, uintptr_t lengths,
                           bool lengths_int32, uintptr_t inv_freq, int64_t rows, int64_t heads, int64_t kv_heads,
                           int64_t head_dim, int64_t cache_batch, int64_t cache_len, double scale,
                           int heads_per_block, int threads, int dtype, uintptr_t stream) {
    check(dtype == SESEME_BF16 || dtype == SESEME_F16, "rope_append_attention: dtype must be bfloat16 or float16");
    check_shape("rope_append_attention", rows, heads, kv_heads, cache_batch, cache_len);
    check(rows <= 65535, "rope_append_attention: rows must be <= 65535, got " + std::to_string(rows));
    check(head_dim >= 16 && head_dim % 16 == 0 && head_dim <= kShortAttnMaxHeadDim,
          "rope_append_attention: head_dim must be a multiple of 16 in [16, " +
              std::to_string(kShortAttnMaxHeadDim) + "], got " + std::to_string(head_dim));
    check(cache_len <= kShortAttnMaxLen, "rope_append_attention: cache length must be <= " +
                                             std::to_string(kShortAttnMaxLen) + ", got " + std::to_string(cache_len));
    check(heads / kv_heads <= 8, "rope_append_attention: at most 8 query heads per KV head");
    check(std::isfinite(scale), "rope_append_attention: scale must be finite");
    check(heads_per_block == 0 || (heads_per_block >= 1 && (heads / kv_heads) % heads_per_block == 0),
          "rope_append_attention: heads_per_block must be 0 (default) or divide heads / kv_heads, got " +
              std::to_string(heads_per_block));
    check(threads == 0 || (threads % 32 == 0 && threads >= 32 && threads <= kShortAttnMaxThreads),
          "rope_append_attention: threads must be 0 (default) or a multiple of 32 in [32, " +
              std::to_string(kShortAttnMaxThreads) + "], got " + std::to_string(threads));
    check(out != 0 && k_cache != 0 && v_cache != 0 && qkv != 0 && positions != 0 && cache_rows != 0 &&
              lengths != 0 && inv_freq != 0,
          "rope_append_attention: all pointers must be non-null device pointers");
    check(out % 16 == 0 && k_cache % 16 == 0 && v_cache % 16 == 0 && qkv % 16 == 0,
          "rope_append_attention: out, qkv and the caches must be 16-byte aligned");
    check_ptr("positions", positions, positions_int32 ? 4 : 8);
    check_ptr("cache_rows", cache_rows, cache_rows_int32 ? 4 : 8);
    check_ptr("lengths", lengths, lengths_int32 ? 4 : 8);
    check_ptr("inv_freq", inv_freq, 4);
#if !SESEME_WITH_CUDA
    no_cuda();
#else
    check_launch("rope_append_attention",
                 launch_rope_append_attention(
                     reinterpret_cast<void*>(out), reinterpret_cast<void*>(k_cache), reinterpret_cast<void*>(v_cache),
                     reinterpret_cast<const void*>(qkv), reinterpret_cast<const void*>(positions), positions_int32,
                     reinterpret_cast<const void*>(cache_rows), cache_rows_int32,
                     reinterpret_cast<const void*>(lengths), lengths_int32, reinterpret_cast<const float*>(inv_freq),
                     rows, heads, kv_heads, head_dim, cache_batch, cache_len, static_cast<float>(scale),
                     heads_per_block, threads, dtype, stream));
#endif
}

void masked_attention(uintptr_t out, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t mask, int64_t batch,
                      int64_t heads, int64_t queries, int64_t keys, int64_t head_dim, std::array<int64_t, 3> out_strides,
                      std::array<int64_t, 3> q_strides, std::array<int64_t, 3> k_strides,
                      std::array<int64_t, 3> v_strides, std::array<int64_t, 4> mask_strides, double scale,
                      uintptr_t stream) {
    check(batch >= 0 && heads >= 1 && batch * heads <= std::numeric_limits<int32_t>::max(),
          "masked_attention: batch x heads must be in [0, 2^31), got " + std::to_string(batch) + " x " +
              std::to_string(heads));
    check(queries >= 1 && queries <= kMaskedAttnMaxQueries,
          "masked_attention: queries must be in [1, " + std::to_string(kMaskedAttnMaxQueries) + "], got " +
              std::to_string(queries));
    check(keys >= 1 && keys <= kMaskedAttnMaxKeys,
          "masked_attention: keys must be in [1, " + std::to_string(kMaskedAttnMaxKeys) + "], got " +
              std::to_string(keys));
    check(head_dim == 32 || head_dim == 64 || head_dim == 128,
          "masked_attention: head_dim must be 32, 64 or 128, got " + std::to_string(head_dim));
    check(std::isfinite(scale), "masked_attention: scale must be finite");
    check(out != 0 && q != 0 && k != 0 && v != 0 && mask != 0,
          "masked_attention: all pointers must be non-null device pointers");
    for (const auto* strides : {&out_strides, &q_strides, &k_strides, &v_strides})
        for (int64_t s : *strides) check(s % 4 == 0, "masked_attention: q, k, v and out strides must be multiples of 4");
    check_ptr("out", out, 16);
    check_ptr("q", q, 16);
    check_ptr("k", k, 16);
    check_ptr("v", v, 16);
#if !SESEME_WITH_CUDA
    no_cuda();
#else
    MaskedAttentionArgs a{reinterpret_cast<float*>(out), reinterpret_cast<const float*>(q),
                          reinterpret_cast<const float*>(k), reinterpret_cast<const float*>(v),
                          reinterpret_cast<const bool*>(mask), batch, heads, queries, keys, head_dim,
                          {}, {}, {}, {}, {}, (float)scale};
    for (int i = 0; i < 3; i++) {
        a.out_s[i] = out_strides[i];
        a.q_s[i] = q_strides[i];
        a.k_s[i] = k_strides[i];
        a.v_s[i] = v_strides[i];
    }
    for (int i = 0; i < 4; i++) a.mask_s[i] = mask_strides[i];
    check_launch("masked_attention", launch_masked_attention(a, stream));
#endif
}

}  // namespace

void bind_attention(py::module_& m) {
    m.attr("rope_max_head_dim") = kRopeMaxHeadDim;
    m.attr("rope_max_threads") = kRopeMaxThreads;
    m.attr("attention_max_head_dim") = kAttnMaxHeadDim;
    m.attr("attention_max_splits") = kAttnMaxSplits;
    m.attr("attention_max_threads") = kAttnMaxThreads;
    m.attr("attention_max_rep_times_keys") = kAttnMaxRepTimesKeys;
    m.attr("attention_default_threads") = kAttnDefaultThreads;
    m.attr("attention_default_keys_per_iter") = kAttnDefaultKeysPerIter;
    m.def("rope_append", &rope_append, py::arg("q_out"), py::arg("k_cache"), py::arg("v_cache"), py::arg("qkv"),
          py::arg("positions"), py::arg("positions_int32"), py::arg("cache_rows"), py::arg("cache_rows_int32"),
          py::arg("inv_freq"), py::arg("rows"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
          py::arg("cache_batch"), py::arg("cache_len"), py::arg("dtype"), py::arg("threads"), py::arg("stream"),
          "Rotate q and k of each qkv row (RoPE, rotate-half layout), write q to q_out and k, v into the caches at "
          "(cache_rows[n], positions[n]). threads 0 for the default. Asynchronous on `stream`.");
    m.def("decode_attention", &decode_attention, py::arg("out"), py::arg("q"), py::arg("k_cache"),
          py::arg("v_cache"), py::arg("cache_rows"), py::arg("cache_rows_int32"), py::arg("lengths"),
          py::arg("lengths_int32"), py::arg("workspace"), py::arg("workspace_floats"), py::arg("rows"),
          py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("cache_batch"), py::arg("cache_len"),
          py::arg("scale"), py::arg("num_splits"), py::arg("threads"), py::arg("keys_per_iter"), py::arg("dtype"),
          py::arg("stream"),
          "GQA decode attention of each query row over the first lengths[n] slots of cache row cache_rows[n]; "
          "split-KV over num_splits blocks (workspace: fp32, attention_workspace_floats). threads / "
          "keys_per_iter 0 for the defaults. Asynchronous on `stream`.");
    m.attr("short_attention_max_len") = kShortAttnMaxLen;
    m.attr("short_attention_max_head_dim") = kShortAttnMaxHeadDim;
    m.attr("short_attention_group_rows") = kShortAttnGroupRows;
    m.def("rope_append_attention", &rope_append_attention, py::arg("out"), py::arg("k_cache"), py::arg("v_cache"),
          py::arg("qkv"), py::arg("positions"), py::arg("positions_int32"), py::arg("cache_rows"),
          py::arg("cache_rows_int32"), py::arg("lengths"), py::arg("lengths_int32"), py::arg("inv_freq"),
          py::arg("rows"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("cache_batch"),
          py::arg("cache_len"), py::arg("scale"), py::arg("heads_per_block"), py::arg("threads"), py::arg("dtype"),
          py::arg("stream"),
          "rope_append then decode_attention in one kernel, for caches of at most short_attention_max_len slots "
          "and rows with distinct cache rows. heads_per_block / threads 0 for the defaults. Asynchronous on "
          "`stream`.");
    m.attr("masked_attention_max_queries") = kMaskedAttnMaxQueries;
    m.attr("masked_attention_max_keys") = kMaskedAttnMaxKeys;
    m.def("masked_attention", &masked_attention, py::arg("out"), py::arg("q"), py::arg("k"), py::arg("v"),
          py::arg("mask"), py::arg("batch"), py::arg("heads"), py::arg("queries"), py::arg("keys"),
          py::arg("head_dim"), py::arg("out_strides"), py::arg("q_strides"), py::arg("k_strides"),
          py::arg("v_strides"), py::arg("mask_strides"), py::arg("scale"), py::arg("stream"),
          "fp32 attention of (batch, heads, queries, head_dim) q over (batch, heads, keys, head_dim) k, v where the "
          "bool mask (strides of b, h, t, c; 0 to broadcast) is true; a query with no key gets zeros. Strides in "
          "elements, the head dim contiguous. Asynchronous on `stream`.");
}

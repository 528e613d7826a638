// Binding of the persistent depth decoder (cuda/depth_decoder.cu). Checks only; the Python side
// (seseme_cli.ops.depth_decoder) has already matched shapes, dtypes and devices of the tensors behind these pointers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "../cuda/depth_decoder.cuh"
#include "check.h"
#include "families.h"

namespace py = pybind11;

namespace {

using namespace seseme;

// The kernel's reason to refuse these shapes, or None.
py::object shape_error(int n, int num_layers, int dim, int heads_q, int kv_heads, int head_dim, int ffn, int vocab,
                       int first_step, int num_codebooks, int64_t cache_len, int64_t cache_batch, int dtype) {
#if !SESEME_WITH_CUDA
    return py::str("seseme was built without CUDA");
#else
    const char* err = depth_steps_shape_error(n, num_layers, dim, heads_q, kv_heads, head_dim, ffn, vocab, first_step,
                                              num_codebooks, cache_len, cache_batch, dtype);
    return err == nullptr ? py::object(py::none()) : py::object(py::str(err));
#endif
}

// layers: per layer (attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down, k_cache, v_cache) device pointers.
void depth_steps(const std::vector<std::array<uintptr_t, 8>>& layers, uintptr_t final_norm, uintptr_t heads,
                 int64_t head_stride, uintptr_t embed, uintptr_t inv_freq, uintptr_t h, uintptr_t qkv, uintptr_t attn,
                 uintptr_t act, uintptr_t logits, int64_t logits_step_stride, uintptr_t codes, int64_t codes_stride,
                 uintptr_t forced, int64_t forced_stride, uintptr_t temperature, uintptr_t topk, uintptr_t seeds,
                 uintptr_t counters, uintptr_t barrier, double eps, double scale, int n, int dim, int heads_q,
                 int kv_heads, int head_dim, int ffn, int vocab, int first_step, int num_codebooks, int64_t cache_len,
                 int64_t cache_batch, int dtype, int blocks, uintptr_t stream) {
    check(!layers.empty() && layers.size() <= (size_t)kDepthMaxLayers,
          "depth_steps: layers must be 1 to " + std::to_string(kDepthMaxLayers) + ", got " +
              std::to_string(layers.size()));
    DepthStepsArgs a = {};
    for (size_t l = 0; l < layers.size(); l++) {
        const auto& p = layers[l];
        for (uintptr_t ptr : p) check(ptr != 0 && ptr % 16 == 0, "depth_steps: layer pointers must be 16-byte aligned");
        a.layers[l] = DepthLayer{reinterpret_cast<const void*>(p[0]), reinterpret_cast<const void*>(p[1]),
                                 reinterpret_cast<const void*>(p[2]), reinterpret_cast<const void*>(p[3]),
                                 reinterpret_cast<const void*>(p[4]), reinterpret_cast<const void*>(p[5]),
                                 reinterpret_cast<void*>(p[6]), reinterpret_cast<void*>(p[7])};
    }
    for (uintptr_t ptr : {final_norm, heads, embed, h, qkv, attn, act, logits})
        check(ptr != 0 && ptr % 16 == 0, "depth_steps: weights and activations must be 16-byte aligned");
    check(inv_freq != 0 && inv_freq % 4 == 0 && temperature != 0 && topk != 0 && seeds != 0 && counters != 0 &&
              codes != 0 && codes % 8 == 0 && barrier != 0 && barrier % 4 == 0 && forced % 8 == 0,
          "depth_steps: sampling state, codes and barrier must be aligned device pointers");
    a.num_layers = (int)layers.size();
    a.final_norm = reinterpret_cast<const void*>(final_norm);
    a.heads = reinterpret_cast<const void*>(heads);
    a.head_stride = head_stride;
    a.embed = reinterpret_cast<const void*>(embed);
    a.inv_freq = reinterpret_cast<const float*>(inv_freq);
    a.h = reinterpret_cast<void*>(h);
    a.qkv = reinterpret_cast<void*>(qkv);
    a.attn = reinterpret_cast<void*>(attn);
    a.act = reinterpret_cast<void*>(act);
    a.logits = reinterpret_cast<void*>(logits);
    a.logits_step_stride = logits_step_stride;
    a.codes = reinterpret_cast<int64_t*>(codes);
    a.codes_stride = codes_stride;
    a.forced = reinterpret_cast<const int64_t*>(forced);
    a.forced_stride = forced_stride;
    a.temperature = reinterpret_cast<const float*>(temperature);
    a.topk = reinterpret_cast<const int32_t*>(topk);
    a.seeds = reinterpret_cast<const int64_t*>(seeds);
    a.counters = reinterpret_cast<const int64_t*>(counters);
    a.barrier = reinterpret_cast<unsigned*>(barrier);
    a.eps = (float)eps;
    a.scale = (float)scale;
    a.n = n;
    a.dim = dim;
    a.heads_q = heads_q;
    a.kv_heads = kv_heads;
    a.head_dim = head_dim;
    a.ffn = ffn;
    a.vocab = vocab;
    a.first_step = first_step;
    a.num_codebooks = num_codebooks;
    a.cache_len = (int)cache_len;
    a.cache_batch = cache_batch;
    a.dtype = dtype;
#if !SESEME_WITH_CUDA
    (void)blocks;
    (void)stream;
    no_cuda();
#else
    check_launch("depth_steps", launch_depth_steps(a, blocks, stream));
#endif
}

}  // namespace

void bind_depth_decoder(py::module_& m) {
    m.attr("depth_max_rows") = kDepthMaxRows;
    m.def("depth_steps_shape_error", &shape_error, py::arg("n"), py::arg("num_layers"), py::arg("dim"),
          py::arg("heads_q"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("ffn"), py::arg("vocab"),
          py::arg("first_step"), py::arg("num_codebooks"), py::arg("cache_len"), py::arg("cache_batch"),
          py::arg("dtype"), "Why the persistent depth decoder cannot take these shapes, or None.");
    m.def("depth_steps", &depth_steps, py::arg("layers"), py::arg("final_norm"), py::arg("heads"),
          py::arg("head_stride"), py::arg("embed"), py::arg("inv_freq"), py::arg("h"), py::arg("qkv"), py::arg("attn"),
          py::arg("act"), py::arg("logits"), py::arg("logits_step_stride"), py::arg("codes"), py::arg("codes_stride"),
          py::arg("forced"), py::arg("forced_stride"), py::arg("temperature"), py::arg("topk"), py::arg("seeds"),
          py::arg("counters"), py::arg("barrier"), py::arg("eps"), py::arg("scale"), py::arg("n"), py::arg("dim"),
          py::arg("heads_q"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("ffn"), py::arg("vocab"),
          py::arg("first_step"), py::arg("num_codebooks"), py::arg("cache_len"), py::arg("cache_batch"),
          py::arg("dtype"), py::arg("blocks"), py::arg("stream"),
          "Depth steps first_step..num_codebooks-1 of a frame in one persistent launch (cuda/depth_decoder.cuh). "
          "Asynchronous on `stream`.");
}

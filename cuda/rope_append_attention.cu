// RoPE + KV-cache append + decode attention in one kernel, built for latency on short caches: the depth
// decoder's one-token steps (33 slots, 8 query heads over 2 KV heads of 128), 120 calls per frame.
//
// Two kernels did this before (rope_append 2.0 us, decode_attention 6.8 us of marginal time each at batch 1) and
// a first fused version lost (10.5 us, cuda/NOTES.md) because it ran one long serial chain per block: rotate,
// store, barrier, then rounds of key loads each waiting on the last. Here the chain after the wait for the
// preceding kernel (the QKV projection) is as short as it can be:
//   - before the wait: the row's indices, cos/sin of its position, and cp.async copies of every cached K and V
//     slot it attends to except the new one, into shared memory, all in flight at once (one memory latency,
//     overlapping the projection's tail; launch.cuh's rule 1 is relaxed by the precondition in the header:
//     these slots were written many kernels ago);
//   - after it: one 16-byte load pair per (head, chunk) of the row's qkv, rotated in registers; q goes to
//     shared memory as fp32 (pre-scaled), the new k and v to shared memory and, from one block per KV head, to
//     the caches;
//   - then three short phases from shared memory, a barrier apart: scores (one thread per (head, key)),
//     softmax (one warp per head), p @ V (one thread per (head, 2 dims)).
// Blocks are (heads_per_block query heads, row): with one head per block a batch-1 step spreads over 8 blocks,
// each with a quarter of the work, and every block reads its KV head's slots (from L2 after the first).
//
// Shared memory: K rows padded by 16 bytes (a warp's threads score different keys at the same column: the pad
// puts 8 consecutive keys' 16-byte chunks in distinct banks), V rows unpadded (p @ V reads along a row).
#include "rope_append_attention.cuh"
#include "launch.cuh"
#include "numeric.cuh"
#include "short_attention_device.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

namespace {

using namespace seseme_short_attention;

// ----------------------------------------------------------------------------------------------------
// kernels

template <typename T>
__global__ void __launch_bounds__(kShortAttnMaxThreads) rope_append_attention_kernel(const ShortAttnArgs a) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int n = blockIdx.y;
    const ShortAttnBlock b = short_attention_start<T>(a, smem_raw, n, blockIdx.x,
                                                      load_index(a.cache_rows, a.cache_rows_int32, n),
                                                      load_index(a.positions, a.positions_int32, n),
                                                      load_index(a.lengths, a.lengths_int32, n));
    wait_for_inputs();  // the QKV projection is done
    let_next_kernel_start();
    short_attention_finish<T>(a, smem_raw, b);
}

}  // namespace

// ----------------------------------------------------------------------------------------------------
// launchers

using namespace seseme_short_attention;

const char* launch_rope_append_attention(void* out, void* k_cache, void* v_cache, const void* qkv,
                                         const void* positions, bool positions_int32, const void* cache_rows,
                                         bool cache_rows_int32, const void* lengths, bool lengths_int32,
                                         const float* inv_freq, int64_t rows, int64_t heads, int64_t kv_heads,
                                         int64_t head_dim, int64_t cache_batch, int64_t cache_len, float scale,
                                         int heads_per_block, int threads, int dtype, uintptr_t stream) {
    if (rows == 0) return nullptr;
    if (rows < 0 || rows > 65535) return "rope_append_attention: rows must be in [0, 65535]";
    if (head_dim % 16 != 0 || head_dim > kShortAttnMaxHeadDim || cache_len < 1 || cache_len > kShortAttnMaxLen)
        return "rope_append_attention: head_dim or cache length out of the kernel's range";
    const int64_t rep = heads / kv_heads;
    if (heads_per_block == 0) heads_per_block = rows >= kShortAttnGroupRows ? (int)rep : 1;
    if (heads_per_block < 1 || rep % heads_per_block != 0)
        return "rope_append_attention: heads_per_block must divide heads / kv_heads";
    if (threads == 0) threads = kShortAttnDefaultThreads;
    if (threads % 32 != 0 || threads < 32 || threads > kShortAttnMaxThreads)
        return "rope_append_attention: threads must be a multiple of 32 in [32, 256]";
    ShortAttnArgs a;
    a.out = out;
    a.k_cache = k_cache;
    a.v_cache = v_cache;
    a.qkv = qkv;
    a.positions = positions;
    a.cache_rows = cache_rows;
    a.lengths = lengths;
    a.inv_freq = inv_freq;
    a.positions_int32 = positions_int32;
    a.cache_rows_int32 = cache_rows_int32;
    a.lengths_int32 = lengths_int32;
    a.heads = (int)heads;
    a.kv_heads = (int)kv_heads;
    a.head_dim = (int)head_dim;
    a.heads_per_block = heads_per_block;
    a.cache_batch = cache_batch;
    a.cache_len = (int)cache_len;
    a.scale_log2 = scale * kLog2e;
    const dim3 grid((unsigned)(heads / heads_per_block), (unsigned)rows);
    const auto st = reinterpret_cast<cudaStream_t>(stream);
    const size_t esize = 2;  // bf16 or fp16
    const size_t smem = smem_bytes(heads_per_block, head_dim, cache_len, esize);
    if (smem > 48 * 1024) return "rope_append_attention: shared memory above 48 KB";
    switch (dtype) {
        case SESEME_BF16:
            return launch_error(launch(rope_append_attention_kernel<__nv_bfloat16>, grid, dim3(threads), smem, st, a));
        case SESEME_F16:
            return launch_error(launch(rope_append_attention_kernel<__half>, grid, dim3(threads), smem, st, a));
        default:
            return "rope_append_attention: dtype must be bfloat16 or float16";
    }
}

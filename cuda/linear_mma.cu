// Tensor-core path of the decode linear layer (n = 1..64 rows of x; meant for n > 8): mma.sync m16n8k16
// (HMMA, sm_80 and sm_90) with the weight as the M operand and x as the N operand, so out^T = W x^T.
//
// A block owns BM = warps * 16 * MW weight rows and all n (padded to NT8 * 8) for one slice of K. Weight and x
// tiles of 64 k go global -> shared with cp.async, `stages` deep (the next chunks' loads overlap this chunk's
// MMAs). Shared rows are 128 bytes; the 16-byte unit u of row r sits at u ^ 4 * (r & 1), so both the cp.async
// stores and the fragment loads below are bank-conflict free.
//
// K is permuted inside each 32-wide half chunk so a fragment is one 16-byte load: lane (g = lane / 4,
// t = lane % 4) reads elements [8t, 8t + 8) of its rows and uses them as k = {2t, 2t+1, 2t+8, 2t+9} of two
// consecutive k16 MMAs. A and B use the same permutation, so the dot products are unchanged, and no ldmatrix is
// needed. SwiGLU blocks hold gate rows in the first MW/2 tiles of each warp and the matching up rows in the
// last MW/2, so each thread has gate and up of the same output element in registers.
//
// Split-K (gridDim.y > 1): each block writes its raw fp32 accumulators to the workspace; the last block of a
// row tile to arrive (an atomic counter, reset by that block) adds all slices in a fixed order (deterministic)
// and runs the epilogue.
#include "linear.cuh"

namespace seseme_linear {
namespace {

constexpr int kBK = 64;  // k per chunk: one 128-byte shared row

// ----------------------------------------------------------------------------------------------------
// kernels

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

__device__ __forceinline__ uint4 lds128(uint32_t addr) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
    return v;
}

__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1, __nv_bfloat16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1, __half) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void wait_stages(int stages) {  // chunk c is in once at most stages-2 groups pend
    if (stages == 2) cp_async_wait<0>();
    else if (stages == 3) cp_async_wait<1>();
    else cp_async_wait<2>();
}

// Output row of accumulator row `r16` (0..15) of tile i of this warp; for SwiGLU tiles i and i + MW/2 share it.
template <int MW, bool SWIGLU>
__device__ __forceinline__ int out_row(int tile, int warp, int warps, int i, int r16) {
    constexpr int MO = SWIGLU ? MW / 2 : MW;  // output tiles per warp
    return ((tile * warps + warp) * MO + (i % MO)) * 16 + r16;
}

template <typename T, int NT8, int MW, bool SWIGLU>
__global__ void __launch_bounds__(256, 1) mma_kernel(T* out, const T* __restrict__ x, const T* __restrict__ weight,
                                                 const T* residual, float* partials, int* counters, int n, int m,
                                                 int k, int chunks_per_split, int stages) {
    constexpr int NPAD = NT8 * 8;
    constexpr int MO = SWIGLU ? MW / 2 : MW;
    extern __shared__ __align__(128) uint8_t smem[];
    __shared__ int is_last;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int bm = warps * 16 * MW;                     // weight rows per block
    const uint32_t stage_bytes = (uint32_t)(bm + NPAD) * 128;
    const uint32_t smem0 = (uint32_t)__cvta_generic_to_shared(smem);
    const int nchunks = (k + kBK - 1) / kBK;
    const int c_begin = blockIdx.y * chunks_per_split;
    const int nch = min(c_begin + chunks_per_split, nchunks) - c_begin;  // >= 1 (launcher)

    // This thread's cp.async sources: unit u of rows r0 + 4 * warps * j (weights), then x rows likewise.
    const int u = tid & 7, r0 = tid >> 3, rstep = warps * 4;
    const T* wsrc[4 * MW];
    bool wok[4 * MW];
#pragma unroll
    for (int j = 0; j < 4 * MW; j++) {  // bm / rstep == 4 * MW rows per thread
        const int r = r0 + j * rstep;
        const int w = r / (16 * MW), i = (r / 16) % MW;
        const int orow = out_row<MW, SWIGLU>(blockIdx.x, w, warps, i, r % 16);
        wok[j] = orow < m;
        wsrc[j] = weight + (size_t)(SWIGLU && i >= MO ? orow + m : orow) * k + u * 8;
    }

    auto load_chunk = [&](int chunk, int stage) {
        const uint32_t sbase = smem0 + stage * stage_bytes + ((u ^ ((r0 & 1) << 2)) << 4);  // rstep is even
        const int kk = chunk * kBK + u * 8;
        const bool kok = kk < k;  // k % 8 == 0: a unit is all in or all out
#pragma unroll
        for (int j = 0; j < 4 * MW; j++) {
            const bool ok = wok[j] && kok;
            cp_async16(sbase + (r0 + j * rstep) * 128, ok ? (const void*)(wsrc[j] + chunk * kBK) : weight,
                       ok ? 16 : 0);
        }
        for (int r = r0; r < NPAD; r += rstep) {
            const bool ok = r < n && kok;
            cp_async16(sbase + (bm + r) * 128, ok ? (const void*)(x + (size_t)r * k + kk) : x, ok ? 16 : 0);
        }
    };

    float c[MW][NT8][4];
#pragma unroll
    for (int i = 0; i < MW; i++)
#pragma unroll
        for (int j = 0; j < NT8; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) c[i][j][q] = 0.f;

    // The pipeline's first weight chunks towards L2 while the previous kernel finishes (cuda/launch.cuh).
    // One thread of the 8 that share a 128-byte row asks for it.
    for (int s = 0; u == 0 && s < stages - 1 && s < nch && (c_begin + s) * kBK < k; s++) {
#pragma unroll
        for (int j = 0; j < 4 * MW; j++)
            if (wok[j]) prefetch_l2(wsrc[j] + (c_begin + s) * kBK);
    }
    wait_for_inputs();
    let_next_kernel_start();

    for (int s = 0; s < stages - 1; s++) {
        if (s < nch) load_chunk(c_begin + s, s);
        cp_async_commit();
    }
    const uint32_t unit_off[2] = {(uint32_t)((t ^ ((g & 1) << 2)) << 4), (uint32_t)(((4 + t) ^ ((g & 1) << 2)) << 4)};
    int read_stage = 0, write_stage = stages - 1;
    for (int ci = 0; ci < nch; ci++) {
        wait_stages(stages);
        __syncthreads();  // chunk ci visible to all; everyone is done with the stage written next
        if (ci + stages - 1 < nch) load_chunk(c_begin + ci + stages - 1, write_stage);
        cp_async_commit();

        const uint32_t sb = smem0 + read_stage * stage_bytes;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            uint4 a[MW][2];
#pragma unroll
            for (int i = 0; i < MW; i++) {
                const uint32_t row = warp * 16 * MW + i * 16 + g;
                a[i][0] = lds128(sb + row * 128 + unit_off[h]);
                a[i][1] = lds128(sb + (row + 8) * 128 + unit_off[h]);
            }
#pragma unroll
            for (int j = 0; j < NT8; j++) {
                const uint4 b = lds128(sb + (bm + j * 8 + g) * 128 + unit_off[h]);
#pragma unroll
                for (int i = 0; i < MW; i++) {
                    mma16816(c[i][j], a[i][0].x, a[i][1].x, a[i][0].y, a[i][1].y, b.x, b.y, T());
                    mma16816(c[i][j], a[i][0].z, a[i][1].z, a[i][0].w, a[i][1].w, b.z, b.w, T());
                }
            }
        }
        read_stage = read_stage + 1 == stages ? 0 : read_stage + 1;
        write_stage = write_stage + 1 == stages ? 0 : write_stage + 1;
    }
    cp_async_wait<0>();

    if (gridDim.y > 1) {
        // Layout [slice][tile][float4 index][thread]: every store and load below is coalesced.
        const size_t per_block = (size_t)blockDim.x * MW * NT8 * 4;
        float4* mine = reinterpret_cast<float4*>(partials + (blockIdx.y * gridDim.x + blockIdx.x) * per_block);
#pragma unroll
        for (int i = 0; i < MW; i++)
#pragma unroll
            for (int j = 0; j < NT8; j++)
                __stcg(mine + (i * NT8 + j) * blockDim.x + tid,
                       make_float4(c[i][j][0], c[i][j][1], c[i][j][2], c[i][j][3]));
        __threadfence();
        __syncthreads();
        if (tid == 0) is_last = atomicAdd(&counters[blockIdx.x], 1) == (int)gridDim.y - 1;
        __syncthreads();
        if (!is_last) return;
        __threadfence();
#pragma unroll
        for (int i = 0; i < MW; i++)
#pragma unroll
            for (int j = 0; j < NT8; j++)
#pragma unroll
                for (int q = 0; q < 4; q++) c[i][j][q] = 0.f;
        // Slices in order (deterministic), SB of them per batch so that ~16 loads of 16 bytes are in flight:
        // this block reads S whole tiles from L2, and latency, not bandwidth, bounds it.
        constexpr int Q = MW * NT8, SB = Q >= 16 ? 1 : 16 / Q;
        const int S = (int)gridDim.y;
        for (int s0 = 0; s0 < S; s0 += SB) {
            float4 v[SB][Q];
#pragma unroll
            for (int d = 0; d < SB; d++) {
                const float4* p =
                    reinterpret_cast<const float4*>(partials + ((s0 + d) * gridDim.x + blockIdx.x) * per_block);
#pragma unroll
                for (int q = 0; q < Q; q++)
                    v[d][q] = s0 + d < S ? __ldcg(p + q * blockDim.x + tid) : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
            for (int d = 0; d < SB; d++) {
                if (s0 + d >= S) break;
#pragma unroll
                for (int q = 0; q < Q; q++) {
                    float* cq = c[q / NT8][q % NT8];
                    cq[0] += v[d][q].x, cq[1] += v[d][q].y, cq[2] += v[d][q].z, cq[3] += v[d][q].w;
                }
            }
        }
        if (tid == 0) counters[blockIdx.x] = 0;  // ready for the next call
    }

    // Accumulator q of tile (i, j): weight row g + 8 * (q / 2) of the tile, x row j * 8 + 2t + q % 2.
#pragma unroll
    for (int i = 0; i < MO; i++)
#pragma unroll
        for (int hi = 0; hi < 2; hi++) {
            const int row = out_row<MW, SWIGLU>(blockIdx.x, warp, warps, i, g + 8 * hi);
            if (row >= m) continue;
#pragma unroll
            for (int j = 0; j < NT8; j++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int xr = j * 8 + 2 * t + e;
                    if (xr >= n) continue;
                    const float up = SWIGLU ? c[i + MO][j][2 * hi + e] : 0.f;
                    store_out<T, SWIGLU>(out, residual, (size_t)xr * m + row, c[i][j][2 * hi + e], up);
                }
        }
}

// ----------------------------------------------------------------------------------------------------
// launchers

// Once per device and kernel: allow the largest dynamic shared memory the device takes next to the kernel's
// static shared memory (the default cap is 48 KB for both together). Returns that largest size, -1 on error.
// A template on the kernel itself, so each kernel has its own cache (all share one function-pointer type).
template <auto kernel>
int dynamic_smem_limit() {
    static int limit[64] = {};
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev >= 64) return -1;
    if (limit[dev] == 0) {
        int optin = 0;
        cudaFuncAttributes attr{};
        if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
            cudaFuncGetAttributes(&attr, kernel) != cudaSuccess)
            return -1;
        const int max_dynamic = optin - (int)attr.sharedSizeBytes;
        if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_dynamic) != cudaSuccess)
            return -1;
        limit[dev] = max_dynamic;
    }
    return limit[dev];
}

template <typename T, int NT8, int MW, bool SWIGLU>
const char* run(const Args& a) {
    constexpr auto kernel = mma_kernel<T, NT8, MW, SWIGLU>;
    const int bm = a.cfg.warps * 16 * a.cfg.rows;
    const int smem = a.cfg.stages * (bm + NT8 * 8) * 128;
    const int limit = dynamic_smem_limit<kernel>();
    if (limit < 0) return cudaGetErrorString(cudaGetLastError());
    if (smem > limit) return "linear: MMA config needs more shared memory than this device allows";
    int64_t tiles, splits;
    linear_mma_grid(a.m, a.k, SWIGLU, a.cfg, &tiles, &splits);
    const int nchunks = (a.k + kBK - 1) / kBK;
    const int per_split = (nchunks + a.cfg.split_k - 1) / a.cfg.split_k;
    float* partials = nullptr;
    int* counters = nullptr;
    if (splits > 1) {
        counters = static_cast<int*>(a.workspace);
        partials = reinterpret_cast<float*>(static_cast<char*>(a.workspace) + kLinearMaxCounters * sizeof(int));
    }
    return launch_error(launch(kernel, dim3((unsigned)tiles, (unsigned)splits), dim3(a.cfg.warps * 32), smem, a.stream,
                               (T*)a.out, (const T*)a.x, (const T*)a.weight, (const T*)a.residual, partials, counters,
                               a.n, a.m, a.k, per_split, a.cfg.stages));
}

// The (NT8, MW) pairs compiled: accumulators MW * NT8 * 4 <= 64 registers; SwiGLU needs MW even.
template <typename T, int NT8, bool SWIGLU>
const char* pick_mw(const Args& a) {
    const int mw = a.cfg.rows;
    if constexpr (!SWIGLU) {
        if (mw == 1) return run<T, NT8, 1, SWIGLU>(a);
    }
    if (mw == 2) return run<T, NT8, 2, SWIGLU>(a);
    if constexpr (NT8 <= 4) {
        if (mw == 4) return run<T, NT8, 4, SWIGLU>(a);
    }
    return "linear: MMA rows (16-row tiles per warp) not compiled for this n";
}

template <typename T, bool SWIGLU>
const char* pick_nt(const Args& a) {
    if (a.n <= 8) return pick_mw<T, 1, SWIGLU>(a);
    if (a.n <= 16) return pick_mw<T, 2, SWIGLU>(a);
    if (a.n <= 32) return pick_mw<T, 4, SWIGLU>(a);
    return pick_mw<T, 8, SWIGLU>(a);
}

}  // namespace

const char* launch_mma(const Args& a) {
    if (a.dtype == SESEME_BF16) return a.swiglu ? pick_nt<__nv_bfloat16, true>(a) : pick_nt<__nv_bfloat16, false>(a);
    if (a.dtype == SESEME_F16) return a.swiglu ? pick_nt<__half, true>(a) : pick_nt<__half, false>(a);
    return "linear: unsupported dtype code (bf16 and fp16 only)";
}

}  // namespace seseme_linear

// Device code of the fused temperature + top-k + Philox sampling (the algorithm: cuda/sampling.cu's header
// comment): shared by the sampling kernel and the persistent depth decoder (cuda/depth_decoder.cu), which
// draws each codebook inside its own launch. CUDA only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "numeric.cuh"
#include "sampling.cuh"

namespace seseme_sampling {

constexpr unsigned kFull = 0xffffffffu;

// Random123's Philox4x32 constants.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint32_t k0, uint32_t k1) {
#pragma unroll
    for (int round = 0; round < 10; round++) {
        if (round > 0) {
            k0 += kPhiloxW0;
            k1 += kPhiloxW1;
        }
        const uint32_t hi0 = __umulhi(kPhiloxM0, c.x), lo0 = kPhiloxM0 * c.x;
        const uint32_t hi1 = __umulhi(kPhiloxM1, c.z), lo1 = kPhiloxM1 * c.z;
        c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
    }
    return c;
}

// A 32-bit word -> U in (0, 1]: 24 bits, so the float is exact; U = 1 gives E = 0 and an infinite key.
__device__ __forceinline__ float uniform01(uint32_t u) { return (float)((u >> 8) + 1u) * 5.9604644775390625e-8f; }


// Order-preserving unsigned images: a < b as floats <=> image(a) < image(b). -0 joins +0 (equal as floats);
// NaN goes above +inf (as in torch.argmax), so it is never below a real number. image >= 1 for every input.
__device__ __forceinline__ uint32_t order_image32(float f) {
    if (f != f) return 0xffffffffu;
    uint32_t b = __float_as_uint(f);
    if (b == 0x80000000u) b = 0;
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ uint32_t order_image16(uint32_t b, bool nan) {
    if (nan) return 0xffffu;
    if (b == 0x8000u) b = 0;
    return (b & 0x8000u) ? (~b & 0xffffu) : (b | 0x8000u);
}

// The image of a staged logit in its storage type's bits (the fp32 value is exact): 16 bits for the half
// types, so their radix select needs 2 passes instead of 4.
template <typename T>
struct Image;
template <>
struct Image<float> {
    static constexpr int kBits = 32;
    __device__ __forceinline__ static uint32_t of(float f) { return order_image32(f); }
};
template <>
struct Image<__nv_bfloat16> {
    static constexpr int kBits = 16;
    __device__ __forceinline__ static uint32_t of(float f) { return order_image16(__float_as_uint(f) >> 16, f != f); }
};
template <>
struct Image<__half> {
    static constexpr int kBits = 16;
    __device__ __forceinline__ static uint32_t of(float f) {
        return order_image16(__half_as_ushort(__float2half_rn(f)), f != f);
    }
};

// (image, index) -> one integer whose max is the largest image, ties to the smallest index. 0 = nothing.
__device__ __forceinline__ unsigned long long pack(uint32_t image, int index) {
    return ((unsigned long long)image << 32) | (0xffffffffu - (uint32_t)index);
}
__device__ __forceinline__ int unpack_index(unsigned long long p) { return (int)(0xffffffffu - (uint32_t)p); }

// blockDim.x is a multiple of 32; every thread gets the block's maximum.
__device__ __forceinline__ unsigned long long block_max(unsigned long long v) {
    __shared__ unsigned long long partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        const unsigned long long o = __shfl_xor_sync(kFull, v, offset);
        v = o > v ? o : v;
    }
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x / 32) ? partial[lane] : 0ull;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        const unsigned long long o = __shfl_xor_sync(kFull, v, offset);
        v = o > v ? o : v;
    }
    return v;
}

__device__ __forceinline__ float component(const float4& v, int j) {
    return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

struct Selection {
    uint32_t digit, remaining, count;
};

// The image of the kk-th largest staged logit (1 <= kk < vocab), or a lower bound on it that keeps exactly
// the same set: "keep image >= result" keeps every entry >= the kk-th largest and nothing else.
// Every thread of the block must call it (it synchronises); all get the same result.
template <typename T>
__device__ uint32_t radix_select(const float4* xs4, int vocab, int groups, uint32_t kk) {
    __shared__ uint32_t hist[256];
    __shared__ Selection sel;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    uint32_t prefix = 0, mask = 0, remaining = kk;
#pragma unroll 1
    for (int shift = Image<T>::kBits - 8; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        // Every thread runs the same number of iterations, so whole warps meet at __match_any_sync.
        for (int base = 0; base < groups; base += blockDim.x) {
            const int g = base + threadIdx.x;
            const float4 v = g < groups ? xs4[g] : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const uint32_t image = Image<T>::of(component(v, j));
                const bool take = g < groups && 4 * g + j < vocab && (image & mask) == prefix;
                const uint32_t digit = (image >> shift) & 255u;
                const unsigned peers = __match_any_sync(kFull, take ? digit : 0xffffffffu);
                if (take && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], (uint32_t)__popc(peers));
            }
        }
        __syncthreads();
        if (warp == 0) {
            // Lane l holds bins 255 - 8l - j (j = 0..7): counts from the top. Find the bin where the running
            // count from the top reaches `remaining`.
            uint32_t c[8], sum = 0;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                c[j] = hist[255 - 8 * lane - j];
                sum += c[j];
            }
            uint32_t incl = sum;
#pragma unroll
            for (int offset = 1; offset < 32; offset *= 2) {
                const uint32_t o = __shfl_up_sync(kFull, incl, offset);
                if (lane >= offset) incl += o;
            }
            uint32_t above = incl - sum;
            if (above < remaining && remaining <= incl) {
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    if (above < remaining && remaining <= above + c[j]) {
                        sel = Selection{255u - 8u * lane - j, remaining - above, c[j]};
                    }
                    above += c[j];
                }
            }
        }
        __syncthreads();
        const Selection s = sel;
        prefix |= s.digit << shift;
        mask |= 255u << shift;
        remaining = s.remaining;
        // The whole bin lies in the top kk: everything >= the bin's lowest possible image is kept, and no more.
        if (s.count == remaining) break;
    }
    return prefix;
}

// Writes the drawn index (every thread holds the block's `best`) and, with an embedding, copies that table row
// to the row's embedding output in 16-byte words (the launcher checked sizes and alignment).
__device__ __forceinline__ void finish_row(unsigned long long best, int64_t* out, int row, const SampleEmbed& embed) {
    const int code = unpack_index(best);
    if (threadIdx.x == 0) out[row] = code;
    if (embed.table == nullptr) return;
    const uint4* src = reinterpret_cast<const uint4*>(static_cast<const char*>(embed.table) + code * embed.row_bytes);
    uint4* dst = reinterpret_cast<uint4*>(static_cast<char*>(embed.out) + row * embed.out_stride_bytes);
    for (int i = threadIdx.x; i < embed.row_bytes / 16; i += blockDim.x) dst[i] = __ldg(src + i);
}

// The draw of one row (every thread of the block calls it; all get the packed (key, index) of the winner, see
// unpack_index): l is the row's vocab logits, xs4 shared memory for (vocab + 3) / 4 float4 groups. seed and
// counter point at the row's values, read only after the radix select: read up front they stay live across it
// (54 registers instead of 40, fewer blocks per SM; ptxas, sm_90).
template <typename T>
__device__ unsigned long long sample_row(const T* l, int vocab, float temp, int k, const int64_t* seed_at,
                                         const int64_t* counter_at, uint32_t codebook, float4* xs4) {
    if (!(temp > 0.f) || k == 1) {  // greedy: argmax of the raw logits, first index among ties
        unsigned long long best = 0;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const unsigned long long p = pack(Image<T>::of(to_f32(l[i])), i);
            best = p > best ? p : best;
        }
        return block_max(best);
    }

    const int groups = (vocab + 3) / 4;
    float* xs = reinterpret_cast<float*>(xs4);
    for (int i = threadIdx.x; i < 4 * groups; i += blockDim.x) xs[i] = i < vocab ? to_f32(l[i]) : 0.f;
    __syncthreads();

    // Entries are kept by image >= threshold; 0 keeps all (every image is >= 1).
    const uint32_t threshold = (k > 0 && k < vocab) ? radix_select<T>(xs4, vocab, groups, (uint32_t)k) : 0u;

    const uint64_t seed = (uint64_t)*seed_at, counter = (uint64_t)*counter_at;
    const uint32_t key0 = (uint32_t)seed, key1 = (uint32_t)(seed >> 32);
    unsigned long long best = 0;
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        const uint4 r = philox4x32_10(make_uint4((uint32_t)g, codebook, (uint32_t)counter, (uint32_t)(counter >> 32)),
                                      key0, key1);
        const float4 v = xs4[g];
        const uint32_t words[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int i = 4 * g + j;
            const float x = component(v, j);
            if (i < vocab && Image<T>::of(x) >= threshold) {
                // Written op by op as the reference does it (IEEE division, logf twice): the keys match bitwise.
                const float e = -logf(uniform01(words[j]));
                float race = x / temp - logf(e);
                if (race != race) race = -INFINITY;  // a -inf logit meeting E = 0 (U = 1) must not win
                const unsigned long long p = pack(order_image32(race), i);
                best = p > best ? p : best;
            }
        }
    }
    return block_max(best);
}

}  // namespace seseme_sampling

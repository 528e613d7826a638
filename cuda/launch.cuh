// Kernel launches with programmatic dependent launch (PDL, Hopper and later), shared by every kernel family.
//
// A frame is ~1,000 kernels in a row, and at batch 1 most are short: a depth-decoder attention or sampling
// kernel runs a few microseconds on a handful of SMs while the rest of the GPU idles, and each kernel pays its
// own launch and ramp-up. With PDL the next kernel is launched while the current one still runs: its blocks
// become resident, issue what does not depend on the current kernel (the linear layers prefetch their first
// weights into L2), and then wait in `wait_for_inputs()` until the current kernel has finished and its writes
// are visible. Weight streaming thus overlaps the latency-bound kernels.
//
// The rules every kernel launched through `launch` follows (kernels that never wait would race):
//   1. Before `wait_for_inputs()` a kernel reads only memory that no kernel writes during a frame (weights,
//      RoPE frequencies) and writes nothing at all.
//   2. Right after it, the kernel calls `let_next_kernel_start()`. So a kernel's successor is launched only once
//      the kernel itself is past its wait, i.e. once its own predecessor has finished: at most two kernels
//      are in flight, and the successor's blocks never crowd out a kernel that is still waiting.
// A kernel launched without the attribute (torch's own, cuBLAS) orders as usual; both device calls are no-ops
// then. SESEME_PDL=0 in the environment turns the attribute off (for A/B timing).
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

// Wait until the kernel before this one has completed and its memory writes are visible (PDL), else no-op.
__device__ __forceinline__ void wait_for_inputs() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Allow the next kernel in the stream to be launched now (it still waits for this one to finish).
__device__ __forceinline__ void let_next_kernel_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Ask L2 for the 128-byte line at p, without waiting for it (used before wait_for_inputs for weights).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// Whether launches on the current device get the PDL attribute: compute capability >= 9 and SESEME_PDL != 0.
// Cached per device (a handful of cudaDeviceGetAttribute calls per process).
inline bool pdl_enabled() {
    static const bool allowed = [] {
        const char* env = std::getenv("SESEME_PDL");
        return env == nullptr || std::strcmp(env, "0") != 0;
    }();
    static signed char by_device[64] = {};  // 0 unknown, 1 yes, -1 no
    int dev = 0;
    if (!allowed || cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
    if (by_device[dev] == 0) {
        int major = 0;
        by_device[dev] = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                                 major >= 9
                             ? 1
                             : -1;
    }
    return by_device[dev] > 0;
}

// kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute where pdl_enabled(). Returns the
// launch error, as cudaGetLastError would.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attr;
    config.numAttrs = pdl_enabled() ? 1 : 0;
    return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

// A launch's result as the launchers report it: null on success, else the message (the error is cleared).
inline const char* launch_error(cudaError_t err) {
    if (err == cudaSuccess) return nullptr;
    cudaGetLastError();
    return cudaGetErrorString(err);
}

// See pdl_probe.cuh. The second kernel breaks rule 1 of launch.cuh on purpose: it writes its start time
// before waiting, into a slot nothing else touches.
#include "pdl_probe.cuh"
#include "launch.cuh"

namespace {

__device__ __forceinline__ int64_t global_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return (int64_t)t;
}

__global__ void probe_first(int64_t* times, int64_t spin_ns) {
    wait_for_inputs();
    let_next_kernel_start();
    const int64_t start = global_ns();
    while (global_ns() - start < spin_ns) {
    }
    times[0] = global_ns();
}

__global__ void probe_second(int64_t* times) {
    times[1] = global_ns();
    wait_for_inputs();
    let_next_kernel_start();
    times[2] = global_ns();
}

}  // namespace

const char* launch_pdl_probe(int64_t* times, int64_t spin_ns, uintptr_t stream) {
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    const char* err = launch_error(launch(probe_first, dim3(1), dim3(32), 0, s, times, spin_ns));
    return err != nullptr ? err : launch_error(launch(probe_second, dim3(1), dim3(32), 0, s, times));
}

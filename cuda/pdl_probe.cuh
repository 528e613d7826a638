// A check that programmatic dependent launch (cuda/launch.cuh) really overlaps kernels on this GPU, in a stream
// and in a CUDA graph captured from it. Plain C++ declarations (cpp/ includes this in builds without CUDA).
#pragma once

#include <cstdint>

// Two kernels on `stream`: the first spins for spin_ns nanoseconds and then stores the global timer in
// times[0]; the second, launched through `launch` right after it, stores the timer in times[1] as it starts
// (before waiting) and in times[2] after wait_for_inputs(). With PDL working, times[1] < times[0] <= times[2].
// times: 3 int64 on the device. Returns nullptr or an error message.
const char* launch_pdl_probe(int64_t* times, int64_t spin_ns, uintptr_t stream);

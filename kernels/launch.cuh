// What every launcher does right after its launch: report the launch's error, and under
// CUDA_LAUNCH_BLOCKING=1 also the kernel's own (a fault then surfaces at the kernel that made
// it, named by the caller, instead of in some later unrelated op).
#pragma once
#include <cuda_runtime.h>
#include <stdlib.h>

static inline cudaError_t qlora_after_launch() {
    cudaError_t err = cudaGetLastError();
    static const bool blocking = [] {
        const char* v = getenv("CUDA_LAUNCH_BLOCKING");
        return v != nullptr && v[0] == '1';
    }();
    if (err == cudaSuccess && blocking) err = cudaDeviceSynchronize();
    return err;
}

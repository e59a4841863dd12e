// CUDA twin of dropout_cpu.cpp: the same mask and one IEEE multiplication per element.
#include <cuda_runtime.h>

#include "launch.cuh"
#include <stdint.h>

#include "dropout.h"

namespace {

__global__ void dropout_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t n,
                               int64_t width, const int64_t* __restrict__ row_keys,
                               uint64_t seed, uint32_t threshold, float scale) {
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = e / width;
        const uint64_t i = qlora_dropout_index(row_keys, r, width, e - r * width);
        const bool keep = qlora_dropout_bits(seed, i) >= threshold;
        y[e] = __fmul_rn(x[e], keep ? scale : 0.0f);
    }
}

}  // namespace

extern "C" int qlora_dropout_cuda(const float* x, float* y, int64_t rows, int64_t width,
                                  const int64_t* row_keys, uint64_t seed, uint32_t threshold,
                                  float scale, int device, void* stream) {
    if (rows < 0 || width < 0) return (int)cudaErrorInvalidValue;
    const int64_t n = rows * width;
    if (n > 0 && (x == nullptr || y == nullptr)) return (int)cudaErrorInvalidValue;
    if (n == 0) return 0;
    // Launch on `device`, then give the caller its current device back.
    int prev = -1;
    cudaError_t err = cudaGetDevice(&prev);
    if (err != cudaSuccess) return (int)err;
    if (prev != device && (err = cudaSetDevice(device)) != cudaSuccess) return (int)err;
    const int threads = 256;
    int64_t blocks = (n + threads - 1) / threads;
    if (blocks > 65535 * 8) blocks = 65535 * 8;  // the grid-stride loop covers the rest
    dropout_kernel<<<(unsigned)blocks, threads, 0, (cudaStream_t)stream>>>(
        x, y, n, width, row_keys, seed, threshold, scale);
    err = qlora_after_launch();
    if (prev != device) {
        const cudaError_t err2 = cudaSetDevice(prev);
        if (err == cudaSuccess) err = err2;
    }
    return (int)err;
}

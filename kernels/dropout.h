// LoRA dropout with a counter-based mask: element i of a call with `seed` is kept when the
// top 32 bits of splitmix64(seed + i * golden) are at or above `threshold` (= p * 2^32). The
// mask is a pure function of (seed, i), so the backward pass, a checkpointed recomputation
// and the CUDA twin (dropout.cu) all see the same mask without storing it.
#ifndef QLORA_DROPOUT_H
#define QLORA_DROPOUT_H

#include <stdint.h>

#ifdef __CUDACC__
#define QLORA_DROPOUT_HD __host__ __device__ __forceinline__
#else
#define QLORA_DROPOUT_HD static inline
#endif

#ifdef __cplusplus
extern "C" {
#endif

QLORA_DROPOUT_HD uint32_t qlora_dropout_bits(uint64_t seed, uint64_t i) {
    uint64_t z = seed + i * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (uint32_t)(z >> 32);
}

// y[i] = kept(i) ? x[i] * scale : 0 for i in [0, n); x may equal y. The same call applied to
// the output gradient is the backward pass. Returns 0, or -1 for bad arguments.
int qlora_dropout_cpu(const float* x, float* y, int64_t n, uint64_t seed, uint32_t threshold,
                      float scale);
// CUDA twin: device pointers on `device`, launched on `stream` (NULL: the legacy default
// stream). Returns a cudaError_t value.
int qlora_dropout_cuda(const float* x, float* y, int64_t n, uint64_t seed, uint32_t threshold,
                       float scale, int device, void* stream);

#ifdef __cplusplus
}
#endif

#endif

// LoRA dropout with a counter-based mask: element i of a call with `seed` is kept when
// qlora_dropout_bits(seed, i) is at or above `threshold` (= p * 2^32). The mask is a pure
// function of (seed, i), so the backward pass, a checkpointed recomputation and the CUDA twin
// (dropout.cu) all see the same mask without storing it. A call sees its input as `rows` rows
// of `width` elements; element j of row r has index i = key(r) * width + j, where key(r) is
// `row_keys[r]` when given, else r (the flat index). Row keys name a token by its example's
// place in the global batch and its position, so every layout of a batch (ranks, padding,
// gradient accumulation) draws the same mask for the same token. The hash is two rounds of
// murmur3's 32-bit finalizer over a Weyl sequence keyed by the seed: 32-bit multiplies only,
// so the CPU loop vectorizes.
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

QLORA_DROPOUT_HD uint32_t qlora_dropout_fmix32(uint32_t k) {
    k ^= k >> 16;
    k *= 0x85ebca6bu;
    k ^= k >> 13;
    k *= 0xc2b2ae35u;
    k ^= k >> 16;
    return k;
}

QLORA_DROPOUT_HD uint32_t qlora_dropout_bits(uint64_t seed, uint64_t i) {
    const uint32_t k = (uint32_t)i * 0x9e3779b9u + (uint32_t)seed;
    const uint32_t hi = (uint32_t)(i >> 32) * 0x7feb352du ^ (uint32_t)(seed >> 32);
    return qlora_dropout_fmix32(qlora_dropout_fmix32(k) ^ hi);
}

// The index of element j of row r (see above).
QLORA_DROPOUT_HD uint64_t qlora_dropout_index(const int64_t* row_keys, int64_t r, int64_t width,
                                              int64_t j) {
    const uint64_t key = row_keys ? (uint64_t)row_keys[r] : (uint64_t)r;
    return key * (uint64_t)width + (uint64_t)j;
}

// y = x * (kept ? scale : 0) over `rows` x `width` contiguous elements; x may equal y;
// `row_keys` (`rows` entries, on the same device as x) may be NULL. The same call applied to
// the output gradient is the backward pass. Returns 0, or -1 for bad arguments.
int qlora_dropout_cpu(const float* x, float* y, int64_t rows, int64_t width,
                      const int64_t* row_keys, uint64_t seed, uint32_t threshold, float scale);
// CUDA twin: device pointers on `device`, launched on `stream` (NULL: the legacy default
// stream). Returns a cudaError_t value.
int qlora_dropout_cuda(const float* x, float* y, int64_t rows, int64_t width,
                       const int64_t* row_keys, uint64_t seed, uint32_t threshold, float scale,
                       int device, void* stream);

#ifdef __cplusplus
}
#endif

#endif

// CPU (OpenMP) LoRA dropout; see dropout.h. The CUDA twin is dropout.cu.
#include "dropout.h"

extern "C" int qlora_dropout_cpu(const float* x, float* y, int64_t n, uint64_t seed,
                                 uint32_t threshold, float scale) {
    if (n < 0 || (n > 0 && (x == nullptr || y == nullptr))) return -1;
    // qlora_dropout_bits unrolled so that the loop over the low 32 bits of the index is
    // branch-free 32-bit arithmetic the compiler vectorizes; x * 0 (not a select) for a
    // dropped element, as torch's `input * mask * scale` (NaN stays NaN).
    const uint32_t seed_lo = (uint32_t)seed;
    for (int64_t base = 0; base < n; base += ((int64_t)1 << 32)) {
        const int64_t len = (n - base) < ((int64_t)1 << 32) ? (n - base) : ((int64_t)1 << 32);
        const uint32_t hi =
            (uint32_t)((uint64_t)base >> 32) * 0x7feb352du ^ (uint32_t)(seed >> 32);
        const float* xs = x + base;
        float* ys = y + base;
#pragma omp parallel for simd schedule(static) if (len > 32768)
        for (int64_t j = 0; j < len; ++j) {
            const uint32_t k = (uint32_t)j * 0x9e3779b9u + seed_lo;
            const uint32_t bits = qlora_dropout_fmix32(qlora_dropout_fmix32(k) ^ hi);
            ys[j] = xs[j] * (bits >= threshold ? scale : 0.0f);
        }
    }
    return 0;
}

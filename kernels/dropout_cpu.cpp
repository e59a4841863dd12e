// CPU (OpenMP) LoRA dropout; see dropout.h. The CUDA twin is dropout.cu.
#include "dropout.h"

extern "C" int qlora_dropout_cpu(const float* x, float* y, int64_t n, uint64_t seed,
                                 uint32_t threshold, float scale) {
    if (n < 0 || (n > 0 && (x == nullptr || y == nullptr))) return -1;
#pragma omp parallel for schedule(static) if (n > 32768)
    for (int64_t i = 0; i < n; ++i) {
        const bool keep = qlora_dropout_bits(seed, (uint64_t)i) >= threshold;
        y[i] = keep ? x[i] * scale : 0.0f;
    }
    return 0;
}

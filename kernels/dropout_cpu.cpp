// CPU (OpenMP) LoRA dropout; see dropout.h. The CUDA twin is dropout.cu.
#include "dropout.h"

namespace {

// One row: indices base .. base + len - 1. Branch-free 32-bit arithmetic on the two halves
// of the 64-bit index, so the loop vectorizes; x * 0 (not a select) for a dropped element, as
// torch's `input * mask * scale` (NaN stays NaN).
inline void dropout_run(const float* xs, float* ys, int64_t len, uint64_t base, uint64_t seed,
                        uint32_t threshold, float scale) {
    const uint32_t seed_lo = (uint32_t)seed, seed_hi = (uint32_t)(seed >> 32);
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
        const uint64_t i = base + (uint64_t)j;
        const uint32_t k = (uint32_t)i * 0x9e3779b9u + seed_lo;
        const uint32_t hi = (uint32_t)(i >> 32) * 0x7feb352du ^ seed_hi;
        const uint32_t bits = qlora_dropout_fmix32(qlora_dropout_fmix32(k) ^ hi);
        ys[j] = xs[j] * (bits >= threshold ? scale : 0.0f);
    }
}

}  // namespace

extern "C" int qlora_dropout_cpu(const float* x, float* y, int64_t rows, int64_t width,
                                 const int64_t* row_keys, uint64_t seed, uint32_t threshold,
                                 float scale) {
    if (rows < 0 || width < 0) return -1;
    const int64_t n = rows * width;
    if (n > 0 && (x == nullptr || y == nullptr)) return -1;
    if (n == 0) return 0;
    if (rows >= 8) {
#pragma omp parallel for schedule(static) if (n > 32768)
        for (int64_t r = 0; r < rows; ++r) {
            dropout_run(x + r * width, y + r * width, width,
                        qlora_dropout_index(row_keys, r, width, 0), seed, threshold, scale);
        }
        return 0;
    }
    // Few long rows (a flat tensor): split each row into chunks instead.
    const int64_t chunk = 16384;
    for (int64_t r = 0; r < rows; ++r) {
        const uint64_t base = qlora_dropout_index(row_keys, r, width, 0);
        const int64_t chunks = (width + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) if (width > 32768)
        for (int64_t c = 0; c < chunks; ++c) {
            const int64_t start = c * chunk;
            const int64_t len = width - start < chunk ? width - start : chunk;
            dropout_run(x + r * width + start, y + r * width + start, len,
                        base + (uint64_t)start, seed, threshold, scale);
        }
    }
    return 0;
}

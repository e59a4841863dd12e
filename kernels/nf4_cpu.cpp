// CPU kernels for NF4 (bitsandbytes-exact) and the blockwise 8-bit code used by double
// quantization. See nf4.h for the ABI and layout; nf4.cu holds the CUDA twins, which must
// evaluate the same f32 operations in the same order.
//
// Reference behaviour (bitsandbytes 0.50.2, CPU backend):
// * quantize_4bit runs the default torch backend: x.float(); absmax = max|x| per block;
//   full blocks are scaled by x * (1 / max(absmax, 1e-38)), the last partial block by
//   x / max(absmax, 1e-38) and stores the clamped absmax; scaled values are clamped to
//   [-1, 1] and bucketized against the midpoints of the NF4 code (a value on a midpoint
//   goes to the lower code, NaN to 15); an odd count is padded with a scaled 0.
// * quantize_blockwise (the nested absmax) runs the native lib's lookup-table rule; see
//   qlora_q8_lut_index in nf4.h.
// * dequantization multiplies code * absmax in f32 and rounds once to the output dtype.
#include "nf4.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

// Loops over elements run on one thread below 32768 elements (torch's own grain size): for a
// small tensor, waking the OpenMP pool costs more than the work, and its threads then spin.
//
// The bit-exact twins rely on every product and sum being rounded separately; keep GCC
// from fusing them into FMAs on targets that have one.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#if defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace {

struct Nf4Tables {
    float code[16];
    float bounds[15];
    uint32_t zero_index;  // bucket of a scaled 0 (the padding of an odd count)
};

uint32_t nf4_bucket(const float* bounds, float s) {
    // torch.bucketize(right=False): number of bounds strictly below s; NaN lands past the end.
    if (s != s) return 15;
    uint32_t q = 0;
    for (int i = 0; i < 15; ++i) q += bounds[i] < s ? 1u : 0u;
    return q;
}

const Nf4Tables& nf4_tables() {
    static const Nf4Tables tables = [] {
        Nf4Tables t{};
        const uint32_t bits[16] = QLORA_NF4_CODE_BITS;
        for (int i = 0; i < 16; ++i) t.code[i] = qlora_bits_f32(bits[i]);
        for (int i = 0; i < 15; ++i) t.bounds[i] = (t.code[i] + t.code[i + 1]) / 2.0f;
        t.zero_index = nf4_bucket(t.bounds, 0.0f);
        return t;
    }();
    return tables;
}

bool valid_dtype(int dtype) {
    return dtype == QLORA_NF4_F32 || dtype == QLORA_NF4_BF16 || dtype == QLORA_NF4_F16;
}

// torch.clamp(absmax, min=1e-38): the Python double 1e-38 is narrowed to f32 by the kernel.
const float kTinyAbsmax = (float)1e-38;
const float kNan = qlora_bits_f32(0x7fc00000u);

float clamp_unit(float s) {
    // torch.clamp(s, -1, 1) propagates NaN.
    if (s != s) return s;
    return s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
}

struct ScaleReader {
    const QloraNf4Scales& s;
    float operator()(int64_t block) const {
        if (s.absmax != nullptr) return s.absmax[block];
        const float v = s.code2[s.qabsmax[block]] * s.absmax2[block / s.blocksize2];
        return v + s.offset;
    }
};

bool valid_scales(const QloraNf4Scales& s) {
    if (s.absmax != nullptr) return true;
    return s.qabsmax != nullptr && s.code2 != nullptr && s.absmax2 != nullptr && s.blocksize2 > 0;
}

void q8_midpoints(const float* code, float* mid) {
    for (int i = 0; i < 255; ++i) mid[i] = (code[i] + code[i + 1]) * 0.5f;
}

}  // namespace

extern "C" int qlora_nf4_quantize_cpu(const void* x, int dtype, int64_t n, int64_t blocksize,
                                      uint8_t* packed, float* absmax) {
    if (x == nullptr || packed == nullptr || absmax == nullptr || n <= 0 || blocksize <= 0 ||
        blocksize % 2 != 0 || !valid_dtype(dtype)) {
        return QLORA_NF4_EINVAL;
    }
    const Nf4Tables& t = nf4_tables();
    const int64_t n_blocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static) if (n > 32768)
    for (int64_t b = 0; b < n_blocks; ++b) {
        const int64_t start = b * blocksize;
        const int64_t end = std::min(start + blocksize, n);
        const bool full = end - start == blocksize;
        float am = 0.0f;
        bool any_nan = false;
        for (int64_t i = start; i < end; ++i) {
            const float a = std::fabs(qlora_load_f32(x, dtype, i));
            if (a != a) {
                any_nan = true;
            } else if (a > am) {
                am = a;
            }
        }
        if (any_nan) am = kNan;  // torch's max propagates NaN
        const float amc = (am != am) ? am : (am < kTinyAbsmax ? kTinyAbsmax : am);
        absmax[b] = full ? am : amc;
        const float recip = 1.0f / amc;
        // Blocksizes are even, so the two nibbles of a byte never straddle two blocks.
        for (int64_t i = start; i < end; i += 2) {
            uint32_t q[2] = {t.zero_index, t.zero_index};
            for (int64_t e = 0; e < 2 && i + e < end; ++e) {
                const float v = qlora_load_f32(x, dtype, i + e);
                const float s = full ? v * recip : v / amc;
                q[e] = nf4_bucket(t.bounds, clamp_unit(s));
            }
            packed[i >> 1] = (uint8_t)((q[0] << 4) | q[1]);
        }
    }
    return QLORA_NF4_OK;
}

namespace {

bool has_avx512() {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

// GCC 12 warns about its own _mm512_undefined_epi32() inside _mm512_cvtepu8_epi32.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// The AVX-512 twin of the scalar loop below for `count` (a multiple of 32) elements from
// `start` (even): the 16 NF4 codes sit in one register, a permute looks 16 nibbles up at
// once, and the product with the block's scale is the same single f32 multiplication. bf16
// uses the scalar rounding (qlora_f32_to_bf16) lane by lane; fp16 stays scalar.
__attribute__((target("avx512f,avx512bw"))) int64_t dequantize_run_avx512(
    const uint8_t* packed, const float* code, float scale, int64_t start, int64_t count,
    void* out, int out_dtype) {
    const __m512 table = _mm512_loadu_ps(code);
    const __m512 s = _mm512_set1_ps(scale);
    const __m128i low4 = _mm_set1_epi8(0x0f);
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
    const __m512i inf_bits = _mm512_set1_epi32(0x7f800000);
    const __m512i round_bias = _mm512_set1_epi32(0x7fff);
    const __m512i one = _mm512_set1_epi32(1);
    const __m512i sign16 = _mm512_set1_epi32(0x8000);
    const __m512i qnan = _mm512_set1_epi32(0x7fc0);
    auto to_bf16 = [&](__m512 v) -> __m256i {
        const __m512i x = _mm512_castps_si512(v);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), one);
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, round_bias), odd), 16);
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(x, abs_mask), inf_bits);
        const __m512i nan_val =
            _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(x, 16), sign16), qnan);
        r = _mm512_mask_blend_epi32(nan, r, nan_val);
        return _mm512_cvtepi32_epi16(r);
    };
    for (int64_t j = 0; j < count; j += 32) {
        const int64_t i = start + j;
        const __m128i bytes = _mm_loadu_si128((const __m128i*)(packed + (i >> 1)));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
        const __m128i lo = _mm_and_si128(bytes, low4);
        const __m512i idx0 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
        const __m512i idx1 = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo));
        const __m512 v0 = _mm512_mul_ps(_mm512_permutexvar_ps(idx0, table), s);
        const __m512 v1 = _mm512_mul_ps(_mm512_permutexvar_ps(idx1, table), s);
        if (out_dtype == QLORA_NF4_BF16) {
            uint16_t* o = (uint16_t*)out + i;
            _mm256_storeu_si256((__m256i*)o, to_bf16(v0));
            _mm256_storeu_si256((__m256i*)(o + 16), to_bf16(v1));
        } else {
            float* o = (float*)out + i;
            _mm512_storeu_ps(o, v0);
            _mm512_storeu_ps(o + 16, v1);
        }
    }
    return count;
}
#pragma GCC diagnostic pop

}  // namespace

extern "C" int qlora_nf4_dequantize_cpu(const uint8_t* packed, QloraNf4Scales scales, int64_t n,
                                        int64_t blocksize, void* out, int out_dtype) {
    if (packed == nullptr || out == nullptr || n < 0 || blocksize <= 0 || blocksize % 2 != 0 ||
        !valid_dtype(out_dtype) || !valid_scales(scales)) {
        return QLORA_NF4_EINVAL;
    }
    const Nf4Tables& t = nf4_tables();
    const ScaleReader scale_of{scales};
    const int64_t n_blocks = (n + blocksize - 1) / blocksize;
    static const bool wide = has_avx512();
    const bool fast = wide && out_dtype != QLORA_NF4_F16;
#pragma omp parallel for schedule(static) if (n > 32768)
    for (int64_t b = 0; b < n_blocks; ++b) {
        const float scale = scale_of(b);
        const int64_t start = b * blocksize;
        const int64_t end = std::min(start + blocksize, n);
        const int64_t done = fast ? dequantize_run_avx512(packed, t.code, scale, start,
                                                          (end - start) / 32 * 32, out, out_dtype)
                                  : 0;
        for (int64_t i = start + done; i < end; i += 2) {
            const uint8_t byte = packed[i >> 1];
            qlora_store_f32(out, out_dtype, i, t.code[byte >> 4] * scale);
            if (i + 1 < end) qlora_store_f32(out, out_dtype, i + 1, t.code[byte & 15] * scale);
        }
    }
    return QLORA_NF4_OK;
}

extern "C" int qlora_q8_quantize_cpu(const float* code, const float* x, float sub, int64_t n,
                                     int64_t blocksize, uint8_t* q, float* absmax) {
    if (code == nullptr || x == nullptr || q == nullptr || absmax == nullptr || n <= 0 ||
        blocksize <= 0) {
        return QLORA_NF4_EINVAL;
    }
    float mid[255];
    q8_midpoints(code, mid);
    const int64_t n_blocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static) if (n > 32768)
    for (int64_t b = 0; b < n_blocks; ++b) {
        const int64_t start = b * blocksize;
        const int64_t end = std::min(start + blocksize, n);
        // bitsandbytes: `omp simd reduction(max)` over std::max (NaN never wins), seeded
        // with -inf and finally combined with 0.
        float priv = -INFINITY;
        for (int64_t i = start; i < end; ++i) {
            const float a = std::fabs(x[i] - sub);
            priv = priv < a ? a : priv;
        }
        const float am = 0.0f > priv ? 0.0f : priv;
        absmax[b] = am;
        if (am == 0.0f) {
            std::fill(q + start, q + end, (uint8_t)0);
            continue;
        }
        const float inv = 1.0f / am;
        for (int64_t i = start; i < end; ++i) {
            const float v = (x[i] - sub) * inv;
            q[i] = (uint8_t)qlora_q8_code_index(mid, qlora_q8_lut_value(qlora_q8_lut_index(v)));
        }
    }
    return QLORA_NF4_OK;
}

extern "C" int qlora_q8_dequantize_cpu(const float* code, const uint8_t* q, const float* absmax,
                                       float add, int64_t n, int64_t blocksize, float* out) {
    if (code == nullptr || q == nullptr || absmax == nullptr || out == nullptr || n < 0 ||
        blocksize <= 0) {
        return QLORA_NF4_EINVAL;
    }
#pragma omp parallel for schedule(static) if (n > 32768)
    for (int64_t i = 0; i < n; ++i) {
        const float v = code[q[i]] * absmax[i / blocksize];
        out[i] = v + add;
    }
    return QLORA_NF4_OK;
}

// Reduction order of one output y[i, j] (the CUDA kernel uses one warp per j):
//  * element c of the row belongs to lane (c / 8) % 32; each lane sums its elements in
//    increasing c: acc = fl(acc + fl(x[i,c] * w[c])), starting from +0;
//  * the 32 lane sums are combined by the xor butterfly 16, 8, 4, 2, 1, i.e.
//    p[l] = fl(p[l] + p[l + off]) for l < off;
//  * w[c] = fl(code * scale) rounded to the dtype of x (the dequantized weight in x's dtype);
//    the result is rounded once to the dtype of x.
extern "C" int qlora_nf4_matmul_small_cpu(const void* x, int dtype, int64_t m, int64_t k,
                                          const uint8_t* packed, QloraNf4Scales scales,
                                          int64_t blocksize, int64_t n_out, void* y) {
    if (x == nullptr || packed == nullptr || y == nullptr || m < 0 || k <= 0 || n_out < 0 ||
        blocksize <= 0 || blocksize % 2 != 0 || !valid_dtype(dtype) || !valid_scales(scales)) {
        return QLORA_NF4_EINVAL;
    }
    if (m == 0 || n_out == 0) return QLORA_NF4_OK;
    const Nf4Tables& t = nf4_tables();
    const ScaleReader scale_of{scales};
    std::vector<float> xf((size_t)(m * k));
    for (int64_t i = 0; i < m * k; ++i) xf[(size_t)i] = qlora_load_f32(x, dtype, i);
    constexpr int kLanes = 32;
    constexpr int kRows = 16;
#pragma omp parallel
    {
        std::vector<float> w((size_t)k);
        float p[kRows][kLanes];
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n_out; ++j) {
            int64_t cached_block = -1;
            float scale = 0.0f;
            for (int64_t c = 0; c < k; ++c) {
                const int64_t f = j * k + c;
                const int64_t block = f / blocksize;
                if (block != cached_block) {
                    scale = scale_of(block);
                    cached_block = block;
                }
                const uint8_t byte = packed[f >> 1];
                const uint32_t nib = (f & 1) ? (byte & 15u) : (uint32_t)(byte >> 4);
                w[(size_t)c] = qlora_round_to(t.code[nib] * scale, dtype);
            }
            for (int64_t i0 = 0; i0 < m; i0 += kRows) {
                const int rows = (int)std::min<int64_t>(kRows, m - i0);
                for (int r = 0; r < rows; ++r) std::fill(p[r], p[r] + kLanes, 0.0f);
                for (int64_t c = 0; c < k; ++c) {
                    const int lane = (int)((c >> 3) & (kLanes - 1));
                    const float wc = w[(size_t)c];
                    for (int r = 0; r < rows; ++r) {
                        const float prod = xf[(size_t)((i0 + r) * k + c)] * wc;
                        p[r][lane] = p[r][lane] + prod;
                    }
                }
                for (int r = 0; r < rows; ++r) {
                    for (int off = kLanes / 2; off > 0; off >>= 1) {
                        for (int l = 0; l < off; ++l) p[r][l] = p[r][l] + p[r][l + off];
                    }
                    qlora_store_f32(y, dtype, (i0 + r) * n_out + j, p[r][0]);
                }
            }
        }
    }
    return QLORA_NF4_OK;
}

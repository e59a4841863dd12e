// CPU kernels for the AdamW updates declared in optim8bit.h.
//
// Bit-exactness with bitsandbytes/torch needs every float operation rounded exactly where the
// reference rounds it: implicit contraction of a*b+c into an fma is switched off, and the fmas
// the reference performs (torch's vectorised add-with-alpha, addcmul, lerp; bnb's LUT index)
// are written out with std::fma. Hot loops exist twice: compiled for AVX2+FMA (hardware fma,
// chosen at run time) and for the baseline ISA (std::fma then calls libm's exact fmaf).
#pragma GCC optimize("fp-contract=off")
#ifdef __clang__
#pragma clang fp contract(off)
#endif

#include "optim8bit.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace {

constexpr int kBlock = QLORA_OPTIM_BLOCK;
constexpr int kLutSize = 65536;

const float kCode[2][256] = {{QLORA_DYNAMIC_UNSIGNED_CODE}, {QLORA_DYNAMIC_SIGNED_CODE}};
const float kMid[2][255] = {{QLORA_DYNAMIC_UNSIGNED_MIDPOINTS}, {QLORA_DYNAMIC_SIGNED_MIDPOINTS}};

// bitsandbytes' build_quantize_lut: LUT[i] = first code index whose upper midpoint is not
// below (2i)/65535 - 1.
void build_lut(const float* code, unsigned char* lut) {
    float mid[255];
    for (int i = 0; i < 255; ++i) {
        float s = code[i] + code[i + 1];
        mid[i] = s * 0.5f;
    }
    int ci = 0;
    for (int i = 0; i < kLutSize; ++i) {
        float val = static_cast<float>(i);
        val = val + val;
        val = val / 65535.0f;
        val = val - 1.0f;
        while (ci < 255 && mid[ci] < val) ++ci;
        lut[i] = static_cast<unsigned char>(ci);
    }
}

struct Luts {
    unsigned char t[2][kLutSize];
    Luts() {
        build_lut(kCode[0], t[0]);
        build_lut(kCode[1], t[1]);
    }
};

const Luts& luts() {
    static const Luts l;  // thread-safe one-time build
    return l;
}

#define QLORA_INLINE inline __attribute__((always_inline))

// bitsandbytes' quantize_cpu for one block: absmax, then the LUT code of each value.
QLORA_INLINE void quantize_block(const float* x, int len, const unsigned char* lut, uint8_t* out,
                                 float* absmax) {
    if (len <= 0) return;
    float am = -std::numeric_limits<float>::infinity();
    for (int i = 0; i < len; ++i) am = std::max(am, std::fabs(x[i]));
    am = (0.0f > am) ? 0.0f : am;
    *absmax = am;
    if (am == 0.0f) {
        std::memset(out, 0, static_cast<size_t>(len));
        return;
    }
    const float inv = 1.0f / am;
    for (int i = 0; i < len; ++i) {
        float v = x[i] * inv;
        v = std::clamp(v, -1.0f, 1.0f);
        float t = v + 1.0f;
        t = t * 0.5f;
        t = std::fma(t, 65535.0f, 0.5f);
        const int idx = (t == t) ? static_cast<int>(t) : 0;  // NaN: as cvttss2si -> 0 after & 0xffff
        out[i] = lut[idx & 0xffff];
    }
}

QLORA_INLINE void bnb8_block_body(float* p, const float* g, uint8_t* q1, uint8_t* q2,
                                  float* absmax1, float* absmax2, int64_t start, int64_t len,
                                  int64_t b, const QloraAdamScalars& s, const Luts& lt) {
    float m[kBlock];
    float v[kBlock];
    const float a1 = absmax1[b];
    const float a2 = absmax2[b];
    for (int64_t i = 0; i < len; ++i) {
        const int64_t k = start + i;
        const float gi = g[k];
        float mi = kCode[1][q1[k]] * a1;
        float vi = kCode[0][q2[k]] * a2;
        mi = mi * s.beta1;
        mi = std::fma(gi, s.omb1, mi);
        vi = vi * s.beta2;
        const float gs = s.omb2 * gi;
        vi = std::fma(gs, gi, vi);
        float den = std::sqrt(vi);
        den = den / s.correction2;
        den = den + s.eps;
        float pi = p[k];
        if (s.apply_decay) pi = pi * s.decay;
        float u = s.step_size * mi;
        u = u / den;
        p[k] = pi + u;
        m[i] = mi;
        v[i] = vi;
    }
    quantize_block(m, static_cast<int>(len), lt.t[1], q1 + start, absmax1 + b);
    quantize_block(v, static_cast<int>(len), lt.t[0], q2 + start, absmax2 + b);
}

QLORA_INLINE void bnb32_body(float* p, const float* g, float* m, float* v, int64_t start,
                             int64_t end, const QloraAdamScalars& s) {
    for (int64_t k = start; k < end; ++k) {
        const float gi = g[k];
        float mi = m[k] * s.beta1;
        mi = std::fma(gi, s.omb1, mi);
        float vi = v[k] * s.beta2;
        const float gs = s.omb2 * gi;
        vi = std::fma(gs, gi, vi);
        float pi = p[k];
        if (s.apply_decay) pi = pi * s.decay;
        float den = std::sqrt(vi);
        den = den + s.eps;
        const float u = mi / den;
        p[k] = std::fma(u, s.step_size, pi);
        m[k] = mi;
        v[k] = vi;
    }
}

QLORA_INLINE void torch32_body(float* p, const float* g, float* m, float* v, int64_t start,
                               int64_t end, const QloraAdamScalars& s) {
    const float w = s.omb1;
    const bool small = std::fabs(w) < 0.5f;
    const float wm1 = w - 1.0f;
    for (int64_t k = start; k < end; ++k) {
        const float gi = g[k];
        float pi = p[k];
        if (s.apply_decay) pi = pi * s.decay;
        const float d = gi - m[k];
        // torch's lerp: weight < 0.5 ? fma(w, end-self, self) : fma(w-1, end-self, end)
        const float mi = small ? std::fma(w, d, m[k]) : std::fma(wm1, d, gi);
        float vi = v[k] * s.beta2;
        const float gs = s.omb2 * gi;
        vi = std::fma(gs, gi, vi);
        float den = std::sqrt(vi);
        den = den / s.correction2;
        den = den + s.eps;
        float u = s.step_size * mi;
        u = u / den;
        p[k] = pi + u;
        m[k] = mi;
        v[k] = vi;
    }
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define QLORA_HAVE_FMA_CLONE 1
#define QLORA_FMA_TARGET __attribute__((target("avx2,fma")))
#else
#define QLORA_HAVE_FMA_CLONE 0
#define QLORA_FMA_TARGET
#endif

using Bnb8Fn = void (*)(float*, const float*, uint8_t*, uint8_t*, float*, float*, int64_t,
                        int64_t, int64_t, const QloraAdamScalars&, const Luts&);
using Elem32Fn = void (*)(float*, const float*, float*, float*, int64_t, int64_t,
                          const QloraAdamScalars&);

void bnb8_plain(float* p, const float* g, uint8_t* q1, uint8_t* q2, float* a1, float* a2,
                int64_t start, int64_t len, int64_t b, const QloraAdamScalars& s, const Luts& l) {
    bnb8_block_body(p, g, q1, q2, a1, a2, start, len, b, s, l);
}
void bnb32_plain(float* p, const float* g, float* m, float* v, int64_t st, int64_t en,
                 const QloraAdamScalars& s) {
    bnb32_body(p, g, m, v, st, en, s);
}
void torch32_plain(float* p, const float* g, float* m, float* v, int64_t st, int64_t en,
                   const QloraAdamScalars& s) {
    torch32_body(p, g, m, v, st, en, s);
}

#if QLORA_HAVE_FMA_CLONE
QLORA_FMA_TARGET void bnb8_fma(float* p, const float* g, uint8_t* q1, uint8_t* q2, float* a1,
                               float* a2, int64_t start, int64_t len, int64_t b,
                               const QloraAdamScalars& s, const Luts& l) {
    bnb8_block_body(p, g, q1, q2, a1, a2, start, len, b, s, l);
}
QLORA_FMA_TARGET void bnb32_fma(float* p, const float* g, float* m, float* v, int64_t st,
                                int64_t en, const QloraAdamScalars& s) {
    bnb32_body(p, g, m, v, st, en, s);
}
QLORA_FMA_TARGET void torch32_fma(float* p, const float* g, float* m, float* v, int64_t st,
                                  int64_t en, const QloraAdamScalars& s) {
    torch32_body(p, g, m, v, st, en, s);
}
bool cpu_has_fma() {
    static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return has;
}
#endif

Bnb8Fn pick_bnb8() {
#if QLORA_HAVE_FMA_CLONE
    if (cpu_has_fma()) return bnb8_fma;
#endif
    return bnb8_plain;
}

Elem32Fn pick_32(bool torch) {
#if QLORA_HAVE_FMA_CLONE
    if (cpu_has_fma()) return torch ? torch32_fma : bnb32_fma;
#endif
    return torch ? torch32_plain : bnb32_plain;
}

void run_elementwise(Elem32Fn f, float* p, const float* g, float* m, float* v, int64_t n,
                     const QloraAdamScalars& s) {
    if (n <= 0) return;
    constexpr int64_t kChunk = 16384;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t st = c * kChunk;
        f(p, g, m, v, st, std::min(st + kChunk, n), s);
    }
}

}  // namespace

extern "C" {

void qlora_adam_bnb8_cpu(float* p, const float* g, uint8_t* q1, uint8_t* q2, float* absmax1,
                         float* absmax2, int64_t n, QloraAdamScalars s) {
    if (n <= 0) return;
    const Luts& lt = luts();
    const Bnb8Fn f = pick_bnb8();
    const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (blocks > 8)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t st = b * kBlock;
        f(p, g, q1, q2, absmax1, absmax2, st, std::min<int64_t>(kBlock, n - st), b, s, lt);
    }
}

void qlora_adam_bnb32_cpu(float* p, const float* g, float* m, float* v, int64_t n,
                          QloraAdamScalars s) {
    run_elementwise(pick_32(false), p, g, m, v, n, s);
}

void qlora_adam_torch32_cpu(float* p, const float* g, float* m, float* v, int64_t n,
                            QloraAdamScalars s) {
    run_elementwise(pick_32(true), p, g, m, v, n, s);
}

void qlora_dequant_dynamic_cpu(const uint8_t* q, const float* absmax, int32_t is_signed,
                               int64_t n, float* out) {
    const float* code = kCode[is_signed ? 1 : 0];
    for (int64_t i = 0; i < n; ++i) out[i] = code[q[i]] * absmax[i / kBlock];
}

void qlora_dynamic_code(int32_t is_signed, float* out256) {
    std::memcpy(out256, kCode[is_signed ? 1 : 0], sizeof(float) * 256);
}

int32_t qlora_optim8bit_selfcheck(void) {
    const Luts& lt = luts();
    for (int which = 0; which < 2; ++which) {
        for (int i = 0; i < 255; ++i) {
            const float s = kCode[which][i] + kCode[which][i + 1];
            if (s * 0.5f != kMid[which][i]) return 1;
        }
        // The CUDA kernel's binary search over the midpoints must reproduce the LUT.
        for (int i = 0; i < kLutSize; ++i) {
            float val = static_cast<float>(i);
            val = val + val;
            val = val / 65535.0f;
            val = val - 1.0f;
            int lo = 0, hi = 255;
            while (lo < hi) {
                const int mid = (lo + hi) >> 1;
                if (kMid[which][mid] < val)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            if (lt.t[which][i] != lo) return 2;
        }
    }
    return 0;
}

}  // extern "C"

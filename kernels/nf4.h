// NF4 4-bit quantization with the numerics of bitsandbytes 0.50.2 (CPU backend).
//
// Shared by the CPU kernels (nf4_cpu.cpp) and their CUDA twins (nf4.cu): the C ABI that
// src/quant/nf4.rs calls, plus the few inline helpers both sides must evaluate identically
// (code tables as bit patterns, float <-> bf16/fp16 conversions, the 8-bit code lookup).
//
// Layout (as bitsandbytes): element i of the flattened weight lives in byte i/2, in the HIGH
// nibble when i is even; block b covers elements [b*blocksize, (b+1)*blocksize).
#ifndef QLORA_NF4_H
#define QLORA_NF4_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define QLORA_HD __host__ __device__ __forceinline__
#else
#define QLORA_HD static inline
#endif

#ifdef __cplusplus
extern "C" {
#endif

// Element types of the float buffers the kernels read or write.
enum { QLORA_NF4_F32 = 0, QLORA_NF4_BF16 = 1, QLORA_NF4_F16 = 2 };

// Status codes (CUDA launchers return a cudaError_t value instead, 0 on success).
enum { QLORA_NF4_OK = 0, QLORA_NF4_EINVAL = -1 };

// Where the per-block scale (absmax) of the 4-bit weight comes from.
// Plain:  absmax != NULL, f32[n_blocks].
// Nested (double quantization): absmax == NULL; the scale of block b is
//   fl(fl(code2[qabsmax[b]] * absmax2[b / blocksize2]) + offset)
// exactly as bitsandbytes' dequantize_blockwise(...) followed by `absmax += offset`.
typedef struct QloraNf4Scales {
    const float* absmax;
    const uint8_t* qabsmax;
    const float* code2;
    const float* absmax2;
    int64_t blocksize2;
    float offset;
} QloraNf4Scales;

// ---- CPU (OpenMP) ----

// x: n elements of `dtype`; packed: (n+1)/2 bytes; absmax: ceil(n/blocksize) f32.
int qlora_nf4_quantize_cpu(const void* x, int dtype, int64_t n, int64_t blocksize, uint8_t* packed,
                           float* absmax);
// out: n elements of `out_dtype`.
int qlora_nf4_dequantize_cpu(const uint8_t* packed, QloraNf4Scales scales, int64_t n,
                             int64_t blocksize, void* out, int out_dtype);
// Blockwise 8-bit quantization of (x - sub) with a sorted 256-entry code, as bitsandbytes'
// CPU quantize_blockwise (65536-bin lookup-table rule). q: n bytes, absmax: ceil(n/blocksize).
int qlora_q8_quantize_cpu(const float* code, const float* x, float sub, int64_t n, int64_t blocksize,
                          uint8_t* q, float* absmax);
// out[i] = fl(fl(code[q[i]] * absmax[i/blocksize]) + add); add = -0.0f is the exact identity
// (x + -0 == x for every x, -0 included), add = offset rebuilds a nested absmax.
int qlora_q8_dequantize_cpu(const float* code, const uint8_t* q, const float* absmax, float add,
                            int64_t n, int64_t blocksize, float* out);
// y[m, n_out] = x[m, k] . W^T with W the NF4 weight of shape [n_out, k]; x and y of `dtype`.
// The reduction order is fixed (see nf4_cpu.cpp) so the CUDA twin matches bit for bit.
int qlora_nf4_matmul_small_cpu(const void* x, int dtype, int64_t m, int64_t k, const uint8_t* packed,
                               QloraNf4Scales scales, int64_t blocksize, int64_t n_out, void* y);

// ---- CUDA twins (compiled only when nvcc is available; cfg(qlora_cuda) on the Rust side) ----
// All pointers are device pointers on `device`; work is queued on `stream` (cudaStream_t).
int qlora_nf4_quantize_cuda(const void* x, int dtype, int64_t n, int64_t blocksize, uint8_t* packed,
                            float* absmax, int device, void* stream);
int qlora_nf4_dequantize_cuda(const uint8_t* packed, QloraNf4Scales scales, int64_t n,
                              int64_t blocksize, void* out, int out_dtype, int device, void* stream);
int qlora_q8_quantize_cuda(const float* code, const float* x, float sub, int64_t n, int64_t blocksize,
                           uint8_t* q, float* absmax, int device, void* stream);
int qlora_q8_dequantize_cuda(const float* code, const uint8_t* q, const float* absmax, float add,
                             int64_t n, int64_t blocksize, float* out, int device, void* stream);
int qlora_nf4_matmul_small_cuda(const void* x, int dtype, int64_t m, int64_t k,
                                const uint8_t* packed, QloraNf4Scales scales, int64_t blocksize,
                                int64_t n_out, void* y, int device, void* stream);
const char* qlora_nf4_cuda_error_string(int code);

#ifdef __cplusplus
}
#endif

// ---- helpers shared by both compilers ----

// bitsandbytes' NF4 code (get_4bit_type("nf4")) as exact f32 bit patterns: the Python table
// goes decimal -> f64 -> f32, which a decimal float literal would not reproduce.
#define QLORA_NF4_CODE_BITS                                                                    \
    {0xbf800000u, 0xbf3239b1u, 0xbf066b30u, 0xbeca32a0u, 0xbe91a24du, 0xbe3d353fu, 0xbdba7871u, \
     0x00000000u, 0x3da2faffu, 0x3e24cae3u, 0x3e7c04ddu, 0x3ead033au, 0x3ee1a4b8u, 0x3f1007abu, \
     0x3f3913b3u, 0x3f800000u}

QLORA_HD float qlora_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

QLORA_HD uint32_t qlora_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

QLORA_HD float qlora_bf16_to_f32(uint16_t h) { return qlora_bits_f32((uint32_t)h << 16); }

// Round to nearest even, NaN -> 0x7fc0 with the sign, as c10::BFloat16 (torch's .to(bfloat16)).
QLORA_HD uint16_t qlora_f32_to_bf16(float f) {
    uint32_t x = qlora_f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(((x >> 16) & 0x8000u) | 0x7fc0u);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

QLORA_HD float qlora_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0) {
        // Zero or subnormal: mant * 2^-24 is exact in f32.
        float v = (float)mant * 5.9604644775390625e-8f;
        return qlora_bits_f32(qlora_f32_bits(v) | sign);
    }
    if (exp == 31) return qlora_bits_f32(sign | 0x7f800000u | (mant << 13));
    return qlora_bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

// IEEE round to nearest even (overflow -> inf, subnormals kept), as torch's .to(float16).
QLORA_HD uint16_t qlora_f32_to_f16(float f) {
    uint32_t x = qlora_f32_bits(f);
    uint32_t sign = x & 0x80000000u;
    x ^= sign;
    uint32_t o;
    if (x >= 0x47800000u) {  // >= 65536 (ties at 65520 are caught below), inf or NaN
        o = (x > 0x7f800000u) ? 0x7e00u : 0x7c00u;
    } else if (x < 0x38800000u) {  // below the smallest normal half: let the FPU round
        // Adding 0.5 puts the half subnormal's ulp (2^-24) at the f32 ulp of 0.5, so the
        // f32 addition performs the round-to-nearest-even.
        float t = qlora_bits_f32(x) + 0.5f;
        o = qlora_f32_bits(t) - 0x3f000000u;
    } else {
        uint32_t mant_odd = (x >> 13) & 1u;
        x += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
        o = x >> 13;
    }
    return (uint16_t)(o | (sign >> 16));
}

QLORA_HD float qlora_load_f32(const void* p, int dtype, int64_t i) {
    if (dtype == QLORA_NF4_BF16) return qlora_bf16_to_f32(((const uint16_t*)p)[i]);
    if (dtype == QLORA_NF4_F16) return qlora_f16_to_f32(((const uint16_t*)p)[i]);
    return ((const float*)p)[i];
}

QLORA_HD void qlora_store_f32(void* p, int dtype, int64_t i, float v) {
    if (dtype == QLORA_NF4_BF16) {
        ((uint16_t*)p)[i] = qlora_f32_to_bf16(v);
    } else if (dtype == QLORA_NF4_F16) {
        ((uint16_t*)p)[i] = qlora_f32_to_f16(v);
    } else {
        ((float*)p)[i] = v;
    }
}

// Value as it would be after a round trip through `dtype` (how a dequantized weight of
// that dtype enters a matmul).
QLORA_HD float qlora_round_to(float v, int dtype) {
    if (dtype == QLORA_NF4_BF16) return qlora_bf16_to_f32(qlora_f32_to_bf16(v));
    if (dtype == QLORA_NF4_F16) return qlora_f16_to_f32(qlora_f32_to_f16(v));
    return v;
}

// bitsandbytes' CPU `norm_to_lut_index`: clamp to [-1, 1], then (uint16)fma((v+1)*0.5,
// 65535, 0.5). The shipped binary contracts that expression to one FMA (checked in its
// disassembly), so the fused form is the reference. NaN converts to index 0 there
// (cvttss2si's 0x80000000 truncated to 16 bits).
QLORA_HD uint32_t qlora_q8_lut_index(float v) {
    if (v != v) return 0;
    v = v < -1.0f ? -1.0f : (1.0f < v ? 1.0f : v);
    float h = (v + 1.0f) * 0.5f;  // exact-order ops; no FMA possible here (no add after mul)
#ifdef __CUDA_ARCH__
    float t = __fmaf_rn(h, 65535.0f, 0.5f);
#else
    float t = fmaf(h, 65535.0f, 0.5f);
#endif
    return ((uint32_t)(int32_t)t) & 0xffffu;
}

// Value that bin `i` of the lookup table stands for: (2i)/65535 - 1 in f32.
QLORA_HD float qlora_q8_lut_value(uint32_t i) {
    float fi = (float)i;
    return (fi + fi) / 65535.0f - 1.0f;
}

// Entry of bitsandbytes' lookup table for bin value `val`: the first j with
// !(mid[j] < val), j <= 255, where mid[j] = (code[j] + code[j+1]) * 0.5. For a sorted code
// (checked by the caller) this is a lower bound, found by bisection.
QLORA_HD uint32_t qlora_q8_code_index(const float* mid, float val) {
    uint32_t lo = 0, hi = 255;
    while (lo < hi) {
        uint32_t m = (lo + hi) >> 1;
        if (mid[m] < val) {
            lo = m + 1;
        } else {
            hi = m;
        }
    }
    return lo;
}

#endif  // QLORA_NF4_H

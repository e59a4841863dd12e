// CUDA twins of kernels/nf4_cpu.cpp: same f32 operations in the same order, so results
// match the CPU kernels (and hence bitsandbytes' CPU backend) bit for bit. Every product
// and sum that matters goes through __fmul_rn/__fadd_rn/__fdiv_rn so nvcc never fuses or
// approximates it; the only FMA is the one bitsandbytes itself evaluates (nf4.h).
#include <cuda_runtime.h>

#include "launch.cuh"

#include "nf4.h"

namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr unsigned kFull = 0xffffffffu;

__constant__ uint32_t kNf4Bits[16] = QLORA_NF4_CODE_BITS;

// Runs a launch on `device` and restores the caller's current device afterwards.
template <typename F>
int on_device(int device, F launch) {
    int prev = -1;
    cudaError_t err = cudaGetDevice(&prev);
    if (err != cudaSuccess) return (int)err;
    if (prev != device) {
        err = cudaSetDevice(device);
        if (err != cudaSuccess) return (int)err;
    }
    launch();
    err = qlora_after_launch();
    if (prev != device) {
        cudaError_t err2 = cudaSetDevice(prev);
        if (err == cudaSuccess) err = err2;
    }
    return (int)err;
}

unsigned grid_for(int64_t items, int64_t per_block) {
    int64_t g = (items + per_block - 1) / per_block;
    if (g < 1) g = 1;
    if (g > 65535 * 32) g = 65535 * 32;  // grid-stride loops cover the rest
    return (unsigned)g;
}

__device__ __forceinline__ float nf4_code(uint32_t q) { return __uint_as_float(kNf4Bits[q]); }

// Fills code[16], bounds[15] in shared memory; bounds as torch: (code[i] + code[i+1]) / 2.
__device__ void nf4_tables(float* code, float* bounds) {
    for (int i = threadIdx.x; i < 16; i += blockDim.x) code[i] = nf4_code(i);
    for (int i = threadIdx.x; i < 15; i += blockDim.x) {
        bounds[i] = __fdiv_rn(__fadd_rn(nf4_code(i), nf4_code(i + 1)), 2.0f);
    }
    __syncthreads();
}

__device__ __forceinline__ uint32_t nf4_bucket(const float* bounds, float s) {
    if (s != s) return 15;
    uint32_t q = 0;
#pragma unroll
    for (int i = 0; i < 15; ++i) q += bounds[i] < s ? 1u : 0u;
    return q;
}

__device__ __forceinline__ float clamp_unit(float s) {
    if (s != s) return s;
    return s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
}

__device__ __forceinline__ float scale_of(const QloraNf4Scales& s, int64_t block) {
    if (s.absmax != nullptr) return s.absmax[block];
    const float v = __fmul_rn(s.code2[s.qabsmax[block]], s.absmax2[block / s.blocksize2]);
    return __fadd_rn(v, s.offset);
}

__device__ __forceinline__ float warp_max(float v) {
    for (int off = kWarp / 2; off > 0; off >>= 1) {
        const float o = __shfl_xor_sync(kFull, v, off);
        v = v < o ? o : v;
    }
    return v;
}

// One warp per quantization block.
__global__ void nf4_quantize_kernel(const void* __restrict__ x, int dtype, int64_t n,
                                    int64_t blocksize, uint8_t* __restrict__ packed,
                                    float* __restrict__ absmax) {
    __shared__ float code[16];
    __shared__ float bounds[15];
    nf4_tables(code, bounds);
    const int lane = threadIdx.x % kWarp;
    const int64_t n_blocks = (n + blocksize - 1) / blocksize;
    const int64_t warps = (int64_t)gridDim.x * kWarpsPerBlock;
    const float tiny = (float)1e-38;
    const uint32_t zero_q = nf4_bucket(bounds, 0.0f);
    for (int64_t b = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp; b < n_blocks;
         b += warps) {
        const int64_t start = b * blocksize;
        const int64_t end = min(start + blocksize, n);
        const bool full = end - start == blocksize;
        float am = 0.0f;
        bool nan = false;
        for (int64_t i = start + lane; i < end; i += kWarp) {
            const float a = fabsf(qlora_load_f32(x, dtype, i));
            if (a != a) {
                nan = true;
            } else if (a > am) {
                am = a;
            }
        }
        am = warp_max(am);
        if (__any_sync(kFull, nan)) am = __uint_as_float(0x7fc00000u);
        const float amc = (am != am) ? am : (am < tiny ? tiny : am);
        if (lane == 0) absmax[b] = full ? am : amc;
        const float recip = __frcp_rn(amc);
        for (int64_t i = start + 2 * lane; i < end; i += 2 * kWarp) {
            uint32_t q[2] = {zero_q, zero_q};
            for (int e = 0; e < 2 && i + e < end; ++e) {
                const float v = qlora_load_f32(x, dtype, i + e);
                const float s = full ? __fmul_rn(v, recip) : __fdiv_rn(v, amc);
                q[e] = nf4_bucket(bounds, clamp_unit(s));
            }
            packed[i >> 1] = (uint8_t)((q[0] << 4) | q[1]);
        }
    }
}

// One thread per packed byte.
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ packed, QloraNf4Scales scales,
                                      int64_t n, int64_t blocksize, void* __restrict__ out,
                                      int out_dtype) {
    __shared__ float code[16];
    __shared__ float bounds[15];
    nf4_tables(code, bounds);
    const int64_t n_bytes = (n + 1) / 2;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < n_bytes; j += stride) {
        const int64_t i = 2 * j;
        const float scale = scale_of(scales, i / blocksize);
        const uint8_t byte = packed[j];
        qlora_store_f32(out, out_dtype, i, __fmul_rn(code[byte >> 4], scale));
        if (i + 1 < n) qlora_store_f32(out, out_dtype, i + 1, __fmul_rn(code[byte & 15], scale));
    }
}

// Eight outputs per thread: one 4-byte load of packed codes, the block's scale computed once
// (8 | blocksize, so the eight share a block), and 16-byte stores (one for bf16/fp16, two for
// fp32). The products are the scalar kernel's, element for element (and the CPU twin's).
// Needs `packed` 4-byte and `out` 16-byte aligned; the last n % 8 elements go the scalar way.
__global__ void nf4_dequantize8_kernel(const uint8_t* __restrict__ packed, QloraNf4Scales scales,
                                       int64_t n, int64_t blocksize, void* __restrict__ out,
                                       int out_dtype) {
    __shared__ float code[16];
    __shared__ float bounds[15];
    nf4_tables(code, bounds);
    const int64_t groups = n / 8;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const uint32_t* __restrict__ words = reinterpret_cast<const uint32_t*>(packed);
    for (int64_t g = first; g < groups; g += stride) {
        const float scale = scale_of(scales, (8 * g) / blocksize);
        const uint32_t w = words[g];
        float v[8];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const uint32_t byte = (w >> (8 * k)) & 0xffu;  // little-endian: packed[4g + k]
            v[2 * k] = __fmul_rn(code[byte >> 4], scale);
            v[2 * k + 1] = __fmul_rn(code[byte & 15u], scale);
        }
        if (out_dtype == QLORA_NF4_F32) {
            float4* o = reinterpret_cast<float4*>(out) + 2 * g;
            o[0] = make_float4(v[0], v[1], v[2], v[3]);
            o[1] = make_float4(v[4], v[5], v[6], v[7]);
        } else {
            uint32_t h[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const bool bf = out_dtype == QLORA_NF4_BF16;
                const uint32_t lo = bf ? qlora_f32_to_bf16(v[2 * k]) : qlora_f32_to_f16(v[2 * k]);
                const uint32_t hi =
                    bf ? qlora_f32_to_bf16(v[2 * k + 1]) : qlora_f32_to_f16(v[2 * k + 1]);
                h[k] = lo | (hi << 16);
            }
            reinterpret_cast<uint4*>(out)[g] = make_uint4(h[0], h[1], h[2], h[3]);
        }
    }
    for (int64_t i = 8 * groups + first; i < n; i += stride) {
        const float scale = scale_of(scales, i / blocksize);
        const uint8_t byte = packed[i >> 1];
        qlora_store_f32(out, out_dtype, i, __fmul_rn(code[(i & 1) ? (byte & 15) : (byte >> 4)], scale));
    }
}

// One warp per block of the 8-bit code.
__global__ void q8_quantize_kernel(const float* __restrict__ code, const float* __restrict__ x,
                                   float sub, int64_t n, int64_t blocksize,
                                   uint8_t* __restrict__ q, float* __restrict__ absmax) {
    __shared__ float mid[255];
    for (int i = threadIdx.x; i < 255; i += blockDim.x) {
        mid[i] = __fmul_rn(__fadd_rn(code[i], code[i + 1]), 0.5f);
    }
    __syncthreads();
    const int lane = threadIdx.x % kWarp;
    const int64_t n_blocks = (n + blocksize - 1) / blocksize;
    const int64_t warps = (int64_t)gridDim.x * kWarpsPerBlock;
    for (int64_t b = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp; b < n_blocks;
         b += warps) {
        const int64_t start = b * blocksize;
        const int64_t end = min(start + blocksize, n);
        // max over the non-NaN magnitudes (bitsandbytes' std::max reduction), then max(0, .)
        float priv = -INFINITY;
        for (int64_t i = start + lane; i < end; i += kWarp) {
            const float a = fabsf(__fsub_rn(x[i], sub));
            priv = priv < a ? a : priv;
        }
        priv = warp_max(priv);
        const float am = 0.0f > priv ? 0.0f : priv;
        if (lane == 0) absmax[b] = am;
        if (am == 0.0f) {
            for (int64_t i = start + lane; i < end; i += kWarp) q[i] = 0;
            continue;
        }
        const float inv = __frcp_rn(am);
        for (int64_t i = start + lane; i < end; i += kWarp) {
            const float v = __fmul_rn(__fsub_rn(x[i], sub), inv);
            q[i] = (uint8_t)qlora_q8_code_index(mid, qlora_q8_lut_value(qlora_q8_lut_index(v)));
        }
    }
}

__global__ void q8_dequantize_kernel(const float* __restrict__ code, const uint8_t* __restrict__ q,
                                     const float* __restrict__ absmax, float add, int64_t n,
                                     int64_t blocksize, float* __restrict__ out) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[i] = __fadd_rn(__fmul_rn(code[q[i]], absmax[i / blocksize]), add);
    }
}

// One warp per output feature j, MAXM rows of x per warp (see the reduction order in
// nf4_cpu.cpp). Lane l owns the 8-element chunks g with g % 32 == l, visited in order.
template <int MAXM, int DT>
__global__ void nf4_matmul_small_kernel(const void* __restrict__ x, int64_t m, int64_t k,
                                        const uint8_t* __restrict__ packed, QloraNf4Scales scales,
                                        int64_t blocksize, int64_t n_out, void* __restrict__ y,
                                        bool word_loads) {
    __shared__ float code[16];
    __shared__ float bounds[15];
    nf4_tables(code, bounds);
    const int lane = threadIdx.x % kWarp;
    const int64_t n_chunks = (k + 7) / 8;
    // A warp-stride loop over output features: the grid is capped (grid_for), so one warp
    // may own several features. The whole warp shares j, so no shuffle is skipped midway.
    for (int64_t j = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp; j < n_out;
         j += (int64_t)gridDim.x * kWarpsPerBlock) {
        for (int64_t i0 = (int64_t)blockIdx.y * MAXM; i0 < m; i0 += (int64_t)gridDim.y * MAXM) {
            float acc[MAXM];
#pragma unroll
            for (int r = 0; r < MAXM; ++r) acc[r] = 0.0f;
            int64_t cached_block = -1;
            float scale = 0.0f;
            for (int64_t g = lane; g < n_chunks; g += kWarp) {
                const int64_t c0 = g * 8;
                const int64_t f0 = j * k + c0;
                uint32_t word = 0;
                if (word_loads) word = *reinterpret_cast<const uint32_t*>(packed + (f0 >> 1));
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const int64_t c = c0 + e;
                    if (c >= k) break;
                    const int64_t f = f0 + e;
                    const int64_t block = f / blocksize;
                    if (block != cached_block) {
                        scale = scale_of(scales, block);
                        cached_block = block;
                    }
                    const uint32_t byte = word_loads ? (word >> (8 * (e >> 1))) & 0xffu
                                                     : (uint32_t)packed[f >> 1];
                    const uint32_t nib = (f & 1) ? (byte & 15u) : (byte >> 4);
                    const float w = qlora_round_to(__fmul_rn(code[nib], scale), DT);
#pragma unroll
                    for (int r = 0; r < MAXM; ++r) {
                        if (i0 + r < m) {
                            const float xv = qlora_load_f32(x, DT, (i0 + r) * k + c);
                            acc[r] = __fadd_rn(acc[r], __fmul_rn(xv, w));
                        }
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < MAXM; ++r) {
                for (int off = kWarp / 2; off > 0; off >>= 1) {
                    acc[r] = __fadd_rn(acc[r], __shfl_xor_sync(kFull, acc[r], off));
                }
            }
            if (lane == 0) {
#pragma unroll
                for (int r = 0; r < MAXM; ++r) {
                    if (i0 + r < m) qlora_store_f32(y, DT, (i0 + r) * n_out + j, acc[r]);
                }
            }
        }
    }
}

template <int MAXM>
void launch_matmul(int dtype, dim3 grid, cudaStream_t st, const void* x, int64_t m, int64_t k,
                   const uint8_t* packed, QloraNf4Scales scales, int64_t blocksize,
                   int64_t n_out, void* y, bool word_loads) {
    switch (dtype) {
        case QLORA_NF4_BF16:
            nf4_matmul_small_kernel<MAXM, QLORA_NF4_BF16><<<grid, kThreads, 0, st>>>(
                x, m, k, packed, scales, blocksize, n_out, y, word_loads);
            break;
        case QLORA_NF4_F16:
            nf4_matmul_small_kernel<MAXM, QLORA_NF4_F16><<<grid, kThreads, 0, st>>>(
                x, m, k, packed, scales, blocksize, n_out, y, word_loads);
            break;
        default:
            nf4_matmul_small_kernel<MAXM, QLORA_NF4_F32><<<grid, kThreads, 0, st>>>(
                x, m, k, packed, scales, blocksize, n_out, y, word_loads);
            break;
    }
}

bool valid_dtype(int dtype) {
    return dtype == QLORA_NF4_F32 || dtype == QLORA_NF4_BF16 || dtype == QLORA_NF4_F16;
}

bool valid_scales(const QloraNf4Scales& s) {
    if (s.absmax != nullptr) return true;
    return s.qabsmax != nullptr && s.code2 != nullptr && s.absmax2 != nullptr && s.blocksize2 > 0;
}

}  // namespace

extern "C" int qlora_nf4_quantize_cuda(const void* x, int dtype, int64_t n, int64_t blocksize,
                                       uint8_t* packed, float* absmax, int device, void* stream) {
    if (x == nullptr || packed == nullptr || absmax == nullptr || n <= 0 || blocksize <= 0 ||
        blocksize % 2 != 0 || !valid_dtype(dtype)) {
        return QLORA_NF4_EINVAL;
    }
    const int64_t n_blocks = (n + blocksize - 1) / blocksize;
    return on_device(device, [&] {
        nf4_quantize_kernel<<<grid_for(n_blocks, kWarpsPerBlock), kThreads, 0,
                              (cudaStream_t)stream>>>(x, dtype, n, blocksize, packed, absmax);
    });
}

extern "C" int qlora_nf4_dequantize_cuda(const uint8_t* packed, QloraNf4Scales scales, int64_t n,
                                         int64_t blocksize, void* out, int out_dtype, int device,
                                         void* stream) {
    if (packed == nullptr || out == nullptr || n < 0 || blocksize <= 0 || blocksize % 2 != 0 ||
        !valid_dtype(out_dtype) || !valid_scales(scales)) {
        return QLORA_NF4_EINVAL;
    }
    if (n == 0) return QLORA_NF4_OK;
    // QLORA_NF4_DEQUANT_SCALAR=1 keeps the one-byte-per-thread kernel, so that the GPU check
    // can measure what the wide one gains.
    static const bool force_scalar = [] {
        const char* v = getenv("QLORA_NF4_DEQUANT_SCALAR");
        return v != nullptr && v[0] == '1';
    }();
    const bool wide = !force_scalar && blocksize % 8 == 0 &&
                      reinterpret_cast<uintptr_t>(packed) % 4 == 0 &&
                      reinterpret_cast<uintptr_t>(out) % 16 == 0;
    if (wide) {
        return on_device(device, [&] {
            nf4_dequantize8_kernel<<<grid_for(n / 8 + 1, kThreads), kThreads, 0,
                                     (cudaStream_t)stream>>>(packed, scales, n, blocksize, out,
                                                             out_dtype);
        });
    }
    return on_device(device, [&] {
        nf4_dequantize_kernel<<<grid_for((n + 1) / 2, kThreads), kThreads, 0,
                                (cudaStream_t)stream>>>(packed, scales, n, blocksize, out,
                                                        out_dtype);
    });
}

extern "C" int qlora_q8_quantize_cuda(const float* code, const float* x, float sub, int64_t n,
                                      int64_t blocksize, uint8_t* q, float* absmax, int device,
                                      void* stream) {
    if (code == nullptr || x == nullptr || q == nullptr || absmax == nullptr || n <= 0 ||
        blocksize <= 0) {
        return QLORA_NF4_EINVAL;
    }
    const int64_t n_blocks = (n + blocksize - 1) / blocksize;
    return on_device(device, [&] {
        q8_quantize_kernel<<<grid_for(n_blocks, kWarpsPerBlock), kThreads, 0,
                             (cudaStream_t)stream>>>(code, x, sub, n, blocksize, q, absmax);
    });
}

extern "C" int qlora_q8_dequantize_cuda(const float* code, const uint8_t* q, const float* absmax,
                                        float add, int64_t n, int64_t blocksize, float* out,
                                        int device, void* stream) {
    if (code == nullptr || q == nullptr || absmax == nullptr || out == nullptr || n < 0 ||
        blocksize <= 0) {
        return QLORA_NF4_EINVAL;
    }
    if (n == 0) return QLORA_NF4_OK;
    return on_device(device, [&] {
        q8_dequantize_kernel<<<grid_for(n, kThreads), kThreads, 0, (cudaStream_t)stream>>>(
            code, q, absmax, add, n, blocksize, out);
    });
}

extern "C" int qlora_nf4_matmul_small_cuda(const void* x, int dtype, int64_t m, int64_t k,
                                           const uint8_t* packed, QloraNf4Scales scales,
                                           int64_t blocksize, int64_t n_out, void* y, int device,
                                           void* stream) {
    if (x == nullptr || packed == nullptr || y == nullptr || m < 0 || k <= 0 || n_out < 0 ||
        blocksize <= 0 || blocksize % 2 != 0 || !valid_dtype(dtype) || !valid_scales(scales)) {
        return QLORA_NF4_EINVAL;
    }
    if (m == 0 || n_out == 0) return QLORA_NF4_OK;
    // 4-byte loads of 8 nibbles need every chunk to start on a 4-byte boundary.
    const bool word_loads = k % 8 == 0 && (reinterpret_cast<uintptr_t>(packed) % 4) == 0;
    const int maxm = m >= 16 ? 16 : (m > 8 ? 16 : (m > 4 ? 8 : (m > 2 ? 4 : (m > 1 ? 2 : 1))));
    int64_t row_tiles = (m + maxm - 1) / maxm;
    if (row_tiles > 65535) row_tiles = 65535;
    const dim3 grid(grid_for(n_out, kWarpsPerBlock), (unsigned)row_tiles);
    const cudaStream_t st = (cudaStream_t)stream;
    return on_device(device, [&] {
        switch (maxm) {
            case 1:
                launch_matmul<1>(dtype, grid, st, x, m, k, packed, scales, blocksize, n_out, y,
                                 word_loads);
                break;
            case 2:
                launch_matmul<2>(dtype, grid, st, x, m, k, packed, scales, blocksize, n_out, y,
                                 word_loads);
                break;
            case 4:
                launch_matmul<4>(dtype, grid, st, x, m, k, packed, scales, blocksize, n_out, y,
                                 word_loads);
                break;
            case 8:
                launch_matmul<8>(dtype, grid, st, x, m, k, packed, scales, blocksize, n_out, y,
                                 word_loads);
                break;
            default:
                launch_matmul<16>(dtype, grid, st, x, m, k, packed, scales, blocksize, n_out, y,
                                  word_loads);
                break;
        }
    });
}

extern "C" const char* qlora_nf4_cuda_error_string(int code) {
    if (code == QLORA_NF4_EINVAL) return "invalid argument to an NF4 kernel";
    return cudaGetErrorString((cudaError_t)code);
}

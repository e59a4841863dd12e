// CUDA twins of optim8bit_cpu.cpp: identical bits. Every float operation is an explicit
// round-to-nearest intrinsic (__fmul_rn, __fadd_rn, __fdiv_rn, __fsqrt_rn, __fmaf_rn) so nvcc
// cannot contract or approximate anything; the fmas are exactly where the CPU twin has them.
// The 8-bit update runs one CUDA block per 256-element quantization block.
#include <cuda_runtime.h>

#include "launch.cuh"
#include <stdint.h>

#include "optim8bit.h"

namespace {

constexpr int kBlock = QLORA_OPTIM_BLOCK;
constexpr int kThreads32 = 256;

__constant__ float c_code[2][256] = {{QLORA_DYNAMIC_UNSIGNED_CODE}, {QLORA_DYNAMIC_SIGNED_CODE}};
__constant__ float c_mid[2][255] = {{QLORA_DYNAMIC_UNSIGNED_MIDPOINTS},
                                    {QLORA_DYNAMIC_SIGNED_MIDPOINTS}};

// The CPU twin's LUT entry for index idx (bitsandbytes' build_quantize_lut): the number of
// midpoints below (2*idx)/65535 - 1. The midpoints are sorted, so a binary search finds it.
__device__ __forceinline__ int lut_code(const float* mid, int idx) {
    const float f = __int2float_rn(idx);
    const float val = __fsub_rn(__fdiv_rn(__fadd_rn(f, f), 65535.0f), 1.0f);
    int lo = 0, hi = 255;
    while (lo < hi) {
        const int m = (lo + hi) >> 1;
        if (mid[m] < val)
            lo = m + 1;
        else
            hi = m;
    }
    return lo;
}

__device__ __forceinline__ uint8_t quantize_one(float x, float inv, const float* mid) {
    float v = __fmul_rn(x, inv);
    v = (v < -1.0f) ? -1.0f : ((1.0f < v) ? 1.0f : v);  // std::clamp(v, -1, 1)
    float t = __fadd_rn(v, 1.0f);
    t = __fmul_rn(t, 0.5f);
    t = __fmaf_rn(t, 65535.0f, 0.5f);
    const int idx = (t == t) ? __float2int_rz(t) : 0;
    return static_cast<uint8_t>(lut_code(mid, idx & 0xffff));
}

__device__ __forceinline__ float block_max(float x, float* red) {
    const int tid = threadIdx.x;
    red[tid] = x;
    __syncthreads();
    for (int s = kBlock / 2; s > 0; s >>= 1) {
        if (tid < s) red[tid] = fmaxf(red[tid], red[tid + s]);
        __syncthreads();
    }
    const float r = red[0];
    __syncthreads();
    return r;
}

__global__ void __launch_bounds__(kBlock)
    bnb8_kernel(float* __restrict__ p, const float* __restrict__ g, uint8_t* __restrict__ q1,
                uint8_t* __restrict__ q2, float* __restrict__ absmax1,
                float* __restrict__ absmax2, int64_t n, QloraAdamScalars s) {
    __shared__ float s_mid[2][256];
    __shared__ float red[kBlock];
    const int tid = threadIdx.x;
    const int64_t b = blockIdx.x;
    const int64_t k = b * kBlock + tid;
    const bool valid = k < n;
    if (tid < 255) {
        s_mid[0][tid] = c_mid[0][tid];
        s_mid[1][tid] = c_mid[1][tid];
    }
    const float a1 = absmax1[b];
    const float a2 = absmax2[b];
    float mi = 0.0f, vi = 0.0f;
    if (valid) {
        const float gi = g[k];
        mi = __fmul_rn(c_code[1][q1[k]], a1);
        vi = __fmul_rn(c_code[0][q2[k]], a2);
        mi = __fmul_rn(mi, s.beta1);
        mi = __fmaf_rn(gi, s.omb1, mi);
        vi = __fmul_rn(vi, s.beta2);
        const float gs = __fmul_rn(s.omb2, gi);
        vi = __fmaf_rn(gs, gi, vi);
        float den = __fsqrt_rn(vi);
        den = __fdiv_rn(den, s.correction2);
        den = __fadd_rn(den, s.eps);
        float pi = p[k];
        if (s.apply_decay) pi = __fmul_rn(pi, s.decay);
        float u = __fmul_rn(s.step_size, mi);
        u = __fdiv_rn(u, den);
        p[k] = __fadd_rn(pi, u);
    }
    // Every thread has read absmax[b] before block_max's barrier; thread 0 writes after it.
    // NaN takes no part in the maximum, so an all-NaN block gets absmax 0 as on the CPU twin
    // (std::max from -inf, clamped at 0) and bitsandbytes' CPU path; fmaxf alone would keep
    // NaN when both operands are NaN.
    const float am1 = block_max((valid && mi == mi) ? fabsf(mi) : 0.0f, red);
    const float am2 = block_max((valid && vi == vi) ? fabsf(vi) : 0.0f, red);
    if (tid == 0) {
        absmax1[b] = am1;
        absmax2[b] = am2;
    }
    if (valid) {
        q1[k] = (am1 == 0.0f) ? 0 : quantize_one(mi, __fdiv_rn(1.0f, am1), s_mid[1]);
        q2[k] = (am2 == 0.0f) ? 0 : quantize_one(vi, __fdiv_rn(1.0f, am2), s_mid[0]);
    }
}

__global__ void bnb32_kernel(float* __restrict__ p, const float* __restrict__ g,
                             float* __restrict__ m, float* __restrict__ v, int64_t n,
                             QloraAdamScalars s) {
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n;
         k += (int64_t)gridDim.x * blockDim.x) {
        const float gi = g[k];
        float mi = __fmul_rn(m[k], s.beta1);
        mi = __fmaf_rn(gi, s.omb1, mi);
        float vi = __fmul_rn(v[k], s.beta2);
        const float gs = __fmul_rn(s.omb2, gi);
        vi = __fmaf_rn(gs, gi, vi);
        float pi = p[k];
        if (s.apply_decay) pi = __fmul_rn(pi, s.decay);
        float den = __fsqrt_rn(vi);
        den = __fadd_rn(den, s.eps);
        const float u = __fdiv_rn(mi, den);
        p[k] = __fmaf_rn(u, s.step_size, pi);
        m[k] = mi;
        v[k] = vi;
    }
}

__global__ void torch32_kernel(float* __restrict__ p, const float* __restrict__ g,
                               float* __restrict__ m, float* __restrict__ v, int64_t n,
                               QloraAdamScalars s) {
    const float w = s.omb1;
    const bool small = fabsf(w) < 0.5f;
    const float wm1 = __fsub_rn(w, 1.0f);
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n;
         k += (int64_t)gridDim.x * blockDim.x) {
        const float gi = g[k];
        float pi = p[k];
        if (s.apply_decay) pi = __fmul_rn(pi, s.decay);
        const float mk = m[k];
        const float d = __fsub_rn(gi, mk);
        const float mi = small ? __fmaf_rn(w, d, mk) : __fmaf_rn(wm1, d, gi);
        float vi = __fmul_rn(v[k], s.beta2);
        const float gs = __fmul_rn(s.omb2, gi);
        vi = __fmaf_rn(gs, gi, vi);
        float den = __fsqrt_rn(vi);
        den = __fdiv_rn(den, s.correction2);
        den = __fadd_rn(den, s.eps);
        float u = __fmul_rn(s.step_size, mi);
        u = __fdiv_rn(u, den);
        p[k] = __fadd_rn(pi, u);
        m[k] = mi;
        v[k] = vi;
    }
}

// Runs `launch` with `device` current, restoring the caller's device afterwards.
template <typename F>
int32_t on_device(int32_t device, F launch) {
    int prev = 0;
    cudaError_t err = cudaGetDevice(&prev);
    if (err != cudaSuccess) return static_cast<int32_t>(err);
    if (prev != device) {
        err = cudaSetDevice(device);
        if (err != cudaSuccess) return static_cast<int32_t>(err);
    }
    launch();
    err = qlora_after_launch();
    if (prev != device) {
        const cudaError_t e2 = cudaSetDevice(prev);
        if (err == cudaSuccess) err = e2;
    }
    return static_cast<int32_t>(err);
}

unsigned grid32(int64_t n) {
    int64_t blocks = (n + kThreads32 - 1) / kThreads32;
    if (blocks > 65535 * 8) blocks = 65535 * 8;  // grid-stride loop covers the rest
    return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

}  // namespace

extern "C" {

int32_t qlora_adam_bnb8_cuda(float* p, const float* g, uint8_t* q1, uint8_t* q2,
                             float* absmax1, float* absmax2, int64_t n, QloraAdamScalars s,
                             int32_t device, void* stream) {
    if (n <= 0) return 0;
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    if (blocks > 0x7fffffffLL) return static_cast<int32_t>(cudaErrorInvalidValue);
    return on_device(device, [&] {
        bnb8_kernel<<<static_cast<unsigned>(blocks), kBlock, 0,
                      static_cast<cudaStream_t>(stream)>>>(p, g, q1, q2, absmax1, absmax2, n, s);
    });
}

int32_t qlora_adam_bnb32_cuda(float* p, const float* g, float* m, float* v, int64_t n,
                              QloraAdamScalars s, int32_t device, void* stream) {
    if (n <= 0) return 0;
    return on_device(device, [&] {
        bnb32_kernel<<<grid32(n), kThreads32, 0, static_cast<cudaStream_t>(stream)>>>(p, g, m, v,
                                                                                     n, s);
    });
}

int32_t qlora_adam_torch32_cuda(float* p, const float* g, float* m, float* v, int64_t n,
                                QloraAdamScalars s, int32_t device, void* stream) {
    if (n <= 0) return 0;
    return on_device(device, [&] {
        torch32_kernel<<<grid32(n), kThreads32, 0, static_cast<cudaStream_t>(stream)>>>(
            p, g, m, v, n, s);
    });
}

}  // extern "C"

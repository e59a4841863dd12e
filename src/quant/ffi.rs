//! The C ABI of the hand-written kernels (`kernels/nf4.h`: NF4 and blockwise 8-bit, CPU and
//! CUDA) and the thin unsafe wrappers that pick the CPU or CUDA entry point by the tensor's
//! device. Callers check every buffer (`format::expect_buffer`) before a call.
use super::format::{div_ceil, expect_buffer, Absmax, Nf4Tensor};
use anyhow::{bail, ensure, Context, Result};
use std::os::raw::{c_int, c_void};
use tch::{Device, Kind, Tensor};

pub(crate) mod c {
    use std::os::raw::{c_int, c_void};

    /// `QloraNf4Scales` of kernels/nf4.h.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct Scales {
        pub absmax: *const f32,
        pub qabsmax: *const u8,
        pub code2: *const f32,
        pub absmax2: *const f32,
        pub blocksize2: i64,
        pub offset: f32,
    }

    extern "C" {
        pub fn qlora_nf4_quantize_cpu(
            x: *const c_void,
            dtype: c_int,
            n: i64,
            blocksize: i64,
            packed: *mut u8,
            absmax: *mut f32,
        ) -> c_int;
        pub fn qlora_nf4_dequantize_cpu(
            packed: *const u8,
            scales: Scales,
            n: i64,
            blocksize: i64,
            out: *mut c_void,
            out_dtype: c_int,
        ) -> c_int;
        pub fn qlora_q8_quantize_cpu(
            code: *const f32,
            x: *const f32,
            sub: f32,
            n: i64,
            blocksize: i64,
            q: *mut u8,
            absmax: *mut f32,
        ) -> c_int;
        pub fn qlora_q8_dequantize_cpu(
            code: *const f32,
            q: *const u8,
            absmax: *const f32,
            add: f32,
            n: i64,
            blocksize: i64,
            out: *mut f32,
        ) -> c_int;
        pub fn qlora_nf4_matmul_small_cpu(
            x: *const c_void,
            dtype: c_int,
            m: i64,
            k: i64,
            packed: *const u8,
            scales: Scales,
            blocksize: i64,
            n_out: i64,
            y: *mut c_void,
        ) -> c_int;
    }

    #[cfg(qlora_cuda)]
    extern "C" {
        pub fn qlora_nf4_quantize_cuda(
            x: *const c_void,
            dtype: c_int,
            n: i64,
            blocksize: i64,
            packed: *mut u8,
            absmax: *mut f32,
            device: c_int,
            stream: *mut c_void,
        ) -> c_int;
        pub fn qlora_nf4_dequantize_cuda(
            packed: *const u8,
            scales: Scales,
            n: i64,
            blocksize: i64,
            out: *mut c_void,
            out_dtype: c_int,
            device: c_int,
            stream: *mut c_void,
        ) -> c_int;
        pub fn qlora_q8_quantize_cuda(
            code: *const f32,
            x: *const f32,
            sub: f32,
            n: i64,
            blocksize: i64,
            q: *mut u8,
            absmax: *mut f32,
            device: c_int,
            stream: *mut c_void,
        ) -> c_int;
        pub fn qlora_q8_dequantize_cuda(
            code: *const f32,
            q: *const u8,
            absmax: *const f32,
            add: f32,
            n: i64,
            blocksize: i64,
            out: *mut f32,
            device: c_int,
            stream: *mut c_void,
        ) -> c_int;
        pub fn qlora_nf4_matmul_small_cuda(
            x: *const c_void,
            dtype: c_int,
            m: i64,
            k: i64,
            packed: *const u8,
            scales: Scales,
            blocksize: i64,
            n_out: i64,
            y: *mut c_void,
            device: c_int,
            stream: *mut c_void,
        ) -> c_int;
        pub fn qlora_nf4_cuda_error_string(code: c_int) -> *const std::os::raw::c_char;
    }
}

/// Which kernel family runs: decided by the device of the tensors, nothing else.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Backend {
    Cpu,
    #[cfg(qlora_cuda)]
    Cuda(c_int),
}

pub(crate) fn backend(device: Device) -> Result<Backend> {
    match device {
        Device::Cpu => Ok(Backend::Cpu),
        Device::Cuda(i) => cuda_backend(i),
        other => bail!("NF4 kernels run on CPU or CUDA tensors, not on {other:?}"),
    }
}

#[cfg(qlora_cuda)]
pub(crate) fn cuda_backend(index: usize) -> Result<Backend> {
    let index = c_int::try_from(index).context("CUDA device index out of range")?;
    Ok(Backend::Cuda(index))
}

#[cfg(not(qlora_cuda))]
pub(crate) fn cuda_backend(index: usize) -> Result<Backend> {
    bail!(
        "tensor is on cuda:{index} but this build has no CUDA kernels (nvcc was not found or \
         QLORA_NO_CUDA=1 was set); rebuild with CUDA or move the tensor to the CPU"
    )
}

pub(crate) fn check_status(status: c_int, backend: Backend, what: &str) -> Result<()> {
    if status == 0 {
        return Ok(());
    }
    match backend {
        Backend::Cpu => bail!("NF4 CPU kernel `{what}` rejected its arguments (status {status})"),
        #[cfg(qlora_cuda)]
        Backend::Cuda(d) => {
            // SAFETY: returns a pointer to a static NUL-terminated string for any code.
            let msg = unsafe { std::ffi::CStr::from_ptr(c::qlora_nf4_cuda_error_string(status)) };
            bail!(
                "NF4 CUDA kernel `{what}` failed on cuda:{d}: {} (code {status})",
                msg.to_string_lossy()
            )
        }
    }
}

// The kernel wrappers below are unsafe because the kernels trust their pointers: every
// pointer must address a contiguous buffer, of the size kernels/nf4.h documents, on the
// backend's device. Callers establish that with `expect_buffer` just before the call.

pub(crate) unsafe fn k_nf4_quantize(
    b: Backend,
    x: *const c_void,
    dtype: c_int,
    n: i64,
    blocksize: i64,
    packed: *mut u8,
    absmax: *mut f32,
) -> c_int {
    match b {
        Backend::Cpu => c::qlora_nf4_quantize_cpu(x, dtype, n, blocksize, packed, absmax),
        #[cfg(qlora_cuda)]
        Backend::Cuda(d) => c::qlora_nf4_quantize_cuda(
            x,
            dtype,
            n,
            blocksize,
            packed,
            absmax,
            d,
            crate::cuda::current_stream(d as usize),
        ),
    }
}

pub(crate) unsafe fn k_nf4_dequantize(
    b: Backend,
    packed: *const u8,
    scales: c::Scales,
    n: i64,
    blocksize: i64,
    out: *mut c_void,
    out_dtype: c_int,
) -> c_int {
    match b {
        Backend::Cpu => c::qlora_nf4_dequantize_cpu(packed, scales, n, blocksize, out, out_dtype),
        #[cfg(qlora_cuda)]
        Backend::Cuda(d) => c::qlora_nf4_dequantize_cuda(
            packed,
            scales,
            n,
            blocksize,
            out,
            out_dtype,
            d,
            crate::cuda::current_stream(d as usize),
        ),
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn k_q8_quantize(
    b: Backend,
    code: *const f32,
    x: *const f32,
    sub: f32,
    n: i64,
    blocksize: i64,
    q: *mut u8,
    absmax: *mut f32,
) -> c_int {
    match b {
        Backend::Cpu => c::qlora_q8_quantize_cpu(code, x, sub, n, blocksize, q, absmax),
        #[cfg(qlora_cuda)]
        Backend::Cuda(d) => c::qlora_q8_quantize_cuda(
            code,
            x,
            sub,
            n,
            blocksize,
            q,
            absmax,
            d,
            crate::cuda::current_stream(d as usize),
        ),
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn k_q8_dequantize(
    b: Backend,
    code: *const f32,
    q: *const u8,
    absmax: *const f32,
    add: f32,
    n: i64,
    blocksize: i64,
    out: *mut f32,
) -> c_int {
    match b {
        Backend::Cpu => c::qlora_q8_dequantize_cpu(code, q, absmax, add, n, blocksize, out),
        #[cfg(qlora_cuda)]
        Backend::Cuda(d) => c::qlora_q8_dequantize_cuda(
            code,
            q,
            absmax,
            add,
            n,
            blocksize,
            out,
            d,
            crate::cuda::current_stream(d as usize),
        ),
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn k_nf4_matmul_small(
    b: Backend,
    x: *const c_void,
    dtype: c_int,
    m: i64,
    k: i64,
    packed: *const u8,
    scales: c::Scales,
    blocksize: i64,
    n_out: i64,
    y: *mut c_void,
) -> c_int {
    match b {
        Backend::Cpu => {
            c::qlora_nf4_matmul_small_cpu(x, dtype, m, k, packed, scales, blocksize, n_out, y)
        }
        #[cfg(qlora_cuda)]
        Backend::Cuda(d) => c::qlora_nf4_matmul_small_cuda(
            x,
            dtype,
            m,
            k,
            packed,
            scales,
            blocksize,
            n_out,
            y,
            d,
            crate::cuda::current_stream(d as usize),
        ),
    }
}

/// Kernel element type code (kernels/nf4.h) of a kind the kernels read and write directly.
pub(crate) fn kernel_dtype(kind: Kind) -> Option<c_int> {
    match kind {
        Kind::Float => Some(0),
        Kind::BFloat16 => Some(1),
        Kind::Half => Some(2),
        _ => None,
    }
}

pub(crate) fn is_float(kind: Kind) -> bool {
    kernel_dtype(kind).is_some() || kind == Kind::Double
}

pub(crate) fn f32_ptr(t: &Tensor) -> *mut f32 {
    t.data_ptr() as *mut f32
}

pub(crate) fn u8_ptr(t: &Tensor) -> *mut u8 {
    t.data_ptr() as *mut u8
}

impl Nf4Tensor {
    /// Checks the invariants the kernels rely on; returns the backend of the weight's device.
    pub(crate) fn validate(&self) -> Result<Backend> {
        self.validate_layout()?;
        backend(self.device())
    }

    /// The scale buffers' invariants (what [`Nf4Tensor::scales`] checks, without pointers).
    pub(crate) fn scales_layout(&self) -> Result<()> {
        self.scales().map(|_| ())
    }

    /// The kernels' view of the scales; pointers stay valid while `self` lives.
    pub(crate) fn scales(&self) -> Result<c::Scales> {
        let device = self.device();
        let n_blocks = self.n_blocks();
        Ok(match &self.absmax {
            Absmax::Plain(a) => {
                expect_buffer(a, Kind::Float, n_blocks, device, "NF4 absmax")?;
                c::Scales {
                    absmax: f32_ptr(a),
                    qabsmax: std::ptr::null(),
                    code2: std::ptr::null(),
                    absmax2: std::ptr::null(),
                    blocksize2: 0,
                    offset: 0.0,
                }
            }
            Absmax::Nested {
                quant,
                offset,
                nested_absmax,
                nested_code,
                nested_blocksize,
            } => {
                ensure!(
                    *nested_blocksize > 0,
                    "nested blocksize must be positive, got {nested_blocksize}"
                );
                expect_buffer(quant, Kind::Uint8, n_blocks, device, "NF4 quantized absmax")?;
                expect_buffer(
                    nested_absmax,
                    Kind::Float,
                    div_ceil(n_blocks, *nested_blocksize),
                    device,
                    "NF4 nested absmax",
                )?;
                expect_buffer(nested_code, Kind::Float, 256, device, "NF4 nested code")?;
                c::Scales {
                    absmax: std::ptr::null(),
                    qabsmax: u8_ptr(quant),
                    code2: f32_ptr(nested_code),
                    absmax2: f32_ptr(nested_absmax),
                    blocksize2: *nested_blocksize,
                    offset: *offset,
                }
            }
        })
    }
}

//! NF4 4-bit weights, bit-exact with bitsandbytes 0.50.2 (`quantize_4bit(quant_type="nf4")`
//! and `dequantize_4bit` on its CPU backend), on CPU (OpenMP kernels) or CUDA (twin kernels
//! with the same numerics); the tensor's device picks the kernel, callers never branch.
//!
//! Layout, as bitsandbytes: the flattened weight is cut into blocks of `blocksize`
//! elements, each scaled by its absolute maximum; element `i` is a 4-bit index into
//! [`NF4_CODE`] stored in byte `i / 2`, in the high nibble when `i` is even. With double
//! quantization the per-block absmax is itself stored as 8-bit codes of
//! `absmax - mean(absmax)` in blocks of 256 (dynamic map [`DYNAMIC_MAP`]).
//!
//! The kernels live in `kernels/nf4_cpu.cpp` and `kernels/nf4.cu` (ABI in `kernels/nf4.h`);
//! `docs/nf4.md` lists the numerical rules and the one known bitsandbytes quirk we do not
//! reproduce.
use super::nf4_torch;
use crate::kernel_choice::{self, Impl, Kernel};
use anyhow::{bail, ensure, Context, Result};
use std::os::raw::{c_int, c_void};
use tch::{Device, Kind, Tensor};

const fn table<const N: usize>(bits: [u32; N]) -> [f32; N] {
    let mut out = [0.0f32; N];
    let mut i = 0;
    while i < N {
        out[i] = f32::from_bits(bits[i]);
        i += 1;
    }
    out
}

/// bitsandbytes' NF4 code (`get_4bit_type("nf4")`), as the exact f32 values torch holds.
pub const NF4_CODE: [f32; 16] = table([
    0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
    0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000,
]);

/// bitsandbytes' `create_dynamic_map(signed=True)`: the 8-bit code of the nested absmax.
/// Sorted ascending (the quantizer relies on it).
pub const DYNAMIC_MAP: [f32; 256] = table([
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
]);

/// Block size bitsandbytes uses for the nested (double-quantized) absmax.
pub const NESTED_BLOCKSIZE: i64 = 256;

/// Block sizes bitsandbytes' `quantize_4bit` accepts.
pub const BLOCKSIZES: [i64; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Nf4Options {
    /// Elements per absmax block; one of [`BLOCKSIZES`].
    pub blocksize: i64,
    /// Quantize the absmax too (bitsandbytes' `compress_statistics=True`).
    pub double_quant: bool,
}

impl Default for Nf4Options {
    fn default() -> Self {
        Nf4Options {
            blocksize: 64,
            double_quant: true,
        }
    }
}

/// The per-block scales of an [`Nf4Tensor`].
#[derive(Debug)]
pub enum Absmax {
    /// f32 `[n_blocks]`.
    Plain(Tensor),
    /// Double quantization: scale of block `b` is
    /// `nested_code[quant[b]] * nested_absmax[b / nested_blocksize] + offset` (two f32 roundings).
    Nested {
        /// u8 `[n_blocks]`.
        quant: Tensor,
        offset: f32,
        /// f32 `[ceil(n_blocks / nested_blocksize)]`.
        nested_absmax: Tensor,
        /// f32 `[256]`.
        nested_code: Tensor,
        nested_blocksize: i64,
    },
}

/// A weight quantized to NF4.
#[derive(Debug)]
pub struct Nf4Tensor {
    /// u8 `[(numel + 1) / 2, 1]`, as bitsandbytes stores it.
    pub packed: Tensor,
    pub absmax: Absmax,
    /// Shape of the original weight.
    pub shape: Vec<i64>,
    /// Kind of the original weight.
    pub dtype: Kind,
    pub blocksize: i64,
}

mod ffi {
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
enum Backend {
    Cpu,
    #[cfg(qlora_cuda)]
    Cuda(c_int),
}

fn backend(device: Device) -> Result<Backend> {
    match device {
        Device::Cpu => Ok(Backend::Cpu),
        Device::Cuda(i) => cuda_backend(i),
        other => bail!("NF4 kernels run on CPU or CUDA tensors, not on {other:?}"),
    }
}

#[cfg(qlora_cuda)]
fn cuda_backend(index: usize) -> Result<Backend> {
    let index = c_int::try_from(index).context("CUDA device index out of range")?;
    Ok(Backend::Cuda(index))
}

#[cfg(not(qlora_cuda))]
fn cuda_backend(index: usize) -> Result<Backend> {
    bail!(
        "tensor is on cuda:{index} but this build has no CUDA kernels (nvcc was not found or \
         QLORA_NO_CUDA=1 was set); rebuild with CUDA or move the tensor to the CPU"
    )
}

fn check_status(status: c_int, backend: Backend, what: &str) -> Result<()> {
    if status == 0 {
        return Ok(());
    }
    match backend {
        Backend::Cpu => bail!("NF4 CPU kernel `{what}` rejected its arguments (status {status})"),
        #[cfg(qlora_cuda)]
        Backend::Cuda(d) => {
            // SAFETY: returns a pointer to a static NUL-terminated string for any code.
            let msg = unsafe { std::ffi::CStr::from_ptr(ffi::qlora_nf4_cuda_error_string(status)) };
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

unsafe fn k_nf4_quantize(
    b: Backend,
    x: *const c_void,
    dtype: c_int,
    n: i64,
    blocksize: i64,
    packed: *mut u8,
    absmax: *mut f32,
) -> c_int {
    match b {
        Backend::Cpu => ffi::qlora_nf4_quantize_cpu(x, dtype, n, blocksize, packed, absmax),
        #[cfg(qlora_cuda)]
        Backend::Cuda(d) => ffi::qlora_nf4_quantize_cuda(
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

unsafe fn k_nf4_dequantize(
    b: Backend,
    packed: *const u8,
    scales: ffi::Scales,
    n: i64,
    blocksize: i64,
    out: *mut c_void,
    out_dtype: c_int,
) -> c_int {
    match b {
        Backend::Cpu => ffi::qlora_nf4_dequantize_cpu(packed, scales, n, blocksize, out, out_dtype),
        #[cfg(qlora_cuda)]
        Backend::Cuda(d) => ffi::qlora_nf4_dequantize_cuda(
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
unsafe fn k_q8_quantize(
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
        Backend::Cpu => ffi::qlora_q8_quantize_cpu(code, x, sub, n, blocksize, q, absmax),
        #[cfg(qlora_cuda)]
        Backend::Cuda(d) => ffi::qlora_q8_quantize_cuda(
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
unsafe fn k_q8_dequantize(
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
        Backend::Cpu => ffi::qlora_q8_dequantize_cpu(code, q, absmax, add, n, blocksize, out),
        #[cfg(qlora_cuda)]
        Backend::Cuda(d) => ffi::qlora_q8_dequantize_cuda(
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
unsafe fn k_nf4_matmul_small(
    b: Backend,
    x: *const c_void,
    dtype: c_int,
    m: i64,
    k: i64,
    packed: *const u8,
    scales: ffi::Scales,
    blocksize: i64,
    n_out: i64,
    y: *mut c_void,
) -> c_int {
    match b {
        Backend::Cpu => {
            ffi::qlora_nf4_matmul_small_cpu(x, dtype, m, k, packed, scales, blocksize, n_out, y)
        }
        #[cfg(qlora_cuda)]
        Backend::Cuda(d) => ffi::qlora_nf4_matmul_small_cuda(
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
fn kernel_dtype(kind: Kind) -> Option<c_int> {
    match kind {
        Kind::Float => Some(0),
        Kind::BFloat16 => Some(1),
        Kind::Half => Some(2),
        _ => None,
    }
}

fn is_float(kind: Kind) -> bool {
    kernel_dtype(kind).is_some() || kind == Kind::Double
}

fn check_blocksize(blocksize: i64) -> Result<()> {
    ensure!(
        BLOCKSIZES.contains(&blocksize),
        "unsupported NF4 blocksize {blocksize}; bitsandbytes accepts {BLOCKSIZES:?}"
    );
    Ok(())
}

fn div_ceil(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// Checks that `t` can be handed to a kernel as a buffer of `numel` elements of `kind`.
fn expect_buffer(t: &Tensor, kind: Kind, numel: i64, device: Device, what: &str) -> Result<()> {
    ensure!(
        t.kind() == kind,
        "{what}: expected {kind:?}, got {:?}",
        t.kind()
    );
    ensure!(
        t.numel() as i64 == numel,
        "{what}: expected {numel} elements, got {} (shape {:?})",
        t.numel(),
        t.size()
    );
    ensure!(
        t.device() == device,
        "{what}: on {:?}, expected {device:?}",
        t.device()
    );
    ensure!(t.is_contiguous(), "{what}: not contiguous");
    Ok(())
}

fn f32_ptr(t: &Tensor) -> *mut f32 {
    t.data_ptr() as *mut f32
}

fn u8_ptr(t: &Tensor) -> *mut u8 {
    t.data_ptr() as *mut u8
}

/// Quantizes `w` (any float kind, any shape, on CPU or CUDA) to NF4 on its own device.
///
/// Equal bit for bit to bitsandbytes' `quantize_4bit(w, blocksize, compress_statistics=
/// double_quant, quant_type="nf4")` on its CPU backend. f64 input is first rounded to f32
/// (bitsandbytes refuses f64).
pub fn quantize(w: &Tensor, opts: &Nf4Options) -> Result<Nf4Tensor> {
    let nf4 = kernel_choice::choose(Kernel::Nf4Quantize, w.device());
    let q8 = kernel_choice::choose(Kernel::Q8Quantize, w.device());
    quantize_by(w, opts, nf4, q8)
}

/// [`quantize`] by the given implementation (the nested absmax too).
pub fn quantize_with(w: &Tensor, opts: &Nf4Options, imp: Impl) -> Result<Nf4Tensor> {
    quantize_by(w, opts, imp, imp)
}

fn quantize_by(w: &Tensor, opts: &Nf4Options, nf4: Impl, q8: Impl) -> Result<Nf4Tensor> {
    check_blocksize(opts.blocksize)?;
    let kind = w.kind();
    ensure!(
        is_float(kind),
        "NF4 quantization needs a floating-point tensor, got {kind:?}"
    );
    let n = w.numel() as i64;
    ensure!(n > 0, "cannot NF4-quantize an empty tensor");
    let _guard = tch::no_grad_guard();
    let (packed, absmax) = match nf4 {
        Impl::Custom => quantize_custom(w, opts)?,
        Impl::Torch => nf4_torch::quantize(w, opts)?,
    };
    let absmax = if opts.double_quant {
        nest_absmax(&absmax, q8)?
    } else {
        Absmax::Plain(absmax)
    };
    Ok(Nf4Tensor {
        packed,
        absmax,
        shape: w.size(),
        dtype: kind,
        blocksize: opts.blocksize,
    })
}

/// The CPU/CUDA kernel's (packed, absmax) of a float tensor checked by [`quantize_with`].
fn quantize_custom(w: &Tensor, opts: &Nf4Options) -> Result<(Tensor, Tensor)> {
    let kind = w.kind();
    let n = w.numel() as i64;
    let device = w.device();
    let b = backend(device)?;
    let x = if kind == Kind::Double {
        w.detach().to_kind(Kind::Float)
    } else {
        w.detach()
    }
    .contiguous();
    let x_dtype = kernel_dtype(x.kind()).context("internal: unexpected input kind")?;
    let n_blocks = div_ceil(n, opts.blocksize);
    let packed = Tensor::empty([(n + 1) / 2, 1], (Kind::Uint8, device));
    let absmax = Tensor::empty([n_blocks], (Kind::Float, device));
    expect_buffer(&x, x.kind(), n, device, "input")?;
    // SAFETY: x holds n contiguous elements of x_dtype; packed and absmax are fresh contiguous
    // buffers of (n+1)/2 bytes and n_blocks f32, all on `device`.
    let status = unsafe {
        k_nf4_quantize(
            b,
            x.data_ptr(),
            x_dtype,
            n,
            opts.blocksize,
            u8_ptr(&packed),
            f32_ptr(&absmax),
        )
    };
    check_status(status, b, "nf4_quantize")?;
    kernel_choice::inject_fault(Kernel::Nf4Quantize, &absmax);
    Ok((packed, absmax))
}

/// bitsandbytes' double quantization: `offset = absmax.mean()`, then
/// `quantize_blockwise(absmax - offset, blocksize=256)` with the dynamic map.
fn nest_absmax(absmax: &Tensor, imp: Impl) -> Result<Absmax> {
    let device = absmax.device();
    // torch's mean (its summation order, its threading) is what bitsandbytes uses; running it
    // on the CPU for CUDA tensors too keeps CUDA and CPU results identical.
    let offset = absmax
        .to_device(Device::Cpu)
        .f_mean(None::<Kind>)
        .and_then(|m| m.f_double_value(&[]))
        .context("mean of the NF4 absmax")? as f32;
    let code = Tensor::from_slice(&DYNAMIC_MAP).to_device(device);
    let (quant, nested_absmax) = q8_quantize_with(absmax, &code, offset, NESTED_BLOCKSIZE, imp)?;
    Ok(Absmax::Nested {
        quant,
        offset,
        nested_absmax,
        nested_code: code,
        nested_blocksize: NESTED_BLOCKSIZE,
    })
}

/// Dequantizes to a new tensor of `kind` and shape `q.shape`, on `q`'s device; equal bit for
/// bit to bitsandbytes' `dequantize_4bit` (code × absmax in f32, one rounding to `kind`).
pub fn dequantize(q: &Nf4Tensor, kind: Kind) -> Result<Tensor> {
    dequantize_with(
        q,
        kind,
        kernel_choice::choose(Kernel::Nf4Dequantize, q.device()),
    )
}

/// [`dequantize`] by the given implementation.
pub fn dequantize_with(q: &Nf4Tensor, kind: Kind, imp: Impl) -> Result<Tensor> {
    ensure!(
        is_float(kind),
        "NF4 dequantization produces a float tensor, not {kind:?}"
    );
    let direct = if kind == Kind::Double {
        Kind::Float
    } else {
        kind
    };
    let mut out = Tensor::empty(q.shape.as_slice(), (direct, q.device()));
    dequantize_into_with(q, &mut out, imp)?;
    Ok(if kind == Kind::Double {
        out.to_kind(Kind::Double)
    } else {
        out
    })
}

/// Dequantizes into `out` (same number of elements as the weight, any float kind and shape,
/// on `q`'s device). A contiguous f32/bf16/f16 `out` is written in place without temporaries.
pub fn dequantize_into(q: &Nf4Tensor, out: &mut Tensor) -> Result<()> {
    let imp = kernel_choice::choose(Kernel::Nf4Dequantize, q.device());
    dequantize_into_with(q, out, imp)
}

/// [`dequantize_into`] by the given implementation.
pub fn dequantize_into_with(q: &Nf4Tensor, out: &mut Tensor, imp: Impl) -> Result<()> {
    let b = match imp {
        Impl::Custom => Some(q.validate()?),
        Impl::Torch => {
            q.validate_layout()?;
            None
        }
    };
    let n = q.numel();
    ensure!(
        out.numel() as i64 == n,
        "dequantize_into: output has {} elements, the NF4 weight {n} (shape {:?})",
        out.numel(),
        q.shape
    );
    let device = q.device();
    ensure!(
        out.device() == device,
        "dequantize_into: output on {:?}, weight on {device:?}",
        out.device()
    );
    let kind = out.kind();
    ensure!(
        is_float(kind),
        "dequantize_into: output must be a float tensor, got {kind:?}"
    );
    match (b, kernel_dtype(kind)) {
        (None, _) => {
            q.scales_layout()?;
            let _guard = tch::no_grad_guard();
            let twin = nf4_torch::dequantize(q, kind);
            out.f_copy_(&twin.view(out.size().as_slice()))
                .context("dequantize_into: copying into the output")?;
            Ok(())
        }
        (Some(b), Some(dtype)) if out.is_contiguous() => {
            let scales = q.scales()?;
            // SAFETY: q.validate/q.scales checked packed and the scale buffers; out is a
            // contiguous buffer of n elements of `dtype` on the same device.
            let status = unsafe {
                k_nf4_dequantize(
                    b,
                    u8_ptr(&q.packed),
                    scales,
                    n,
                    q.blocksize,
                    out.data_ptr(),
                    dtype,
                )
            };
            check_status(status, b, "nf4_dequantize")?;
            kernel_choice::inject_fault(Kernel::Nf4Dequantize, out);
            Ok(())
        }
        (Some(_), _) => {
            let direct = kernel_dtype(kind).map_or(Kind::Float, |_| kind);
            let tmp = dequantize_with(q, direct, Impl::Custom)?;
            let _guard = tch::no_grad_guard();
            out.f_copy_(&tmp.view(out.size().as_slice()))
                .context("dequantize_into: copying into the output")?;
            Ok(())
        }
    }
}

/// `x · Wᵀ` for a 2-D NF4 weight `W` `[n_out, k]` and `x` `[.., k]` (f32/bf16/f16, same
/// device), in x's dtype, without materializing W: the fused kernel reads the packed nibbles.
/// Meant for few rows (decoding, ≤ 16 rows per pass; more rows are processed in passes).
/// Each weight is dequantized as [`dequantize`] would to x's dtype, products are summed in
/// f32 in a fixed order (identical on CPU and CUDA), and the sum is rounded once.
/// No autograd: the result does not require grad.
pub fn matmul_small(x: &Tensor, q: &Nf4Tensor) -> Result<Tensor> {
    matmul_small_with(
        x,
        q,
        kernel_choice::choose(Kernel::Nf4MatmulSmall, q.device()),
    )
}

/// [`matmul_small`] by the given implementation.
pub fn matmul_small_with(x: &Tensor, q: &Nf4Tensor, imp: Impl) -> Result<Tensor> {
    q.validate_layout()?;
    ensure!(
        q.shape.len() == 2,
        "matmul_small needs a 2-D weight [out, in], got shape {:?}",
        q.shape
    );
    let (n_out, k) = (q.shape[0], q.shape[1]);
    let x_shape = x.size();
    ensure!(
        x_shape.last() == Some(&k),
        "matmul_small: x has shape {x_shape:?}, its last dim must be the weight's in-features {k}"
    );
    let dtype = kernel_dtype(x.kind()).with_context(|| {
        format!(
            "matmul_small: x must be f32, bf16 or f16, got {:?}",
            x.kind()
        )
    })?;
    let device = q.device();
    ensure!(
        x.device() == device,
        "matmul_small: x on {:?}, weight on {device:?}",
        x.device()
    );
    let x = x.detach().contiguous();
    let m = x.numel() as i64 / k.max(1);
    let mut y_shape = x_shape[..x_shape.len() - 1].to_vec();
    y_shape.push(n_out);
    if imp == Impl::Torch {
        q.scales_layout()?;
        let y = if m == 0 || n_out == 0 {
            Tensor::empty(y_shape.as_slice(), (x.kind(), device))
        } else {
            nf4_torch::matmul_small(&x.reshape([m, k]), q)?.reshape(y_shape.as_slice())
        };
        return Ok(y);
    }
    let b = q.validate()?;
    let y = Tensor::empty(y_shape.as_slice(), (x.kind(), device));
    if m == 0 || n_out == 0 {
        return Ok(y);
    }
    expect_buffer(&x, x.kind(), m * k, device, "matmul_small x")?;
    let scales = q.scales()?;
    // SAFETY: x is a contiguous [m, k] buffer of `dtype`, y a fresh [m, n_out] one, packed and
    // scales were validated; all on `device`.
    let status = unsafe {
        k_nf4_matmul_small(
            b,
            x.data_ptr(),
            dtype,
            m,
            k,
            u8_ptr(&q.packed),
            scales,
            q.blocksize,
            n_out,
            y.data_ptr(),
        )
    };
    check_status(status, b, "nf4_matmul_small")?;
    kernel_choice::inject_fault(Kernel::Nf4MatmulSmall, &y);
    Ok(y)
}

/// bitsandbytes' blockwise 8-bit quantization (CPU rule) of an f32 tensor with a sorted
/// 256-entry `code` (e.g. [`DYNAMIC_MAP`]): returns (u8 codes shaped like `x`, f32 absmax
/// `[ceil(numel / blocksize)]`), on x's device.
pub fn quantize_blockwise_8bit(
    x: &Tensor,
    code: &Tensor,
    blocksize: i64,
) -> Result<(Tensor, Tensor)> {
    let imp = kernel_choice::choose(Kernel::Q8Quantize, x.device());
    q8_quantize_with(x, code, 0.0, blocksize, imp)
}

/// Blockwise 8-bit quantization of `x - sub` by the given implementation; codes shaped like
/// `x`.
pub fn q8_quantize_with(
    x: &Tensor,
    code: &Tensor,
    sub: f32,
    blocksize: i64,
    imp: Impl,
) -> Result<(Tensor, Tensor)> {
    ensure!(
        blocksize > 0,
        "blockwise 8-bit quantization needs a positive blocksize"
    );
    ensure!(
        x.kind() == Kind::Float,
        "blockwise 8-bit quantization takes f32, got {:?}",
        x.kind()
    );
    let device = x.device();
    let n = x.numel() as i64;
    ensure!(n > 0, "cannot quantize an empty tensor");
    let code = code.to_device(device).contiguous();
    expect_buffer(&code, Kind::Float, 256, device, "8-bit code")?;
    let sorted: Vec<f32> = Vec::try_from(&code.to_device(Device::Cpu))?;
    ensure!(
        sorted.windows(2).all(|w| w[0] <= w[1]),
        "the 8-bit code must be sorted ascending"
    );
    let x = x.detach().contiguous();
    if imp == Impl::Torch {
        let (q, absmax) = nf4_torch::q8_quantize(&x, &code, sub, blocksize);
        return Ok((q.reshape(x.size().as_slice()), absmax));
    }
    let b = backend(device)?;
    let q = Tensor::empty(x.size().as_slice(), (Kind::Uint8, device));
    let absmax = Tensor::empty([div_ceil(n, blocksize)], (Kind::Float, device));
    // SAFETY: code 256 f32, x n f32, q n bytes, absmax ceil(n/blocksize) f32, contiguous, on
    // `device`.
    let status = unsafe {
        k_q8_quantize(
            b,
            f32_ptr(&code),
            f32_ptr(&x),
            sub,
            n,
            blocksize,
            u8_ptr(&q),
            f32_ptr(&absmax),
        )
    };
    check_status(status, b, "q8_quantize")?;
    kernel_choice::inject_fault(Kernel::Q8Quantize, &q);
    Ok((q, absmax))
}

/// Inverse of [`quantize_blockwise_8bit`]: `code[q] * absmax[block]` in f32, shaped like `q`.
pub fn dequantize_blockwise_8bit(
    q: &Tensor,
    absmax: &Tensor,
    code: &Tensor,
    blocksize: i64,
) -> Result<Tensor> {
    let imp = kernel_choice::choose(Kernel::Q8Dequantize, q.device());
    q8_dequantize_with(q, absmax, code, blocksize, -0.0, imp)
}

/// `fl(fl(code[q] * absmax[block]) + add)` by the given implementation; `add = -0.0` is the
/// exact identity.
pub fn q8_dequantize_with(
    q: &Tensor,
    absmax: &Tensor,
    code: &Tensor,
    blocksize: i64,
    add: f32,
    imp: Impl,
) -> Result<Tensor> {
    ensure!(blocksize > 0, "blockwise 8-bit needs a positive blocksize");
    let device = q.device();
    let n = q.numel() as i64;
    let q = q.contiguous();
    let absmax = absmax.to_device(device).to_kind(Kind::Float).contiguous();
    let code = code.to_device(device).to_kind(Kind::Float).contiguous();
    expect_buffer(&q, Kind::Uint8, n, device, "8-bit codes")?;
    expect_buffer(
        &absmax,
        Kind::Float,
        div_ceil(n, blocksize),
        device,
        "absmax",
    )?;
    expect_buffer(&code, Kind::Float, 256, device, "8-bit code")?;
    if imp == Impl::Torch {
        return Ok(nf4_torch::q8_dequantize(&q, &absmax, &code, blocksize, add));
    }
    let b = backend(device)?;
    let out = Tensor::empty(q.size().as_slice(), (Kind::Float, device));
    if n == 0 {
        return Ok(out);
    }
    // SAFETY: buffers checked just above; out is fresh with n f32.
    let status = unsafe {
        k_q8_dequantize(
            b,
            f32_ptr(&code),
            u8_ptr(&q),
            f32_ptr(&absmax),
            add,
            n,
            blocksize,
            f32_ptr(&out),
        )
    };
    check_status(status, b, "q8_dequantize")?;
    kernel_choice::inject_fault(Kernel::Q8Dequantize, &out);
    Ok(out)
}

fn dtype_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Float => "float32",
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        other => bail!("no bitsandbytes dtype name for {other:?}"),
    })
}

fn dtype_from_name(name: &str) -> Result<Kind> {
    Ok(match name {
        "float32" => Kind::Float,
        "bfloat16" => Kind::BFloat16,
        "float16" => Kind::Half,
        "float64" => Kind::Double,
        other => bail!("unsupported bitsandbytes dtype {other:?}"),
    })
}

/// `repr(float)` of Python, which `json.dumps` uses: shortest round-trip digits, positional
/// for exponents in [-4, 16), else `d.ddde±XX`.
fn python_float_repr(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` prints the shortest round-trip digits, e.g. "-2.5e-7".
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        if point <= 0 {
            format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            let zeros = "0".repeat(point as usize - digits.len());
            format!("{sign}{digits}{zeros}.0")
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{sign}{int}.{frac}")
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.abs())
    }
}

impl Nf4Tensor {
    pub fn device(&self) -> Device {
        self.packed.device()
    }

    /// A copy on `d` (tensors already there are shared, not copied).
    pub fn to_device(&self, d: Device) -> Nf4Tensor {
        let absmax = match &self.absmax {
            Absmax::Plain(a) => Absmax::Plain(a.to_device(d)),
            Absmax::Nested {
                quant,
                offset,
                nested_absmax,
                nested_code,
                nested_blocksize,
            } => Absmax::Nested {
                quant: quant.to_device(d),
                offset: *offset,
                nested_absmax: nested_absmax.to_device(d),
                nested_code: nested_code.to_device(d),
                nested_blocksize: *nested_blocksize,
            },
        };
        Nf4Tensor {
            packed: self.packed.to_device(d),
            absmax,
            shape: self.shape.clone(),
            dtype: self.dtype,
            blocksize: self.blocksize,
        }
    }

    /// Bytes held by the packed weight and its scales.
    pub fn nbytes(&self) -> usize {
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        bytes(&self.packed)
            + match &self.absmax {
                Absmax::Plain(a) => bytes(a),
                Absmax::Nested {
                    quant,
                    nested_absmax,
                    nested_code,
                    ..
                } => bytes(quant) + bytes(nested_absmax) + bytes(nested_code),
            }
    }

    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    pub fn n_blocks(&self) -> i64 {
        div_ceil(self.numel(), self.blocksize)
    }

    /// The per-block scales as f32 `[n_blocks]` (for nested absmax exactly what bitsandbytes'
    /// `dequantize_blockwise(absmax, state2) + offset` gives).
    pub fn absmax_f32(&self) -> Result<Tensor> {
        match &self.absmax {
            Absmax::Plain(a) => Ok(a.shallow_clone()),
            Absmax::Nested {
                quant,
                offset,
                nested_absmax,
                nested_code,
                nested_blocksize,
            } => q8_dequantize_with(
                quant,
                nested_absmax,
                nested_code,
                *nested_blocksize,
                *offset,
                kernel_choice::choose(Kernel::Q8Dequantize, quant.device()),
            ),
        }
    }

    /// Checks the invariants the kernels rely on; returns the backend of the weight's device.
    fn validate(&self) -> Result<Backend> {
        self.validate_layout()?;
        backend(self.device())
    }

    /// The shape and packed-buffer invariants every implementation relies on.
    fn validate_layout(&self) -> Result<()> {
        check_blocksize(self.blocksize)?;
        let n = self.numel();
        ensure!(
            n > 0 && self.shape.iter().all(|&d| d >= 0),
            "NF4 weight has an invalid shape {:?}",
            self.shape
        );
        let device = self.device();
        expect_buffer(
            &self.packed,
            Kind::Uint8,
            (n + 1) / 2,
            device,
            "NF4 packed weight",
        )?;
        Ok(())
    }

    /// The scale buffers' invariants (what [`Nf4Tensor::scales`] checks, without pointers).
    fn scales_layout(&self) -> Result<()> {
        self.scales().map(|_| ())
    }

    /// The kernels' view of the scales; pointers stay valid while `self` lives.
    fn scales(&self) -> Result<ffi::Scales> {
        let device = self.device();
        let n_blocks = self.n_blocks();
        Ok(match &self.absmax {
            Absmax::Plain(a) => {
                expect_buffer(a, Kind::Float, n_blocks, device, "NF4 absmax")?;
                ffi::Scales {
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
                ffi::Scales {
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

    /// The JSON bitsandbytes packs into `weight.quant_state.bitsandbytes__nf4`
    /// (`json.dumps` of the non-tensor items of `QuantState.as_dict()`).
    fn quant_state_json(&self) -> Result<String> {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        let mut s = format!(
            "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.blocksize,
            dtype_name(self.dtype)?,
            shape.join(", ")
        );
        if let Absmax::Nested {
            offset,
            nested_blocksize,
            ..
        } = &self.absmax
        {
            s.push_str(&format!(
                ", \"nested_blocksize\": {nested_blocksize}, \"nested_dtype\": \"float32\", \
                 \"nested_offset\": {}",
                python_float_repr(f64::from(*offset))
            ));
        }
        s.push('}');
        Ok(s)
    }

    /// The tensors transformers writes for a bitsandbytes 4-bit `Linear4bit` weight
    /// (`Params4bit` data plus `QuantState.as_dict(packed=True)`), in that order:
    /// `<prefix>weight` (u8 `[(n+1)/2, 1]`), `<prefix>weight.absmax` (u8 when nested, else
    /// f32), `<prefix>weight.quant_map` (f32 `[16]`), with double quantization
    /// `<prefix>weight.nested_absmax` and `<prefix>weight.nested_quant_map` (f32 `[256]`),
    /// and `<prefix>weight.quant_state.bitsandbytes__nf4` (u8 JSON bytes, on the CPU).
    pub fn to_bnb_tensors(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        self.validate()?;
        self.scales()?;
        let device = self.device();
        let name = |suffix: &str| format!("{prefix}weight{suffix}");
        let code = Tensor::from_slice(&NF4_CODE).to_device(device);
        let mut out = vec![(name(""), self.packed.shallow_clone())];
        match &self.absmax {
            Absmax::Plain(a) => {
                out.push((name(".absmax"), a.shallow_clone()));
                out.push((name(".quant_map"), code));
            }
            Absmax::Nested {
                quant,
                nested_absmax,
                nested_code,
                ..
            } => {
                out.push((name(".absmax"), quant.shallow_clone()));
                out.push((name(".quant_map"), code));
                out.push((name(".nested_absmax"), nested_absmax.shallow_clone()));
                // A copy, as bitsandbytes (`state2.code.clone()`): safetensors refuses shared storage.
                out.push((name(".nested_quant_map"), nested_code.copy()));
            }
        }
        let json = self.quant_state_json()?;
        out.push((
            name(".quant_state.bitsandbytes__nf4"),
            Tensor::from_slice(json.as_bytes()),
        ));
        Ok(out)
    }

    /// Rebuilds a weight from the tensors [`Nf4Tensor::to_bnb_tensors`] names (as found in a
    /// transformers 4-bit checkpoint); `get` looks a full tensor name up. Everything is moved
    /// to the device of `<prefix>weight`.
    pub fn from_bnb_tensors(
        get: &dyn Fn(&str) -> Option<Tensor>,
        prefix: &str,
    ) -> Result<Nf4Tensor> {
        let name = |suffix: &str| format!("{prefix}weight{suffix}");
        let fetch = |suffix: &str| -> Result<Tensor> {
            get(&name(suffix)).with_context(|| format!("missing tensor {}", name(suffix)))
        };
        let packed = fetch("")?;
        let device = packed.device();
        let qs = match get(&name(".quant_state.bitsandbytes__nf4")) {
            Some(t) => t,
            None if get(&name(".quant_state.bitsandbytes__fp4")).is_some() => {
                bail!("{}: FP4 weights are not supported, only NF4", name(""))
            }
            None => bail!(
                "missing tensor {} (not a bitsandbytes 4-bit weight?)",
                name(".quant_state.bitsandbytes__nf4")
            ),
        };
        let bytes: Vec<u8> = Vec::try_from(
            &qs.to_device(Device::Cpu)
                .to_kind(Kind::Uint8)
                .flatten(0, -1),
        )
        .context("reading the packed quant_state")?;
        let meta: serde_json::Value = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{}: quant_state is not JSON",
                name(".quant_state.bitsandbytes__nf4")
            )
        })?;
        let field = |key: &str| {
            meta.get(key)
                .with_context(|| format!("{}: quant_state lacks {key:?}", name("")))
        };
        let as_i64 = |key: &str| -> Result<i64> {
            field(key)?
                .as_i64()
                .with_context(|| format!("{}: quant_state {key:?} is not an integer", name("")))
        };
        let quant_type = field("quant_type")?.as_str().unwrap_or_default();
        ensure!(
            quant_type == "nf4",
            "{}: quant_type {quant_type:?} is not supported, only nf4",
            name("")
        );
        let blocksize = as_i64("blocksize")?;
        check_blocksize(blocksize)?;
        let dtype = dtype_from_name(field("dtype")?.as_str().unwrap_or_default())
            .with_context(|| format!("{}: quant_state dtype", name("")))?;
        let shape: Vec<i64> = field("shape")?
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_i64()).collect::<Option<Vec<_>>>())
            .with_context(|| format!("{}: quant_state shape is not a list of ints", name("")))?;
        // Checkpoints saved with a non-u8 quant_storage keep the same bytes in another dtype.
        let packed = if packed.kind() == Kind::Uint8 {
            packed.contiguous()
        } else {
            packed.contiguous().view_dtype(Kind::Uint8)
        }
        .reshape([-1, 1]);
        if let Some(map) = get(&name(".quant_map")) {
            let map: Vec<f32> = Vec::try_from(&map.to_device(Device::Cpu).to_kind(Kind::Float))
                .context("reading quant_map")?;
            ensure!(
                map.len() == 16
                    && map
                        .iter()
                        .zip(NF4_CODE.iter())
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{}: quant_map is not bitsandbytes' NF4 code",
                name("")
            );
        }
        let absmax_t = fetch(".absmax")?.to_device(device).contiguous();
        let absmax = match get(&name(".nested_absmax")) {
            Some(nested_absmax) => {
                let offset = field("nested_offset")?.as_f64().with_context(|| {
                    format!("{}: quant_state nested_offset is not a number", name(""))
                })? as f32;
                let nested_dtype = field("nested_dtype")?.as_str().unwrap_or_default();
                ensure!(
                    nested_dtype == "float32",
                    "{}: nested_dtype {nested_dtype:?} is not supported",
                    name("")
                );
                Absmax::Nested {
                    quant: absmax_t,
                    offset,
                    nested_absmax: nested_absmax
                        .to_device(device)
                        .to_kind(Kind::Float)
                        .contiguous(),
                    nested_code: fetch(".nested_quant_map")?
                        .to_device(device)
                        .to_kind(Kind::Float)
                        .contiguous(),
                    nested_blocksize: as_i64("nested_blocksize")?,
                }
            }
            None => Absmax::Plain(absmax_t.to_kind(Kind::Float)),
        };
        let q = Nf4Tensor {
            packed,
            absmax,
            shape,
            dtype,
            blocksize,
        };
        q.validate()
            .and_then(|_| q.scales().map(|_| ()))
            .with_context(|| format!("{}: inconsistent bitsandbytes tensors", name("")))?;
        Ok(q)
    }
}

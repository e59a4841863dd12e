//! bitsandbytes' blockwise 8-bit code (`quantize_blockwise` / `dequantize_blockwise` with a
//! code map): what double quantization stores the NF4 absmax in, and the optimizer's states.
use super::ffi::*;
use super::format::DYNAMIC_MAP;
use super::format::{div_ceil, expect_buffer};
use super::nf4_torch;
use crate::kernel_check::{self, rand_codes, randn};
use crate::kernel_choice::{self, Check, Impl, Kernel};
use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

/// bitsandbytes' blockwise 8-bit quantization (CPU rule) of an f32 tensor with a sorted
/// 256-entry `code` (e.g. [`DYNAMIC_MAP`]): returns (u8 codes shaped like `x`, f32 absmax
/// `[ceil(numel / blocksize)]`), on x's device.
pub fn quantize_blockwise_8bit(
    x: &Tensor,
    code: &Tensor,
    blocksize: i64,
) -> Result<(Tensor, Tensor)> {
    let imp = kernel_choice::choose(Kernel::Q8Quantize, x.device(), check_quantize);
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
    let imp = kernel_choice::choose(Kernel::Q8Dequantize, q.device(), check_dequantize);
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

/// The self-check of [`quantize_blockwise_8bit`].
pub fn check_quantize(device: Device) -> Check {
    kernel_check::run(
        device,
        vec![(
            "[1000] bs256 sub 0.1".into(),
            Box::new(move |imp| {
                let x = randn(1000, 6, 1.0, device);
                let code = Tensor::from_slice(&DYNAMIC_MAP).to_device(device);
                let (q, absmax) = q8_quantize_with(&x, &code, 0.1, 256, imp)?;
                Ok(vec![q, absmax])
            }),
        )],
    )
}

/// The self-check of [`dequantize_blockwise_8bit`].
pub fn check_dequantize(device: Device) -> Check {
    kernel_check::run(
        device,
        vec![(
            "[1000] bs256 add 0.3".into(),
            Box::new(move |imp| {
                let q = rand_codes(1000, 7, device);
                let absmax = randn(4, 8, 1.0, device).abs();
                let code = Tensor::from_slice(&DYNAMIC_MAP).to_device(device);
                Ok(vec![q8_dequantize_with(&q, &absmax, &code, 256, 0.3, imp)?])
            }),
        )],
    )
}

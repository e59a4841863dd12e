//! NF4 4-bit weights, bit-exact with bitsandbytes 0.50.2 (`quantize_4bit(quant_type="nf4")`
//! and `dequantize_4bit` on its CPU backend): quantize, dequantize and the small-batch
//! matmul, on CPU (OpenMP kernels) or CUDA (twin kernels with the same numerics); the
//! tensor's device picks the kernel and `kernel_choice` the implementation (hand-written or
//! its torch twin, `nf4_torch`), callers never branch. The format is `format`, the 8-bit
//! code of the nested absmax `blockwise8`, the on-disk form `bnb_format`.
//!
//! The kernels live in `kernels/nf4_cpu.cpp` and `kernels/nf4.cu` (ABI in `kernels/nf4.h`);
//! `docs/nf4.md` lists the numerical rules and the one known bitsandbytes quirk we do not
//! reproduce.
pub use super::blockwise8::{
    dequantize_blockwise_8bit, q8_dequantize_with, q8_quantize_with, quantize_blockwise_8bit,
};
use super::ffi::*;
use super::format::{check_blocksize, div_ceil, expect_buffer};
pub use super::format::{
    Absmax, Nf4Options, Nf4Tensor, BLOCKSIZES, DYNAMIC_MAP, NESTED_BLOCKSIZE, NF4_CODE,
};
use super::nf4_torch;
use crate::kernel_check::{self, randn, Problem};
use crate::kernel_choice::{self, Check, Impl, Kernel};
use anyhow::{ensure, Context, Result};
use tch::{Device, Kind, Tensor};

/// Quantizes `w` (any float kind, any shape, on CPU or CUDA) to NF4 on its own device.
///
/// Equal bit for bit to bitsandbytes' `quantize_4bit(w, blocksize, compress_statistics=
/// double_quant, quant_type="nf4")` on its CPU backend. f64 input is first rounded to f32
/// (bitsandbytes refuses f64).
pub fn quantize(w: &Tensor, opts: &Nf4Options) -> Result<Nf4Tensor> {
    let nf4 = kernel_choice::choose(Kernel::Nf4Quantize, w.device(), check_quantize);
    let q8 = kernel_choice::choose(
        Kernel::Q8Quantize,
        w.device(),
        super::blockwise8::check_quantize,
    );
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
        kernel_choice::choose(Kernel::Nf4Dequantize, q.device(), check_dequantize),
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
    let imp = kernel_choice::choose(Kernel::Nf4Dequantize, q.device(), check_dequantize);
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
        kernel_choice::choose(Kernel::Nf4MatmulSmall, q.device(), check_matmul_small),
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

impl Nf4Tensor {
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
                kernel_choice::choose(
                    Kernel::Q8Dequantize,
                    quant.device(),
                    super::blockwise8::check_dequantize,
                ),
            ),
        }
    }
}

fn check_weight(rows: i64, cols: i64, seed: u64, device: Device) -> Result<Nf4Tensor> {
    let w = randn(rows * cols, seed, 1.0, device).reshape([rows, cols]);
    let opts = Nf4Options {
        blocksize: 64,
        double_quant: true,
    };
    // Built by the twins, which run everywhere: the problem is the same for both sides.
    quantize_with(&w, &opts, Impl::Torch)
}

/// The self-check of [`quantize`]: an odd element count with a partial last block; f32 and
/// bf16 input.
pub fn check_quantize(device: Device) -> Check {
    kernel_check::run(
        device,
        vec![(
            "[33, 70] f32+bf16 bs64".into(),
            Box::new(move |imp| {
                let w = randn(33 * 70, 1, 1.0, device).reshape([33, 70]);
                let opts = Nf4Options {
                    blocksize: 64,
                    double_quant: false,
                };
                let mut outs = Vec::new();
                for w in [w.shallow_clone(), w.to_kind(Kind::BFloat16)] {
                    let q = quantize_with(&w, &opts, imp)?;
                    outs.push(q.packed.shallow_clone());
                    outs.push(q.absmax_f32()?);
                }
                Ok(outs)
            }),
        )],
    )
}

/// The self-check of [`dequantize`]. On a CUDA device it adds one 8B-shaped weight (14336 ×
/// 4096, double-quantized), the shape whose size the kernel's indexing must survive.
pub fn check_dequantize(device: Device) -> Check {
    let q = check_weight(33, 70, 2, device);
    let mut problems: Vec<(String, Problem)> = vec![(
        "[33, 70] bs64 dq -> f32+bf16".into(),
        Box::new(move |imp| {
            let q = q.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
            Ok(vec![
                dequantize_with(q, Kind::Float, imp)?,
                dequantize_with(q, Kind::BFloat16, imp)?,
            ])
        }),
    )];
    if device.is_cuda() {
        let q = check_weight(14336, 4096, 3, device);
        problems.push((
            "[14336, 4096] bs64 dq -> bf16".into(),
            Box::new(move |imp| {
                let q = q.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
                Ok(vec![dequantize_with(q, Kind::BFloat16, imp)?])
            }),
        ));
    }
    kernel_check::run(device, problems)
}

/// The self-check of [`matmul_small`].
pub fn check_matmul_small(device: Device) -> Check {
    let q = check_weight(37, 200, 4, device);
    kernel_check::run(
        device,
        vec![(
            "x [3, 200] f32+bf16 . W [37, 200] bs64 dq".into(),
            Box::new(move |imp| {
                let q = q.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
                let x = randn(3 * 200, 5, 1.0, device).reshape([3, 200]);
                Ok(vec![
                    matmul_small_with(&x, q, imp)?,
                    matmul_small_with(&x.to_kind(Kind::BFloat16), q, imp)?,
                ])
            }),
        )],
    )
}

//! The self-check of one custom kernel on one device (`kernel_choice`, mode `auto`): the
//! kernel and its torch twin run the same small random problem there, and every output is
//! compared. Inputs come from a fixed-seed generator of our own, so a check never touches
//! torch's random state (a run's LoRA initialisation must not depend on the checks).
//! On a CUDA device the NF4 dequantize check adds one 8B-shaped weight (14336 × 4096,
//! double-quantized), the shape whose size the kernel's indexing must survive.
use crate::dropout::{row_key, Dropout};
use crate::kernel_choice::{Check, Impl, Kernel};
use crate::quant::nf4::{self, Nf4Options, Nf4Tensor, DYNAMIC_MAP};
use anyhow::Result;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Every twin repeats its kernel's roundings (see the twins' docs), so the tolerance is 0:
/// the outputs must be equal (NaN where both are NaN counts as equal).
pub const TOLERANCE: f64 = 0.0;

/// `n` pseudo-normal f32 values times `scale` (splitmix64 + Box–Muller), on `device`.
pub fn randn(n: i64, seed: u64, scale: f64, device: Device) -> Tensor {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED;
    let mut uniform = || {
        state = crate::dropout::mix(state, 0x1234_5678);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * scale) as f32
        })
        .collect();
    Tensor::from_slice(&v).to_device(device)
}

/// `n` pseudo-random u8 codes on `device`.
pub fn rand_codes(n: i64, seed: u64, device: Device) -> Tensor {
    let v: Vec<u8> = (0..n as u64)
        .map(|i| (crate::dropout::mix(seed, i) >> 56) as u8)
        .collect();
    Tensor::from_slice(&v).to_device(device)
}

/// Largest |a − b| over two tensors of the same shape, in f64; equal values (infinities
/// included) and NaN against NaN count 0, NaN against a number counts ∞.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let _guard = tch::no_grad_guard();
    if a.size() != b.size() {
        return f64::INFINITY;
    }
    if a.numel() == 0 {
        return 0.0;
    }
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let same = a
        .eq_tensor(&b)
        .logical_or(&a.isnan().logical_and(&b.isnan()));
    let d = (&a - &b).abs().nan_to_num(f64::INFINITY, None, None);
    d.masked_fill(&same, 0.0)
        .max()
        .to_device(Device::Cpu)
        .double_value(&[])
}

type Problem = Box<dyn Fn(Impl) -> Result<Vec<Tensor>>>;

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Runs the self-check of `kernel` on `device`.
pub fn run(kernel: Kernel, device: Device) -> Check {
    let _guard = tch::no_grad_guard();
    let start = Instant::now();
    let mut check = Check {
        shape: String::new(),
        max_abs_diff: 0.0,
        tol: TOLERANCE,
        error: None,
        check_ms: 0.0,
        custom_ms: 0.0,
        torch_ms: 0.0,
    };
    let mut shapes = Vec::new();
    for (shape, problem) in problems(kernel, device) {
        shapes.push(shape);
        let t0 = Instant::now();
        let custom = problem(Impl::Custom);
        sync(device);
        let t1 = Instant::now();
        let twin = problem(Impl::Torch);
        sync(device);
        check.custom_ms += (t1 - t0).as_secs_f64() * 1e3;
        check.torch_ms += t1.elapsed().as_secs_f64() * 1e3;
        match (custom, twin) {
            (Err(e), _) => {
                check.error = Some(format!("{e:#}"));
                break;
            }
            (_, Err(e)) => {
                check.error = Some(format!("the torch twin failed: {e:#}"));
                break;
            }
            (Ok(c), Ok(t)) => {
                for (a, b) in c.iter().zip(&t) {
                    check.max_abs_diff = check.max_abs_diff.max(max_abs_diff(a, b));
                }
                if c.len() != t.len() {
                    check.max_abs_diff = f64::INFINITY;
                }
            }
        }
    }
    check.shape = shapes.join(" + ");
    check.check_ms = start.elapsed().as_secs_f64() * 1e3;
    check
}

fn nf4_weight(
    rows: i64,
    cols: i64,
    blocksize: i64,
    seed: u64,
    device: Device,
) -> Result<Nf4Tensor> {
    let w = randn(rows * cols, seed, 1.0, device).reshape([rows, cols]);
    let opts = Nf4Options {
        blocksize,
        double_quant: true,
    };
    // Built by the twins, which run everywhere: the problem is the same for both sides.
    nf4::quantize_with(&w, &opts, Impl::Torch)
}

fn problems(kernel: Kernel, device: Device) -> Vec<(String, Problem)> {
    let mut out: Vec<(String, Problem)> = Vec::new();
    match kernel {
        Kernel::Nf4Quantize => {
            // An odd element count with a partial last block; f32 and bf16 input.
            out.push((
                "[33, 70] f32+bf16 bs64".into(),
                Box::new(move |imp| {
                    let w = randn(33 * 70, 1, 1.0, device).reshape([33, 70]);
                    let opts = Nf4Options {
                        blocksize: 64,
                        double_quant: false,
                    };
                    let mut outs = Vec::new();
                    for w in [w.shallow_clone(), w.to_kind(Kind::BFloat16)] {
                        let q = nf4::quantize_with(&w, &opts, imp)?;
                        outs.push(q.packed.shallow_clone());
                        outs.push(q.absmax_f32()?);
                    }
                    Ok(outs)
                }),
            ));
        }
        Kernel::Nf4Dequantize => {
            let q = nf4_weight(33, 70, 64, 2, device);
            out.push((
                "[33, 70] bs64 dq -> f32+bf16".into(),
                Box::new(move |imp| {
                    let q = q.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
                    Ok(vec![
                        nf4::dequantize_with(q, Kind::Float, imp)?,
                        nf4::dequantize_with(q, Kind::BFloat16, imp)?,
                    ])
                }),
            ));
            if device.is_cuda() {
                let q = nf4_weight(14336, 4096, 64, 3, device);
                out.push((
                    "[14336, 4096] bs64 dq -> bf16".into(),
                    Box::new(move |imp| {
                        let q = q.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
                        Ok(vec![nf4::dequantize_with(q, Kind::BFloat16, imp)?])
                    }),
                ));
            }
        }
        Kernel::Nf4MatmulSmall => {
            let q = nf4_weight(37, 200, 64, 4, device);
            out.push((
                "x [3, 200] f32+bf16 . W [37, 200] bs64 dq".into(),
                Box::new(move |imp| {
                    let q = q.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
                    let x = randn(3 * 200, 5, 1.0, device).reshape([3, 200]);
                    Ok(vec![
                        nf4::matmul_small_with(&x, q, imp)?,
                        nf4::matmul_small_with(&x.to_kind(Kind::BFloat16), q, imp)?,
                    ])
                }),
            ));
        }
        Kernel::Q8Quantize => {
            out.push((
                "[1000] bs256 sub 0.1".into(),
                Box::new(move |imp| {
                    let x = randn(1000, 6, 1.0, device);
                    let code = Tensor::from_slice(&DYNAMIC_MAP).to_device(device);
                    let (q, absmax) = nf4::q8_quantize_with(&x, &code, 0.1, 256, imp)?;
                    Ok(vec![q, absmax])
                }),
            ));
        }
        Kernel::Q8Dequantize => {
            out.push((
                "[1000] bs256 add 0.3".into(),
                Box::new(move |imp| {
                    let q = rand_codes(1000, 7, device);
                    let absmax = randn(4, 8, 1.0, device).abs();
                    let code = Tensor::from_slice(&DYNAMIC_MAP).to_device(device);
                    Ok(vec![nf4::q8_dequantize_with(
                        &q, &absmax, &code, 256, 0.3, imp,
                    )?])
                }),
            ));
        }
        Kernel::AdamwStep => {
            out.push((
                "[4396] 8-bit + [777] bnb 32-bit + [777] torch, 2 steps".into(),
                Box::new(move |imp| crate::optim::adamw8bit::check_problem(device, imp)),
            ));
        }
        Kernel::Dropout => {
            out.push((
                "[5, 77] row keys past 2^32 + [1000] flat".into(),
                Box::new(move |imp| {
                    let x = randn(5 * 77, 9, 1.0, device).reshape([5, 77]);
                    let keys = Tensor::from_slice(&[0, 3, (1i64 << 33) + 5, row_key(7, 9), 1])
                        .to_device(device);
                    let d = Dropout {
                        p: 0.1,
                        seed: 0x1234_5678_9abc,
                    };
                    let flat = randn(1000, 10, 1.0, device);
                    let d2 = Dropout { p: 0.3, seed: 77 };
                    Ok(vec![
                        d.run_with(&x, 5, 77, Some(&keys), imp)?,
                        d2.run_with(&flat, 1, 1000, None, imp)?,
                    ])
                }),
            ));
        }
    }
    out
}

//! How a custom kernel is checked against its torch twin (`kernel_choice`, mode `auto`): both
//! run the same small random problems on one device, and every output is compared. Each
//! kernel's module states its own problems (`nf4::check_quantize`, `dropout::check`, ...);
//! this runner knows none of them. Inputs come from a fixed-seed generator of our own, so a
//! check never touches torch's random state (a run's LoRA initialisation must not depend on
//! the checks).
use crate::kernel_choice::{Check, Impl};
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
        state = crate::splitmix::mix(state, 0x1234_5678);
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
        .map(|i| (crate::splitmix::mix(seed, i) >> 56) as u8)
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

/// One check problem: its outputs by the given implementation.
pub type Problem = Box<dyn Fn(Impl) -> Result<Vec<Tensor>>>;

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Runs `problems` (shape label, problem) by both implementations on `device`.
pub fn run(device: Device, problems: Vec<(String, Problem)>) -> Check {
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
    for (shape, problem) in problems {
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

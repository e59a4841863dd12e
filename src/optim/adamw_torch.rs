//! The torch twins of the AdamW update kernels (`kernels/optim8bit_cpu.cpp`): the same f32
//! operations in the same order (`kernels/optim8bit.h` lists them) with libtorch tensor ops,
//! the kernels' `fma` and IEEE square root rebuilt exactly by [`crate::exact_f32`]. Updates
//! are written back in place, as the kernels do.
use super::ffi::{dynamic_map, Scalars, BLOCK};
use crate::exact_f32;
use crate::quant::nf4_torch;
use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

fn scalar(v: f32, device: Device) -> Tensor {
    Tensor::full([1], f64::from(v), (Kind::Float, device))
}

/// `a / b` for a scalar `b`, as a true division (CUDA would multiply by `1/b`).
fn div_scalar(a: &Tensor, b: f32) -> Tensor {
    a / a.full_like(f64::from(b))
}

fn decayed(p: &Tensor, s: &Scalars) -> Tensor {
    if s.apply_decay != 0 {
        p * f64::from(s.decay)
    } else {
        p.shallow_clone()
    }
}

/// `v = fma(omb2 · g, g, v · b2)`, the second moment of every flavour.
fn second_moment(g: &Tensor, v: &Tensor, s: &Scalars) -> Tensor {
    let gs = g * f64::from(s.omb2);
    exact_f32::fma(&gs, g, &(v * f64::from(s.beta2)))
}

fn write(dst: &Tensor, src: &Tensor, what: &str) -> Result<()> {
    let mut dst = dst.shallow_clone();
    dst.f_copy_(&src.view_as(&dst))
        .with_context(|| format!("AdamW twin: writing {what}"))
}

/// `p + (step_size · m) / (sqrt(v) / c2 + eps)` after the decay.
fn bnb8_or_torch_param(p: &Tensor, m: &Tensor, v: &Tensor, s: &Scalars) -> Tensor {
    let den = div_scalar(&exact_f32::sqrt(v), s.correction2) + f64::from(s.eps);
    let u = m * f64::from(s.step_size);
    decayed(p, s) + u / den
}

/// bitsandbytes' 8-bit blockwise step: states dequantized, updated, re-quantized with a
/// fresh absmax per block of 256.
pub(crate) fn bnb8(
    p: &Tensor,
    g: &Tensor,
    q1: &Tensor,
    q2: &Tensor,
    absmax1: &Tensor,
    absmax2: &Tensor,
    s: &Scalars,
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let device = p.device();
    let n = p.numel() as i64;
    let signed = Tensor::from_slice(&dynamic_map(true)).to_device(device);
    let unsigned = Tensor::from_slice(&dynamic_map(false)).to_device(device);
    let per_element = |a: &Tensor| {
        a.unsqueeze(1)
            .expand([a.size()[0], BLOCK], false)
            .reshape([-1])
            .narrow(0, 0, n)
    };
    let (pf, gf) = (p.reshape([-1]), g.reshape([-1]));
    let m = signed.index_select(0, &q1.reshape([-1]).to_kind(Kind::Int64)) * per_element(absmax1);
    let v = unsigned.index_select(0, &q2.reshape([-1]).to_kind(Kind::Int64)) * per_element(absmax2);
    let m = exact_f32::fma(&gf, &scalar(s.omb1, device), &(m * f64::from(s.beta1)));
    let v = second_moment(&gf, &v, s);
    let p_new = bnb8_or_torch_param(&pf, &m, &v, s);
    let (q1n, a1n) = nf4_torch::q8_quantize(&m, &signed, 0.0, BLOCK);
    let (q2n, a2n) = nf4_torch::q8_quantize(&v, &unsigned, 0.0, BLOCK);
    write(p, &p_new, "the parameter")?;
    write(q1, &q1n, "state1")?;
    write(q2, &q2n, "state2")?;
    write(absmax1, &a1n, "absmax1")?;
    write(absmax2, &a2n, "absmax2")
}

/// bitsandbytes' 32-bit step (tensors below `min_8bit_size`).
pub(crate) fn bnb32(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: &Scalars) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let device = p.device();
    let pf = p.reshape([-1]);
    let g = &g.reshape([-1]);
    let mn = exact_f32::fma(g, &scalar(s.omb1, device), &(m * f64::from(s.beta1)));
    let vn = second_moment(g, v, s);
    let den = exact_f32::sqrt(&vn) + f64::from(s.eps);
    let u = &mn / den;
    let p_new = exact_f32::fma(&u, &scalar(s.step_size, device), &decayed(&pf, s));
    write(p, &p_new, "the parameter")?;
    write(m, &mn, "m")?;
    write(v, &vn, "v")
}

/// torch.optim.AdamW's single-tensor step (m by torch's lerp).
pub(crate) fn torch32(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: &Scalars) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let device = p.device();
    let pf = p.reshape([-1]);
    let g = &g.reshape([-1]);
    let w = s.omb1;
    let d = g - m;
    // torch's lerp: weight < 0.5 ? fma(w, end - self, self) : fma(w - 1, end - self, end).
    let mn = if w.abs() < 0.5 {
        exact_f32::fma(&scalar(w, device), &d, m)
    } else {
        exact_f32::fma(&scalar(w - 1.0, device), &d, g)
    };
    let vn = second_moment(g, v, s);
    let p_new = bnb8_or_torch_param(&pf, &mn, &vn, s);
    write(p, &p_new, "the parameter")?;
    write(m, &mn, "m")?;
    write(v, &vn, "v")
}

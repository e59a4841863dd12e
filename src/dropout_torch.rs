//! The torch twin of the LoRA dropout kernel (`kernels/dropout.h`, `dropout_cpu.cpp`): the
//! same 32-bit hash of (seed, element index) in int64 tensor ops. Every product is split so
//! it stays below 2⁶³ (libtorch's int64 has no unsigned wrap-around to lean on) and masked
//! back to 32 bits.
use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

const MASK32: i64 = 0xffff_ffff;

/// `(a · c) mod 2³²` for `a` in [0, 2³²) and a 32-bit constant `c`, in 16-bit halves of `c`.
fn mul32(a: &Tensor, c: u32) -> Tensor {
    let lo = i64::from(c & 0xffff);
    let hi = i64::from(c >> 16);
    let high_part = (a * hi)
        .bitwise_and(0xffff)
        .bitwise_left_shift_tensor_scalar(16);
    (a * lo + high_part).bitwise_and(MASK32)
}

fn fmix32(k: &Tensor) -> Tensor {
    let k = k.bitwise_xor_tensor(&k.bitwise_right_shift_tensor_scalar(16));
    let k = mul32(&k, 0x85eb_ca6b);
    let k = k.bitwise_xor_tensor(&k.bitwise_right_shift_tensor_scalar(13));
    let k = mul32(&k, 0xc2b2_ae35);
    k.bitwise_xor_tensor(&k.bitwise_right_shift_tensor_scalar(16))
}

/// `y = x · (kept ? scale : 0)` for `x` as `rows` × `width` (contiguous f32), element j of
/// row r keyed by `keys[r] · width + j` (keys: int64 `[rows]`, or `r` itself when absent).
pub fn apply(
    x: &Tensor,
    rows: i64,
    width: i64,
    keys: Option<&Tensor>,
    seed: u64,
    threshold: u32,
    scale: f32,
) -> Result<Tensor> {
    ensure!(
        width < 1 << 31,
        "dropout twin: rows of {width} elements are longer than it handles (2^31)"
    );
    let _guard = tch::no_grad_guard();
    let device = x.device();
    let keys = match keys {
        Some(k) => k.shallow_clone(),
        None => Tensor::arange(rows, (Kind::Int64, device)),
    }
    .reshape([rows, 1]);
    // index = key · width + j as a u64, in 32-bit halves: key = kh · 2³² + kl, and
    // kl · width + j < 2³² · width ≤ 2⁶³.
    let kl = keys.bitwise_and(MASK32);
    let kh = keys
        .bitwise_right_shift_tensor_scalar(32)
        .bitwise_and(MASK32);
    let j = Tensor::arange(width, (Kind::Int64, device)).reshape([1, width]);
    let low_sum = &kl * width + &j;
    let i_lo = low_sum.bitwise_and(MASK32);
    let carry = low_sum.bitwise_right_shift_tensor_scalar(32);
    let i_hi = (mul32(&kh, width as u32) + carry).bitwise_and(MASK32);
    let seed_lo = (seed & 0xffff_ffff) as i64;
    let seed_hi = (seed >> 32) as i64;
    let k = (mul32(&i_lo, 0x9e37_79b9) + seed_lo).bitwise_and(MASK32);
    let hi = mul32(&i_hi, 0x7feb_352d).bitwise_xor(seed_hi);
    let bits = fmix32(&fmix32(&k).bitwise_xor_tensor(&hi));
    let factor = bits.ge(i64::from(threshold)).to_kind(Kind::Float) * f64::from(scale);
    Ok(x.reshape([rows, width]) * factor)
}

//! The torch twins of the NF4 and blockwise 8-bit kernels (`kernels/nf4_cpu.cpp`): the same
//! f32 operations in the same order, written with libtorch tensor ops only (nibble shifts,
//! code-table lookups, multiplies), so they run on any device libtorch supports and equal
//! the kernels bit for bit. `kernel_choice` decides which of the two runs.
use super::format::{Absmax, Nf4Options, Nf4Tensor, NF4_CODE};
use crate::exact_f32;
use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

fn div_ceil(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

fn nf4_code(device: Device) -> Tensor {
    Tensor::from_slice(&NF4_CODE).to_device(device)
}

/// `t` (1-D, `n` elements) padded with `fill` to `blocks · blocksize` and viewed as blocks.
fn as_blocks(t: &Tensor, blocksize: i64, fill: f64) -> Tensor {
    let n = t.size()[0];
    let padded = div_ceil(n, blocksize) * blocksize;
    let t = if padded > n {
        let tail = Tensor::full([padded - n], fill, (t.kind(), t.device()));
        Tensor::cat(&[t.shallow_clone(), tail], 0)
    } else {
        t.shallow_clone()
    };
    t.reshape([-1, blocksize])
}

/// One value per block repeated over its elements, for `n` elements.
fn per_element(per_block: &Tensor, blocksize: i64, n: i64) -> Tensor {
    per_block
        .unsqueeze(1)
        .expand([per_block.size()[0], blocksize], false)
        .reshape([-1])
        .narrow(0, 0, n)
}

/// bitsandbytes' NF4 quantization (the torch code bitsandbytes itself runs on the CPU).
pub fn quantize(w: &Tensor, opts: &Nf4Options) -> Result<(Tensor, Tensor)> {
    let _guard = tch::no_grad_guard();
    let device = w.device();
    let x = w.detach().to_kind(Kind::Float).reshape([-1]);
    let n = x.size()[0];
    let bs = opts.blocksize;
    let n_blocks = div_ceil(n, bs);
    let blocks = as_blocks(&x, bs, 0.0);
    let am = blocks.abs().amax([1], false);
    let amc = am.clamp_min(f64::from(1e-38f32));
    let full_blocks = n / bs;
    let absmax = if full_blocks < n_blocks {
        Tensor::cat(
            &[am.narrow(0, 0, full_blocks), amc.narrow(0, full_blocks, 1)],
            0,
        )
    } else {
        am.shallow_clone()
    };
    // Full blocks multiply by the reciprocal, the partial one divides (as bitsandbytes).
    let recip = (amc.ones_like() / &amc).unsqueeze(1);
    let scaled_full = &blocks * &recip;
    let scaled_part = &blocks / amc.unsqueeze(1);
    let is_full = Tensor::arange(n_blocks, (Kind::Int64, device))
        .lt(full_blocks)
        .unsqueeze(1);
    let s = scaled_full
        .where_self(&is_full, &scaled_part)
        .reshape([-1])
        .narrow(0, 0, n)
        .clamp(-1.0, 1.0);
    let code = nf4_code(device);
    let bounds = (code.narrow(0, 0, 15) + code.narrow(0, 1, 15)) / 2.0;
    let idx = s
        .searchsorted(&bounds, false, false, "left", None::<Tensor>)
        .masked_fill(&s.isnan(), 15);
    let zero = Tensor::zeros([1], (Kind::Float, device)).searchsorted(
        &bounds,
        false,
        false,
        "left",
        None::<Tensor>,
    );
    let idx = if n % 2 == 1 {
        Tensor::cat(&[idx, zero], 0)
    } else {
        idx
    }
    .reshape([-1, 2]);
    let packed = (idx.select(1, 0).bitwise_left_shift_tensor_scalar(4) + idx.select(1, 1))
        .to_kind(Kind::Uint8)
        .reshape([-1, 1]);
    Ok((packed, absmax))
}

/// The per-block scales as f32 `[n_blocks]`: `fl(fl(code2[q] · absmax2[b / bs2]) + offset)`
/// for a nested absmax, exactly as the kernels read them.
pub fn scales(q: &Nf4Tensor) -> Tensor {
    match &q.absmax {
        Absmax::Plain(a) => a.to_kind(Kind::Float),
        Absmax::Nested {
            quant,
            offset,
            nested_absmax,
            nested_code,
            nested_blocksize,
        } => q8_dequantize(
            quant,
            nested_absmax,
            nested_code,
            *nested_blocksize,
            *offset,
        ),
    }
}

/// The dequantized weight as f32 values, flat `[n]` (before rounding to an output type).
fn dequantize_f32(q: &Nf4Tensor) -> Tensor {
    let n = q.numel();
    let bytes = q.packed.reshape([-1]).to_kind(Kind::Int64);
    let hi = bytes.bitwise_right_shift_tensor_scalar(4);
    let lo = bytes.bitwise_and(15);
    let nibbles = Tensor::stack(&[hi, lo], 1).reshape([-1]).narrow(0, 0, n);
    let values = nf4_code(q.device()).index_select(0, &nibbles);
    values * per_element(&scales(q), q.blocksize, n)
}

/// `code · absmax` in f32, rounded once to `kind`, shaped like the weight.
pub fn dequantize(q: &Nf4Tensor, kind: Kind) -> Tensor {
    let _guard = tch::no_grad_guard();
    let direct = if kind == Kind::Double {
        Kind::Float
    } else {
        kind
    };
    dequantize_f32(q)
        .to_kind(direct)
        .to_kind(kind)
        .reshape(q.shape.as_slice())
}

/// Lanes of the kernels' reduction (one warp on CUDA).
const LANES: i64 = 32;
/// Consecutive elements of a row one lane sums before the next lane's.
const RUN: i64 = 8;
/// Elements of the product tensor a pass holds at once.
const PASS_ELEMENTS: i64 = 1 << 24;

/// `x · Wᵀ` in the kernels' reduction order (see `qlora_nf4_matmul_small_cpu`): each weight
/// rounded to x's dtype, products in f32, lane `(c / 8) % 32` sums its products in
/// increasing `c`, the 32 lane sums fold by the butterfly 16, 8, 4, 2, 1, one rounding.
/// `x` is `[m, k]`; returns `[m, n_out]` of x's kind.
pub fn matmul_small(x: &Tensor, q: &Nf4Tensor) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let (n_out, k) = (q.shape[0], q.shape[1]);
    let kind = x.kind();
    let xs = x.size();
    ensure!(
        xs.len() == 2 && xs[1] == k,
        "matmul_small twin: x {xs:?} is not [m, {k}]"
    );
    let m = xs[0];
    let device = q.device();
    let width = div_ceil(k, LANES * RUN) * LANES * RUN;
    let pad = |t: Tensor| {
        if width > k {
            t.constant_pad_nd([0, width - k])
        } else {
            t
        }
    };
    let w = pad(dequantize_f32(q)
        .to_kind(kind)
        .to_kind(Kind::Float)
        .reshape([n_out, k]));
    let xf = pad(x.to_kind(Kind::Float));
    let rounds = width / (LANES * RUN);
    let chunk = (PASS_ELEMENTS / (m.max(1) * width)).clamp(1, n_out.max(1));
    let mut parts = Vec::new();
    let mut j0 = 0;
    while j0 < n_out {
        let cols = chunk.min(n_out - j0);
        let prod = (xf.unsqueeze(1) * w.narrow(0, j0, cols).unsqueeze(0))
            .reshape([m, cols, rounds, LANES, RUN]);
        let mut acc = Tensor::zeros([m, cols, LANES], (Kind::Float, device));
        for r in 0..rounds {
            let round = prod.select(2, r);
            for t in 0..RUN {
                acc += round.select(3, t);
            }
        }
        let mut off = LANES / 2;
        while off > 0 {
            acc = acc.narrow(2, 0, off) + acc.narrow(2, off, off);
            off /= 2;
        }
        parts.push(acc.select(2, 0));
        j0 += cols;
    }
    Ok(Tensor::cat(&parts, 1).to_kind(kind))
}

/// bitsandbytes' CPU blockwise 8-bit quantization of `x - sub` (f32, flattened) with a
/// sorted 256-entry `code`: absmax ignores NaN, a zero block is all code 0, other values go
/// through the 65536-bin lookup (`qlora_q8_lut_index`, `qlora_q8_lut_value`, then the first
/// code midpoint not below the bin's value). Returns (u8 `[n]`, f32 absmax `[blocks]`).
pub fn q8_quantize(x: &Tensor, code: &Tensor, sub: f32, blocksize: i64) -> (Tensor, Tensor) {
    let _guard = tch::no_grad_guard();
    let device = x.device();
    let code = code.to_device(device).to_kind(Kind::Float);
    let d = x.reshape([-1]).to_kind(Kind::Float) - f64::from(sub);
    let n = d.size()[0];
    let a = d.abs();
    let a = a.masked_fill(&a.isnan(), f64::NEG_INFINITY);
    let am = as_blocks(&a, blocksize, f64::NEG_INFINITY)
        .amax([1], false)
        .clamp_min(0.0);
    // Tensor / tensor: CUDA turns a division by a scalar into a product with its reciprocal.
    let inv = am.ones_like() / &am;
    let v = &d * per_element(&inv, blocksize, n);
    let v_nan = v.isnan();
    let h = (v.clamp(-1.0, 1.0) + 1.0) * 0.5;
    let t = exact_f32::fma_scalars(&h, 65535.0, 0.5);
    let bin = t
        .masked_fill(&v_nan, 0.0)
        .to_kind(Kind::Int64)
        .bitwise_and(0xffff);
    let fi = bin.to_kind(Kind::Float);
    let val = (&fi + &fi) / fi.full_like(65535.0) - 1.0;
    let mid = (code.narrow(0, 0, 255) + code.narrow(0, 1, 255)) * 0.5;
    let idx = val.searchsorted(&mid, false, false, "left", None::<Tensor>);
    let zero_block = per_element(&am.eq(0.0), blocksize, n);
    let q = idx.masked_fill(&zero_block, 0).to_kind(Kind::Uint8);
    (q, am)
}

/// `fl(fl(code[q] · absmax[i / blocksize]) + add)` in f32, shaped like `q`; `add = -0.0` is
/// the exact identity.
pub fn q8_dequantize(
    q: &Tensor,
    absmax: &Tensor,
    code: &Tensor,
    blocksize: i64,
    add: f32,
) -> Tensor {
    let _guard = tch::no_grad_guard();
    let device = q.device();
    let n = q.numel() as i64;
    let code = code.to_device(device).to_kind(Kind::Float);
    let absmax = absmax.to_device(device).to_kind(Kind::Float);
    let idx = q.reshape([-1]).to_kind(Kind::Int64);
    let v = code.index_select(0, &idx) * per_element(&absmax, blocksize, n);
    let v = if add.to_bits() == (-0.0f32).to_bits() {
        v
    } else {
        v + f64::from(add)
    };
    v.reshape(q.size().as_slice())
}

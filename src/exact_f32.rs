//! Correctly rounded f32 `fma` and `sqrt` built from libtorch tensor ops, for the torch twins
//! of the custom kernels (`kernel_choice`). The kernels call `fmaf` and the IEEE square
//! root; torch has no fused multiply-add op and its CPU `sqrt` goes through a vector math
//! library that is not correctly rounded, so the twins rebuild both from f64 arithmetic,
//! which every libtorch device evaluates exactly as IEEE prescribes.
use tch::{Kind, Tensor};

/// `fma(a, b, c)` in f32, rounded once, elementwise with broadcasting (f32 inputs).
///
/// `a·b` of two f32 values is exact in f64; the f64 sum is rounded, so its error is
/// recovered by TwoSum and folded in by rounding to odd (an inexact result gets its last
/// bit forced to 1), which makes the final f64 → f32 rounding equal the single rounding
/// of the exact value (53 ≥ 24 + 2).
pub fn fma(a: &Tensor, b: &Tensor, c: &Tensor) -> Tensor {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let c = c.to_kind(Kind::Double);
    let p = &a * &b;
    let s = &p + &c;
    let bb = &s - &p;
    let err = (&p - (&s - &bb)) + (&c - &bb);
    let even = s.contiguous().view_dtype(Kind::Int64).bitwise_and(1).eq(0);
    let inexact = err.ne(0.0).logical_and(&s.isfinite());
    let toward = Tensor::full_like(&s, f64::INFINITY)
        .where_self(&err.gt(0.0), &Tensor::full_like(&s, f64::NEG_INFINITY));
    let odd = s.nextafter(&toward);
    odd.where_self(&inexact.logical_and(&even), &s)
        .to_kind(Kind::Float)
}

/// `fma(a, b, c)` with scalar `b` and `c` (f32 values).
pub fn fma_scalars(a: &Tensor, b: f32, c: f32) -> Tensor {
    let like = |v: f32| Tensor::full([1], f64::from(v), (Kind::Float, a.device()));
    fma(a, &like(b), &like(c))
}

/// The correctly rounded f32 square root of an f32 tensor.
///
/// The f64 root rounded to f32 is at most one f32 ulp off; the midpoints to both neighbours
/// squared are exact in f64 (≤ 50 significant bits) and decide which of the three values is
/// the nearest. A root never lies exactly on a midpoint, so there are no ties.
pub fn sqrt(v: &Tensor) -> Tensor {
    let vd = v.to_kind(Kind::Double);
    let r = vd.sqrt().to_kind(Kind::Float);
    let inf = Tensor::full_like(&r, f64::INFINITY);
    let up = r.nextafter(&inf);
    let down = r.nextafter(&(-&inf));
    let rd = r.to_kind(Kind::Double);
    let mid_up = (&rd + up.to_kind(Kind::Double)) * 0.5;
    let mid_down = (&rd + down.to_kind(Kind::Double)) * 0.5;
    let go_up = (&mid_up * &mid_up).lt_tensor(&vd);
    let go_down = (&mid_down * &mid_down)
        .gt_tensor(&vd)
        .logical_and(&r.gt(0.0));
    let r = down.where_self(&go_down, &r);
    up.where_self(&go_up, &r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn bits(t: &Tensor) -> Vec<u32> {
        Vec::<f32>::try_from(t.to_device(Device::Cpu).contiguous().view([-1]))
            .expect("f32 tensor")
            .into_iter()
            .map(f32::to_bits)
            .collect()
    }

    /// A spread of f32 values: random mantissas over many binades, signs, zeros, specials.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        let mut out = Vec::with_capacity(n + 8);
        for _ in 0..n {
            s = crate::splitmix::mix(s, 1);
            let exp = ((s >> 40) % 60) as i32 - 30;
            let mant = 1.0 + (s & 0xff_ffff) as f32 / 16_777_216.0;
            let sign = if s >> 63 == 1 { -1.0 } else { 1.0 };
            out.push(sign * mant * 2f32.powi(exp));
        }
        out.extend([
            0.0,
            -0.0,
            1.0,
            f32::MIN_POSITIVE,
            1e-45,
            f32::INFINITY,
            f32::NAN,
            4.0,
        ]);
        out
    }

    #[test]
    fn fma_equals_fmaf_bit_for_bit() {
        let (a, b, c) = (values(20_000, 1), values(20_000, 2), values(20_000, 3));
        let want: Vec<u32> = a
            .iter()
            .zip(&b)
            .zip(&c)
            .map(|((x, y), z)| x.mul_add(*y, *z).to_bits())
            .collect();
        let got = bits(&fma(
            &Tensor::from_slice(&a),
            &Tensor::from_slice(&b),
            &Tensor::from_slice(&c),
        ));
        let nan = |u: u32| f32::from_bits(u).is_nan();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g == w || (nan(*g) && nan(*w)),
                "{i}: {a:?} {b:?} {c:?}",
                a = a[i],
                b = b[i],
                c = c[i]
            );
        }
        // Cancellation hard cases: a·b + c with c = -fl(a·b) leaves the exact product error.
        let c2: Vec<f32> = a.iter().zip(&b).map(|(x, y)| -(x * y)).collect();
        let got = bits(&fma(
            &Tensor::from_slice(&a),
            &Tensor::from_slice(&b),
            &Tensor::from_slice(&c2),
        ));
        for (i, g) in got.iter().enumerate() {
            let w = a[i].mul_add(b[i], c2[i]).to_bits();
            assert!(*g == w || (nan(*g) && nan(w)), "{i}");
        }
    }

    #[test]
    fn sqrt_is_correctly_rounded() {
        let v: Vec<f32> = values(50_000, 4).into_iter().map(f32::abs).collect();
        let got = bits(&sqrt(&Tensor::from_slice(&v)));
        for (i, g) in got.iter().enumerate() {
            let w = v[i].sqrt();
            assert!(
                *g == w.to_bits() || (w.is_nan() && f32::from_bits(*g).is_nan()),
                "sqrt({}) = {} want {w}",
                v[i],
                f32::from_bits(*g)
            );
        }
    }
}

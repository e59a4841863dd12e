//! LoRA's starting values, PEFT's `init_lora_weights`: `true` (A Kaiming-uniform, B zero),
//! `false` (both Kaiming-uniform, as `nn.Linear` leaves them), `gaussian` (A ~ N(0, 1/r)),
//! and the two that move part of the frozen weight into the adapter: PiSSA (`pissa`,
//! `pissa_niter_N`: A and B from the top singular triplets of W, the residual is the new
//! base, quantised to NF4 for QPiSSA) and LoftQ (`loftq`: the NF4 base and a rank-r
//! correction of its error, alternated `loftq_iter` times).
//!
//! The decompositions are PEFT 0.21's `pissa_init` and `loftq_init` operation for operation,
//! on the same libtorch, so on the same machine they give PEFT's tensors bit for bit; the
//! randomized SVD of `pissa_niter_N` is torch's `svd_lowrank`, drawing its test matrix from
//! the seeded global generator on the CPU (as our LoRA A is drawn), so PEFT under the same
//! seed draws the same matrix.
use crate::quant::nf4::{self, Nf4Options};
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// PEFT's `init_lora_weights` (and, for LoftQ, `loftq_config.loftq_iter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// `true`: A Kaiming-uniform (a = √5), B zero.
    #[default]
    Kaiming,
    /// `false`: A and B both Kaiming-uniform (the adapter is not a no-op at the start).
    Random,
    /// `"gaussian"`: A ~ N(0, 1/r), B zero.
    Gaussian,
    /// `"pissa"` (full SVD) or `"pissa_niter_N"` (torch's `svd_lowrank` with N iterations).
    Pissa { niter: Option<u32> },
    /// `"loftq"` with `loftq_config = {loftq_bits: 4, loftq_iter}`.
    Loftq { iter: u32 },
}

/// The bitsandbytes block size PEFT's `loftq_init` quantises with (`Params4bit`'s default,
/// without double quantisation), whatever the model's own quantisation config says.
pub const LOFTQ_BLOCKSIZE: i64 = 64;

impl LoraInit {
    /// Reads PEFT's value: `true`, `false`, or one of the strings; `loftq_iter` is used by
    /// `"loftq"` only.
    pub fn parse(value: &str, loftq_iter: i64) -> Result<Self> {
        Ok(match value {
            "true" | "True" => LoraInit::Kaiming,
            "false" | "False" => LoraInit::Random,
            "gaussian" => LoraInit::Gaussian,
            "pissa" => LoraInit::Pissa { niter: None },
            "loftq" => {
                if loftq_iter < 1 {
                    bail!("loftq_iter must be at least 1, got {loftq_iter}");
                }
                LoraInit::Loftq {
                    iter: loftq_iter as u32,
                }
            }
            s => match s.strip_prefix("pissa_niter_").map(str::parse::<u32>) {
                Some(Ok(n)) => LoraInit::Pissa { niter: Some(n) },
                _ => bail!(
                    "init_lora_weights {s:?} is not supported (true, false, gaussian, pissa, \
                     pissa_niter_N, loftq)"
                ),
            },
        })
    }

    /// The value as the `init_lora_weights` key takes it ([`Self::parse`] reads it back).
    pub fn name(&self) -> String {
        match self {
            LoraInit::Kaiming => "true".into(),
            LoraInit::Random => "false".into(),
            LoraInit::Gaussian => "gaussian".into(),
            LoraInit::Pissa { niter: None } => "pissa".into(),
            LoraInit::Pissa { niter: Some(n) } => format!("pissa_niter_{n}"),
            LoraInit::Loftq { .. } => "loftq".into(),
        }
    }

    /// PEFT's `init_lora_weights` value as `adapter_config.json` holds it (a boolean for
    /// `true` / `false`).
    pub fn peft_value(&self) -> serde_json::Value {
        match self {
            LoraInit::Kaiming => serde_json::json!(true),
            LoraInit::Random => serde_json::json!(false),
            _ => serde_json::json!(self.name()),
        }
    }

    /// PEFT's `loftq_config` (`{}` unless LoftQ).
    pub fn loftq_config(&self) -> serde_json::Value {
        match self {
            LoraInit::Loftq { iter } => serde_json::json!({"loftq_bits": 4, "loftq_iter": iter}),
            _ => serde_json::json!({}),
        }
    }

    /// Whether the frozen weight an adapter trains against is not the checkpoint's own.
    pub fn changes_base(&self) -> bool {
        matches!(self, LoraInit::Pissa { .. } | LoraInit::Loftq { .. })
    }

    /// Whether running the init again on the same weights gives the same base (no random
    /// draw): what loading an adapter without its saved residual base relies on.
    pub fn deterministic(&self) -> bool {
        !matches!(self, LoraInit::Pissa { niter: Some(_) })
    }
}

/// A base-changing init applied to one frozen weight: the new base (in the weight's dtype)
/// and the adapter's starting A `[r, in]`, B `[out, r]` in fp32.
pub struct Decomposed {
    pub base: Tensor,
    pub a: Tensor,
    pub b: Tensor,
}

/// PEFT's `pissa_init` / `loftq_init` for the weight `w` `[out, in]` (any float dtype, any
/// device) of a module with rank `r` and scaling `scale`.
pub fn decompose(init: LoraInit, w: &Tensor, r: i64, scale: f64) -> Result<Decomposed> {
    let _g = tch::no_grad_guard();
    let kind = w.kind();
    let (a, b, base) = match init {
        LoraInit::Pissa { niter } => pissa(&w.to_kind(Kind::Float), r, scale, niter)?,
        LoraInit::Loftq { iter } => loftq(&w.to_kind(Kind::Float), r, iter)?,
        _ => bail!("init_lora_weights {:?} leaves the base as it is", init),
    };
    Ok(Decomposed {
        base: base.to_kind(kind),
        a,
        b,
    })
}

/// `pissa_init`: `W = V·S·Uᴴ`; `A = √(S_r/s)·Uᴴ_r`, `B = V_r·√(S_r/s)`, base `W − s·B·A`.
fn pissa(w: &Tensor, r: i64, scale: f64, niter: Option<u32>) -> Result<(Tensor, Tensor, Tensor)> {
    let (out, inp) = (w.size()[0], w.size()[1]);
    if r > out.min(inp) {
        bail!(
            "PiSSA needs r ≤ min(out, in) = {}, got r = {r}",
            out.min(inp)
        );
    }
    let (vr, sr, uhr) = match niter {
        None => {
            let (v, s, uh) = svd(w);
            (
                v.narrow(1, 0, r),
                s.narrow(0, 0, r) / scale,
                uh.narrow(0, 0, r),
            )
        }
        Some(n) => {
            let (v, s, u) = svd_lowrank(w, r, n);
            (v, s / scale, u.tr())
        }
    };
    let root = sr.sqrt().diag(0);
    let a = root.matmul(&uhr);
    let b = vr.matmul(&root);
    let base = w - (&b * scale).matmul(&a);
    Ok((a, b, base))
}

/// `loftq_init` with 4 bits: quantise the residual, take the rank-r SVD of the error,
/// repeat; returns (A = R, B = L, the dequantised NF4 base). PEFT applies no scaling: the
/// adapter starts at `s·L·R`, not `L·R`, when `lora_alpha ≠ r`.
fn loftq(w: &Tensor, r: i64, iter: u32) -> Result<(Tensor, Tensor, Tensor)> {
    let opts = Nf4Options {
        blocksize: LOFTQ_BLOCKSIZE,
        double_quant: false,
    };
    let mut res = w.copy();
    let mut out = None;
    for i in 0..iter {
        let q = nf4::quantize(&res, &opts)?;
        let deq = nf4::dequantize(&q, Kind::Float)?;
        let err = w - &deq;
        let (u, s, vh) = svd(&err);
        let root = s.diag(0);
        let l = u.matmul(&root.narrow(1, 0, r).sqrt());
        let rr = root.narrow(0, 0, r).sqrt().matmul(&vh);
        if i + 1 < iter {
            res = w - l.mm(&rr);
        }
        out = Some((rr, l, deq));
    }
    out.ok_or_else(|| anyhow::anyhow!("loftq_iter must be at least 1"))
}

/// `torch.linalg.svd(w, full_matrices=False)` as (U, S, Vh). tch passes the (CUDA-only)
/// `driver` argument even when empty, which the CPU refuses, so this goes through
/// `torch.svd`, the same LAPACK call, and takes Vh back from its V.
fn svd(w: &Tensor) -> (Tensor, Tensor, Tensor) {
    let (u, s, v) = w.svd(true, true);
    (u, s, v.mh())
}

/// torch's `svd_lowrank(A, q, niter)` (Halko et al. 2009, algorithm 5.1) as (U, S, V), its
/// random test matrix drawn on the CPU from the global generator.
pub fn svd_lowrank(a: &Tensor, q: i64, niter: u32) -> (Tensor, Tensor, Tensor) {
    let (m, n) = (a.size()[0], a.size()[1]);
    let a = if m < n { a.mh() } else { a.shallow_clone() };
    let basis = approximate_basis(&a, q, niter);
    let b = basis.mh().matmul(&a);
    let (u, s, vh) = svd(&b);
    let v = vh.mh();
    let u = basis.matmul(&u);
    if m < n {
        (v, s, u)
    } else {
        (u, s, v)
    }
}

/// torch's `get_approximate_basis`: q orthonormal columns spanning most of A's range.
fn approximate_basis(a: &Tensor, q: i64, niter: u32) -> Tensor {
    let r = Tensor::randn([a.size()[1], q], (Kind::Float, Device::Cpu)).to_device(a.device());
    let qr = |x: &Tensor| Tensor::linalg_qr(x, "reduced").0;
    let mut basis = qr(&a.matmul(&r));
    for _ in 0..niter {
        basis = qr(&a.mh().matmul(&basis));
        basis = qr(&a.matmul(&basis));
    }
    basis
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_as_peft_writes_them() {
        for (s, v) in [
            ("true", serde_json::json!(true)),
            ("false", serde_json::json!(false)),
            ("gaussian", serde_json::json!("gaussian")),
            ("pissa", serde_json::json!("pissa")),
            ("pissa_niter_4", serde_json::json!("pissa_niter_4")),
            ("loftq", serde_json::json!("loftq")),
        ] {
            assert_eq!(LoraInit::parse(s, 2).unwrap().peft_value(), v);
        }
        assert!(LoraInit::parse("olora", 1).is_err());
        assert!(LoraInit::parse("pissa_niter_x", 1).is_err());
        assert!(LoraInit::parse("loftq", 0).is_err());
    }

    #[test]
    fn pissa_keeps_the_weight_and_takes_its_top_directions() {
        tch::manual_seed(3);
        let w = Tensor::randn([48, 32], (Kind::Float, Device::Cpu));
        let d = decompose(LoraInit::Pissa { niter: None }, &w, 4, 2.0).unwrap();
        let back = &d.base + d.b.matmul(&d.a) * 2.0;
        assert!(f64::try_from((back - &w).abs().max()).unwrap() < 1e-5);
        // The residual holds the other singular values only.
        let (_, s, _) = svd(&w);
        let (_, sr, _) = svd(&d.base);
        let top = s.narrow(0, 4, 28) - sr.narrow(0, 0, 28);
        assert!(f64::try_from(top.abs().max()).unwrap() < 1e-4);
    }

    #[test]
    fn loftq_lowers_the_quantisation_error() {
        tch::manual_seed(5);
        let w = Tensor::randn([64, 128], (Kind::Float, Device::Cpu));
        let plain = nf4::dequantize(
            &nf4::quantize(
                &w,
                &Nf4Options {
                    blocksize: LOFTQ_BLOCKSIZE,
                    double_quant: false,
                },
            )
            .unwrap(),
            Kind::Float,
        )
        .unwrap();
        let err = |t: &Tensor| f64::try_from((&w - t).norm()).unwrap();
        let d1 = decompose(LoraInit::Loftq { iter: 1 }, &w, 8, 1.0).unwrap();
        // One iteration keeps the plain NF4 base and corrects part of its error.
        assert!(f64::try_from((&d1.base - &plain).abs().max()).unwrap() == 0.0);
        assert!(err(&(&d1.base + d1.b.matmul(&d1.a))) < 0.95 * err(&plain));
    }
}

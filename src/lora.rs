//! LoRA adapters as PEFT applies them to bitsandbytes `Linear4bit`: the input is cast to the
//! adapter's fp32, passed through dropout, A then B, scaled by alpha/r (rsLoRA: alpha/√r),
//! and cast back to the
//! dtype of the frozen layer's output before being added to it.
use crate::dropout::MaskKey;
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// The projections LoRA may target.
pub const LORA_TARGETS: [&str; 9] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
];

/// PEFT's `LoraLayer.update_layer` scaling: `alpha / r`, or `alpha / √r` with rsLoRA.
pub fn scale(alpha: f64, r: i64, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
    /// PEFT's `use_rslora`: scale by `alpha / √r` (Kalajdzievski 2023) instead of `alpha / r`.
    pub use_rslora: bool,
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.r <= 0 {
            bail!("LoRA rank r must be positive, got {}", self.r);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("LoRA dropout must be in [0, 1), got {}", self.dropout);
        }
        if self.target_modules.is_empty() {
            bail!("LoRA target_modules is empty");
        }
        for m in &self.target_modules {
            if !LORA_TARGETS.contains(&m.as_str()) {
                bail!(
                    "unknown LoRA target module {m:?} (expected some of {})",
                    LORA_TARGETS.join(", ")
                );
            }
        }
        Ok(())
    }

    /// PEFT's scaling: `lora_alpha / r`, or `lora_alpha / √r` with `use_rslora`.
    pub fn scale(&self) -> f64 {
        scale(self.alpha, self.r, self.use_rslora)
    }

    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|m| m == module)
    }
}

#[derive(Debug)]
pub struct LoraAdapter {
    /// `[r, in]`, fp32 leaf with requires_grad.
    pub a: Tensor,
    /// `[out, r]`, fp32 leaf with requires_grad.
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
}

impl LoraAdapter {
    /// PEFT's default init: A Kaiming-uniform with a=√5 (i.e. U(-1/√in, 1/√in)), B zeros.
    /// Draws from the global torch generator on the CPU so the result does not depend on
    /// the device; the caller seeds it.
    pub fn new(in_features: i64, out_features: i64, cfg: &LoraConfig, device: Device) -> Self {
        let bound = 1.0 / (in_features as f64).sqrt();
        let a = Tensor::empty([cfg.r, in_features], (Kind::Float, Device::Cpu))
            .uniform_(-bound, bound)
            .to_device(device)
            .set_requires_grad(true);
        let b = Tensor::zeros([out_features, cfg.r], (Kind::Float, device)).set_requires_grad(true);
        LoraAdapter {
            a,
            b,
            scale: cfg.scale(),
            dropout: cfg.dropout,
        }
    }

    /// The LoRA bypass for `x` under autograd, without dropout (evaluation mode), in
    /// `out_kind` (the frozen layer's output dtype).
    pub fn forward(&self, x: &Tensor, out_kind: Kind) -> Tensor {
        let y = x
            .to_kind(Kind::Float)
            .linear::<Tensor>(&self.a, None)
            .linear::<Tensor>(&self.b, None)
            * self.scale;
        y.to_kind(out_kind)
    }
}

/// `W + scale·B·A` in fp32: a LoRA pair folded into its frozen weight (`merge`, and
/// inference with dense weights). `w` must already be fp32.
pub fn fold(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Tensor {
    tch::no_grad(|| {
        w + b
            .to_kind(Kind::Float)
            .matmul(&a.to_kind(Kind::Float))
            .g_mul_scalar(scale)
    })
}

/// What [`LoraAdapter::backward`] needs from one [`LoraAdapter::forward_saved`].
#[derive(Debug)]
pub struct LoraSaved {
    /// The dropout mask's key, when dropout was applied; the mask is regenerated from it.
    dropout: Option<MaskKey>,
    /// `dropout(x) · Aᵀ`, `[N, r]`.
    u: Tensor,
}

impl LoraAdapter {
    /// The dropout of a training forward whose masks `key` names; `None` when off.
    fn dropout_for(&self, key: Option<MaskKey>) -> Option<MaskKey> {
        key.filter(|_| self.dropout > 0.0)
    }

    /// As [`Self::forward`] for rows `x` `[N, in]` outside autograd, with dropout when
    /// `dropout` is given (training), keeping what the hand-written backward needs.
    pub fn forward_saved(
        &self,
        x: &Tensor,
        dropout: Option<MaskKey>,
        out_kind: Kind,
    ) -> Result<(Tensor, LoraSaved)> {
        let dropout = self.dropout_for(dropout);
        let xl = x.to_kind(Kind::Float);
        let xd = match &dropout {
            Some(d) => d.apply(self.dropout, &xl)?,
            None => xl,
        };
        let (a, b) = (self.a.detach(), self.b.detach());
        let u = xd.linear::<Tensor>(&a, None);
        let y = (u.linear::<Tensor>(&b, None) * self.scale).to_kind(out_kind);
        Ok((y, LoraSaved { dropout, u }))
    }

    /// Accumulates A's and B's gradients for the incoming gradient `dy` `[N, out]`, given the
    /// forward's input rows `x` again, and returns the gradient of the input in `x`'s dtype;
    /// the operations autograd runs for [`Self::forward`], with the dropout mask regenerated
    /// rather than stored.
    pub fn backward(&self, saved: &LoraSaved, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let (a, b) = (self.a.detach(), self.b.detach());
        let dv = dy.to_kind(Kind::Float) * self.scale;
        accumulate_grad(&self.b, &dv.tr().mm(&saved.u));
        let du = dv.mm(&b);
        let xl = x.to_kind(Kind::Float);
        let xd = match &saved.dropout {
            Some(d) => d.apply(self.dropout, &xl)?,
            None => xl,
        };
        accumulate_grad(&self.a, &du.tr().mm(&xd));
        let dxd = du.mm(&a);
        let dx = match &saved.dropout {
            Some(d) => d.apply(self.dropout, &dxd)?,
            None => dxd,
        };
        Ok(dx.to_kind(x.kind()))
    }
}

/// `p.grad += g`, creating the gradient on first use the way autograd does (`d/dp Σ p·g = g`
/// exactly), so the optimizer, the all-reduce and `zero_grad` see an ordinary `.grad`.
pub fn accumulate_grad(p: &Tensor, g: &Tensor) {
    let mut cur = p.grad();
    if cur.defined() {
        tch::no_grad(|| {
            let _ = cur.g_add_(g);
        });
    } else {
        tch::with_grad(|| (p * g.detach()).sum(Kind::Float).backward());
    }
}

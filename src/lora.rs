//! LoRA adapters as PEFT applies them to bitsandbytes `Linear4bit`: the input is cast to the
//! adapter's fp32, passed through dropout, A then B, scaled by alpha/r (rsLoRA: alpha/√r),
//! and cast back to the dtype of the frozen layer's output before being added to it.
//! With DoRA (PEFT's `use_dora`) the adapter also holds the magnitude vector m, and the layer
//! computes `g·(W + s·B·A)·x` with `g = m / ‖W + s·B·A‖` per output row, the norm detached
//! (PEFT's `DoraLinearLayer`; [`crate::quant::qlinear`] owns that arithmetic).
use crate::dropout::MaskKey;
pub use crate::lora_init::LoraInit;
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
    /// PEFT's `layers_to_transform`: the decoder layers adapted (`None`: all of them).
    pub layers: Option<Vec<i64>>,
    /// PEFT's `rank_pattern` / `alpha_pattern`, in their order: the first pattern a module's
    /// name ends with (a regular expression, PEFT's `(.*\.)?(pattern)$`) sets its r / alpha.
    pub rank_pattern: Vec<(String, i64)>,
    pub alpha_pattern: Vec<(String, f64)>,
    /// PEFT's `use_dora` (Liu et al. 2024): a trained magnitude per output row.
    pub use_dora: bool,
    /// PEFT's `init_lora_weights` (PiSSA and LoftQ also change the frozen weight; the
    /// checkpoint loader applies them, see `lora_init`).
    pub init: LoraInit,
}

/// PEFT's match of a `rank_pattern` / `alpha_pattern` key: `re.match(rf"(.*\.)?({p})$", key)`.
fn pattern_regex(p: &str) -> std::result::Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!("^(?:.*\\.)?(?:{p})$"))
}

/// PEFT's `get_pattern_key`: the first pattern `key` matches.
fn pattern_for<'a, V>(patterns: &'a [(String, V)], key: &str) -> Option<&'a V> {
    patterns.iter().find_map(|(p, v)| {
        pattern_regex(p)
            .ok()
            .filter(|re| re.is_match(key))
            .map(|_| v)
    })
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
        let keys = self.rank_pattern.iter().map(|(k, _)| ("rank_pattern", k));
        for (what, k) in keys.chain(self.alpha_pattern.iter().map(|(k, _)| ("alpha_pattern", k))) {
            if let Err(e) = pattern_regex(k) {
                bail!("{what}: {k:?} is not a regular expression: {e}");
            }
        }
        if let Some((k, r)) = self.rank_pattern.iter().find(|(_, r)| *r <= 0) {
            bail!("rank_pattern: {k:?} sets r {r}; it must be positive");
        }
        if self.use_dora && self.init.changes_base() {
            bail!(
                "use_dora with init_lora_weights {} is not supported (DoRA's magnitude would be \
                 taken from the residual base)",
                self.init.peft_value()
            );
        }
        Ok(())
    }

    /// PEFT's (r, alpha) for the module `key` (`model.layers.3.self_attn.q_proj`), named
    /// `module` (`q_proj`), on decoder layer `layer`; `None` when it is not adapted.
    pub fn for_module(&self, layer: usize, key: &str, module: &str) -> Option<(i64, f64)> {
        if !self.targets(module) {
            return None;
        }
        if let Some(layers) = &self.layers {
            if !layers.contains(&(layer as i64)) {
                return None;
            }
        }
        let r = pattern_for(&self.rank_pattern, key)
            .copied()
            .unwrap_or(self.r);
        let alpha = pattern_for(&self.alpha_pattern, key)
            .copied()
            .unwrap_or(self.alpha);
        Some((r, alpha))
    }

    /// Refuses a module that several patterns match: PEFT takes the first as written, and the
    /// JSON and YAML readers here keep patterns in sorted order, not as written.
    pub fn check_patterns(&self, keys: &[String]) -> Result<()> {
        for key in keys {
            for (what, names) in [
                (
                    "rank_pattern",
                    self.rank_pattern.iter().map(|(k, _)| k).collect::<Vec<_>>(),
                ),
                (
                    "alpha_pattern",
                    self.alpha_pattern.iter().map(|(k, _)| k).collect(),
                ),
            ] {
                let hits: Vec<&String> = names
                    .into_iter()
                    .filter(|p| pattern_regex(p).is_ok_and(|re| re.is_match(key)))
                    .collect();
                if hits.len() > 1 {
                    bail!("{what}: {hits:?} all match module {key}; make them match one each");
                }
            }
        }
        Ok(())
    }

    /// This configuration with one module's r and alpha.
    pub fn with(&self, r: i64, alpha: f64) -> LoraConfig {
        LoraConfig {
            r,
            alpha,
            ..self.clone()
        }
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
    /// DoRA's magnitude `[out]` (PEFT's `lora_magnitude_vector`), fp32 leaf with
    /// requires_grad; `None` for plain LoRA.
    pub magnitude: Option<Tensor>,
    /// PiSSA's starting (A₀, B₀), kept for PEFT's conversion to a plain LoRA against the
    /// original weights (`ΔW = s·(B·A − B₀·A₀)`); `None` for other inits.
    pub initial: Option<(Tensor, Tensor)>,
}

impl LoraAdapter {
    /// PEFT's default init: A Kaiming-uniform with a=√5 (i.e. U(-1/√in, 1/√in)), B zeros;
    /// `init_lora_weights: false` draws B as `nn.Linear(r, out)` leaves it, U(-1/√r, 1/√r),
    /// and `gaussian` draws A from N(0, 1/r) (PiSSA / LoftQ pairs are set by the caller).
    /// Draws from the global torch generator on the CPU so the result does not depend on
    /// the device; the caller seeds it.
    pub fn new(in_features: i64, out_features: i64, cfg: &LoraConfig, device: Device) -> Self {
        let cpu = (Kind::Float, Device::Cpu);
        let a = match cfg.init {
            LoraInit::Gaussian => {
                Tensor::empty([cfg.r, in_features], cpu).normal_(0.0, 1.0 / cfg.r as f64)
            }
            _ => {
                let bound = 1.0 / (in_features as f64).sqrt();
                Tensor::empty([cfg.r, in_features], cpu).uniform_(-bound, bound)
            }
        };
        let b = match cfg.init {
            LoraInit::Random => {
                let bound = 1.0 / (cfg.r as f64).sqrt();
                Tensor::empty([out_features, cfg.r], cpu).uniform_(-bound, bound)
            }
            _ => Tensor::zeros([out_features, cfg.r], cpu),
        };
        let a = a.to_device(device).set_requires_grad(true);
        let b = b.to_device(device).set_requires_grad(true);
        LoraAdapter {
            a,
            b,
            scale: cfg.scale(),
            dropout: cfg.dropout,
            magnitude: None,
            initial: None,
        }
    }

    /// DoRA's row norm `‖W + s·B·A‖` `[out]` for the frozen weight `w` `[out, in]` in fp32,
    /// outside autograd (PEFT's `get_weight_norm`, detached as PEFT's forward detaches it).
    pub fn weight_norm(&self, w: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let v = fold(w, &self.a, &self.b, self.scale);
            v.linalg_norm(2.0, [1i64].as_slice(), false, Kind::Float)
        })
    }

    /// Turns the adapter into DoRA, the magnitude starting at `‖W + s·B·A‖` (PEFT's
    /// `DoraLinearLayer.update_layer`; with B = 0, the rows' norms of W).
    pub fn init_dora(&mut self, w: &Tensor) {
        self.magnitude = Some(self.weight_norm(w).set_requires_grad(true));
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

/// DoRA folded into its weight: `g·(W + s·B·A)` with `g = m / ‖W + s·B·A‖` per row
/// (PEFT's `DoraLinearVariant.merge`). `w` must already be fp32.
pub fn fold_dora(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64, magnitude: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let v = fold(w, a, b, scale);
        let norm = v.linalg_norm(2.0, [1i64].as_slice(), false, Kind::Float);
        (magnitude.to_kind(Kind::Float) / norm).unsqueeze(1) * v
    })
}

/// What [`LoraAdapter::backward`] needs from one [`LoraAdapter::forward_saved`].
#[derive(Debug)]
pub struct LoraSaved {
    /// The dropout mask's key, when dropout was applied; the mask is regenerated from it.
    dropout: Option<MaskKey>,
    /// `dropout(x) · Aᵀ`, `[N, r]`.
    u: Tensor,
    /// DoRA's factor `g = m / ‖W + s·B·A‖` and the norm, `[out]` each (the forward's values:
    /// the backward must not see a norm recomputed from other weights).
    pub dora: Option<(Tensor, Tensor)>,
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
        Ok((
            y,
            LoraSaved {
                dropout,
                u,
                dora: None,
            },
        ))
    }

    /// The rows the branch saw: `x` in fp32 through the forward's dropout mask, if any.
    pub fn dropped(&self, saved: &LoraSaved, x: &Tensor) -> Result<Tensor> {
        let xl = x.to_kind(Kind::Float);
        match &saved.dropout {
            Some(d) => d.apply(self.dropout, &xl),
            None => Ok(xl),
        }
    }

    /// Whether the forward applied dropout (DoRA then recomputes the frozen product on the
    /// dropped rows, as PEFT does).
    pub fn dropped_out(saved: &LoraSaved) -> bool {
        saved.dropout.is_some()
    }

    /// The branch's output `s·B·A·dropout(x)` in fp32, from what the forward saved.
    pub fn output(&self, saved: &LoraSaved) -> Tensor {
        saved.u.linear::<Tensor>(&self.b.detach(), None) * self.scale
    }

    /// The gradient of dropout-masked rows: the mask of the forward applied to `d`.
    pub fn through_dropout(&self, saved: &LoraSaved, d: &Tensor) -> Result<Tensor> {
        match &saved.dropout {
            Some(k) => k.apply(self.dropout, d),
            None => Ok(d.shallow_clone()),
        }
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

//! The decoder as transformers computes it for Llama and the families of `family.rs`:
//! RMSNorm in fp32 then cast back (Gemma: `(1 + w)` before the cast), rotary embeddings with
//! rotate-half (Llama 3.1 and linear scaling; Gemma 3's local table), grouped-query attention
//! through `scaled_dot_product_attention` (or eager, for Gemma 2's soft-capping), sliding
//! windows, SwiGLU or GeGLU MLP. The family's switches pick the pieces; there is one decoder.
//!
//! Why one file: the decoder reads top to bottom as transformers' modeling file does (candle's
//! `llama.rs` is the model to imitate); every op says which transformers function it mirrors,
//! and splitting attention from the MLP would scatter the family switches each op reads.
use crate::dropout::MaskKey;
use crate::lora::{LoraAdapter, LoraConfig, LoraInit, LoraSaved};
use crate::model::checkpoint::{BaseWeights, LayerWeights, Linear};
use crate::model::family::{Activation, Switches};
use crate::model::hf_config::{LlamaConfig, RopeScaling};
use crate::profile::{scope, Part};
use crate::quant::nf4::{self, Nf4Tensor};
use crate::quant::qlinear::{
    few_rows, gemm_kind, linear_in, mm_in, FrozenWeight, QLinear, Scratch,
};
use anyhow::{anyhow, Result};
use std::f64::consts::PI;
use tch::{Device, Kind, Tensor};

/// The global rotary table's frequencies (see [`inv_freq_of`]).
pub fn inv_freq(cfg: &LlamaConfig) -> Tensor {
    inv_freq_of(cfg.rope_theta, &cfg.rope_scaling, cfg.head_dim)
}

/// `1/θ^(2i/d)`, with Llama 3 or linear scaling, in fp32 — op for op as transformers'
/// `compute_default_rope_parameters` / `_compute_llama3_parameters` /
/// `_compute_linear_scaling_rope_parameters` so the values agree bitwise.
pub fn inv_freq_of(theta: f64, scaling: &RopeScaling, dim: i64) -> Tensor {
    let inv = theta_powers(theta, dim).reciprocal();
    match *scaling {
        RopeScaling::Default => inv,
        RopeScaling::Linear { factor } => inv / factor,
        // The short factors: what a batch within the original context uses.
        RopeScaling::LongRope {
            ref short_factor, ..
        } => longrope_inv_freq(theta, short_factor, dim),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old_ctx = original_max_position_embeddings as f64;
            let low_freq_wavelen = old_ctx / low_freq_factor;
            let high_freq_wavelen = old_ctx / high_freq_factor;
            // Python's `scalar / tensor` is `tensor.reciprocal() * scalar`.
            let wavelen = inv.reciprocal() * (2.0 * PI);
            let long = wavelen.gt(low_freq_wavelen);
            let inv_llama = inv.where_self(&long.logical_not(), &(&inv / factor));
            let smooth = (wavelen.reciprocal() * old_ctx - low_freq_factor)
                / (high_freq_factor - low_freq_factor);
            let smoothed =
                (smooth.g_mul_scalar(-1.0) + 1.0) * &inv_llama / factor + &smooth * &inv_llama;
            let medium = wavelen
                .lt(high_freq_wavelen)
                .logical_not()
                .logical_and(&long.logical_not());
            smoothed.where_self(&medium, &inv_llama)
        }
    }
}

/// `θ^(2i/d)` for `i < d/2`, in fp32, as transformers computes it (`base ** (arange / dim)`).
fn theta_powers(theta: f64, dim: i64) -> Tensor {
    let exponent = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))
        .to_kind(Kind::Float)
        / dim as f64;
    Tensor::pow_scalar(theta, &exponent)
}

/// LongRoPE's `1 / (factors · θ^(2i/d))`, op for op as `_compute_longrope_parameters`.
fn longrope_inv_freq(theta: f64, factors: &[f64], dim: i64) -> Tensor {
    let ext = Tensor::from_slice(factors).to_kind(Kind::Float);
    (ext * theta_powers(theta, dim)).reciprocal()
}

/// One rotary table's frequencies: the ones every batch uses, or (LongRoPE) another set for
/// batches longer than the original context, and the factor cos and sin are scaled by.
#[derive(Debug)]
pub struct RopeTable {
    pub inv_freq: Tensor,
    /// (original context length, frequencies for batches longer than it).
    pub long: Option<(i64, Tensor)>,
    pub attention_scaling: f64,
}

impl RopeTable {
    pub fn new(theta: f64, scaling: &RopeScaling, dim: i64) -> Self {
        let (long, attention_scaling) = match scaling {
            RopeScaling::LongRope {
                long_factor,
                original_max_position_embeddings,
                attention_factor,
                ..
            } => (
                Some((
                    *original_max_position_embeddings,
                    longrope_inv_freq(theta, long_factor, dim),
                )),
                *attention_factor,
            ),
            _ => (None, 1.0),
        };
        RopeTable {
            inv_freq: inv_freq_of(theta, scaling, dim),
            long,
            attention_scaling,
        }
    }

    /// cos and sin `[T, head_dim]` for positions `0..seq_len`, in `kind`. LongRoPE picks its
    /// set by the batch's length as transformers' `longrope_frequency_update` does (the
    /// largest position + 1, i.e. the padded length).
    pub fn tables(&self, seq_len: i64, kind: Kind, device: Device) -> (Tensor, Tensor) {
        let inv_freq = match &self.long {
            Some((original, long)) if seq_len > *original => long,
            _ => &self.inv_freq,
        };
        let pos = Tensor::arange(seq_len, (Kind::Int64, device)).to_kind(Kind::Float);
        let freqs = pos.unsqueeze(-1) * inv_freq.to_device(device).unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let (cos, sin) = (emb.cos(), emb.sin());
        if self.attention_scaling == 1.0 {
            return (cos.to_kind(kind), sin.to_kind(kind));
        }
        (
            (cos * self.attention_scaling).to_kind(kind),
            (sin * self.attention_scaling).to_kind(kind),
        )
    }
}

pub fn rotate_half(x: &Tensor) -> Tensor {
    let d = *x.size().last().expect("rank >= 1");
    let x1 = x.narrow(-1, 0, d / 2);
    let x2 = x.narrow(-1, d / 2, d - d / 2);
    Tensor::cat(&[&x2.neg(), &x1], -1)
}

#[derive(Debug)]
pub struct RmsNorm {
    /// Llama: `w` in the compute dtype; Gemma: `1 + w` in fp32.
    pub weight: Tensor,
    pub eps: f64,
    /// Gemma's order: scale in fp32, then cast (Llama casts, then scales).
    pub gemma: bool,
}

impl RmsNorm {
    /// From the checkpoint's weight (already in the compute dtype).
    pub fn new(weight: Tensor, eps: f64, gemma: bool) -> Self {
        let weight = if gemma {
            weight.to_kind(Kind::Float) + 1.0
        } else {
            weight
        };
        RmsNorm { weight, eps, gemma }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_saved(x).0
    }

    /// [`RmsNorm::forward`] and its `rsqrt(mean(x²) + eps)` `[N, 1]` (fp32).
    pub fn forward_saved(&self, x: &Tensor) -> (Tensor, Tensor) {
        let xf = x.to_kind(Kind::Float);
        let var = xf
            .pow_tensor_scalar(2)
            .mean_dim([-1].as_slice(), true, Kind::Float);
        let rstd = (var + self.eps).rsqrt();
        (self.normed(x, &rstd), rstd)
    }

    /// The forward's output again from its input and saved `rstd`, bit for bit.
    pub fn normed(&self, x: &Tensor, rstd: &Tensor) -> Tensor {
        if self.gemma {
            (x.to_kind(Kind::Float) * rstd * &self.weight).to_kind(x.kind())
        } else {
            &self.weight * (x.to_kind(Kind::Float) * rstd).to_kind(x.kind())
        }
    }

    /// The input gradient in `kind`, following autograd's chain for `forward`:
    /// `w·(x·r)` with `r = (mean(x²) + eps)^-½`.
    pub fn backward(&self, x: &Tensor, rstd: &Tensor, dy: &Tensor, kind: Kind) -> Tensor {
        let xf = x.to_kind(Kind::Float);
        let dt = if self.gemma {
            dy.to_kind(Kind::Float) * &self.weight
        } else {
            (dy * &self.weight).to_kind(Kind::Float)
        };
        let direct = &dt * rstd;
        let dr = (&dt * &xf).sum_dim_intlist([-1].as_slice(), true, Kind::Float);
        let dvar = dr * rstd.pow_tensor_scalar(3) * -0.5;
        let h = *xf.size().last().expect("rank >= 1") as f64;
        let dsq = (dvar / h) * 2.0 * &xf;
        (direct + dsq).to_kind(kind)
    }
}

/// What a batch's attention context is built from: the frequencies of each rotary table
/// (0: every layer's, 1: Gemma 3's sliding layers') and the sliding windows in use.
#[derive(Debug)]
pub struct ContextSpec {
    pub ropes: Vec<RopeTable>,
    pub windows: Vec<i64>,
}

/// One attention pattern's mask.
pub struct Masks {
    /// `[B, 1, T, T]` boolean (true = attend), `None` for plain causal attention without
    /// padding (then `is_causal` is used, as transformers does).
    pub mask: Option<Tensor>,
    /// `[B, 1, T, 1]` 1 for queries that see at least one key, 0 for those that see none.
    pub row_valid: Option<Tensor>,
}

/// What every layer of one forward pass shares.
pub struct LayerContext {
    /// Per rotary table, cos and sin `[T, head_dim]` in the compute dtype.
    pub ropes: Vec<(Tensor, Tensor)>,
    pub full: Masks,
    /// Per sliding window: causal attention to the last `window` positions.
    pub sliding: Vec<(i64, Masks)>,
}

impl LayerContext {
    pub fn new(spec: &ContextSpec, attention_mask: &Tensor, kind: Kind) -> Self {
        let device = attention_mask.device();
        let t = attention_mask.size()[1];
        let ropes = spec
            .ropes
            .iter()
            .map(|r| r.tables(t, kind, device))
            .collect();
        let padding = attention_mask.to_kind(Kind::Bool);
        let all_visible = padding.all().int64_value(&[]) != 0;
        let idx = Tensor::arange(t, (Kind::Int64, device));
        let distance = idx.unsqueeze(1) - idx.unsqueeze(0);
        let causal = distance.ge(0);
        let b = padding.size()[0];
        let masks = |pattern: &Tensor| {
            let mask = pattern
                .view([1, 1, t, t])
                .logical_and(&padding.view([b, 1, 1, t]));
            // A query that sees no key (left padding) gets 0 from torch's math kernel; the
            // fused kernels are not all as careful, so such rows attend everywhere and are
            // zeroed after.
            let valid = mask.any_dim(-1, true);
            let mask = mask.logical_or(&valid.logical_not());
            Masks {
                mask: Some(mask),
                row_valid: Some(valid.to_kind(kind)),
            }
        };
        let plain = || Masks {
            mask: None,
            row_valid: None,
        };
        let full = if all_visible { plain() } else { masks(&causal) };
        let sliding = spec
            .windows
            .iter()
            .map(|&w| {
                // Within the window every key is visible: plain causal attention.
                let m = if all_visible && t <= w {
                    plain()
                } else {
                    masks(&causal.logical_and(&distance.lt(w)))
                };
                (w, m)
            })
            .collect();
        LayerContext {
            ropes,
            full,
            sliding,
        }
    }

    pub fn masks(&self, window: Option<i64>) -> &Masks {
        match window {
            None => &self.full,
            Some(w) => self
                .sliding
                .iter()
                .find(|(x, _)| *x == w)
                .map(|(_, m)| m)
                .expect("every layer's window is in the context"),
        }
    }
}

/// Projections of one input read as parts: q, k and v (or Phi-3's `qkv_proj` split in
/// three), gate and up (or `gate_up_proj` split in two).
#[derive(Debug)]
pub struct Projections {
    /// (module path, layer, LoRA dropout index): one per part, or a single fused one.
    pub linears: Vec<(&'static str, QLinear, u64)>,
    /// Width of each part.
    pub widths: Vec<i64>,
    /// The parts' biases end to end when every part has one (Qwen2's q/k/v), so the stacked
    /// matmul adds them in its addmm as `linear` does per part; built once, not per pass.
    stacked_bias: Option<Tensor>,
}

impl Projections {
    pub fn new(linears: Vec<(&'static str, QLinear, u64)>, widths: Vec<i64>) -> Self {
        let biases: Option<Vec<&Tensor>> =
            linears.iter().map(|(_, l, _)| l.bias.as_ref()).collect();
        let stacked_bias = biases.filter(|b| b.len() > 1).map(|b| Tensor::cat(&b, 0));
        Projections {
            linears,
            widths,
            stacked_bias,
        }
    }

    fn fused(&self) -> bool {
        self.linears.len() == 1 && self.widths.len() > 1
    }

    fn split(&self, y: Tensor) -> Vec<Tensor> {
        y.split_with_sizes(self.widths.as_slice(), -1)
    }

    /// The parts under autograd (the padded reference forward).
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        if self.fused() {
            return Ok(self.split(self.linears[0].1.forward(x)?));
        }
        self.linears.iter().map(|(_, l, _)| l.forward(x)).collect()
    }

    /// The parts' NF4 weights when they can be stacked into one `[Σ out, in]` operand (two
    /// or more separate NF4 projections of the same input); `None` otherwise.
    fn stackable(&self) -> Option<Vec<&Nf4Tensor>> {
        // DoRA rescales each projection's frozen product by its own factor.
        if self.linears.len() < 2 || self.linears.iter().any(|(_, l, _)| l.is_dora()) {
            return None;
        }
        self.linears
            .iter()
            .map(|(_, l, _)| match &l.weight {
                FrozenWeight::Nf4(q) => Some(q),
                FrozenWeight::Dense(_) => None,
            })
            .collect()
    }

    /// The stacked frozen weight `[Σ out, in]` in `kind`, each part dequantised straight
    /// into its rows of `scratch`, so the parts take one matmul (forward and backward).
    fn stacked_weight(
        &self,
        parts: &[&Nf4Tensor],
        kind: Kind,
        scratch: &Scratch,
    ) -> Result<Tensor> {
        let _p = scope(Part::Dequantize);
        let rows: i64 = parts.iter().map(|q| q.shape[0]).sum();
        let w = scratch.take(rows, parts[0].shape[1], kind, parts[0].device());
        let mut at = 0;
        for q in parts {
            let mut part = w.narrow(0, at, q.shape[0]);
            nf4::dequantize_into(q, &mut part)?;
            at += q.shape[0];
        }
        Ok(w)
    }

    /// The parts of rows `x` outside autograd with what the backward needs; `seed` gives
    /// each projection's dropout seed from its index.
    pub fn forward_saved(
        &self,
        x: &Tensor,
        seed: &dyn Fn(u64) -> Option<MaskKey>,
        scratch: &Scratch,
    ) -> Result<(Vec<Tensor>, Vec<Option<LoraSaved>>)> {
        if let Some(parts) = self.stackable().filter(|_| !few_rows(x)) {
            let w = self.stacked_weight(&parts, gemm_kind(x.kind(), x.device()), scratch)?;
            let bias = &self.stacked_bias;
            let bases = {
                let _p = scope(Part::Matmul);
                linear_in(x, &w, bias.as_ref()).split_with_sizes(self.widths.as_slice(), -1)
            };
            let mut outs = Vec::with_capacity(bases.len());
            let mut saved = Vec::with_capacity(bases.len());
            for (base, (_, l, i)) in bases.into_iter().zip(&self.linears) {
                let base = match (&l.bias, bias) {
                    (Some(b), None) => base + b,
                    _ => base,
                };
                match &l.lora {
                    Some(lora) => {
                        let _p = scope(Part::Lora);
                        let (y, s) = lora.forward_saved(x, seed(*i), x.kind())?;
                        outs.push(base + y);
                        saved.push(Some(s));
                    }
                    None => {
                        // A part is a strided view of the whole product; kept alone, it
                        // would keep the other parts' storage alive with it.
                        outs.push(base.contiguous());
                        saved.push(None);
                    }
                }
            }
            return Ok((outs, saved));
        }
        let mut outs = Vec::with_capacity(self.widths.len());
        let mut saved = Vec::with_capacity(self.linears.len());
        for (_, l, i) in &self.linears {
            let (y, s) = l.forward_saved(x, seed(*i), scratch)?;
            outs.push(y);
            saved.push(s);
        }
        if self.fused() {
            let y = outs.pop().expect("one output");
            outs = self.split(y);
        }
        Ok((outs, saved))
    }

    /// The input gradient for the parts' gradients `dys`, accumulating the LoRA gradients;
    /// `x` rebuilds the input rows (for the LoRA branches only).
    pub fn backward(
        &self,
        saved: &[Option<LoraSaved>],
        x: &dyn Fn() -> Tensor,
        dys: &[Tensor],
        scratch: &Scratch,
    ) -> Result<Tensor> {
        if self.fused() {
            let dy = Tensor::cat(dys, -1);
            return self.linears[0]
                .1
                .backward(saved[0].as_ref(), x, &dy, scratch);
        }
        if let Some(parts) = self.stackable() {
            let w =
                self.stacked_weight(&parts, gemm_kind(dys[0].kind(), dys[0].device()), scratch)?;
            let mut dx = {
                let _p = scope(Part::Matmul);
                mm_in(&Tensor::cat(dys, -1), &w)
            };
            drop(w);
            self.lora_backward(saved, x, dys, &mut dx)?;
            return Ok(dx);
        }
        let mut dx: Option<Tensor> = None;
        for (((_, l, _), s), dy) in self.linears.iter().zip(saved).zip(dys) {
            let g = l.backward(s.as_ref(), x, dy, scratch)?;
            dx = Some(match dx {
                Some(d) => d + g,
                None => g,
            });
        }
        dx.ok_or_else(|| anyhow!("no projection"))
    }

    /// The LoRA branches' gradients for the parts' output gradients (the stacked path, plain
    /// LoRA only), their input gradients added to `dx`.
    fn lora_backward(
        &self,
        saved: &[Option<LoraSaved>],
        x: &dyn Fn() -> Tensor,
        dys: &[Tensor],
        dx: &mut Tensor,
    ) -> Result<()> {
        for (((_, l, _), s), dy) in self.linears.iter().zip(saved).zip(dys) {
            if let (Some(lora), Some(s)) = (&l.lora, s) {
                let _p = scope(Part::Lora);
                *dx += lora.backward(s, &x(), dy)?;
            }
        }
        Ok(())
    }

    /// Only the LoRA gradients, for a layer whose input needs no gradient.
    pub fn backward_params_only(
        &self,
        saved: &[Option<LoraSaved>],
        x: &dyn Fn() -> Tensor,
        dys: &[Tensor],
    ) -> Result<()> {
        if self.fused() {
            let dy = Tensor::cat(dys, -1);
            return self.linears[0]
                .1
                .backward_params_only(saved[0].as_ref(), x, &dy);
        }
        for (((_, l, _), s), dy) in self.linears.iter().zip(saved).zip(dys) {
            l.backward_params_only(s.as_ref(), x, dy)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct Attention {
    /// q, k, v.
    pub qkv: Projections,
    pub o_proj: QLinear,
    /// Per-head RMSNorm of queries and keys (Qwen3, Gemma 3).
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub scale: f64,
    pub softcap: Option<f64>,
    /// This layer's sliding window, if it slides.
    pub window: Option<i64>,
    /// Which of the context's rotary tables this layer uses.
    pub rope: usize,
}

fn repeat_kv(x: &Tensor, n_rep: i64) -> Tensor {
    if n_rep == 1 {
        return x.shallow_clone();
    }
    let s = x.size();
    x.unsqueeze(2)
        .expand([s[0], s[1], n_rep, s[2], s[3]], false)
        .reshape([s[0], s[1] * n_rep, s[2], s[3]])
}

impl Attention {
    /// Attention of `[B, heads, T, d]` queries, keys and values under the context's mask for
    /// this layer, as transformers computes it: sdpa, or its eager path when the logits are
    /// soft-capped; `[B, heads, T, d]` out.
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, ctx: &LayerContext) -> Tensor {
        let t = q.size()[2];
        let n_rep = self.num_heads / self.num_kv_heads;
        let m = ctx.masks(self.window);
        let o = if let Some(cap) = self.softcap {
            let k = repeat_kv(k, n_rep);
            let v = repeat_kv(v, n_rep);
            let w = q.matmul(&k.transpose(2, 3)) * self.scale;
            let w = (w / cap).tanh() * cap;
            let allowed = match &m.mask {
                Some(mask) => mask.shallow_clone(),
                None => {
                    let idx = Tensor::arange(t, (Kind::Int64, q.device()));
                    idx.unsqueeze(1)
                        .ge_tensor(&idx.unsqueeze(0))
                        .view([1, 1, t, t])
                }
            };
            let w = w.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
            w.softmax(-1, Kind::Float).to_kind(q.kind()).matmul(&v)
        } else {
            match &m.mask {
                None => Tensor::scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    None::<Tensor>,
                    0.0,
                    t > 1,
                    self.scale,
                    n_rep > 1,
                ),
                Some(mask) => Tensor::scaled_dot_product_attention(
                    q,
                    &repeat_kv(k, n_rep),
                    &repeat_kv(v, n_rep),
                    Some(mask),
                    0.0,
                    false,
                    self.scale,
                    false,
                ),
            }
        };
        match &m.row_valid {
            Some(rv) => o * rv,
            None => o,
        }
    }

    /// [`Self::attend`] for one query per sequence: `q` `[B, heads, 1, d]` sits at position
    /// `pos[b]` of its sequence and sees the keys `[B, kv_heads, T, d]` that query would see
    /// there; `[B, heads, 1, d]` out.
    pub fn attend_at(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &LayerContext,
        pos: &Tensor,
    ) -> Tensor {
        let s = k.size();
        let (b, t) = (s[0], s[2]);
        let n_rep = self.num_heads / self.num_kv_heads;
        let (k, v) = (repeat_kv(k, n_rep), repeat_kv(v, n_rep));
        let allowed = match &ctx.masks(self.window).mask {
            // Each sequence's row of its mask at the query's position.
            Some(mask) => mask.expand([b, 1, t, t], false).gather(
                2,
                &pos.view([b, 1, 1, 1]).expand([b, 1, 1, t], false),
                false,
            ),
            None => {
                let idx = Tensor::arange(t, (Kind::Int64, k.device()));
                idx.view([1, 1, 1, t]).le_tensor(&pos.view([b, 1, 1, 1]))
            }
        };
        match self.softcap {
            Some(cap) => {
                let w = q.matmul(&k.transpose(2, 3)) * self.scale;
                let w = (w / cap).tanh() * cap;
                let w = w.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
                w.softmax(-1, Kind::Float).to_kind(q.kind()).matmul(&v)
            }
            None => Tensor::scaled_dot_product_attention(
                q,
                &k,
                &v,
                Some(&allowed),
                0.0,
                false,
                self.scale,
                false,
            ),
        }
    }

    pub fn forward(&self, x: &Tensor, ctx: &LayerContext) -> Result<Tensor> {
        let s = x.size();
        let (b, t) = (s[0], s[1]);
        let d = self.head_dim;
        let heads = |y: &Tensor, norm: &Option<RmsNorm>| {
            let y = y.view([b, t, -1, d]);
            let y = match norm {
                Some(n) => n.forward(&y),
                None => y,
            };
            y.transpose(1, 2)
        };
        let parts = self.qkv.forward(x)?;
        let q = heads(&parts[0], &self.q_norm);
        let k = heads(&parts[1], &self.k_norm);
        let v = heads(&parts[2], &None);
        let (cos, sin) = &ctx.ropes[self.rope];
        let cos = cos.view([1, 1, t, d]);
        let sin = sin.view([1, 1, t, d]);
        let q = &q * &cos + rotate_half(&q) * &sin;
        let k = &k * &cos + rotate_half(&k) * &sin;
        let out = self.attend(&q, &k, &v, ctx);
        let out = out.transpose(1, 2).contiguous().reshape([b, t, -1]);
        self.o_proj.forward(&out)
    }
}

#[derive(Debug)]
pub struct Mlp {
    /// gate, up.
    pub gate_up: Projections,
    pub down_proj: QLinear,
    pub act: Activation,
}

impl Activation {
    pub fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Activation::Silu => x.silu(),
            Activation::GeluTanh => x.gelu("tanh"),
        }
    }

    /// The input gradient for `dy`, given the activation's input `x`.
    pub fn backward(self, x: &Tensor, dy: &Tensor) -> Tensor {
        match self {
            Activation::Silu => x.silu_backward(dy),
            Activation::GeluTanh => x.gelu_backward(dy, "tanh"),
        }
    }
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let parts = self.gate_up.forward(x)?;
        let g = self.act.forward(&parts[0]);
        self.down_proj.forward(&(g * &parts[1]))
    }
}

#[derive(Debug)]
pub struct DecoderLayer {
    /// Before attention (`input_layernorm`).
    pub attn_norm: RmsNorm,
    pub self_attn: Attention,
    /// On the attention's output (Gemma's `post_attention_layernorm`).
    pub attn_post_norm: Option<RmsNorm>,
    /// Before the MLP (Llama's `post_attention_layernorm`, Gemma's `pre_feedforward_layernorm`).
    pub mlp_norm: RmsNorm,
    pub mlp: Mlp,
    /// On the MLP's output (Gemma's `post_feedforward_layernorm`).
    pub mlp_post_norm: Option<RmsNorm>,
}

fn maybe_norm(norm: &Option<RmsNorm>, x: Tensor) -> Tensor {
    match norm {
        Some(n) => n.forward(&x),
        None => x,
    }
}

impl DecoderLayer {
    pub fn forward(&self, x: &Tensor, ctx: &LayerContext) -> Result<Tensor> {
        let a = self.self_attn.forward(&self.attn_norm.forward(x), ctx)?;
        let h = x + maybe_norm(&self.attn_post_norm, a);
        let m = self.mlp.forward(&self.mlp_norm.forward(&h))?;
        Ok(&h + maybe_norm(&self.mlp_post_norm, m))
    }

    /// [`Self::linears`], mutably.
    pub fn linears_mut(&mut self) -> Vec<&mut QLinear> {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        a.qkv
            .linears
            .iter_mut()
            .map(|(_, l, _)| l)
            .chain(std::iter::once(&mut a.o_proj))
            .chain(m.gate_up.linears.iter_mut().map(|(_, l, _)| l))
            .chain(std::iter::once(&mut m.down_proj))
            .collect()
    }

    /// The LoRA adapters of this layer with their module paths (`self_attn.q_proj`, ...).
    pub fn adapters(&self) -> Vec<(String, &LoraAdapter)> {
        self.linears()
            .into_iter()
            .filter_map(|(n, l)| l.lora.as_ref().map(|a| (n.to_string(), a)))
            .collect()
    }

    /// Every linear of the layer with its module path (`self_attn.q_proj`, ...).
    pub fn linears(&self) -> Vec<(&'static str, &QLinear)> {
        let (a, m) = (&self.self_attn, &self.mlp);
        a.qkv
            .linears
            .iter()
            .map(|(n, l, _)| (*n, l))
            .chain([("self_attn.o_proj", &a.o_proj)])
            .chain(m.gate_up.linears.iter().map(|(n, l, _)| (*n, l)))
            .chain([("mlp.down_proj", &m.down_proj)])
            .collect()
    }
}

#[derive(Debug)]
pub struct LlamaModel {
    pub embed_tokens: Tensor,
    /// √hidden (Gemma), applied in the embeddings' dtype.
    pub embed_scale: Option<f64>,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub spec: ContextSpec,
}

impl LlamaModel {
    /// Assembles the model from loaded weights, creating LoRA adapters (from the global torch
    /// generator, which the caller seeds) on the targeted projections in layer order.
    pub fn new(
        cfg: &LlamaConfig,
        weights: BaseWeights,
        lora: Option<&LoraConfig>,
        device: Device,
    ) -> Result<Self> {
        let sw = &cfg.switches;
        let layers = weights
            .layers
            .into_iter()
            .enumerate()
            .map(|(i, lw)| build_layer(cfg, i, lw, lora, device))
            .collect::<Result<_>>()?;
        let mut ropes = vec![RopeTable::new(
            cfg.rope_theta,
            &cfg.rope_scaling,
            cfg.head_dim,
        )];
        if let Some((theta, scaling)) = &cfg.local_rope {
            ropes.push(RopeTable::new(*theta, scaling, cfg.head_dim));
        }
        Ok(LlamaModel {
            embed_tokens: weights.embed_tokens,
            embed_scale: sw.embed_scale.then(|| (cfg.hidden_size as f64).sqrt()),
            layers,
            norm: RmsNorm::new(weights.norm, cfg.rms_norm_eps, sw.gemma_norm),
            spec: ContextSpec {
                ropes,
                windows: sw.windows(),
            },
        })
    }

    pub fn embed(&self, input_ids: &Tensor) -> Tensor {
        let s = input_ids.size();
        let e = self
            .embed_tokens
            .index_select(0, &input_ids.reshape([-1]))
            .reshape([s[0], s[1], -1]);
        match self.embed_scale {
            // transformers holds the factor as a fp32 tensor and casts it to the weights' dtype.
            Some(f) => e * Tensor::from(f as f32).to_kind(self.embed_tokens.kind()),
            None => e,
        }
    }
}

fn build_layer(
    cfg: &LlamaConfig,
    index: usize,
    lw: LayerWeights,
    lora: Option<&LoraConfig>,
    device: Device,
) -> Result<DecoderLayer> {
    let sw: &Switches = &cfg.switches;
    let LayerWeights { norms, linears } = lw;
    let linears: Vec<(&'static str, QLinear)> = linears
        .into_iter()
        .map(|lin| {
            let Linear {
                name,
                weight,
                bias,
                init,
            } = lin;
            // PEFT's module key, as its patterns and layer choice see it.
            let parent = cfg
                .linear_modules()
                .iter()
                .find(|(_, n)| *n == name)
                .map_or("self_attn", |(p, _)| *p);
            let key = format!("model.layers.{index}.{parent}.{name}");
            let mut adapter = lora.and_then(|l| {
                l.for_module(index, &key, name).map(|(r, alpha)| {
                    LoraAdapter::new(
                        weight.in_features(),
                        weight.out_features(),
                        &l.with(r, alpha),
                        device,
                    )
                })
            });
            // PiSSA / LoftQ: the starting pair the loader took out of the weight.
            if let (Some(a), Some((a0, b0))) = (adapter.as_mut(), init) {
                let (a0, b0) = (a0.to_device(device).detach(), b0.to_device(device).detach());
                a.a = a0.copy().set_requires_grad(true);
                a.b = b0.copy().set_requires_grad(true);
                if lora.is_some_and(|l| matches!(l.init, LoraInit::Pissa { .. })) {
                    a.initial = Some((a0, b0));
                }
            }
            let mut q = QLinear {
                weight,
                bias,
                lora: adapter,
            };
            if lora.is_some_and(|l| l.use_dora) {
                let w = q.dense_in(Kind::Float, &Scratch::default())?;
                if let Some(a) = q.lora.as_mut() {
                    a.init_dora(&w);
                }
            }
            Ok((name, q))
        })
        .collect::<Result<_>>()?;
    let mut linears = linears;
    let mut take = |name: &str| -> Result<QLinear> {
        let i = linears
            .iter()
            .position(|(n, _)| *n == name)
            .ok_or_else(|| anyhow!("layer {index} lacks projection {name}"))?;
        Ok(linears.remove(i).1)
    };
    let mut norms = norms;
    let mut norm = |name: &str| -> Option<RmsNorm> {
        let i = norms.iter().position(|(n, _)| *n == name)?;
        Some(RmsNorm::new(
            norms.remove(i).1,
            cfg.rms_norm_eps,
            sw.gemma_norm,
        ))
    };
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let i = cfg.intermediate_size;
    // Dropout indices: q=0, k=1, v=2, o=3, gate=4, up=5, down=6, qkv=7, gate_up=8.
    let (qkv, gate_up) = if sw.fused_projections {
        (
            vec![("self_attn.qkv_proj", take("qkv_proj")?, 7)],
            vec![("mlp.gate_up_proj", take("gate_up_proj")?, 8)],
        )
    } else {
        (
            vec![
                ("self_attn.q_proj", take("q_proj")?, 0),
                ("self_attn.k_proj", take("k_proj")?, 1),
                ("self_attn.v_proj", take("v_proj")?, 2),
            ],
            vec![
                ("mlp.gate_proj", take("gate_proj")?, 4),
                ("mlp.up_proj", take("up_proj")?, 5),
            ],
        )
    };
    let missing = |n: &str| anyhow!("layer {index} lacks norm {n}");
    let (attn_post_norm, mlp_norm, mlp_post_norm) = if sw.sandwich_norms {
        (
            Some(
                norm("post_attention_layernorm")
                    .ok_or_else(|| missing("post_attention_layernorm"))?,
            ),
            norm("pre_feedforward_layernorm")
                .ok_or_else(|| missing("pre_feedforward_layernorm"))?,
            Some(
                norm("post_feedforward_layernorm")
                    .ok_or_else(|| missing("post_feedforward_layernorm"))?,
            ),
        )
    } else {
        (
            None,
            norm("post_attention_layernorm").ok_or_else(|| missing("post_attention_layernorm"))?,
            None,
        )
    };
    let window = sw.layer_windows.get(index).copied().flatten();
    Ok(DecoderLayer {
        attn_norm: norm("input_layernorm").ok_or_else(|| missing("input_layernorm"))?,
        self_attn: Attention {
            qkv: Projections::new(qkv, vec![q, kv, kv]),
            o_proj: take("o_proj")?,
            q_norm: norm("self_attn.q_norm"),
            k_norm: norm("self_attn.k_norm"),
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            scale: sw.attn_scale,
            softcap: sw.attn_softcap,
            window,
            // Gemma 3's sliding layers have their own table.
            rope: usize::from(window.is_some() && cfg.local_rope.is_some()),
        },
        attn_post_norm,
        mlp_norm,
        mlp: Mlp {
            gate_up: Projections::new(gate_up, vec![i, i]),
            down_proj: take("down_proj")?,
            act: sw.activation,
        },
        mlp_post_norm,
    })
}

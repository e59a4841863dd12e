//! The Llama decoder as transformers computes it: RMSNorm in fp32 then cast back, rotary
//! embeddings with rotate-half (and Llama 3.1 frequency scaling), grouped-query attention
//! through `scaled_dot_product_attention`, SwiGLU MLP.
use crate::lora::{LoraAdapter, LoraConfig};
use crate::model::checkpoint::{BaseWeights, LayerWeights};
use crate::model::hf_config::{LlamaConfig, RopeScaling};
use crate::quant::qlinear::QLinear;
use anyhow::Result;
use std::f64::consts::PI;
use tch::{Device, Kind, Tensor};

/// `1/θ^(2i/d)`, with Llama 3 scaling, in fp32 — op for op as transformers'
/// `compute_default_rope_parameters` / `_compute_llama3_parameters` so the values agree bitwise.
pub fn inv_freq(cfg: &LlamaConfig) -> Tensor {
    let dim = cfg.head_dim;
    let exponent = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))
        .to_kind(Kind::Float)
        / dim as f64;
    let inv = Tensor::pow_scalar(cfg.rope_theta, &exponent).reciprocal();
    match cfg.rope_scaling {
        RopeScaling::Default => inv,
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

/// cos and sin `[T, head_dim]` for positions `0..seq_len`, in `kind`.
pub fn rope_tables(
    inv_freq: &Tensor,
    seq_len: i64,
    kind: Kind,
    device: Device,
) -> (Tensor, Tensor) {
    let pos = Tensor::arange(seq_len, (Kind::Int64, device)).to_kind(Kind::Float);
    let freqs = pos.unsqueeze(-1) * inv_freq.to_device(device).unsqueeze(0);
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
}

pub fn rotate_half(x: &Tensor) -> Tensor {
    let d = *x.size().last().expect("rank >= 1");
    let x1 = x.narrow(-1, 0, d / 2);
    let x2 = x.narrow(-1, d / 2, d - d / 2);
    Tensor::cat(&[&x2.neg(), &x1], -1)
}

#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
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
        &self.weight * (x.to_kind(Kind::Float) * rstd).to_kind(x.kind())
    }

    /// The input gradient in `kind`, following autograd's chain for `forward`:
    /// `w·(x·r)` with `r = (mean(x²) + eps)^-½`.
    pub fn backward(&self, x: &Tensor, rstd: &Tensor, dy: &Tensor, kind: Kind) -> Tensor {
        let xf = x.to_kind(Kind::Float);
        let dt = (dy * &self.weight).to_kind(Kind::Float);
        let direct = &dt * rstd;
        let dr = (&dt * &xf).sum_dim_intlist([-1].as_slice(), true, Kind::Float);
        let dvar = dr * rstd.pow_tensor_scalar(3) * -0.5;
        let h = *xf.size().last().expect("rank >= 1") as f64;
        let dsq = (dvar / h) * 2.0 * &xf;
        (direct + dsq).to_kind(kind)
    }
}

/// What every layer of one forward pass shares.
pub struct LayerContext {
    /// `[T, head_dim]` in the compute dtype.
    pub cos: Tensor,
    pub sin: Tensor,
    /// `[B, 1, T, T]` boolean (true = attend), `None` when no position is padded (then
    /// `is_causal` is used, as transformers does).
    pub mask: Option<Tensor>,
    /// `[B, 1, T, 1]` 1 for queries that see at least one key, 0 for those that see none.
    pub row_valid: Option<Tensor>,
}

impl LayerContext {
    pub fn new(inv_freq: &Tensor, attention_mask: &Tensor, kind: Kind) -> Self {
        let device = attention_mask.device();
        let t = attention_mask.size()[1];
        let (cos, sin) = rope_tables(inv_freq, t, kind, device);
        let padding = attention_mask.to_kind(Kind::Bool);
        let all_visible = padding.all().int64_value(&[]) != 0;
        if all_visible {
            return LayerContext {
                cos,
                sin,
                mask: None,
                row_valid: None,
            };
        }
        let idx = Tensor::arange(t, (Kind::Int64, device));
        let causal = idx.unsqueeze(1).ge_tensor(&idx.unsqueeze(0));
        let b = padding.size()[0];
        let mask = causal
            .view([1, 1, t, t])
            .logical_and(&padding.view([b, 1, 1, t]));
        // A query that sees no key (left padding) gets 0 from torch's math kernel; the fused
        // kernels are not all as careful, so such rows attend everywhere and are zeroed after.
        let valid = mask.any_dim(-1, true);
        let mask = mask.logical_or(&valid.logical_not());
        LayerContext {
            cos,
            sin,
            mask: Some(mask),
            row_valid: Some(valid.to_kind(kind)),
        }
    }
}

#[derive(Debug)]
pub struct Attention {
    pub q_proj: QLinear,
    pub k_proj: QLinear,
    pub v_proj: QLinear,
    pub o_proj: QLinear,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
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
    /// Scaled-dot-product attention of `[B, heads, T, d]` queries, keys and values under the
    /// context's mask, as transformers' sdpa path computes it; `[B, heads, T, d]` out.
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, ctx: &LayerContext) -> Tensor {
        let t = q.size()[2];
        let scale = (self.head_dim as f64).powf(-0.5);
        let n_rep = self.num_heads / self.num_kv_heads;
        match &ctx.mask {
            None => Tensor::scaled_dot_product_attention(
                q,
                k,
                v,
                None::<Tensor>,
                0.0,
                t > 1,
                scale,
                n_rep > 1,
            ),
            Some(mask) => {
                let k = repeat_kv(k, n_rep);
                let v = repeat_kv(v, n_rep);
                let o = Tensor::scaled_dot_product_attention(
                    q,
                    &k,
                    &v,
                    Some(mask),
                    0.0,
                    false,
                    scale,
                    false,
                );
                match &ctx.row_valid {
                    Some(rv) => o * rv,
                    None => o,
                }
            }
        }
    }

    pub fn forward(&self, x: &Tensor, ctx: &LayerContext) -> Result<Tensor> {
        let s = x.size();
        let (b, t) = (s[0], s[1]);
        let heads = |y: Tensor| y.view([b, t, -1, self.head_dim]).transpose(1, 2);
        let q = heads(self.q_proj.forward(x)?);
        let k = heads(self.k_proj.forward(x)?);
        let v = heads(self.v_proj.forward(x)?);
        let cos = ctx.cos.view([1, 1, t, self.head_dim]);
        let sin = ctx.sin.view([1, 1, t, self.head_dim]);
        let q = &q * &cos + rotate_half(&q) * &sin;
        let k = &k * &cos + rotate_half(&k) * &sin;
        let out = self.attend(&q, &k, &v, ctx);
        let out = out.transpose(1, 2).contiguous().reshape([b, t, -1]);
        self.o_proj.forward(&out)
    }
}

#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: QLinear,
    pub up_proj: QLinear,
    pub down_proj: QLinear,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate_proj.forward(x)?.silu();
        let u = self.up_proj.forward(x)?;
        self.down_proj.forward(&(g * u))
    }
}

#[derive(Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    pub fn forward(&self, x: &Tensor, ctx: &LayerContext) -> Result<Tensor> {
        let h = x + self
            .self_attn
            .forward(&self.input_layernorm.forward(x), ctx)?;
        let out = &h
            + self
                .mlp
                .forward(&self.post_attention_layernorm.forward(&h))?;
        Ok(out)
    }

    /// The LoRA adapters of this layer with their module paths (`self_attn.q_proj`, ...).
    pub fn adapters(&self) -> Vec<(String, &LoraAdapter)> {
        let mods: [(&str, &QLinear); 7] = [
            ("self_attn.q_proj", &self.self_attn.q_proj),
            ("self_attn.k_proj", &self.self_attn.k_proj),
            ("self_attn.v_proj", &self.self_attn.v_proj),
            ("self_attn.o_proj", &self.self_attn.o_proj),
            ("mlp.gate_proj", &self.mlp.gate_proj),
            ("mlp.up_proj", &self.mlp.up_proj),
            ("mlp.down_proj", &self.mlp.down_proj),
        ];
        mods.into_iter()
            .filter_map(|(n, l)| l.lora.as_ref().map(|a| (n.to_string(), a)))
            .collect()
    }
}

#[derive(Debug)]
pub struct LlamaModel {
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub inv_freq: Tensor,
}

impl LlamaModel {
    /// Assembles the model from loaded weights, creating LoRA adapters (from the global torch
    /// generator, which the caller seeds) on the targeted projections in layer order.
    pub fn new(
        cfg: &LlamaConfig,
        weights: BaseWeights,
        lora: Option<&LoraConfig>,
        device: Device,
    ) -> Self {
        let eps = cfg.rms_norm_eps;
        let layers = weights
            .layers
            .into_iter()
            .map(|lw| build_layer(cfg, lw, lora, device))
            .collect();
        LlamaModel {
            embed_tokens: weights.embed_tokens,
            layers,
            norm: RmsNorm {
                weight: weights.norm,
                eps,
            },
            inv_freq: inv_freq(cfg),
        }
    }

    pub fn embed(&self, input_ids: &Tensor) -> Tensor {
        let s = input_ids.size();
        self.embed_tokens
            .index_select(0, &input_ids.reshape([-1]))
            .reshape([s[0], s[1], -1])
    }
}

fn build_layer(
    cfg: &LlamaConfig,
    lw: LayerWeights,
    lora: Option<&LoraConfig>,
    device: Device,
) -> DecoderLayer {
    let mut linears: Vec<QLinear> = lw
        .linears
        .into_iter()
        .map(|(name, weight)| {
            let adapter = lora
                .filter(|l| l.targets(name))
                .map(|l| LoraAdapter::new(weight.in_features(), weight.out_features(), l, device));
            QLinear {
                weight,
                lora: adapter,
            }
        })
        .collect();
    let mut take = || linears.remove(0);
    let (q, k, v, o) = (take(), take(), take(), take());
    let (g, u, d) = (take(), take(), take());
    let eps = cfg.rms_norm_eps;
    DecoderLayer {
        input_layernorm: RmsNorm {
            weight: lw.input_layernorm,
            eps,
        },
        self_attn: Attention {
            q_proj: q,
            k_proj: k,
            v_proj: v,
            o_proj: o,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        },
        post_attention_layernorm: RmsNorm {
            weight: lw.post_attention_layernorm,
            eps,
        },
        mlp: Mlp {
            gate_proj: g,
            up_proj: u,
            down_proj: d,
        },
    }
}

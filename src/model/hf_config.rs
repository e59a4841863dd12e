//! A decoder's `config.json` as published for Llama 2, 3, 3.1, 3.2, Mistral, Qwen2/2.5,
//! Qwen3, Phi-3, Gemma 2 and Gemma 3 (text) and as transformers 5 writes it
//! (`rope_parameters` holding `rope_theta`/`rope_type`), plus PEFT's parameter count line.
//! What a family changes is read into [`Switches`] (see `family.rs`).
//!
//! Why one file: eleven families' spellings of the same fields (and transformers 5's) are read
//! into one struct; splitting by family would repeat the struct's reader in each.
use crate::model::family::{layer_types, Activation, Family, Switches};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// How the rotary frequencies are derived.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor` (transformers' `_compute_linear_scaling_rope_parameters`).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling (transformers' `_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: i64,
    },
    /// Phi-3's LongRoPE (transformers' `_compute_longrope_parameters`): per-frequency
    /// `short_factor`s, or `long_factor`s for a batch longer than
    /// `original_max_position_embeddings`; cos and sin scaled by `attention_factor`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: i64,
        attention_factor: f64,
    },
}

/// A bitsandbytes 4-bit `quantization_config`, when the checkpoint carries one.
#[derive(Clone, Debug, PartialEq)]
pub struct BnbQuantConfig {
    pub load_in_4bit: bool,
    pub quant_type: String,
    pub double_quant: bool,
    pub compute_dtype: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// The sliding layers' own rotary base and scaling (Gemma 3's local layers).
    pub local_rope: Option<(f64, RopeScaling)>,
    pub switches: Switches,
    pub tie_word_embeddings: bool,
    pub initializer_range: f64,
    pub bos_token_ids: Vec<i64>,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
    /// `torch_dtype` (transformers 4) or `dtype` (transformers 5), as written.
    pub dtype: Option<String>,
    pub quantization: Option<BnbQuantConfig>,
}

struct Reader<'a> {
    obj: &'a Map<String, Value>,
    origin: &'a str,
}

impl Reader<'_> {
    fn err(&self, key: &str, what: &str) -> anyhow::Error {
        anyhow!("{}: key `{key}` {what}", self.origin)
    }
    fn present(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    fn int(&self, key: &str) -> Result<i64> {
        let v = self
            .present(key)
            .ok_or_else(|| self.err(key, "is missing"))?;
        as_int(v).ok_or_else(|| self.err(key, &format!("is not an integer: {v}")))
    }
    fn opt_int(&self, key: &str) -> Result<Option<i64>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => as_int(v)
                .map(Some)
                .ok_or_else(|| self.err(key, &format!("is not an integer: {v}"))),
        }
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, &format!("is not a number: {v}"))),
        }
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, &format!("is not a boolean: {v}"))),
        }
    }
    fn opt_str(&self, key: &str) -> Result<Option<String>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| self.err(key, &format!("is not a string: {v}"))),
        }
    }
    /// An id that may be an integer or a list of integers (Llama 3's `eos_token_id`).
    fn ids(&self, key: &str) -> Result<Vec<i64>> {
        match self.present(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    as_int(v).ok_or_else(|| self.err(key, &format!("holds a non-integer: {v}")))
                })
                .collect(),
            Some(v) => as_int(v)
                .map(|i| vec![i])
                .ok_or_else(|| self.err(key, &format!("is not an integer or a list: {v}"))),
        }
    }
}

fn as_int(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        // Some tools write integral floats (`8192.0`).
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
            .map(|f| f as i64)
    })
}

fn positive(origin: &str, key: &str, v: i64) -> Result<i64> {
    if v <= 0 {
        bail!("{origin}: key `{key}` must be positive, got {v}");
    }
    Ok(v)
}

impl LlamaConfig {
    /// Reads `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses config.json text; `origin` names the file in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let value: Value =
            serde_json::from_str(text).with_context(|| format!("{origin}: malformed JSON"))?;
        let obj = value
            .as_object()
            .ok_or_else(|| anyhow!("{origin}: not a JSON object"))?;
        let r = Reader { obj, origin };

        let family = match r.opt_str("model_type")? {
            Some(mt) => Family::from_model_type(origin, &mt)?,
            None => Family::Llama,
        };
        let act_key = if family.is_gemma() && r.present("hidden_activation").is_some() {
            "hidden_activation"
        } else {
            "hidden_act"
        };
        let activation = match r.opt_str(act_key)? {
            Some(a) => Activation::parse(origin, act_key, &a)?,
            None if family.is_gemma() => Activation::GeluTanh,
            None => Activation::Silu,
        };
        if activation != Activation::Silu && !family.is_gemma() {
            bail!("{origin}: key `{act_key}` must be \"silu\" for model_type {family:?}");
        }
        for key in ["attention_bias", "mlp_bias"] {
            if r.opt_bool(key)? == Some(true) {
                bail!("{origin}: key `{key}` is true; biased projections are not supported");
            }
        }
        if let Some(tp) = r.opt_int("pretraining_tp")? {
            if tp != 1 {
                bail!("{origin}: key `pretraining_tp` is {tp}, only 1 is supported");
            }
        }
        // Training-time dropout inside the frozen model would make the reference's
        // training pass random; every published checkpoint sets these to 0.
        for key in ["attention_dropout", "resid_pdrop", "embd_pdrop"] {
            if let Some(p) = r.opt_f64(key)? {
                if p != 0.0 {
                    bail!("{origin}: key `{key}` is {p}; only 0 is supported");
                }
            }
        }
        if r.opt_bool("use_bidirectional_attention")? == Some(true) {
            bail!("{origin}: key `use_bidirectional_attention` is true; only causal attention is supported");
        }
        if let Some(f) = r.opt_f64("partial_rotary_factor")? {
            if f != 1.0 {
                bail!("{origin}: key `partial_rotary_factor` is {f}; only 1.0 is supported");
            }
        }

        let hidden_size = positive(origin, "hidden_size", r.int("hidden_size")?)?;
        let num_attention_heads =
            positive(origin, "num_attention_heads", r.int("num_attention_heads")?)?;
        let num_key_value_heads = match r.opt_int("num_key_value_heads")? {
            Some(v) => positive(origin, "num_key_value_heads", v)?,
            None => num_attention_heads,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            bail!(
                "{origin}: key `num_key_value_heads` ({num_key_value_heads}) must divide \
                 num_attention_heads ({num_attention_heads})"
            );
        }
        let head_dim = match r.opt_int("head_dim")?.or(family.default_head_dim()) {
            Some(v) => positive(origin, "head_dim", v)?,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    bail!(
                        "{origin}: key `hidden_size` ({hidden_size}) is not a multiple of \
                         num_attention_heads ({num_attention_heads}) and `head_dim` is absent"
                    );
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            bail!("{origin}: key `head_dim` must be even for rotary embeddings, got {head_dim}");
        }
        let max_position_embeddings = r.opt_int("max_position_embeddings")?.unwrap_or(2048);
        let num_hidden_layers = positive(origin, "num_hidden_layers", r.int("num_hidden_layers")?)?;
        let ((rope_theta, rope_scaling), local_rope) = if family == Family::Gemma3Text {
            let (global, local) = parse_gemma3_rope(&r, max_position_embeddings)?;
            (global, Some(local))
        } else {
            (parse_rope(&r, max_position_embeddings)?, None)
        };
        if let RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        } = &rope_scaling
        {
            for (key, f) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                if f.len() as i64 != head_dim / 2 {
                    bail!(
                        "{origin}: key `{key}` has {} factors; LongRoPE needs head_dim / 2 = {}",
                        f.len(),
                        head_dim / 2
                    );
                }
                if f.iter().any(|v| !v.is_finite() || *v <= 0.0) {
                    bail!("{origin}: key `{key}` must hold positive numbers");
                }
            }
        }
        let switches = parse_switches(&r, family, activation, head_dim, num_hidden_layers)?;

        let quantization = match r.present("quantization_config") {
            None => None,
            Some(v) => Some(parse_quant(v, origin)?),
        };
        let dtype = match r.opt_str("dtype")? {
            Some(d) => Some(d),
            None => r.opt_str("torch_dtype")?,
        };

        Ok(LlamaConfig {
            vocab_size: positive(origin, "vocab_size", r.int("vocab_size")?)?,
            hidden_size,
            intermediate_size: positive(origin, "intermediate_size", r.int("intermediate_size")?)?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps: r
                .opt_f64("rms_norm_eps")?
                .unwrap_or(family.default_rms_norm_eps()),
            rope_theta,
            rope_scaling,
            local_rope,
            switches,
            tie_word_embeddings: r.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            initializer_range: r.opt_f64("initializer_range")?.unwrap_or(0.02),
            bos_token_ids: r.ids("bos_token_id")?,
            eos_token_ids: r.ids("eos_token_id")?,
            pad_token_id: match r.obj.get("pad_token_id") {
                // Absent: the class default; present (null included): as written.
                None => family.default_pad_token_id(),
                Some(_) => r.ids("pad_token_id")?.first().copied(),
            },
            dtype,
            quantization,
        })
    }

    /// Parameters of the base model without `lm_head` (what a sequence classifier holds
    /// besides its score head).
    pub fn base_param_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let sw = &self.switches;
        let linears: u64 = self
            .linear_modules()
            .iter()
            .map(|(_, m)| {
                let (i, o) = self.linear_shape(m).expect("known projection");
                (i * o) as u64
            })
            .sum();
        let q = (self.num_attention_heads * self.head_dim) as u64;
        let kv = (self.num_key_value_heads * self.head_dim) as u64;
        let biases = if sw.qkv_bias { q + 2 * kv } else { 0 } + if sw.o_bias { h } else { 0 };
        let norms = if sw.sandwich_norms { 4 * h } else { 2 * h }
            + if sw.qk_norm {
                2 * self.head_dim as u64
            } else {
                0
            };
        let per_layer = linears + biases + norms;
        self.vocab_size as u64 * h + self.num_hidden_layers as u64 * per_layer + h
    }

    /// The frozen projections of one layer as (module, name), in the checkpoint's order.
    pub fn linear_modules(&self) -> &'static [(&'static str, &'static str)] {
        if self.switches.fused_projections {
            &FUSED_LINEARS
        } else {
            &SEPARATE_LINEARS
        }
    }

    /// (in_features, out_features) of a projection named like a PEFT target module; `None`
    /// for a name this family's layers lack.
    pub fn linear_shape(&self, module: &str) -> Option<(i64, i64)> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let i = self.intermediate_size;
        let fused = self.switches.fused_projections;
        Some(match module {
            "q_proj" if !fused => (h, q),
            "k_proj" | "v_proj" if !fused => (h, kv),
            "qkv_proj" if fused => (h, q + 2 * kv),
            "o_proj" => (q, h),
            "gate_proj" | "up_proj" if !fused => (h, i),
            "gate_up_proj" if fused => (h, 2 * i),
            "down_proj" => (i, h),
            _ => return None,
        })
    }
}

/// Llama's projections, and Phi-3's with q/k/v and gate/up fused.
pub const SEPARATE_LINEARS: [(&str, &str); 7] = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
];
pub const FUSED_LINEARS: [(&str, &str); 4] = [
    ("self_attn", "qkv_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_up_proj"),
    ("mlp", "down_proj"),
];

/// transformers' precedence: a non-empty `rope_scaling` replaces `rope_parameters`; `rope_theta`
/// inside the dict wins over the top-level key; `type` is the old spelling of `rope_type`.
fn parse_rope(r: &Reader, max_pos: i64) -> Result<(f64, RopeScaling)> {
    let origin = r.origin;
    let dict_key = match r.present("rope_scaling") {
        Some(Value::Object(m)) if !m.is_empty() => Some("rope_scaling"),
        Some(Value::Object(_)) | None => match r.present("rope_parameters") {
            Some(Value::Object(_)) => Some("rope_parameters"),
            Some(v) => bail!("{origin}: key `rope_parameters` is not an object: {v}"),
            None => None,
        },
        Some(v) => bail!("{origin}: key `rope_scaling` is not an object: {v}"),
    };
    let top_theta = r.opt_f64("rope_theta")?;
    let Some(key) = dict_key else {
        return Ok((top_theta.unwrap_or(10_000.0), RopeScaling::Default));
    };
    let obj = r.obj[key].as_object().expect("checked above");
    let sub_origin = format!("{origin} ({key})");
    // Phi-3's files keep `original_max_position_embeddings` at the top level.
    let top_original = r.opt_int("original_max_position_embeddings")?;
    rope_dict(
        obj,
        &sub_origin,
        top_theta.unwrap_or(10_000.0),
        max_pos,
        top_original,
    )
}

/// Gemma 3's two rotary settings, (global, local): transformers 5 writes `rope_parameters`
/// nested by layer type; older files have `rope_theta` (global, default 1e6),
/// `rope_local_base_freq` (local, default 1e4) and a `rope_scaling` for the global layers.
fn parse_gemma3_rope(r: &Reader, max_pos: i64) -> Result<((f64, RopeScaling), (f64, RopeScaling))> {
    let origin = r.origin;
    let nested = match r.present("rope_parameters") {
        Some(Value::Object(m))
            if m.contains_key("full_attention") || m.contains_key("sliding_attention") =>
        {
            Some(m)
        }
        _ => None,
    };
    let scaling = match r.present("rope_scaling") {
        Some(Value::Object(m)) if !m.is_empty() => Some(m),
        _ => None,
    };
    let global_theta = r.opt_f64("rope_theta")?.unwrap_or(1_000_000.0);
    let local_theta = r.opt_f64("rope_local_base_freq")?.unwrap_or(10_000.0);
    let empty = Map::new();
    let part = |layer: &str, theta: f64| -> Result<(f64, RopeScaling)> {
        let sub_origin = format!("{origin} (rope_parameters.{layer})");
        match nested.and_then(|m| m.get(layer)).filter(|v| !v.is_null()) {
            Some(Value::Object(d)) => rope_dict(d, &sub_origin, theta, max_pos, None),
            Some(v) => bail!("{sub_origin}: not an object: {v}"),
            None if layer == "full_attention" && scaling.is_some() => rope_dict(
                scaling.expect("checked"),
                &format!("{origin} (rope_scaling)"),
                theta,
                max_pos,
                None,
            ),
            None => rope_dict(&empty, &sub_origin, theta, max_pos, None),
        }
    };
    Ok((
        part("full_attention", global_theta)?,
        part("sliding_attention", local_theta)?,
    ))
}

/// One rotary dict (`rope_type`, `rope_theta`, the type's own keys); `top_original`: the
/// config's top-level `original_max_position_embeddings`, if any.
fn rope_dict(
    obj: &Map<String, Value>,
    sub_origin: &str,
    default_theta: f64,
    max_pos: i64,
    top_original: Option<i64>,
) -> Result<(f64, RopeScaling)> {
    let d = Reader {
        obj,
        origin: sub_origin,
    };
    let theta = d.opt_f64("rope_theta")?.unwrap_or(default_theta);
    let rope_type = match d.opt_str("rope_type")? {
        Some(t) => t,
        None => d.opt_str("type")?.unwrap_or_else(|| "default".into()),
    };
    let need = |k: &str| -> Result<f64> {
        d.opt_f64(k)?
            .ok_or_else(|| anyhow!("{sub_origin}: key `{k}` is missing for rope_type {rope_type}"))
    };
    if let Some(f) = d.opt_f64("partial_rotary_factor")? {
        if f != 1.0 {
            bail!("{sub_origin}: key `partial_rotary_factor` is {f}; only 1.0 is supported");
        }
    }
    let scaling = match rope_type.as_str() {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: d
                .opt_int("original_max_position_embeddings")?
                .unwrap_or(max_pos),
        },
        "longrope" => {
            let factors = |k: &str| -> Result<Vec<f64>> {
                match d.present(k) {
                    Some(Value::Array(v)) => v
                        .iter()
                        .map(|x| {
                            x.as_f64().ok_or_else(|| {
                                anyhow!("{sub_origin}: key `{k}` holds {x}, not a number")
                            })
                        })
                        .collect(),
                    Some(v) => bail!("{sub_origin}: key `{k}` is not a list of numbers: {v}"),
                    None => bail!("{sub_origin}: key `{k}` is missing for rope_type longrope"),
                }
            };
            let original = match d.opt_int("original_max_position_embeddings")?.or(top_original) {
                Some(o) if o > 1 => o,
                Some(o) => bail!(
                    "{sub_origin}: key `original_max_position_embeddings` must be above 1, got {o}"
                ),
                None => bail!(
                    "{sub_origin}: key `original_max_position_embeddings` is missing for rope_type longrope"
                ),
            };
            // As transformers: the ratio of the context lengths unless `factor` is given, and
            // the paper's attention factor unless `attention_factor` is.
            let factor = d
                .opt_f64("factor")?
                .unwrap_or(max_pos as f64 / original as f64);
            let attention_factor = match d.opt_f64("attention_factor")? {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
            };
            RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            }
        }
        other => {
            bail!(
                "{sub_origin}: key `rope_type` {other:?} is not supported (default, linear, llama3, longrope)"
            )
        }
    };
    if theta <= 0.0 {
        bail!("{sub_origin}: key `rope_theta` must be positive, got {theta}");
    }
    Ok((theta, scaling))
}

/// The family's differences from Llama, with transformers' class defaults for absent keys.
fn parse_switches(
    r: &Reader,
    family: Family,
    activation: Activation,
    head_dim: i64,
    num_layers: i64,
) -> Result<Switches> {
    let origin = r.origin;
    let gemma = family.is_gemma();
    let window_key = r.opt_int("sliding_window")?;
    let sliding_window = match family {
        Family::Llama => None,
        Family::Mistral => match r.obj.get("sliding_window") {
            None => Some(4096),
            Some(_) => window_key,
        },
        Family::Qwen2 | Family::Qwen3 => {
            if r.opt_bool("use_sliding_window")?.unwrap_or(false) {
                Some(window_key.unwrap_or(4096))
            } else {
                None
            }
        }
        Family::Phi3 => window_key,
        Family::Gemma2 | Family::Gemma3Text => Some(window_key.unwrap_or(4096)),
    };
    if let Some(w) = sliding_window {
        positive(origin, "sliding_window", w)?;
    }
    let given_types = match r.present("layer_types") {
        None => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        anyhow!("{origin}: key `layer_types` holds a non-string: {v}")
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        Some(v) => bail!("{origin}: key `layer_types` is not a list: {v}"),
    };
    let sliding = layer_types(
        origin,
        family,
        given_types,
        num_layers,
        sliding_window,
        r.opt_int("max_window_layers")?.unwrap_or(28),
        positive(
            origin,
            "sliding_window_pattern",
            r.opt_int("sliding_window_pattern")?.unwrap_or(6),
        )?,
    )?;
    let layer_windows = sliding
        .iter()
        .map(|&s| if s { sliding_window } else { None })
        .collect();
    let attn_scale = if gemma {
        let s = r.opt_f64("query_pre_attn_scalar")?.unwrap_or(256.0);
        if s <= 0.0 {
            bail!("{origin}: key `query_pre_attn_scalar` must be positive, got {s}");
        }
        s.powf(-0.5)
    } else {
        (head_dim as f64).powf(-0.5)
    };
    let attn_softcap = match family {
        Family::Gemma2 => match r.obj.get("attn_logit_softcapping") {
            None => Some(50.0),
            Some(_) => r.opt_f64("attn_logit_softcapping")?,
        },
        Family::Gemma3Text => r.opt_f64("attn_logit_softcapping")?,
        _ => None,
    };
    if let Some(c) = attn_softcap {
        if c <= 0.0 {
            bail!("{origin}: key `attn_logit_softcapping` must be positive, got {c}");
        }
    }
    Ok(Switches {
        family,
        qkv_bias: family == Family::Qwen2,
        o_bias: false,
        qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3Text),
        gemma_norm: gemma,
        embed_scale: gemma,
        sandwich_norms: gemma,
        activation,
        fused_projections: family == Family::Phi3,
        attn_scale,
        attn_softcap,
        layer_windows,
    })
}

fn parse_quant(v: &Value, origin: &str) -> Result<BnbQuantConfig> {
    let obj = v
        .as_object()
        .ok_or_else(|| anyhow!("{origin}: key `quantization_config` is not an object"))?;
    let sub = format!("{origin} (quantization_config)");
    let r = Reader { obj, origin: &sub };
    if let Some(m) = r.opt_str("quant_method")? {
        if m != "bitsandbytes" {
            bail!("{sub}: key `quant_method` is {m:?}, only bitsandbytes 4-bit is supported");
        }
    }
    let load_in_4bit = r.opt_bool("load_in_4bit")?.unwrap_or(false);
    if !load_in_4bit {
        bail!("{sub}: key `load_in_4bit` is not true; only bitsandbytes 4-bit checkpoints are supported");
    }
    let quant_type = r
        .opt_str("bnb_4bit_quant_type")?
        .unwrap_or_else(|| "fp4".into());
    if quant_type != "nf4" {
        bail!("{sub}: key `bnb_4bit_quant_type` is {quant_type:?}, only nf4 is supported");
    }
    Ok(BnbQuantConfig {
        load_in_4bit,
        quant_type,
        double_quant: r.opt_bool("bnb_4bit_use_double_quant")?.unwrap_or(false),
        compute_dtype: r.opt_str("bnb_4bit_compute_dtype")?,
    })
}

/// PEFT's `get_nb_trainable_parameters` for a 4-bit model (a `Params4bit` counts as its full
/// element count) with LoRA of rank `lora_r` on `target_modules` and the score head in
/// `modules_to_save` (PEFT counts the original head and its trainable copy).
pub fn peft_param_counts(
    cfg: &LlamaConfig,
    num_labels: i64,
    lora_r: i64,
    target_modules: &[String],
) -> (u64, u64) {
    let lora = crate::lora::LoraConfig {
        r: lora_r,
        alpha: 1.0,
        dropout: 0.0,
        target_modules: target_modules.to_vec(),
        use_rslora: false,
        layers: None,
        rank_pattern: Vec::new(),
        alpha_pattern: Vec::new(),
        use_dora: false,
        init: Default::default(),
    };
    peft_param_counts_for(cfg, num_labels, &lora)
}

/// [`peft_param_counts`] for any LoRA configuration (per-module ranks, a layer choice).
pub fn peft_param_counts_for(
    cfg: &LlamaConfig,
    num_labels: i64,
    lora: &crate::lora::LoraConfig,
) -> (u64, u64) {
    let mut adapted = 0u64;
    for layer in 0..cfg.num_hidden_layers as usize {
        for (parent, name) in cfg.linear_modules() {
            let key = format!("model.layers.{layer}.{parent}.{name}");
            if let (Some((r, _)), Some((i, o))) =
                (lora.for_module(layer, &key, name), cfg.linear_shape(name))
            {
                adapted += r as u64 * (i as u64 + o as u64);
                if lora.use_dora {
                    adapted += o as u64; // the magnitude
                }
            }
        }
    }
    let score = (cfg.hidden_size * num_labels) as u64;
    let trainable = adapted + score;
    let all = cfg.base_param_count() + adapted + 2 * score;
    (trainable, all)
}

/// PEFT's `print_trainable_parameters` line:
/// `trainable params: {t:,d} || all params: {a:,d} || trainable%: {100*t/a:.4f}`.
pub fn peft_param_line(trainable: u64, all: u64) -> String {
    let pct = if all == 0 {
        f64::NAN
    } else {
        100.0 * trainable as f64 / all as f64
    };
    format!(
        "trainable params: {} || all params: {} || trainable%: {pct:.4}",
        thousands(trainable),
        thousands(all)
    )
}

fn thousands(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
/// transformers' name of a float kind (`config.dtype`).
pub fn dtype_config_name(k: tch::Kind) -> &'static str {
    match k {
        tch::Kind::BFloat16 => "bfloat16",
        tch::Kind::Half => "float16",
        _ => "float32",
    }
}

/// `--dtype` → kind.
pub fn parse_dtype(s: &str) -> anyhow::Result<tch::Kind> {
    Ok(match s {
        "bfloat16" | "bf16" => tch::Kind::BFloat16,
        "float16" | "fp16" => tch::Kind::Half,
        "float32" | "fp32" => tch::Kind::Float,
        _ => anyhow::bail!("--dtype {s:?}: expected bfloat16, float16 or float32"),
    })
}

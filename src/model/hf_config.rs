//! The Llama `config.json` as published for Llama 2, 3, 3.1 and 3.2 and as transformers 5
//! writes it (`rope_parameters` holding `rope_theta`/`rope_type`), plus PEFT's parameter
//! count line.
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// How the rotary frequencies are derived.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Llama 3.1's frequency-dependent scaling (transformers' `_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: i64,
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

        if let Some(mt) = r.opt_str("model_type")? {
            if mt != "llama" {
                bail!("{origin}: key `model_type` is {mt:?}, only \"llama\" is supported");
            }
        }
        if let Some(act) = r.opt_str("hidden_act")? {
            if act != "silu" {
                bail!("{origin}: key `hidden_act` is {act:?}, only \"silu\" is supported");
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if r.opt_bool(key)? == Some(true) {
                bail!("{origin}: key `{key}` is true; biased Llama projections are not supported");
            }
        }
        if let Some(tp) = r.opt_int("pretraining_tp")? {
            if tp != 1 {
                bail!("{origin}: key `pretraining_tp` is {tp}, only 1 is supported");
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
        let head_dim = match r.opt_int("head_dim")? {
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
        let (rope_theta, rope_scaling) = parse_rope(&r, max_position_embeddings)?;

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
            num_hidden_layers: positive(origin, "num_hidden_layers", r.int("num_hidden_layers")?)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps: r.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: r.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            initializer_range: r.opt_f64("initializer_range")?.unwrap_or(0.02),
            bos_token_ids: r.ids("bos_token_id")?,
            eos_token_ids: r.ids("eos_token_id")?,
            pad_token_id: r.ids("pad_token_id")?.first().copied(),
            dtype,
            quantization,
        })
    }

    /// Parameters of the base model without `lm_head` (what a sequence classifier holds
    /// besides its score head).
    pub fn base_param_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let q = (self.num_attention_heads * self.head_dim) as u64;
        let kv = (self.num_key_value_heads * self.head_dim) as u64;
        let i = self.intermediate_size as u64;
        let per_layer = h * q * 2 + h * kv * 2 + 3 * h * i + 2 * h;
        self.vocab_size as u64 * h + self.num_hidden_layers as u64 * per_layer + h
    }

    /// (in_features, out_features) of a projection named like a PEFT target module.
    pub fn linear_shape(&self, module: &str) -> Option<(i64, i64)> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let i = self.intermediate_size;
        Some(match module {
            "q_proj" => (h, q),
            "k_proj" | "v_proj" => (h, kv),
            "o_proj" => (q, h),
            "gate_proj" | "up_proj" => (h, i),
            "down_proj" => (i, h),
            _ => return None,
        })
    }
}

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
    let d = Reader {
        obj,
        origin: &sub_origin,
    };
    let theta = d.opt_f64("rope_theta")?.or(top_theta).unwrap_or(10_000.0);
    let rope_type = match d.opt_str("rope_type")? {
        Some(t) => t,
        None => d.opt_str("type")?.unwrap_or_else(|| "default".into()),
    };
    let scaling = match rope_type.as_str() {
        "default" => RopeScaling::Default,
        "llama3" => {
            let need = |k: &str| -> Result<f64> {
                d.opt_f64(k)?.ok_or_else(|| {
                    anyhow!("{sub_origin}: key `{k}` is missing for rope_type llama3")
                })
            };
            RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: d
                    .opt_int("original_max_position_embeddings")?
                    .unwrap_or(max_pos),
            }
        }
        other => {
            bail!("{sub_origin}: key `rope_type` {other:?} is not supported (default, llama3)")
        }
    };
    if theta <= 0.0 {
        bail!("{sub_origin}: key `rope_theta` must be positive, got {theta}");
    }
    Ok((theta, scaling))
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
    let r = lora_r as u64;
    let per_layer: u64 = target_modules
        .iter()
        .filter_map(|m| cfg.linear_shape(m))
        .map(|(i, o)| r * (i as u64 + o as u64))
        .sum();
    let lora = per_layer * cfg.num_hidden_layers as u64;
    let score = (cfg.hidden_size * num_labels) as u64;
    let trainable = lora + score;
    let all = cfg.base_param_count() + lora + 2 * score;
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

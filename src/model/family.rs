//! The decoder families and how each differs from Llama. Everything family-specific is read
//! from config.json here, once, into [`Switches`]; the decoder (`llama.rs`, `backward.rs`) and
//! the loader only ever look at the switches, never at the family name.
use anyhow::{bail, Result};

/// A `model_type` we read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
    Gemma2,
    Gemma3Text,
}

impl Family {
    pub const ALL: [Family; 7] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Qwen3,
        Family::Phi3,
        Family::Gemma2,
        Family::Gemma3Text,
    ];

    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Phi3 => "phi3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3Text => "gemma3_text",
        }
    }

    /// transformers' sequence-classification class for the family (what a merged checkpoint's
    /// `architectures` names; Gemma 3's text-only model has its own).
    pub fn sequence_classifier(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForSequenceClassification",
            Family::Mistral => "MistralForSequenceClassification",
            Family::Qwen2 => "Qwen2ForSequenceClassification",
            Family::Qwen3 => "Qwen3ForSequenceClassification",
            Family::Phi3 => "Phi3ForSequenceClassification",
            Family::Gemma2 => "Gemma2ForSequenceClassification",
            Family::Gemma3Text => "Gemma3TextForSequenceClassification",
        }
    }

    pub fn from_model_type(origin: &str, model_type: &str) -> Result<Family> {
        match Family::ALL
            .into_iter()
            .find(|f| f.model_type() == model_type)
        {
            Some(f) => Ok(f),
            None => {
                let known: Vec<&str> = Family::ALL.iter().map(|f| f.model_type()).collect();
                bail!(
                    "{origin}: key `model_type` is {model_type:?}, which is not supported \
                     (supported: {})",
                    known.join(", ")
                )
            }
        }
    }

    /// PEFT's default LoRA `target_modules` for the family
    /// (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
    pub fn peft_default_targets(self) -> &'static [&'static str] {
        match self {
            Family::Phi3 => &["qkv_proj"],
            _ => &["q_proj", "v_proj"],
        }
    }

    /// PEFT's `target_modules="all-linear"` for the family's sequence classifier: every
    /// linear layer of the decoder, never the `score` head (peft#2027).
    pub fn all_linear_targets(self) -> &'static [&'static str] {
        match self {
            Family::Phi3 => &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
            _ => &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        }
    }

    /// Gemma's decoder: `(1 + w)` norms in fp32, √hidden embedding scale, GeGLU (tanh),
    /// norms after attention and after the MLP as well as before them.
    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3Text)
    }

    /// transformers' class defaults of the keys config.json may omit.
    pub fn default_pad_token_id(self) -> Option<i64> {
        match self {
            Family::Phi3 => Some(32000),
            Family::Gemma2 | Family::Gemma3Text => Some(0),
            _ => None,
        }
    }

    /// `head_dim` when config.json lacks it: Qwen3 and Gemma fix it, the others derive it.
    pub fn default_head_dim(self) -> Option<i64> {
        match self {
            Family::Qwen3 => Some(128),
            Family::Gemma2 | Family::Gemma3Text => Some(256),
            _ => None,
        }
    }

    pub fn default_rms_norm_eps(self) -> f64 {
        match self {
            Family::Phi3 => 1e-5,
            _ => 1e-6,
        }
    }
}

/// The MLP's activation (`hidden_act`, Gemma's `hidden_activation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU's `silu`.
    Silu,
    /// `gelu_pytorch_tanh`: GELU with the tanh approximation.
    GeluTanh,
}

impl Activation {
    pub fn parse(origin: &str, key: &str, name: &str) -> Result<Activation> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" => Activation::GeluTanh,
            other => {
                bail!("{origin}: key `{key}` is {other:?}; supported: silu, gelu_pytorch_tanh")
            }
        })
    }
}

/// Where a family's decoder differs from Llama's, as config.json sets it.
#[derive(Clone, Debug, PartialEq)]
pub struct Switches {
    pub family: Family,
    /// Biases on q/k/v (Qwen2; `attention_bias` elsewhere) and on o (`attention_bias`).
    pub qkv_bias: bool,
    pub o_bias: bool,
    /// RMSNorm over each query and key head before the rotary embedding (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Gemma's norm: `x·r·(1 + w)` in fp32, cast after.
    pub gemma_norm: bool,
    /// Embeddings times √hidden, the factor rounded to the compute dtype (Gemma).
    pub embed_scale: bool,
    /// Norms on the attention's and the MLP's outputs too (Gemma).
    pub sandwich_norms: bool,
    pub activation: Activation,
    /// Phi-3's `qkv_proj` and `gate_up_proj` instead of q/k/v and gate/up.
    pub fused_projections: bool,
    /// Scale of the attention logits: `head_dim^-½`, Gemma's `query_pre_attn_scalar^-½`.
    pub attn_scale: f64,
    /// `attn_logit_softcapping` (Gemma 2): logits → `c·tanh(logits/c)` before the mask.
    pub attn_softcap: Option<f64>,
    /// Per layer: the sliding window (keys within `window` positions of the query), if any.
    pub layer_windows: Vec<Option<i64>>,
}

impl Switches {
    /// The distinct windows of sliding layers.
    pub fn windows(&self) -> Vec<i64> {
        let mut w: Vec<i64> = self.layer_windows.iter().flatten().copied().collect();
        w.sort_unstable();
        w.dedup();
        w
    }
}

/// Per layer `sliding_attention` / `full_attention` from `layer_types`, or transformers'
/// default for the family when config.json lacks it.
pub fn layer_types(
    origin: &str,
    family: Family,
    given: Option<Vec<String>>,
    num_layers: i64,
    sliding_window: Option<i64>,
    max_window_layers: i64,
    sliding_window_pattern: i64,
) -> Result<Vec<bool>> {
    let honoured = matches!(
        family,
        Family::Qwen2 | Family::Qwen3 | Family::Gemma2 | Family::Gemma3Text
    );
    if let Some(types) = given.filter(|_| honoured) {
        if types.len() as i64 != num_layers {
            bail!(
                "{origin}: key `layer_types` has {} entries for {num_layers} layers",
                types.len()
            );
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                "sliding_attention" => Ok(true),
                "full_attention" => Ok(false),
                other => bail!(
                    "{origin}: key `layer_types` holds {other:?}; supported: \
                     sliding_attention, full_attention"
                ),
            })
            .collect();
    }
    Ok((0..num_layers)
        .map(|i| match family {
            Family::Llama => false,
            // Every layer slides when a window is set.
            Family::Mistral | Family::Phi3 => sliding_window.is_some(),
            Family::Qwen2 | Family::Qwen3 => sliding_window.is_some() && i >= max_window_layers,
            Family::Gemma2 => (i + 1) % 2 != 0,
            Family::Gemma3Text => (i + 1) % sliding_window_pattern != 0,
        })
        .collect())
}

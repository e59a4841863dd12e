//! One `Config`, read from a YAML file, overridden by command-line flags of the same names,
//! validated once. Keys carry the reference script's argparse names (`model_dir`, `r`,
//! `lora_alpha`, `bnb_4bit_compute_dtype`, ...), so its users feel at home.
//!
//! Why one file: each key's field, default and check sit side by side, so a new key is added
//! in one place; the keys and their docs are most of the length (tests are a tenth of it).
use crate::data::long_text::{Aggregate, LongText, Mode, Side};
use crate::lora::LORA_TARGETS;

/// PEFT's `target_modules: all-linear`.
pub const ALL_LINEAR: &str = "all-linear";
use crate::model::family::Family;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Hugging Face model folder (config.json + safetensors).
    pub model_dir: Option<PathBuf>,
    /// Folder with tokenizer.json (defaults to model_dir).
    pub tokenizer_dir: Option<PathBuf>,
    /// Folder with the data in any supported layout (parquet, GLUE TSV, MSR txt, CSV, JSONL).
    pub data_dir: Option<PathBuf>,
    /// The run folder.
    pub results_path: PathBuf,
    /// A GLUE task by name (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli) or `custom`.
    pub task: String,
    pub num_classes: i64,
    /// `custom`: the one or two columns holding the texts.
    pub text_columns: Vec<String>,
    /// `custom`: the column holding the label.
    pub label_column: String,
    /// `custom`: label names in id order (default: the distinct values, sorted).
    pub labels: Option<Vec<String>>,
    /// The text fed to the model, with `{prompt}` and `{column}` placeholders.
    pub template: Option<String>,
    /// `single_label_classification`, `multi_label_classification` or `regression`
    /// (default: inferred from the labels, as transformers infers it).
    pub problem_type: Option<String>,
    /// `balanced` or one weight per label (cross-entropy `weight`, multi-label `pos_weight`).
    pub class_weights: Option<ClassWeights>,
    /// The metric that picks `best_adapter` (default: the task's first).
    pub metric_for_best_model: Option<String>,
    // LoRA (PEFT's LoraConfig)
    pub r: i64,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// A list of module names, or `all-linear` (PEFT's: every projection of the decoder).
    #[serde(deserialize_with = "one_or_many")]
    pub target_modules: Vec<String>,
    /// PEFT's `use_rslora`: LoRA scaled by `lora_alpha / √r` instead of `lora_alpha / r`.
    pub use_rslora: bool,
    /// PEFT's `layers_to_transform`: the decoder layers adapted (null: every layer).
    pub layers_to_transform: Option<Vec<i64>>,
    /// PEFT's `rank_pattern` / `alpha_pattern`: module-name patterns (a module whose name ends
    /// with the pattern, a regular expression) with their own r / lora_alpha.
    pub rank_pattern: BTreeMap<String, i64>,
    pub alpha_pattern: BTreeMap<String, f64>,
    /// PEFT's `use_dora`: DoRA (a trained magnitude per output row of each adapted weight).
    pub use_dora: bool,
    /// PEFT's `init_lora_weights`: `true`, `false`, `gaussian`, `pissa`, `pissa_niter_N` or
    /// `loftq` (with `loftq_iter`, PEFT's `LoftQConfig(loftq_bits=4, loftq_iter)`).
    #[serde(deserialize_with = "bool_or_string")]
    pub init_lora_weights: String,
    pub loftq_iter: i64,
    // Quantization (bitsandbytes' BitsAndBytesConfig)
    pub load_in_4bit: bool,
    pub bnb_4bit_use_double_quant: bool,
    pub bnb_4bit_quant_type: String,
    pub bnb_4bit_compute_dtype: String,
    pub bnb_4bit_blocksize: i64,
    // Data
    pub prompt: String,
    pub max_length: Option<usize>,
    /// transformers' `truncation_side`: the end `long_text: truncate` cuts (`right`, `left`).
    pub truncation_side: String,
    /// A text over `max_length`: `truncate`, `head_tail` (the prompt part, the first
    /// `head_tokens` and the last tokens) or `chunk` (windows of `max_length` overlapping by
    /// `chunk_stride` tokens, each led by the prompt part; trained on with the document's
    /// label and combined by `chunk_aggregate` in eval, predict and serve).
    pub long_text: String,
    pub chunk_stride: usize,
    /// `task: preference`: TRL's `center_rewards_coefficient` (adds c · mean((r_c + r_r)²)).
    pub center_rewards_coefficient: Option<f64>,
    /// `mean_logits` or `max_prob` (the window the model is surest of).
    pub chunk_aggregate: String,
    /// `head_tail`: body tokens kept from the start (null: a quarter of the room).
    pub head_tokens: Option<usize>,
    pub bucket_by_length: bool,
    pub train_splits: String,
    pub eval_split: String,
    // Optimisation
    pub batch_size: usize,
    /// Micro-steps per optimizer step: each rank runs `batch_size / (ranks × steps)` examples
    /// at a time and the gradient is still the whole batch's.
    pub gradient_accumulation_steps: usize,
    pub eval_batch_size: usize,
    pub seed: u64,
    pub lr: f64,
    pub epochs: usize,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub optimizer: String,
    pub max_grad_norm: Option<f64>,
    pub gradient_checkpointing: Checkpointing,
    /// Memory `gradient_checkpointing: auto` may plan for: bytes, or a size such as `20GiB`
    /// / `16GB`; null: what the device has (free device memory, or available RAM, plus
    /// what this process already holds).
    pub max_memory: Option<MemorySize>,
    /// Stop after this many optimizer steps (for smoke runs); null = all epochs.
    pub max_steps: Option<usize>,
    pub eval_before_training: bool,
    /// Also evaluate every N optimizer steps (null: at each epoch's end only).
    pub eval_steps: Option<usize>,
    /// transformers' `EarlyStoppingCallback`: stop after this many evaluations in a row that
    /// did not improve `metric_for_best_model` by more than `early_stopping_threshold` over
    /// the best so far (null: never stop early).
    pub early_stopping_patience: Option<usize>,
    pub early_stopping_threshold: f64,
    /// `temperature`: fit one temperature on the first evaluation split's logits at every
    /// evaluation and save it beside the adapter (`calibration.json`); `none`.
    pub calibrate: String,
    /// `tune` (pick on the first evaluation split the cut on p₁ maximising the main metric,
    /// per label the one maximising its F1 for multi-label) or a fixed number in (0, 1);
    /// saved beside the adapter (`threshold.json`). null: argmax / 0.5.
    pub threshold: Option<ThresholdSetting>,
    // Checkpoints
    /// Save a checkpoint every N optimizer steps (0: only at the end of each epoch).
    pub checkpoint_every: usize,
    /// How many checkpoints to keep (the newest).
    pub keep_checkpoints: usize,
    /// `auto` (the run folder's newest checkpoint, or a fresh start), a checkpoint folder, or null.
    pub resume: Option<String>,
    /// What a non-finite loss or gradient does: `stop` (with the step and examples named) or `skip` the step.
    pub on_nonfinite: String,
    // Runtime
    pub device: String,
    /// `auto` (custom kernels, each checked against its torch twin on first use), `custom`
    /// or `torch` (libtorch-op twins only); see `kernel_choice`.
    pub kernels: String,
    /// Seconds a collective may wait for the other ranks before the run stops, naming the lost rank.
    pub dist_timeout_s: u64,
    pub log_every: usize,
    /// Time each training step's parts (`profile.json` in the run folder; synchronises a GPU).
    pub profile: bool,
}

/// `gradient_checkpointing`: `auto` keeps each layer's activations when the estimated peak
/// fits `max_memory`, else recomputes as few layers in the backward as make it fit (all of
/// them as the last resort); `true` always recomputes every layer (the reference's
/// setting), `false` always keeps; a number `n` recomputes the first `n` decoder layers and
/// keeps the rest (torchtune's selective checkpointing by layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpointing {
    Auto,
    Recompute,
    Keep,
    Layers(usize),
}

impl Serialize for Checkpointing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Checkpointing::Auto => s.serialize_str("auto"),
            Checkpointing::Recompute => s.serialize_bool(true),
            Checkpointing::Keep => s.serialize_bool(false),
            Checkpointing::Layers(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Checkpointing {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Bool(true) => Ok(Checkpointing::Recompute),
            Value::Bool(false) => Ok(Checkpointing::Keep),
            Value::String(s) if s == "auto" => Ok(Checkpointing::Auto),
            Value::String(s) if s == "true" => Ok(Checkpointing::Recompute),
            Value::String(s) if s == "false" => Ok(Checkpointing::Keep),
            Value::Number(n) if n.is_u64() => Ok(Checkpointing::Layers(
                n.as_u64().map_or(usize::MAX, |k| k as usize),
            )),
            other => Err(serde::de::Error::custom(format!(
                "expected auto, true, false or a number of layers to recompute, got {other:?}"
            ))),
        }
    }
}

/// `max_memory`: a byte count, written as a number or with a unit (`20GiB`, `16GB`, `512MiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySize(pub u64);

impl MemorySize {
    /// `units::parse_size`'s units (`--max_shard_size` takes the same spellings).
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        crate::units::parse_size(text)
            .map(MemorySize)
            .map_err(|e| format!("{e:#}"))
    }
}

impl Serialize for MemorySize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for MemorySize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = match Value::deserialize(d)? {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s,
            other => {
                return Err(serde::de::Error::custom(format!(
                    "expected a size such as 20GiB, got {other:?}"
                )))
            }
        };
        MemorySize::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// `threshold`: `tune` or a fixed cut in (0, 1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ThresholdSetting {
    Fixed(f64),
    Named(String),
}

/// `class_weights`: `balanced` (n / (K · count), sklearn's) or one weight per label.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ClassWeights {
    Named(String),
    List(Vec<f64>),
}

impl Default for Config {
    fn default() -> Self {
        Config {
            model_dir: None,
            tokenizer_dir: None,
            data_dir: None,
            results_path: PathBuf::from("runs/run"),
            task: "mrpc".into(),
            num_classes: 2,
            text_columns: Vec::new(),
            label_column: "label".into(),
            labels: None,
            template: None,
            problem_type: None,
            class_weights: None,
            metric_for_best_model: None,
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.1,
            use_rslora: false,
            layers_to_transform: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            use_dora: false,
            init_lora_weights: "true".into(),
            loftq_iter: 1,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            load_in_4bit: true,
            bnb_4bit_use_double_quant: true,
            bnb_4bit_quant_type: "nf4".into(),
            bnb_4bit_compute_dtype: "auto".into(),
            bnb_4bit_blocksize: 64,
            prompt: "perfect".into(),
            max_length: None,
            truncation_side: "right".into(),
            long_text: "truncate".into(),
            chunk_stride: 0,
            chunk_aggregate: "mean_logits".into(),
            center_rewards_coefficient: None,
            head_tokens: None,
            bucket_by_length: false,
            train_splits: "train".into(),
            eval_split: "validation".into(),
            batch_size: 8,
            gradient_accumulation_steps: 1,
            eval_batch_size: 8,
            seed: 42,
            lr: 3e-4,
            epochs: 10,
            warmup_ratio: 0.06,
            weight_decay: 0.01,
            optimizer: "adamw8bit".into(),
            max_grad_norm: None,
            gradient_checkpointing: Checkpointing::Auto,
            max_memory: None,
            max_steps: None,
            eval_before_training: true,
            eval_steps: None,
            early_stopping_patience: None,
            early_stopping_threshold: 0.0,
            calibrate: "none".into(),
            threshold: None,
            checkpoint_every: 0,
            keep_checkpoints: 2,
            resume: None,
            on_nonfinite: "stop".into(),
            device: "auto".into(),
            kernels: "auto".into(),
            dist_timeout_s: 300,
            log_every: 10,
            profile: false,
        }
    }
}

/// A list, or one string standing for a one-element list (`target_modules: all-linear`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// `true` / `false` as YAML booleans or any string (`init_lora_weights`), kept as a string.
fn bool_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum BoolOrString {
        Bool(bool),
        Str(String),
    }
    Ok(match BoolOrString::deserialize(d)? {
        BoolOrString::Bool(b) => b.to_string(),
        BoolOrString::Str(s) => s,
    })
}

/// Every key a YAML file or a flag may set.
pub fn keys() -> Vec<String> {
    match serde_yaml::to_value(Config::default()) {
        Ok(Value::Mapping(m)) => m
            .keys()
            .filter_map(|k| k.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

fn hint(word: &str, candidates: &[String]) -> String {
    match crate::suggest::nearest(word, candidates.iter().map(String::as_str)) {
        Some(n) => format!(" (did you mean `{n}`?)"),
        None => String::new(),
    }
}

/// Where each key's value came from, for error messages.
#[derive(Debug, Clone, Default)]
pub struct Origins(BTreeMap<String, String>);

impl Origins {
    /// Whether the file or a flag set `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    pub fn of(&self, key: &str) -> String {
        self.0
            .get(key)
            .cloned()
            .unwrap_or_else(|| "the built-in defaults".into())
    }
}

/// A command-line override: `--batch_size 16`, `--batch-size=16`.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub key: String,
    pub value: String,
}

/// Splits `--key value` / `--key=value` flags; a flag with no value (or followed by another
/// flag) means `true`.
pub fn parse_flags(args: &[String]) -> Result<Vec<Override>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let Some(stripped) = a.strip_prefix("--") else {
            bail!("unexpected argument `{a}`: configuration flags look like `--key value`");
        };
        let (key, value) = match stripped.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => {
                let next = args.get(i + 1);
                match next {
                    Some(n) if !n.starts_with("--") => {
                        i += 1;
                        (stripped.to_string(), n.clone())
                    }
                    _ => (stripped.to_string(), "true".to_string()),
                }
            }
        };
        out.push(Override {
            key: key.replace('-', "_"),
            value,
        });
        i += 1;
    }
    Ok(out)
}

fn yaml_scalar(key: &str, text: &str) -> Value {
    // Paths and prompts stay strings even when they look like numbers or booleans.
    match key {
        "prompt"
        | "model_dir"
        | "tokenizer_dir"
        | "data_dir"
        | "results_path"
        | "task"
        | "resume"
        | "template"
        | "label_column"
        | "problem_type"
        | "metric_for_best_model" => Value::String(text.to_string()),
        "class_weights" if text.contains(',') => {
            serde_yaml::from_str::<Value>(&format!("[{text}]"))
                .unwrap_or_else(|_| Value::String(text.into()))
        }
        "target_modules" | "text_columns" | "labels" => Value::Sequence(
            text.split(',')
                .map(|s| Value::String(s.trim().to_string()))
                .filter(|v| v.as_str() != Some(""))
                .collect(),
        ),
        _ => serde_yaml::from_str::<Value>(text).unwrap_or_else(|_| Value::String(text.into())),
    }
}

impl Config {
    /// Reads `file` (if any), applies `overrides`, validates. Errors name the file or flag
    /// and the key.
    pub fn load(file: Option<&Path>, overrides: &[Override]) -> Result<(Config, Origins)> {
        let known = keys();
        let mut merged = match serde_yaml::to_value(Config::default())? {
            Value::Mapping(m) => m,
            _ => Mapping::new(),
        };
        let mut origins = Origins::default();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            let doc: Value = serde_yaml::from_str(&text)
                .with_context(|| format!("{}: not valid YAML", path.display()))?;
            let map = match doc {
                Value::Mapping(m) => m,
                Value::Null => Mapping::new(),
                _ => bail!("{}: expected a mapping of `key: value`", path.display()),
            };
            let base = path.parent().unwrap_or(Path::new("."));
            for (k, v) in map {
                let key = k
                    .as_str()
                    .with_context(|| format!("{}: key {k:?} is not a string", path.display()))?
                    .to_string();
                if !known.contains(&key) {
                    bail!(
                        "{}: unknown key `{key}`{}",
                        path.display(),
                        hint(&key, &known)
                    );
                }
                // Relative paths in a config file are relative to the working directory,
                // as the reference script's flags are; `base` is only used for messages.
                let _ = base;
                origins.0.insert(key.clone(), path.display().to_string());
                merged.insert(Value::String(key), v);
            }
        }
        for o in overrides {
            if !known.contains(&o.key) {
                bail!(
                    "unknown flag `--{}`{}",
                    o.key,
                    hint(&o.key, &known).replace('`', "`--")
                );
            }
            origins
                .0
                .insert(o.key.clone(), format!("the command line (--{})", o.key));
            merged.insert(Value::String(o.key.clone()), yaml_scalar(&o.key, &o.value));
        }
        let mut cfg: Config = match serde_yaml::from_value(Value::Mapping(merged.clone())) {
            Ok(c) => c,
            Err(e) => {
                // Find the key that does not parse, to name it.
                let defaults = match serde_yaml::to_value(Config::default())? {
                    Value::Mapping(m) => m,
                    _ => Mapping::new(),
                };
                for (k, v) in &merged {
                    let mut one = defaults.clone();
                    one.insert(k.clone(), v.clone());
                    if let Err(e1) = serde_yaml::from_value::<Config>(Value::Mapping(one)) {
                        let key = k.as_str().unwrap_or("?");
                        bail!("{}: key `{key}`: {e1}", origins.of(key));
                    }
                }
                bail!("invalid configuration: {e}");
            }
        };
        let family = cfg.model_dir.as_deref().and_then(model_family);
        if !origins.contains("target_modules") {
            if let Some(family) = family {
                cfg.target_modules = family
                    .peft_default_targets()
                    .iter()
                    .map(|t| t.to_string())
                    .collect();
            }
        }
        // PEFT's `all-linear`, resolved for the model's family as PEFT resolves it (and as
        // its saved adapter_config.json then lists the modules).
        if cfg.target_modules == [ALL_LINEAR] {
            if let Some(family) = family {
                cfg.target_modules = family
                    .all_linear_targets()
                    .iter()
                    .map(|t| t.to_string())
                    .collect();
            }
        }
        cfg.validate(&origins)?;
        Ok((cfg, origins))
    }

    /// `max_length`, `truncation_side`, `long_text`, `chunk_stride`, `head_tokens`.
    pub fn long_text_settings(&self) -> Result<LongText> {
        Ok(LongText {
            max_length: self.max_length,
            side: Side::parse(&self.truncation_side).context("key `truncation_side`")?,
            mode: Mode::parse(&self.long_text).context("key `long_text`")?,
            stride: self.chunk_stride,
            head_tokens: self.head_tokens,
        })
    }

    pub fn chunk_aggregate(&self) -> Result<Aggregate> {
        Aggregate::parse(&self.chunk_aggregate).context("key `chunk_aggregate`")
    }

    fn validate(&self, o: &Origins) -> Result<()> {
        let err =
            |key: &str, msg: String| -> Result<()> { bail!("{}: key `{key}`: {msg}", o.of(key)) };
        if self.r <= 0 {
            err("r", format!("LoRA rank must be positive, got {}", self.r))?;
        }
        if self.lora_alpha.is_nan() || self.lora_alpha <= 0.0 {
            err(
                "lora_alpha",
                format!("must be positive, got {}", self.lora_alpha),
            )?;
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            err(
                "lora_dropout",
                format!("must be in [0, 1), got {}", self.lora_dropout),
            )?;
        }
        match self.lora_init() {
            Err(e) => err("init_lora_weights", format!("{e:#}"))?,
            Ok(init) if init.changes_base() && self.use_dora => err(
                "init_lora_weights",
                format!("{} with use_dora is not supported", init.peft_value()),
            )?,
            Ok(_) => {}
        }
        if !self.lr.is_finite() || self.lr <= 0.0 {
            err("lr", format!("must be positive, got {}", self.lr))?;
        }
        if self.batch_size == 0 {
            err("batch_size", "must be at least 1".into())?;
        }
        if self.gradient_accumulation_steps == 0 {
            err("gradient_accumulation_steps", "must be at least 1".into())?;
        }
        if self.gradient_accumulation_steps > self.batch_size {
            err(
                "gradient_accumulation_steps",
                format!(
                    "{} micro-steps cannot split a batch of {} (batch_size is the global batch)",
                    self.gradient_accumulation_steps, self.batch_size
                ),
            )?;
        }
        if self.eval_batch_size == 0 {
            err("eval_batch_size", "must be at least 1".into())?;
        }
        if self.epochs == 0 {
            err("epochs", "must be at least 1".into())?;
        }
        if self.num_classes < 2 {
            err(
                "num_classes",
                format!("must be at least 2, got {}", self.num_classes),
            )?;
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            err(
                "warmup_ratio",
                format!("must be in [0, 1), got {}", self.warmup_ratio),
            )?;
        }
        if self.weight_decay < 0.0 {
            err("weight_decay", "must not be negative".into())?;
        }
        if self.max_length == Some(0) {
            err("max_length", "must be at least 1 (or null)".into())?;
        }
        if let Err(e) = Side::parse(&self.truncation_side) {
            err("truncation_side", format!("{e:#}"))?;
        }
        if let Err(e) = Mode::parse(&self.long_text) {
            err("long_text", format!("{e:#}"))?;
        }
        match self.long_text_settings() {
            Err(e) => bail!("{e:#}"),
            Ok(lt) => {
                if lt.side == Side::Left && lt.mode != Mode::Truncate {
                    err(
                        "truncation_side",
                        format!(
                            "`left` applies to long_text: truncate, not {}",
                            self.long_text
                        ),
                    )?;
                }
                if lt.mode != Mode::Truncate && self.max_length.is_none() {
                    err(
                        "long_text",
                        format!(
                            "`{}` needs max_length (the length it fits texts to)",
                            self.long_text
                        ),
                    )?;
                }
                if self.chunk_stride > 0 && lt.mode != Mode::Chunk {
                    err("chunk_stride", "applies to long_text: chunk".into())?;
                }
                if self.head_tokens.is_some() && lt.mode != Mode::HeadTail {
                    err("head_tokens", "applies to long_text: head_tail".into())?;
                }
            }
        }
        if let Some(c) = self.center_rewards_coefficient {
            if !c.is_finite() || c < 0.0 {
                err(
                    "center_rewards_coefficient",
                    format!("must be 0 or more, got {c}"),
                )?;
            }
            if self.task != crate::task::PREFERENCE {
                err(
                    "center_rewards_coefficient",
                    "applies to task: preference".into(),
                )?;
            }
        }
        if let Err(e) = Aggregate::parse(&self.chunk_aggregate) {
            err("chunk_aggregate", format!("{e:#}"))?;
        }
        if self.eval_steps == Some(0) {
            err("eval_steps", "must be at least 1 (or null)".into())?;
        }
        if self.early_stopping_patience == Some(0) {
            err(
                "early_stopping_patience",
                "must be at least 1 (or null)".into(),
            )?;
        }
        if !self.early_stopping_threshold.is_finite() || self.early_stopping_threshold < 0.0 {
            err(
                "early_stopping_threshold",
                format!("must be 0 or more, got {}", self.early_stopping_threshold),
            )?;
        }
        if !["none", "temperature"].contains(&self.calibrate.as_str()) {
            err(
                "calibrate",
                format!("`{}` is not one of none, temperature", self.calibrate),
            )?;
        }
        match &self.threshold {
            Some(ThresholdSetting::Named(n)) if n != "tune" => err(
                "threshold",
                format!("`{n}` is not `tune` or a number in (0, 1)"),
            )?,
            Some(ThresholdSetting::Fixed(t)) if !(*t > 0.0 && *t < 1.0) => err(
                "threshold",
                format!("a fixed threshold must be in (0, 1), got {t}"),
            )?,
            _ => {}
        }
        if self.keep_checkpoints == 0 {
            err("keep_checkpoints", "must be at least 1".into())?;
        }
        if !["stop", "skip"].contains(&self.on_nonfinite.as_str()) {
            err(
                "on_nonfinite",
                format!("`{}` is not one of stop, skip", self.on_nonfinite),
            )?;
        }
        if let Err(e) = crate::kernel_choice::Mode::parse(&self.kernels) {
            err("kernels", format!("{e:#}"))?;
        }
        if self.dist_timeout_s == 0 {
            err("dist_timeout_s", "must be at least 1".into())?;
        }
        if self.log_every == 0 {
            err("log_every", "must be at least 1".into())?;
        }
        if self.target_modules.is_empty() {
            err("target_modules", "name at least one module".into())?;
        }
        let targets: Vec<String> = LORA_TARGETS.iter().map(|s| s.to_string()).collect();
        for t in &self.target_modules {
            if t == ALL_LINEAR {
                err(
                    "target_modules",
                    "`all-linear` needs `model_dir` pointing at a model whose config.json names a \
                     supported family (it stands for that family's projections), and no other \
                     module beside it"
                        .into(),
                )?;
                continue;
            }
            if !LORA_TARGETS.contains(&t.as_str()) {
                err(
                    "target_modules",
                    format!(
                        "unknown module `{t}`{}; choose from {}",
                        hint(t, &targets),
                        LORA_TARGETS.join(", ")
                    ),
                )?;
            }
        }
        if self.bnb_4bit_quant_type != "nf4" {
            err(
                "bnb_4bit_quant_type",
                format!(
                    "only `nf4` is supported, got `{}`",
                    self.bnb_4bit_quant_type
                ),
            )?;
        }
        let dtypes = ["auto", "bfloat16", "float16", "float32"];
        if !dtypes.contains(&self.bnb_4bit_compute_dtype.as_str()) {
            err(
                "bnb_4bit_compute_dtype",
                format!(
                    "`{}` is not one of {}",
                    self.bnb_4bit_compute_dtype,
                    dtypes.join(", ")
                ),
            )?;
        }
        if !(64..=4096).contains(&self.bnb_4bit_blocksize)
            || !(self.bnb_4bit_blocksize as u64).is_power_of_two()
        {
            err(
                "bnb_4bit_blocksize",
                format!(
                    "must be a power of two in 64..4096, got {}",
                    self.bnb_4bit_blocksize
                ),
            )?;
        }
        let opts = ["adamw8bit", "adamw"];
        if !opts.contains(&self.optimizer.as_str()) {
            err(
                "optimizer",
                format!("`{}` is not one of {}", self.optimizer, opts.join(", ")),
            )?;
        }
        if let Some(p) = &self.problem_type {
            if let Err(e) = crate::labels::ProblemType::parse(p) {
                err("problem_type", format!("{e:#}"))?;
            }
        }
        match &self.class_weights {
            Some(ClassWeights::Named(n)) if n != "balanced" => err(
                "class_weights",
                format!("`{n}` is not `balanced` or a list of numbers"),
            )?,
            Some(ClassWeights::List(w)) if w.iter().any(|x| !x.is_finite() || *x < 0.0) => err(
                "class_weights",
                format!("weights must be finite and not negative, got {w:?}"),
            )?,
            _ => {}
        }
        if let Err(e) = crate::data::prompt::resolve_prompt(&self.prompt) {
            err("prompt", format!("{e:#}"))?;
        }
        if let Err(e) = self.to_task() {
            let msg = format!("{e:#}");
            // The key the message is about (the task's own keys before `task`).
            let key = ["template", "problem_type", "text_columns"]
                .into_iter()
                .find(|k| msg.contains(k))
                .unwrap_or("task");
            err(key, msg)?;
        }
        let dev = self.device.as_str();
        if !(dev == "auto"
            || dev == "cpu"
            || dev == "cuda"
            || dev
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok()))
        {
            err(
                "device",
                format!("`{dev}` is not auto, cpu, cuda or cuda:N"),
            )?;
        }
        if let Some(n) = dev.strip_prefix("cuda").map(|r| r.trim_start_matches(':')) {
            let want: i64 = n.parse().unwrap_or(0);
            let have = tch::Cuda::device_count();
            if want >= have {
                err(
                    "device",
                    format!("`{dev}` asked for, but libtorch sees {have} CUDA device(s); use `auto` or `cpu`"),
                )?;
            }
        }
        for (key, dir) in [
            ("model_dir", &self.model_dir),
            ("tokenizer_dir", &self.tokenizer_dir),
            ("data_dir", &self.data_dir),
        ] {
            if let Some(d) = dir {
                if !d.is_dir() {
                    err(key, format!("folder {} does not exist", d.display()))?;
                }
            }
        }
        Ok(())
    }

    pub fn model_dir(&self) -> Result<&Path> {
        self.model_dir
            .as_deref()
            .context("no model_dir: set `model_dir` in the config or pass --model_dir DIR")
    }

    pub fn tokenizer_dir(&self) -> Result<&Path> {
        match &self.tokenizer_dir {
            Some(d) => Ok(d),
            None => self.model_dir(),
        }
    }

    pub fn data_dir(&self) -> Result<&Path> {
        self.data_dir
            .as_deref()
            .context("no data_dir: set `data_dir` in the config or pass --data_dir DIR")
    }
    /// The task these keys describe.
    pub fn to_task(&self) -> Result<crate::task::Task> {
        crate::task::Task::from_keys(&crate::task::TaskKeys {
            task: &self.task,
            text_columns: &self.text_columns,
            label_column: &self.label_column,
            labels: self.labels.as_deref(),
            problem_type: self.problem_type.as_deref(),
            prompt: &self.prompt,
            template: self.template.as_deref(),
            metric_for_best_model: self.metric_for_best_model.as_deref(),
        })
    }

    /// The device of a single-process run for the `device` setting (a rank of a
    /// distributed run takes [`crate::dist::Dist::device_for`]): `auto` is the first GPU
    /// only when this build has CUDA kernels and libtorch sees one, else the CPU; `cuda` and
    /// `cuda:N` without a usable GPU are an error naming the key.
    pub fn device(&self) -> Result<tch::Device> {
        crate::dist::rank_device(&self.device, 0, 1, crate::hardware::usable_gpus())
    }

    /// `init_lora_weights` (with `loftq_iter`) as the model builder takes it.
    pub fn lora_init(&self) -> Result<crate::lora::LoraInit> {
        crate::lora::LoraInit::parse(&self.init_lora_weights, self.loftq_iter)
    }

    /// The compute dtype; `auto` is bf16 on a GPU and on a CPU with bf16 matmul
    /// instructions (AVX512-BF16 or AMX-BF16, Arm's BF16), fp32 on other CPUs (where bf16
    /// matmuls are emulated and slower than fp32).
    pub fn compute_kind(&self, device: tch::Device) -> tch::Kind {
        match self.bnb_4bit_compute_dtype.as_str() {
            "bfloat16" => tch::Kind::BFloat16,
            "float16" => tch::Kind::Half,
            "float32" => tch::Kind::Float,
            _ if device.is_cuda() || crate::hardware::cpu_has_bf16_matmul() => tch::Kind::BFloat16,
            _ => tch::Kind::Float,
        }
    }
}

/// The decoder family of `model_dir/config.json`, when it names one we know; LoRA's default
/// `target_modules` is PEFT's for that family. A file that cannot be read is the model
/// loader's to report, with its path.
fn model_family(model_dir: &Path) -> Option<Family> {
    let text = std::fs::read_to_string(model_dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let mt = v.get("model_type")?.as_str()?;
    Family::from_model_type("config.json", mt).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_in_both_spellings() {
        let args: Vec<String> = ["--batch-size", "16", "--lr=1e-4", "--resume", "--r", "4"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let o = parse_flags(&args).unwrap();
        let pairs: Vec<(&str, &str)> = o
            .iter()
            .map(|o| (o.key.as_str(), o.value.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("batch_size", "16"),
                ("lr", "1e-4"),
                ("resume", "true"),
                ("r", "4")
            ]
        );
        assert!(parse_flags(&["oops".to_string()]).is_err());
    }

    #[test]
    fn long_text_keys_are_checked_together() {
        let load = |flags: &[&str]| {
            let args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
            Config::load(None, &parse_flags(&args).expect("flags")).map(|(c, _)| c)
        };
        let ok = load(&[
            "--max_length",
            "64",
            "--long_text",
            "chunk",
            "--chunk_stride",
            "8",
        ])
        .expect("chunk with max_length");
        let lt = ok.long_text_settings().unwrap();
        assert_eq!(
            (lt.mode, lt.stride, lt.max_length),
            (Mode::Chunk, 8, Some(64))
        );
        for (flags, key) in [
            (&["--long_text", "chunk"][..], "long_text"),
            (
                &["--max_length", "64", "--long_text", "chunks"],
                "long_text",
            ),
            (
                &["--max_length", "64", "--truncation_side", "up"],
                "truncation_side",
            ),
            (
                &[
                    "--max_length",
                    "64",
                    "--long_text",
                    "head_tail",
                    "--truncation_side",
                    "left",
                ],
                "truncation_side",
            ),
            (
                &["--max_length", "64", "--chunk_stride", "4"],
                "chunk_stride",
            ),
            (&["--max_length", "64", "--head_tokens", "4"], "head_tokens"),
            (&["--chunk_aggregate", "max"], "chunk_aggregate"),
        ] {
            let e = format!("{:#}", load(flags).expect_err("refused"));
            assert!(e.contains(&format!("key `{key}`")), "{flags:?}: {e}");
        }
    }

    #[test]
    fn checkpointing_spellings_round_trip() {
        let flag = |v: &str| {
            let o = parse_flags(&["--gradient_checkpointing".to_string(), v.to_string()])
                .expect("flag");
            Config::load(None, &o).map(|(c, _)| c.gradient_checkpointing)
        };
        assert_eq!(flag("auto").unwrap(), Checkpointing::Auto);
        assert_eq!(flag("true").unwrap(), Checkpointing::Recompute);
        assert_eq!(flag("false").unwrap(), Checkpointing::Keep);
        assert_eq!(flag("12").unwrap(), Checkpointing::Layers(12));
        let e = format!("{:#}", flag("-3").unwrap_err());
        assert!(e.contains("gradient_checkpointing"), "{e}");
        // A run folder's config.json reads back as it was written.
        for c in [
            Checkpointing::Auto,
            Checkpointing::Recompute,
            Checkpointing::Keep,
            Checkpointing::Layers(7),
        ] {
            let text = serde_json::to_string(&c).unwrap();
            let back: Checkpointing = serde_yaml::from_str(&text).unwrap();
            assert_eq!(back, c, "{text}");
        }
    }
}

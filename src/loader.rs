//! One place that loads a model for use, as transformers' `from_pretrained` does: the
//! tokenizer, the checkpoint (quantized to NF4 on the way in), fresh or trained LoRA adapters
//! and head, and, for a trained adapter, the task and labels saved with it. `train`, `eval`,
//! `predict`, `merge` and `serve` all load through here.
use crate::adapter;
use crate::config::{Checkpointing, Config, ThresholdSetting};
use crate::data::batch::TextEncoder;
use crate::labels::{LabelSpec, ProblemType};
use crate::lora::LoraConfig;
use crate::model::classifier::{LlamaClassifier, ModelOptions, RECOMPUTE_ALL};
use crate::model::hf_config::LlamaConfig;
use crate::quant::nf4::Nf4Options;
use crate::task::TaskLabels;
use crate::threshold::Decision;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::Device;

/// Everything a run needs besides the optimizer: the model, the tokenizer, the device.
pub struct Loaded {
    pub model: LlamaClassifier,
    pub encoder: TextEncoder,
    pub device: Device,
}

pub fn model_options(cfg: &Config, device: Device, pad_id: i64) -> Result<ModelOptions> {
    Ok(ModelOptions {
        device,
        compute_dtype: cfg.compute_kind(device),
        quant: cfg.load_in_4bit.then_some(Nf4Options {
            blocksize: cfg.bnb_4bit_blocksize,
            double_quant: cfg.bnb_4bit_use_double_quant,
        }),
        lora: Some(LoraConfig {
            r: cfg.r,
            alpha: cfg.lora_alpha,
            dropout: cfg.lora_dropout,
            target_modules: cfg.target_modules.clone(),
            use_rslora: cfg.use_rslora,
            layers: cfg.layers_to_transform.clone(),
            rank_pattern: cfg
                .rank_pattern
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            alpha_pattern: cfg
                .alpha_pattern
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            use_dora: cfg.use_dora,
            init: cfg.lora_init().context("key `init_lora_weights`")?,
        }),
        num_labels: cfg.num_classes,
        pad_token_id: pad_id,
        // `auto` is decided by the trainer once the data is known (`train::memory`).
        recompute_layers: match cfg.gradient_checkpointing {
            Checkpointing::Keep => 0,
            Checkpointing::Layers(n) => n,
            Checkpointing::Auto | Checkpointing::Recompute => RECOMPUTE_ALL,
        },
        seed: cfg.seed,
        residual: None,
    })
}

/// The pad token is the model's `pad_token_id` (config.json, or its family's class default
/// as transformers reads it) when it has one, else EOS, as the reference sets it; padding
/// and the pooled position (the last non-pad token) both follow it.
pub fn use_model_pad_token(model_dir: &Path, encoder: &mut TextEncoder) -> Result<()> {
    if let Some(pad) = LlamaConfig::from_dir(model_dir)?.pad_token_id {
        encoder.set_pad_id(pad);
    }
    Ok(())
}

/// Loads the tokenizer and the (quantized) model with fresh LoRA adapters and head.
pub fn load_model(cfg: &Config, device: Device) -> Result<Loaded> {
    load_model_on(cfg, device, None)
}

/// [`load_model`], the adapted modules' frozen weights read from a PiSSA / LoftQ adapter's
/// `residual` base when given.
fn load_model_on(cfg: &Config, device: Device, residual: Option<PathBuf>) -> Result<Loaded> {
    // The loading thread's device, once: kernels then launch without switching devices.
    crate::cuda::set_device(device)?;
    // `kernels` for every command that loads a model (eval, predict, serve, merge, train).
    crate::kernel_choice::set_mode(
        crate::kernel_choice::Mode::parse(&cfg.kernels).context("key `kernels`")?,
    );
    let mut encoder = TextEncoder::from_dir(cfg.tokenizer_dir()?, cfg.max_length)?;
    encoder.set_long_text(cfg.long_text_settings()?);
    let model_dir = cfg.model_dir()?;
    use_model_pad_token(model_dir, &mut encoder)?;
    let opts = ModelOptions {
        residual,
        ..model_options(cfg, device, encoder.pad_id())?
    };
    let model = LlamaClassifier::load(model_dir, &opts)
        .with_context(|| format!("cannot load the model from {}", model_dir.display()))?;
    let vocab = model.config.vocab_size;
    if !(0..vocab).contains(&encoder.pad_id()) {
        bail!(
            "{}: pad_token_id {} is not a token of the model's {vocab}-row embedding",
            model_dir.join("config.json").display(),
            encoder.pad_id()
        );
    }
    if encoder.max_id() >= vocab {
        bail!(
            "{}: the tokenizer produces ids up to {} but the model's embedding has only {vocab} rows ({}); \
             point tokenizer_dir at the model's own tokenizer",
            cfg.tokenizer_dir()?.join("tokenizer.json").display(),
            encoder.max_id(),
            model_dir.join("config.json").display()
        );
    }
    Ok(Loaded {
        model,
        encoder,
        device,
    })
}

/// The loss the model trains and evaluates with for `labels`: transformers' for its problem
/// type (with class `weights`), or TRL's pairwise loss for a preference task.
pub fn set_task_loss(
    model: &mut LlamaClassifier,
    labels: &TaskLabels,
    weights: Option<Vec<f64>>,
    cfg: &Config,
) {
    model.set_loss(labels.spec.problem_type, weights);
    if labels.task.is_preference() {
        model.set_pairwise_loss(cfg.center_rewards_coefficient);
    }
}

/// `cfg` with the head sized for `spec` (one output for regression).
pub fn sized_for(cfg: &Config, spec: &LabelSpec) -> Config {
    let mut c = cfg.clone();
    c.num_classes = spec.num_labels() as i64;
    c
}

/// The frozen weights `serve`, `eval` and `predict` multiply with: NF4 dequantised per batch
/// (as training does; a batch of a few hundred tokens then spends much of its time
/// dequantising) or dequantised once (with the LoRA pairs folded in when computing in fp32),
/// when asked (`Some(true)`) or, by default, when the dense copy takes at most half of the
/// memory still free. Returns "dense" or "nf4" (`/info`'s `frozen_weights`).
pub fn for_inference(
    model: &mut LlamaClassifier,
    device: Device,
    wanted: Option<bool>,
) -> Result<&'static str> {
    let bytes = model.dense_frozen_bytes();
    if bytes == 0 {
        // Already dense (`load_in_4bit: false`): only the LoRA pairs to fold in fp32.
        if wanted != Some(false) {
            model.densify_frozen()?;
        }
        return Ok("dense");
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let dense = match wanted {
        Some(w) => w,
        None => {
            let (_, free) = crate::hardware::device_memory(device)?;
            let fits = bytes <= free / 2;
            if !fits {
                println!(
                    "frozen weights: kept in NF4 (dense, {:.2} GiB, would take over half of the {:.2} GiB free; \
                     --dense_weights true forces it)",
                    gib(bytes),
                    gib(free)
                );
            }
            fits
        }
    };
    if !dense {
        return Ok("nf4");
    }
    model.densify_frozen()?;
    println!(
        "frozen weights: dequantised once to {:?}, LoRA folded in when fp32 ({:.2} GiB; --dense_weights false keeps NF4)",
        model.opts.compute_dtype,
        gib(bytes)
    );
    Ok("dense")
}

/// The adapter's LoRA options (from its `adapter_config.json`) in place of `cfg`'s.
pub fn with_adapter_options(cfg: &mut Config, meta: adapter::AdapterMeta) {
    cfg.r = meta.r;
    cfg.lora_alpha = meta.lora_alpha;
    cfg.target_modules = meta.target_modules;
    cfg.use_rslora = meta.use_rslora;
    cfg.layers_to_transform = meta.layers_to_transform;
    cfg.rank_pattern = meta.rank_pattern;
    cfg.alpha_pattern = meta.alpha_pattern;
    cfg.use_dora = meta.use_dora;
    cfg.init_lora_weights = meta.init.name();
    if let crate::lora::LoraInit::Loftq { iter } = meta.init {
        cfg.loftq_iter = iter as i64;
    }
}

/// `qlora-cls eval`/`predict`: the model with a trained adapter loaded, and the task and
/// labels saved with it (MRPC's for an adapter saved before labels travelled with it).
pub fn load_with_adapter(cfg: &Config, adapter_dir: &Path) -> Result<(Loaded, TaskLabels)> {
    let meta = adapter::read_meta(adapter_dir)?;
    meta.check_layers(
        adapter_dir,
        LlamaConfig::from_dir(cfg.model_dir()?)?.num_hidden_layers,
    )?;
    let mut cfg = cfg.clone();
    with_adapter_options(&mut cfg, meta);
    let labels = match adapter::read_labels(adapter_dir)? {
        Some(l) => l,
        // An adapter made elsewhere: its head's rows size ours. Two (or the configured
        // count) read as MRPC's classes, as before; any other count gets transformers'
        // defaults, so a one-output head (TRL's reward models) is a regression head.
        None => TaskLabels {
            task: cfg.to_task()?,
            spec: match adapter::head_rows(adapter_dir)? {
                Some(k) if k as i64 != cfg.num_classes => LabelSpec::transformers_default(k),
                _ => LabelSpec::mrpc(cfg.num_classes as usize),
            },
        },
    };
    let cfg = sized_for(&cfg, &labels.spec);
    let residual = adapter::residual_path(adapter_dir, cfg.lora_init()?)?;
    let mut loaded = load_model_on(&cfg, cfg.device()?, residual)?;
    let weights_path = adapter_dir.join(adapter::WEIGHTS_FILE);
    let weights = adapter::read_safetensors(&weights_path)?;
    loaded
        .model
        .load_trainable(&|name| weights.get(name).map(|t| t.shallow_clone()))
        .with_context(|| format!("cannot load the adapter {}", weights_path.display()))?;
    set_task_loss(&mut loaded.model, &labels, None, &cfg);
    if let Some(t) = adapter::read_temperature(adapter_dir)? {
        if labels.spec.problem_type != ProblemType::SingleLabel {
            bail!(
                "{}: temperature scaling is for single-label classifiers; this adapter is {}",
                adapter_dir.join(crate::calibration::FILE).display(),
                labels.spec.problem_type.as_str()
            );
        }
        loaded.model.set_temperature(t)?;
        println!(
            "calibration: logits divided by the temperature {t:.4} ({})",
            crate::calibration::FILE
        );
    }
    Ok((loaded, labels))
}

/// A fixed cut `t` as the decision for `spec`: on p₁ for two classes, on every label for
/// multi-label; other problem types have no threshold.
pub fn fixed_decision(t: f64, spec: &LabelSpec) -> Result<Decision> {
    match spec.problem_type {
        ProblemType::SingleLabel if spec.num_labels() == 2 => Ok(Decision::Binary(t)),
        ProblemType::MultiLabel => Ok(Decision::PerLabel(vec![t; spec.num_labels()])),
        p => bail!(
            "key `threshold`: a threshold is for two-class and multi-label tasks; this one is {} with {} labels",
            p.as_str(),
            spec.num_labels()
        ),
    }
}

/// How `eval` / `predict` turn the adapter's probabilities into labels: the configuration's
/// fixed `threshold` if it sets one, else the adapter's `threshold.json`, else argmax / 0.5
/// (said on the console when not the default).
pub fn decision(cfg: &Config, adapter_dir: &Path, spec: &LabelSpec) -> Result<Decision> {
    let d = match &cfg.threshold {
        Some(ThresholdSetting::Fixed(t)) => fixed_decision(*t, spec)?,
        Some(ThresholdSetting::Named(n)) => bail!(
            "key `threshold`: `{n}` chooses a threshold while training; here give a number in \
             (0, 1), or none to use the adapter's {}",
            crate::threshold::FILE
        ),
        None => adapter::read_decision(adapter_dir, spec)?.unwrap_or_default(),
    };
    match &d {
        Decision::Default => {}
        Decision::Binary(t) => println!("threshold: class 1 when its probability > {t:.4}"),
        Decision::PerLabel(ts) => println!(
            "thresholds per label: {}",
            ts.iter()
                .map(|t| format!("{t:.4}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
    Ok(d)
}

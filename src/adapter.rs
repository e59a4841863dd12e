//! PEFT's adapter layout: `adapter_config.json` + `adapter_model.safetensors`, with PEFT's
//! key names (the `score` head included, as `modules_to_save` saves it), so that
//! `PeftModel.from_pretrained(base, dir)` loads what we train and we load what PEFT trains.
//!
//! Why one file: it is PEFT's adapter folder as one format, its writer and its reader (every
//! `LoraConfig` key's use in one table) side by side; the key table and its tests are a
//! third of it.
use crate::config::Config;
use crate::labels::{LabelSpec, ProblemType};
use crate::lora::LoraInit;
use crate::runio;
use crate::task::{Task, TaskLabels};
use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The frozen weights a PiSSA or LoftQ adapter was trained against, for the modules it
/// adapts (checkpoint names; NF4 in bitsandbytes' layout when quantised). PEFT ignores the
/// file; with it, `eval`, `predict`, `serve` and `merge` use the exact base of training
/// instead of computing it again.
pub const RESIDUAL_FILE: &str = "residual_base.safetensors";
/// The label side of the task (ours; PEFT reads only the two files above).
pub const LABELS_FILE: &str = "labels.json";

/// Writes [`LABELS_FILE`]: `problem_type`, `num_labels`, `id2label`, `label2id` in the
/// spelling of a transformers model config, and the task's columns and template.
pub fn write_labels(dir: &Path, labels: &TaskLabels) -> Result<()> {
    let spec = &labels.spec;
    runio::write_json(
        &dir.join(LABELS_FILE),
        &json!({
            "problem_type": spec.problem_type.as_str(),
            "num_labels": spec.num_labels(),
            "id2label": spec.id2label(),
            "label2id": spec.label2id(),
            "task": labels.task,
        }),
    )
}

/// `dir/file` parsed as JSON, with its path for messages; None when the adapter has none.
fn read_json_beside(
    dir: &Path,
    file: &str,
) -> Result<Option<(std::path::PathBuf, serde_json::Value)>> {
    let path = dir.join(file);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let v = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    Ok(Some((path, v)))
}

/// `calibration.json`: the temperature fitted for the adapter beside it (`calibrate:
/// temperature`), on which split and rows, and the split's calibration before and after.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TemperatureFit {
    pub method: &'static str,
    pub temperature: f64,
    pub split: String,
    pub examples: usize,
    pub before: crate::calibration::Calibration,
    pub after: crate::calibration::Calibration,
}

pub fn write_calibration(dir: &Path, fit: &TemperatureFit) -> Result<()> {
    runio::write_json(&dir.join(crate::calibration::FILE), fit)
}

/// The temperature in `dir/calibration.json`, if the adapter has one.
pub fn read_temperature(dir: &Path) -> Result<Option<f64>> {
    let Some((path, v)) = read_json_beside(dir, crate::calibration::FILE)? else {
        return Ok(None);
    };
    if v["method"] != "temperature" {
        bail!(
            "{}: key `method`: {} is not `temperature`, the one calibration supported",
            path.display(),
            v["method"]
        );
    }
    match v["temperature"].as_f64() {
        Some(t) if t.is_finite() && t > 0.0 => Ok(Some(t)),
        _ => bail!(
            "{}: key `temperature` must be a positive number, got {}",
            path.display(),
            v["temperature"]
        ),
    }
}

/// `threshold.json` beside an adapter: `threshold` (a number for two classes, one per label
/// for multi-label) and how it was chosen (`method`, and for `tune` the metric, split and
/// values).
pub fn write_threshold(dir: &Path, file: &serde_json::Value) -> Result<()> {
    runio::write_json(&dir.join(crate::threshold::FILE), file)
}

/// The decision in `dir/threshold.json`, if the adapter has one, checked against its labels.
pub fn read_decision(dir: &Path, spec: &LabelSpec) -> Result<Option<crate::threshold::Decision>> {
    use crate::threshold::Decision;
    let Some((path, v)) = read_json_beside(dir, crate::threshold::FILE)? else {
        return Ok(None);
    };
    let cut = |x: &serde_json::Value| -> Result<f64> {
        match x.as_f64() {
            Some(t) if t > 0.0 && t < 1.0 => Ok(t),
            _ => bail!(
                "{}: key `threshold`: {x} is not a number in (0, 1)",
                path.display()
            ),
        }
    };
    let n = spec.num_labels();
    match (&v["threshold"], spec.problem_type) {
        (t @ serde_json::Value::Number(_), ProblemType::SingleLabel) if n == 2 => {
            Ok(Some(Decision::Binary(cut(t)?)))
        }
        (serde_json::Value::Array(ts), ProblemType::MultiLabel) if ts.len() == n => Ok(Some(
            Decision::PerLabel(ts.iter().map(cut).collect::<Result<_>>()?),
        )),
        (t, p) => bail!(
            "{}: key `threshold`: {t} does not fit a {} adapter with {n} labels (a number for \
             two classes, a list of {n} for multi-label)",
            path.display(),
            p.as_str()
        ),
    }
}

/// The label side saved with an adapter; `None` for an adapter saved before labels
/// travelled with it (MRPC's two classes).
pub fn read_labels(dir: &Path) -> Result<Option<TaskLabels>> {
    let Some((path, v)) = read_json_beside(dir, LABELS_FILE)? else {
        return Ok(None);
    };
    let problem_type = ProblemType::parse(v["problem_type"].as_str().unwrap_or(""))
        .with_context(|| format!("{}: key `problem_type`", path.display()))?;
    let k = v["num_labels"].as_u64().with_context(|| {
        format!(
            "{}: key `num_labels` missing or not a count",
            path.display()
        )
    })?;
    let names = (0..k)
        .map(|i| v["id2label"][i.to_string()].as_str().map(str::to_string))
        .collect::<Option<Vec<_>>>()
        .with_context(|| format!("{}: `id2label` must name every id 0..{k}", path.display()))?;
    let task: Task = serde_json::from_value(v["task"].clone())
        .with_context(|| format!("{}: key `task`", path.display()))?;
    Ok(Some(TaskLabels {
        spec: LabelSpec {
            problem_type,
            names,
        },
        task,
    }))
}

/// The rows of the head an adapter file holds (`score.weight` in `modules_to_save`), if any.
pub fn head_rows(adapter_dir: &Path) -> Result<Option<usize>> {
    let path = adapter_dir.join(WEIGHTS_FILE);
    let weights = read_safetensors(&path)?;
    Ok(weights
        .get(crate::model::classifier::SCORE_KEY)
        .and_then(|t| t.size().first().copied())
        .map(|rows| rows as usize))
}

/// The labels of the adapter in `adapter_dir` whose head has `num_labels` outputs: its
/// `labels.json`, else (an adapter saved before labels travelled with it, or made elsewhere)
/// transformers' defaults ([`LabelSpec::transformers_default`]).
pub fn labels_for(adapter_dir: &Path, num_labels: usize) -> Result<LabelSpec> {
    let Some(saved) = read_labels(adapter_dir)? else {
        return Ok(LabelSpec::transformers_default(num_labels));
    };
    if saved.spec.names.len() != num_labels {
        bail!(
            "{}: id2label names {} labels, the head has {num_labels}",
            adapter_dir.join(LABELS_FILE).display(),
            saved.spec.names.len()
        );
    }
    Ok(saved.spec)
}

/// PEFT's LoraConfig fields for this run (what `lora_config.json` and the adapter hold).
pub fn lora_config_json(cfg: &Config) -> serde_json::Value {
    // Validated with the rest of the configuration; an unreadable value cannot get here.
    let init = cfg.lora_init().unwrap_or_default();
    json!({
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": cfg.model_dir.as_ref().map(|p| p.display().to_string()),
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": cfg.target_modules,
        "modules_to_save": ["classifier", "score"],
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": init.peft_value(),
        "loftq_config": init.loftq_config(),
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "layers_to_transform": cfg.layers_to_transform,
        "layers_pattern": null,
        "rank_pattern": cfg.rank_pattern,
        "alpha_pattern": cfg.alpha_pattern,
        "revision": null
    })
}

/// bitsandbytes' BitsAndBytesConfig fields for this run (`quant_config.json`).
pub fn quant_config_json(cfg: &Config) -> serde_json::Value {
    json!({
        "quant_method": "bitsandbytes",
        "load_in_4bit": cfg.load_in_4bit,
        "load_in_8bit": false,
        "bnb_4bit_quant_type": cfg.bnb_4bit_quant_type,
        "bnb_4bit_use_double_quant": cfg.bnb_4bit_use_double_quant,
        "bnb_4bit_compute_dtype": cfg.bnb_4bit_compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_blocksize": cfg.bnb_4bit_blocksize,
    })
}

fn kind_to_dtype(k: Kind) -> Result<Dtype> {
    Ok(match k {
        Kind::Float => Dtype::F32,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Bool => Dtype::BOOL,
        k => bail!("cannot store a {k:?} tensor in safetensors"),
    })
}

/// Serialises named tensors to safetensors bytes (with `{"format": "pt"}`, as torch writes).
pub fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let n = t.numel() * t.kind().elt_size_in_bytes();
        let mut bytes = vec![0u8; n];
        t.copy_data_u8(&mut bytes, t.numel());
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        owned.push((name.clone(), kind_to_dtype(t.kind())?, shape, bytes));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    Ok(safetensors::serialize(views, Some(meta))?)
}

/// Writes named tensors to a safetensors file, atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    runio::write_atomic(path, &safetensors_bytes(tensors)?)
}

/// Reads every tensor of a safetensors file (CPU).
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let kind = crate::model::checkpoint::kind_of(view.dtype()).with_context(|| {
            format!(
                "{}: {name} has unsupported dtype {:?}",
                path.display(),
                view.dtype()
            )
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::from_data_size(view.data(), &shape, kind);
        out.insert(name, t);
    }
    Ok(out)
}

/// Saves the trainable tensors (PEFT key names) and PEFT's adapter_config.json into `dir`.
pub fn save(dir: &Path, cfg: &Config, trainable: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_safetensors(&dir.join(WEIGHTS_FILE), trainable)?;
    runio::write_json(&dir.join(CONFIG_FILE), &lora_config_json(cfg))
}

/// Writes [`RESIDUAL_FILE`] into `dir` when `residual` is not empty (a base-changing init).
pub fn write_residual(dir: &Path, residual: &[(String, Tensor)]) -> Result<()> {
    if residual.is_empty() {
        return Ok(());
    }
    write_safetensors(&dir.join(RESIDUAL_FILE), residual)
}

/// The adapter's saved [`RESIDUAL_FILE`] for a base-changing `init`; `None` when the init
/// leaves the base as it is, or when there is no file and the init can be applied again
/// (PEFT's own adapters: said on the console). A random init without its file is an error.
pub fn residual_path(dir: &Path, init: LoraInit) -> Result<Option<std::path::PathBuf>> {
    if !init.changes_base() {
        return Ok(None);
    }
    let path = dir.join(RESIDUAL_FILE);
    if path.exists() {
        return Ok(Some(path));
    }
    if !init.deterministic() {
        bail!(
            "{}: init_lora_weights {} draws at random, so the base it was trained against \
             cannot be computed again, and {} is missing",
            dir.join(CONFIG_FILE).display(),
            init.peft_value(),
            path.display()
        );
    }
    println!(
        "{}: no {RESIDUAL_FILE}; computing the {} residual base from the checkpoint, as PEFT does",
        dir.display(),
        init.peft_value()
    );
    Ok(None)
}

/// The sub-folder of a PiSSA adapter holding PEFT's conversion to a plain LoRA.
pub const AS_LORA_DIR: &str = "as_lora";

/// PEFT's conversion of a PiSSA adapter to a plain LoRA on the original weights
/// (`save_pretrained(path_initial_model_for_weight_conversion=…)`): `ΔW = s·(B·A − B₀·A₀)
/// = s·[B, −B₀]·[A; A₀]`, rank 2r with `lora_alpha` doubled (×√2 under rsLoRA) and the
/// patterns doubled, so every scale stays; `init_lora_weights: true`. `initial` holds A₀,
/// B₀ under the adapter's names. Written to `dir/as_lora`; returns whether it was.
pub fn save_as_lora(
    dir: &Path,
    cfg: &Config,
    trainable: &[(String, Tensor)],
    initial: &[(String, Tensor)],
) -> Result<bool> {
    if initial.is_empty() {
        return Ok(false);
    }
    if cfg.use_rslora && !(cfg.rank_pattern.is_empty() && cfg.alpha_pattern.is_empty()) {
        // PEFT refuses this combination too: its doubled alpha pattern would not keep √r's scale.
        println!(
            "{}: PiSSA with use_rslora and rank/alpha patterns has no plain-LoRA conversion (PEFT refuses it); not written",
            dir.join(AS_LORA_DIR).display()
        );
        return Ok(false);
    }
    let init: HashMap<&str, &Tensor> = initial.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = Vec::with_capacity(trainable.len());
    for (k, t) in trainable {
        let t = match init.get(k.as_str()) {
            Some(t0) if k.ends_with("lora_A.weight") => Tensor::cat(&[t.detach(), t0.detach()], 0),
            Some(t0) => Tensor::cat(&[t.detach(), -t0.detach()], 1),
            None => t.detach(),
        };
        out.push((k.clone(), t));
    }
    let mut conv = cfg.clone();
    conv.r *= 2;
    conv.lora_alpha *= if cfg.use_rslora { 2f64.sqrt() } else { 2.0 };
    conv.rank_pattern.values_mut().for_each(|r| *r *= 2);
    conv.alpha_pattern.values_mut().for_each(|a| *a *= 2.0);
    conv.init_lora_weights = LoraInit::Kaiming.name();
    save(&dir.join(AS_LORA_DIR), &conv, &out)?;
    Ok(true)
}

/// The LoRA hyper-parameters an adapter was trained with (they must match the model built
/// to receive it).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterMeta {
    pub r: i64,
    pub lora_alpha: f64,
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
    /// PEFT's `use_dora`: the adapter holds a `lora_magnitude_vector` per module.
    pub use_dora: bool,
    /// PEFT's `init_lora_weights` (with `loftq_config`): PiSSA and LoftQ adapters were
    /// trained against a changed base, which [`RESIDUAL_FILE`] holds when we saved them.
    pub init: LoraInit,
    /// For `target_modules` given as full module names (as PEFT saves `all-linear`): the
    /// decoder layers each projection is named on (they must be all of them).
    pub named_layers: Option<std::collections::BTreeMap<String, std::collections::BTreeSet<i64>>>,
    pub layers_to_transform: Option<Vec<i64>>,
    pub rank_pattern: std::collections::BTreeMap<String, i64>,
    pub alpha_pattern: std::collections::BTreeMap<String, f64>,
}

/// What we do with each key of PEFT's `LoraConfig` (peft 0.21.2's `to_dict()`, every key).
#[derive(Clone, Copy, Debug, PartialEq)]
enum KeyUse {
    /// Read into [`AdapterMeta`] (`r`, `lora_alpha`, `target_modules`, `use_rslora`).
    Read,
    /// Says nothing about the weights to load (bookkeeping, training-only, runtime).
    Ignored,
    /// Changes what the adapter computes; only PEFT's "off" value (null, false, `{}`, `[]`,
    /// or the value given) is supported, anything else is refused by name.
    OnlyOff(&'static str),
}

const LORA_CONFIG_KEYS: &[(&str, KeyUse)] = &[
    ("r", KeyUse::Read),
    ("lora_alpha", KeyUse::Read),
    ("target_modules", KeyUse::Read),
    ("use_rslora", KeyUse::Read),
    ("peft_type", KeyUse::Ignored), // checked to be LORA below
    ("task_type", KeyUse::Ignored), // checked to be SEQ_CLS (or unset) below
    ("auto_mapping", KeyUse::Ignored),
    ("peft_version", KeyUse::Ignored),
    ("base_model_name_or_path", KeyUse::Ignored),
    ("revision", KeyUse::Ignored),
    ("inference_mode", KeyUse::Ignored),
    ("lora_dropout", KeyUse::Ignored),      // training only
    ("megatron_core", KeyUse::Ignored),     // a module name, used only with megatron_config
    ("qalora_group_size", KeyUse::Ignored), // used only with use_qalora
    ("runtime_config", KeyUse::Ignored),    // written by earlier PEFT releases
    ("init_lora_weights", KeyUse::Read),
    ("modules_to_save", KeyUse::Ignored), // checked below: the head only
    ("exclude_modules", KeyUse::OnlyOff("null")),
    ("fan_in_fan_out", KeyUse::OnlyOff("false")),
    ("bias", KeyUse::OnlyOff("\"none\"")),
    ("layers_to_transform", KeyUse::Read),
    ("layers_pattern", KeyUse::Ignored), // checked below: PEFT's default `layers` only
    ("rank_pattern", KeyUse::Read),
    ("alpha_pattern", KeyUse::Read),
    ("megatron_config", KeyUse::OnlyOff("null")),
    ("trainable_token_indices", KeyUse::OnlyOff("null")),
    ("loftq_config", KeyUse::Read),
    ("eva_config", KeyUse::OnlyOff("null")),
    ("corda_config", KeyUse::OnlyOff("null")),
    ("lora_ga_config", KeyUse::OnlyOff("null")),
    ("use_dora", KeyUse::Read),
    ("velora_config", KeyUse::OnlyOff("null")),
    ("alora_invocation_tokens", KeyUse::OnlyOff("null")),
    ("use_qalora", KeyUse::OnlyOff("false")),
    ("monteclora_config", KeyUse::OnlyOff("null")),
    ("layer_replication", KeyUse::OnlyOff("null")),
    ("lora_bias", KeyUse::OnlyOff("false")),
    ("target_parameters", KeyUse::OnlyOff("null")),
    ("use_bdlora", KeyUse::OnlyOff("null")),
    ("arrow_config", KeyUse::OnlyOff("null")),
    ("kasa_config", KeyUse::OnlyOff("null")),
    ("ensure_weight_tying", KeyUse::OnlyOff("false")),
];

/// PEFT's "off" for an option: absent, null, false, empty, or `bias: "none"`.
fn is_off(key: &str, v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => key == "bias" && s == "none",
        _ => false,
    }
}

/// Reads `adapter_config.json`. Every key PEFT's `LoraConfig` writes is either honoured or,
/// when it changes what the adapter computes in a way we do not (PiSSA, LoftQ, bias, ...), refused with the file and the key: such an adapter read as a plain
/// LoRA would give other predictions than PEFT without a word. Unknown keys are refused too.
pub fn read_meta(dir: &Path) -> Result<AdapterMeta> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (is this a PEFT adapter folder?)",
            path.display()
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let obj = v
        .as_object()
        .with_context(|| format!("{}: not a JSON object", path.display()))?;
    let refuse = |key: &str, value: &serde_json::Value, supported: &str| {
        anyhow::anyhow!(
            "{}: key `{key}` is {value}; this build supports only {supported} \
             (loading it as a plain LoRA would not give PEFT's predictions)",
            path.display()
        )
    };
    for (key, value) in obj {
        match LORA_CONFIG_KEYS.iter().find(|(k, _)| k == key) {
            None => bail!(
                "{}: unknown LoraConfig key `{key}` (written by a newer PEFT, or not a LoRA \
                 adapter?); the keys this build knows are PEFT 0.21's",
                path.display()
            ),
            Some((_, KeyUse::OnlyOff(supported))) if !is_off(key, value) => {
                return Err(refuse(key, value, supported))
            }
            _ => {}
        }
    }
    if let Some(p) = obj.get("peft_type").filter(|p| !p.is_null()) {
        if p.as_str() != Some("LORA") {
            return Err(refuse("peft_type", p, "\"LORA\""));
        }
    }
    if let Some(t) = obj.get("task_type").filter(|t| !t.is_null()) {
        if t.as_str() != Some("SEQ_CLS") {
            return Err(refuse(
                "task_type",
                t,
                "\"SEQ_CLS\" (a sequence classifier)",
            ));
        }
    }
    // PiSSA and LoftQ move part of the weight into the adapter: honoured (the loader takes
    // the residual base from RESIDUAL_FILE or computes it again); OLoRA, CorDA, EVA, ... are
    // refused.
    let loftq_iter = match obj.get("loftq_config") {
        None | Some(serde_json::Value::Null) => 1,
        Some(serde_json::Value::Object(m)) if m.is_empty() => 1,
        Some(c) => {
            if c["loftq_bits"].as_i64() != Some(4) {
                return Err(refuse("loftq_config", c, "loftq_bits 4"));
            }
            c["loftq_iter"].as_i64().unwrap_or(1)
        }
    };
    let init = match obj.get("init_lora_weights") {
        None | Some(serde_json::Value::Null) => LoraInit::Kaiming,
        Some(serde_json::Value::Bool(b)) => LoraInit::parse(&b.to_string(), 1)?,
        Some(v @ serde_json::Value::String(s)) => LoraInit::parse(s, loftq_iter).map_err(|_| {
            refuse(
                "init_lora_weights",
                v,
                "true, false, \"gaussian\", \"pissa\", \"pissa_niter_N\" or \"loftq\"",
            )
        })?,
        Some(v) => return Err(refuse("init_lora_weights", v, "true, false or a string")),
    };
    if let Some(m) = obj.get("modules_to_save").filter(|m| !m.is_null()) {
        let head_only = m.as_array().is_some_and(|a| {
            a.iter()
                .all(|x| matches!(x.as_str(), Some("score" | "classifier")))
        });
        if !head_only {
            return Err(refuse(
                "modules_to_save",
                m,
                "the classifier head ([\"classifier\", \"score\"] or a part of it)",
            ));
        }
    }
    let r = v["r"]
        .as_i64()
        .with_context(|| format!("{}: key `r` missing or not an integer", path.display()))?;
    let lora_alpha = v["lora_alpha"].as_f64().with_context(|| {
        format!(
            "{}: key `lora_alpha` missing or not a number",
            path.display()
        )
    })?;
    let listed = match &v["target_modules"] {
        serde_json::Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .with_context(|| format!("{}: `target_modules` must be strings", path.display()))?,
        // PEFT reads a string as a regular expression over the full module names (or as
        // `all-linear`), not as one module's name.
        s @ serde_json::Value::String(_) => {
            return Err(refuse("target_modules", s, "a list of module names"))
        }
        _ => bail!("{}: key `target_modules` missing", path.display()),
    };
    // PEFT saves `all-linear` as the full names it matched (`model.layers.3.mlp.up_proj`):
    // each one names a projection on one layer.
    let mut target_modules: Vec<String> = Vec::new();
    let mut named_layers = std::collections::BTreeMap::new();
    for name in &listed {
        let short = match name.rsplit_once('.') {
            None => name.clone(),
            Some((prefix, short)) => {
                let layer = prefix
                    .strip_suffix(".self_attn")
                    .or_else(|| prefix.strip_suffix(".mlp"))
                    .and_then(|p| p.rsplit_once("layers."))
                    .and_then(|(_, i)| i.parse::<i64>().ok());
                let Some(layer) = layer else {
                    return Err(refuse(
                        "target_modules",
                        &json!(name),
                        "projection names, or full names `model.layers.N.self_attn|mlp.<projection>`",
                    ));
                };
                named_layers
                    .entry(short.to_string())
                    .or_insert_with(std::collections::BTreeSet::new)
                    .insert(layer);
                short.to_string()
            }
        };
        if !target_modules.contains(&short) {
            target_modules.push(short);
        }
    }
    let named_layers = (!named_layers.is_empty()).then_some(named_layers);
    let layers_to_transform = match &v["layers_to_transform"] {
        serde_json::Value::Null => None,
        serde_json::Value::Number(n) if n.is_i64() => n.as_i64().map(|i| vec![i]),
        serde_json::Value::Array(a) if a.iter().all(|x| x.is_i64()) => {
            Some(a.iter().filter_map(|x| x.as_i64()).collect())
        }
        other => {
            return Err(refuse(
                "layers_to_transform",
                other,
                "null, a layer index or a list of them",
            ))
        }
    };
    if let Some(p) = obj.get("layers_pattern") {
        let ours = match p {
            serde_json::Value::Null => true,
            serde_json::Value::String(s) => s.is_empty() || s == "layers",
            serde_json::Value::Array(a) => a.iter().all(|x| x.as_str() == Some("layers")),
            _ => false,
        };
        if !ours {
            return Err(refuse("layers_pattern", p, "null or \"layers\""));
        }
    }
    let mut rank_pattern = std::collections::BTreeMap::new();
    for (k, r) in v["rank_pattern"].as_object().into_iter().flatten() {
        match r.as_i64() {
            Some(r) if r > 0 => rank_pattern.insert(k.clone(), r),
            _ => {
                return Err(refuse(
                    "rank_pattern",
                    &v["rank_pattern"],
                    "positive integer ranks",
                ))
            }
        };
    }
    let mut alpha_pattern = std::collections::BTreeMap::new();
    for (k, a) in v["alpha_pattern"].as_object().into_iter().flatten() {
        match a.as_f64() {
            Some(a) => alpha_pattern.insert(k.clone(), a),
            None => return Err(refuse("alpha_pattern", &v["alpha_pattern"], "numbers")),
        };
    }
    for (key, p) in [
        ("rank_pattern", &v["rank_pattern"]),
        ("alpha_pattern", &v["alpha_pattern"]),
    ] {
        if !(p.is_null() || p.is_object()) {
            return Err(refuse(key, p, "an object of patterns"));
        }
    }
    let flag = |key: &str| match &v[key] {
        serde_json::Value::Null => Ok(false),
        serde_json::Value::Bool(b) => Ok(*b),
        other => Err(refuse(key, other, "true or false")),
    };
    let (use_rslora, use_dora) = (flag("use_rslora")?, flag("use_dora")?);
    Ok(AdapterMeta {
        init,
        r,
        lora_alpha,
        target_modules,
        use_rslora,
        named_layers,
        layers_to_transform,
        rank_pattern,
        alpha_pattern,
        use_dora,
    })
}

impl AdapterMeta {
    /// Full module names must cover every layer `layers_to_transform` names (all of the
    /// model's `num_layers` by default): we adapt a projection on each of them.
    pub fn check_layers(&self, dir: &Path, num_layers: i64) -> Result<()> {
        // PEFT adapts, of the layers `layers_to_transform` names, every one holding a target.
        let all: std::collections::BTreeSet<i64> = match &self.layers_to_transform {
            Some(l) => l
                .iter()
                .copied()
                .filter(|i| (0..num_layers).contains(i))
                .collect(),
            None => (0..num_layers).collect(),
        };
        for (name, layers) in self.named_layers.iter().flatten() {
            if *layers != all {
                bail!(
                    "{}: key `target_modules` names `{name}` on layers {:?} of the model's \
                     {num_layers}; this build adapts a projection on every layer that \
                     `layers_to_transform` names ({:?}); say the layers there",
                    dir.join(CONFIG_FILE).display(),
                    layers,
                    all
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_then_labels_json() {
        let d = tempfile::tempdir().unwrap();
        let s = labels_for(d.path(), 3).unwrap();
        assert_eq!(s.names, ["LABEL_0", "LABEL_1", "LABEL_2"]);
        assert_eq!(s.problem_type, ProblemType::SingleLabel);
        let saved = crate::task::TaskLabels {
            task: crate::config::Config::default().to_task().unwrap(),
            spec: LabelSpec {
                problem_type: ProblemType::MultiLabel,
                names: vec!["no".into(), "yes".into()],
            },
        };
        write_labels(d.path(), &saved).unwrap();
        let s = labels_for(d.path(), 2).unwrap();
        assert_eq!(s.names, ["no", "yes"]);
        assert_eq!(s.problem_type, ProblemType::MultiLabel);
        assert_eq!(s.config_fields()["label2id"]["yes"], 1);
        let e = labels_for(d.path(), 3).unwrap_err().to_string();
        assert!(e.contains("labels.json") && e.contains("2 labels"), "{e}");
        let path = d.path().join(LABELS_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("multi_label_classification", "ranking")).unwrap();
        let e = format!("{:#}", labels_for(d.path(), 2).unwrap_err());
        assert!(e.contains("problem_type") && e.contains("ranking"), "{e}");
    }

    /// PEFT 0.21.2's `LoraConfig(task_type="SEQ_CLS", r=8, target_modules=[q_proj, v_proj])
    /// .to_dict()`, every key as it writes them.
    const PEFT_DEFAULTS: &str = r#"{"task_type": "SEQ_CLS", "peft_type": "LORA",
        "auto_mapping": null, "peft_version": "0.21.2", "base_model_name_or_path": null,
        "revision": null, "inference_mode": false, "r": 8, "target_modules": ["q_proj",
        "v_proj"], "exclude_modules": null, "lora_alpha": 8, "lora_dropout": 0.0,
        "fan_in_fan_out": false, "bias": "none", "use_rslora": false, "modules_to_save": null,
        "init_lora_weights": true, "layers_to_transform": null, "layers_pattern": null,
        "rank_pattern": {}, "alpha_pattern": {}, "megatron_config": null,
        "megatron_core": "megatron.core", "trainable_token_indices": null, "loftq_config": {},
        "eva_config": null, "corda_config": null, "lora_ga_config": null, "use_dora": false,
        "velora_config": null, "alora_invocation_tokens": null, "use_qalora": false,
        "qalora_group_size": 16, "monteclora_config": null, "layer_replication": null,
        "lora_bias": false, "target_parameters": null, "use_bdlora": null,
        "arrow_config": null, "kasa_config": null, "ensure_weight_tying": false}"#;

    fn meta_of(v: &serde_json::Value) -> Result<AdapterMeta> {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(CONFIG_FILE), v.to_string()).unwrap();
        read_meta(d.path()).map_err(|e| anyhow::anyhow!("{e:#}"))
    }

    #[test]
    fn every_lora_config_key_is_honoured_or_refused_by_name() {
        let peft: serde_json::Value = serde_json::from_str(PEFT_DEFAULTS).unwrap();
        // PEFT's own defaults and our own file both load.
        let m = meta_of(&peft).unwrap();
        assert_eq!((m.r, m.lora_alpha, m.use_rslora), (8, 8.0, false));
        assert_eq!(m.target_modules, ["q_proj", "v_proj"]);
        meta_of(&lora_config_json(&crate::config::Config::default())).unwrap();
        // The table names every key PEFT writes (and earlier releases' `runtime_config`).
        let peft_keys: Vec<&String> = peft.as_object().unwrap().keys().collect();
        for (k, _) in LORA_CONFIG_KEYS {
            let known = peft_keys.iter().any(|p| p == k) || *k == "runtime_config";
            assert!(known, "{k} is not a PEFT key");
        }
        // Each option that changes what the adapter computes, set, is refused by name.
        for (key, use_) in LORA_CONFIG_KEYS {
            if !matches!(use_, KeyUse::OnlyOff(_)) {
                continue;
            }
            let mut v = peft.clone();
            v[*key] = match *key {
                "bias" => json!("lora_only"),
                _ => json!(true),
            };
            let e = meta_of(&v).unwrap_err().to_string();
            assert!(
                e.contains(&format!("key `{key}`")) && e.contains(CONFIG_FILE),
                "{key}: {e}"
            );
        }
        let cases = [
            ("init_lora_weights", json!("olora")),
            ("init_lora_weights", json!("corda")),
            ("init_lora_weights", json!(3)),
            ("loftq_config", json!({"loftq_bits": 8, "loftq_iter": 1})),
            ("target_modules", json!("all-linear")),
            ("modules_to_save", json!(["lm_head"])),
            ("task_type", json!("CAUSAL_LM")),
            ("peft_type", json!("IA3")),
            ("use_rslora", json!("yes")),
        ];
        for (key, value) in cases {
            let mut v = peft.clone();
            v[key] = value.clone();
            let e = meta_of(&v).unwrap_err().to_string();
            assert!(e.contains(&format!("key `{key}`")), "{key} = {value}: {e}");
        }
        let mut v = peft.clone();
        v["lora_magic"] = json!(1);
        let e = meta_of(&v).unwrap_err().to_string();
        assert!(e.contains("unknown LoraConfig key `lora_magic`"), "{e}");
        // Honoured: rsLoRA, gaussian init, the head in modules_to_save.
        let mut v = peft.clone();
        v["use_rslora"] = json!(true);
        v["init_lora_weights"] = json!("gaussian");
        v["modules_to_save"] = json!(["classifier", "score"]);
        assert!(meta_of(&v).unwrap().use_rslora);
        // PiSSA and LoftQ (with PEFT's loftq_config) are read, not refused.
        for (init, loftq, want) in [
            (json!("pissa"), json!({}), LoraInit::Pissa { niter: None }),
            (
                json!("pissa_niter_3"),
                json!({}),
                LoraInit::Pissa { niter: Some(3) },
            ),
            (
                json!("loftq"),
                json!({"loftq_bits": 4, "loftq_iter": 2}),
                LoraInit::Loftq { iter: 2 },
            ),
        ] {
            let mut v = peft.clone();
            v["init_lora_weights"] = init;
            v["loftq_config"] = loftq;
            assert_eq!(meta_of(&v).unwrap().init, want);
        }
    }

    #[test]
    fn full_module_names_are_read_per_layer() {
        let mut v: serde_json::Value = serde_json::from_str(PEFT_DEFAULTS).unwrap();
        v["target_modules"] = json!([
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.0.mlp.down_proj"
        ]);
        let m = meta_of(&v).unwrap();
        assert_eq!(m.target_modules, ["q_proj", "down_proj"]);
        let d = tempfile::tempdir().unwrap();
        let e = m.check_layers(d.path(), 2).unwrap_err().to_string();
        assert!(e.contains("`down_proj` on layers {0}"), "{e}");
        v["target_modules"] = json!([
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.self_attn.q_proj"
        ]);
        meta_of(&v).unwrap().check_layers(d.path(), 2).unwrap();
        v["target_modules"] = json!(["model.embed_tokens"]);
        let e = meta_of(&v).unwrap_err().to_string();
        assert!(e.contains("key `target_modules`"), "{e}");
    }
}

//! PEFT's adapter layout: `adapter_config.json` + `adapter_model.safetensors`, with PEFT's
//! key names (the `score` head included, as `modules_to_save` saves it), so that
//! `PeftModel.from_pretrained(base, dir)` loads what we train and we load what PEFT trains.
use crate::config::Config;
use crate::labels::{LabelSpec, ProblemType};
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

/// The label side saved with an adapter; `None` for an adapter saved before labels
/// travelled with it (MRPC's two classes).
pub fn read_labels(dir: &Path) -> Result<Option<TaskLabels>> {
    let path = dir.join(LABELS_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
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

/// The labels of the adapter in `adapter_dir` whose head has `num_labels` outputs: its
/// `labels.json`, else (an adapter saved before labels travelled with it) transformers'
/// defaults, `LABEL_i` and single-label classification.
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
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
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

/// The LoRA hyper-parameters an adapter was trained with (they must match the model built
/// to receive it).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterMeta {
    pub r: i64,
    pub lora_alpha: f64,
    pub target_modules: Vec<String>,
}

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
    let r = v["r"]
        .as_i64()
        .with_context(|| format!("{}: key `r` missing or not an integer", path.display()))?;
    let lora_alpha = v["lora_alpha"].as_f64().with_context(|| {
        format!(
            "{}: key `lora_alpha` missing or not a number",
            path.display()
        )
    })?;
    let target_modules = match &v["target_modules"] {
        serde_json::Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .with_context(|| format!("{}: `target_modules` must be strings", path.display()))?,
        serde_json::Value::String(s) => vec![s.clone()],
        _ => bail!("{}: key `target_modules` missing", path.display()),
    };
    Ok(AdapterMeta {
        r,
        lora_alpha,
        target_modules,
    })
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
}

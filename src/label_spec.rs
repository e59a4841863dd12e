//! What the classifier's outputs mean: the label names and transformers' `problem_type`.
//! Today every adapter is single-label with `num_labels` classes and no names; an adapter
//! folder may name them (`id2label`, `problem_type` in `adapter_config.json`, or a
//! `labels.json` beside it), and everything that writes or serves labels reads them here.
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

pub const LABELS_FILE: &str = "labels.json";

/// transformers' `config.problem_type`, which decides how logits become scores (the same
/// type the loss is chosen by).
pub use crate::model::loss::ProblemType;

#[derive(Clone, Debug, PartialEq)]
pub struct LabelSpec {
    /// Name of output `i`.
    pub id2label: Vec<String>,
    pub problem_type: ProblemType,
}

impl LabelSpec {
    /// The config.json fields transformers reads: `id2label`, `label2id`, `problem_type`.
    pub fn config_fields(&self) -> Value {
        let id2label: serde_json::Map<String, Value> = self
            .id2label
            .iter()
            .enumerate()
            .map(|(i, n)| (i.to_string(), json!(n)))
            .collect();
        let label2id: serde_json::Map<String, Value> = self
            .id2label
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), json!(i)))
            .collect();
        json!({"id2label": id2label, "label2id": label2id, "problem_type": self.problem_type.as_str()})
    }
}

/// The labels of the adapter in `adapter_dir` whose head has `num_labels` outputs: from
/// `labels.json`, else from `adapter_config.json`, else transformers' defaults (`LABEL_i`,
/// single-label classification).
pub fn label_spec(adapter_dir: &Path, num_labels: usize) -> Result<LabelSpec> {
    let mut spec = LabelSpec {
        id2label: (0..num_labels).map(|i| format!("LABEL_{i}")).collect(),
        problem_type: ProblemType::SingleLabel,
    };
    for file in [
        adapter_dir.join(LABELS_FILE),
        adapter_dir.join(crate::adapter::CONFIG_FILE),
    ] {
        if !file.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", file.display()))?;
        let (names, problem) = (v.get("id2label"), v.get("problem_type"));
        if names.is_none() && problem.is_none() {
            continue;
        }
        if let Some(p) = problem.filter(|p| !p.is_null()) {
            let s = p.as_str().unwrap_or_default();
            spec.problem_type = ProblemType::parse(s).with_context(|| {
                format!(
                    "{}: problem_type {p}: expected single_label_classification, \
                     multi_label_classification or regression",
                    file.display()
                )
            })?;
        }
        if let Some(n) = names.filter(|n| !n.is_null()) {
            let map = n
                .as_object()
                .with_context(|| format!("{}: id2label must be an object", file.display()))?;
            for (k, name) in map {
                let i: usize = k
                    .parse()
                    .ok()
                    .filter(|&i| i < num_labels)
                    .with_context(|| {
                        format!(
                            "{}: id2label key {k:?} is not a label index below {num_labels}",
                            file.display()
                        )
                    })?;
                spec.id2label[i] = name
                    .as_str()
                    .with_context(|| format!("{}: id2label[{k}] must be a string", file.display()))?
                    .to_string();
            }
            if map.len() != num_labels {
                bail!(
                    "{}: id2label names {} labels, the head has {num_labels}",
                    file.display(),
                    map.len()
                );
            }
        }
        break;
    }
    Ok(spec)
}

/// Scores `[B, num_labels]` (f64) from fp32 logits, as transformers' pipeline turns them
/// into scores for the problem type: softmax, an independent sigmoid, or the raw value.
pub fn scores(logits: &tch::Tensor, problem: ProblemType) -> tch::Tensor {
    let l = logits.to_kind(tch::Kind::Double);
    match problem {
        ProblemType::SingleLabel => l.softmax(-1, tch::Kind::Double),
        ProblemType::MultiLabel => l.sigmoid(),
        ProblemType::Regression => l,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_then_files() {
        let d = tempfile::tempdir().unwrap();
        let s = label_spec(d.path(), 3).unwrap();
        assert_eq!(s.id2label, ["LABEL_0", "LABEL_1", "LABEL_2"]);
        assert_eq!(s.problem_type, ProblemType::SingleLabel);
        std::fs::write(
            d.path().join(LABELS_FILE),
            r#"{"id2label": {"0": "no", "1": "yes"}, "problem_type": "multi_label_classification"}"#,
        )
        .unwrap();
        let s = label_spec(d.path(), 2).unwrap();
        assert_eq!(s.id2label, ["no", "yes"]);
        assert_eq!(s.problem_type, ProblemType::MultiLabel);
        assert_eq!(s.config_fields()["label2id"]["yes"], 1);
        let e = label_spec(d.path(), 3).unwrap_err().to_string();
        assert!(e.contains("labels.json") && e.contains("2 labels"), "{e}");
        std::fs::write(d.path().join(LABELS_FILE), r#"{"problem_type": "ranking"}"#).unwrap();
        let e = label_spec(d.path(), 2).unwrap_err().to_string();
        assert!(e.contains("problem_type"), "{e}");
    }
}

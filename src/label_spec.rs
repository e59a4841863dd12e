//! What the classifier's outputs mean, in the form merge and serve hand on: the label names
//! (transformers' `id2label`) and `problem_type`, from the adapter's `labels.json`
//! ([`crate::adapter::read_labels`], written by `train`) or transformers' defaults.
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::path::Path;

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

/// The labels of the adapter in `adapter_dir` whose head has `num_labels` outputs: its
/// `labels.json`, else (an adapter saved before labels travelled with it) transformers'
/// defaults, `LABEL_i` and single-label classification.
pub fn label_spec(adapter_dir: &Path, num_labels: usize) -> Result<LabelSpec> {
    let Some(saved) = crate::adapter::read_labels(adapter_dir)? else {
        return Ok(LabelSpec {
            id2label: (0..num_labels).map(|i| format!("LABEL_{i}")).collect(),
            problem_type: ProblemType::SingleLabel,
        });
    };
    if saved.spec.names.len() != num_labels {
        bail!(
            "{}: id2label names {} labels, the head has {num_labels}",
            adapter_dir.join(crate::adapter::LABELS_FILE).display(),
            saved.spec.names.len()
        );
    }
    Ok(LabelSpec {
        id2label: saved.spec.names,
        problem_type: saved.spec.problem_type,
    })
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
    fn defaults_then_labels_json() {
        let d = tempfile::tempdir().unwrap();
        let s = label_spec(d.path(), 3).unwrap();
        assert_eq!(s.id2label, ["LABEL_0", "LABEL_1", "LABEL_2"]);
        assert_eq!(s.problem_type, ProblemType::SingleLabel);
        let saved = crate::task::TaskLabels {
            task: crate::task::Task::from_config(&crate::config::Config::default()).unwrap(),
            spec: crate::task::LabelSpec {
                problem_type: ProblemType::MultiLabel,
                names: vec!["no".into(), "yes".into()],
            },
        };
        crate::adapter::write_labels(d.path(), &saved).unwrap();
        let s = label_spec(d.path(), 2).unwrap();
        assert_eq!(s.id2label, ["no", "yes"]);
        assert_eq!(s.problem_type, ProblemType::MultiLabel);
        assert_eq!(s.config_fields()["label2id"]["yes"], 1);
        let e = label_spec(d.path(), 3).unwrap_err().to_string();
        assert!(e.contains("labels.json") && e.contains("2 labels"), "{e}");
        let path = d.path().join(crate::adapter::LABELS_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("multi_label_classification", "ranking")).unwrap();
        let e = format!("{:#}", label_spec(d.path(), 2).unwrap_err());
        assert!(e.contains("problem_type") && e.contains("ranking"), "{e}");
    }
}

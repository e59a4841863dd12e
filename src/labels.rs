//! What a classifier's outputs mean: the one label type ([`LabelSpec`]: problem type and
//! label names in id order) and what one example is trained to output ([`Target`]). The
//! task, the data readers, the loss, merge and serve all speak it; `labels.json` beside an
//! adapter is read and written by [`crate::adapter`] only.
use serde_json::{json, Value};

/// transformers' `config.problem_type`, which decides the loss and how logits become scores.
pub use crate::model::loss::ProblemType;

/// The label side of a trained adapter: problem type and label names in id order (one name,
/// `LABEL_0`, for regression). Saved as [`crate::adapter::LABELS_FILE`] beside PEFT's files.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelSpec {
    pub problem_type: ProblemType,
    pub names: Vec<String>,
}

impl LabelSpec {
    pub fn num_labels(&self) -> usize {
        self.names.len()
    }

    /// The id of a label name.
    pub fn id_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// MRPC's labels as the reference trains them: ids named by themselves, so `predict`
    /// writes 0 and 1 as before (and as GLUE's server expects).
    pub fn mrpc(num_classes: usize) -> LabelSpec {
        let names = (0..num_classes).map(|i| i.to_string()).collect();
        LabelSpec {
            problem_type: ProblemType::SingleLabel,
            names,
        }
    }

    /// transformers' defaults for a head of `num_labels` outputs and no saved labels:
    /// `LABEL_i`, single-label classification, or regression for one output (as its
    /// `*ForSequenceClassification` decides a missing `problem_type`: a reward model's head).
    pub fn transformers_default(num_labels: usize) -> LabelSpec {
        LabelSpec {
            problem_type: if num_labels == 1 {
                ProblemType::Regression
            } else {
                ProblemType::SingleLabel
            },
            names: (0..num_labels).map(|i| format!("LABEL_{i}")).collect(),
        }
    }

    /// The config.json fields transformers reads: `id2label`, `label2id`, `problem_type`.
    pub fn config_fields(&self) -> Value {
        json!({
            "id2label": self.id2label(),
            "label2id": self.label2id(),
            "problem_type": self.problem_type.as_str(),
        })
    }

    /// `{"0": name, ...}` as transformers writes `id2label`.
    pub fn id2label(&self) -> serde_json::Map<String, Value> {
        self.names
            .iter()
            .enumerate()
            .map(|(i, n)| (i.to_string(), json!(n)))
            .collect()
    }

    /// `{name: id, ...}` as transformers writes `label2id`.
    pub fn label2id(&self) -> serde_json::Map<String, Value> {
        self.names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), json!(i)))
            .collect()
    }
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

/// What the model is trained to output for one example.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Single-label: a class id.
    Class(i64),
    /// Multi-label: one 0/1 per label.
    Multi(Vec<f32>),
    /// Regression: the value.
    Value(f64),
}

impl Target {
    pub fn class(&self) -> Option<i64> {
        match self {
            Target::Class(c) => Some(*c),
            _ => None,
        }
    }
}

impl From<i64> for Target {
    fn from(c: i64) -> Self {
        Target::Class(c)
    }
}

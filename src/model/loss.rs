//! The sequence-classification losses of transformers' `LlamaForSequenceClassification` (its
//! `ForSequenceClassificationLoss`), one per `problem_type`, with the class weights torch's
//! losses take (transformers has none: a Trainer subclass passes them to torch's loss).
use anyhow::{bail, Context, Result};
use std::fmt;
use tch::{Kind, Reduction, Tensor};

/// Single-label targets equal to this count for nothing, as in torch's and transformers'
/// cross-entropy.
pub const IGNORE_INDEX: i64 = -100;

/// A model config's `problem_type`, in transformers' spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProblemType {
    /// One class per example: cross-entropy.
    SingleLabel,
    /// Any set of labels per example: binary cross-entropy with logits on multi-hot targets.
    MultiLabel,
    /// A real target: mean squared error.
    Regression,
}

impl ProblemType {
    pub const ALL: [ProblemType; 3] = [
        ProblemType::SingleLabel,
        ProblemType::MultiLabel,
        ProblemType::Regression,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProblemType::SingleLabel => "single_label_classification",
            ProblemType::MultiLabel => "multi_label_classification",
            ProblemType::Regression => "regression",
        }
    }

    pub fn parse(s: &str) -> Result<ProblemType> {
        match ProblemType::ALL.into_iter().find(|p| p.as_str() == s) {
            Some(p) => Ok(p),
            None => {
                let names: Vec<&str> = ProblemType::ALL.iter().map(|p| p.as_str()).collect();
                bail!(
                    "unknown problem_type `{s}` (expected one of: {})",
                    names.join(", ")
                )
            }
        }
    }
}

impl fmt::Display for ProblemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-class weights of the loss: torch `CrossEntropyLoss(weight=)` for single-label
/// (a weighted mean: the sum of weighted terms over the sum of the targets' weights),
/// `BCEWithLogitsLoss(pos_weight=)` for multi-label (the weight of each label's positive
/// term). Regression takes none.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum LossWeights {
    #[default]
    None,
    PerClass(Vec<f64>),
}

/// The mean loss of `logits` (`[batch, num_labels]`) against `targets`, as transformers'
/// `ForSequenceClassificationLoss` computes it for `problem`:
/// - single-label: `cross_entropy(logits.view(-1, K), targets.view(-1))`, targets integer class
///   ids ([`IGNORE_INDEX`] skipped);
/// - multi-label: `BCEWithLogitsLoss()(logits, targets)`, targets multi-hot of the logits' shape;
/// - regression: `MSELoss()(logits.squeeze(), targets.squeeze())` for one output, else
///   `MSELoss()(logits, targets)`.
///
/// Targets of multi-label and regression are cast to the logits' kind (a Trainer's collator
/// gives transformers float32 labels); the loss is in the logits' kind.
pub fn loss(
    logits: &Tensor,
    targets: &Tensor,
    problem: ProblemType,
    weights: &LossWeights,
) -> Result<Tensor> {
    let size = logits.size();
    let &[_, num_labels] = size.as_slice() else {
        bail!("logits of shape {size:?}: expected [batch, num_labels]");
    };
    let targets = targets.to_device(logits.device());
    let weight = match weights {
        LossWeights::None => None,
        LossWeights::PerClass(_) if problem == ProblemType::Regression => {
            bail!("class weights do not apply to regression")
        }
        LossWeights::PerClass(w) => {
            if w.len() as i64 != num_labels {
                bail!(
                    "{} class weights for {num_labels} labels ({problem})",
                    w.len()
                );
            }
            if let Some(bad) = w.iter().find(|v| !v.is_finite() || **v < 0.0) {
                bail!("class weight {bad} is not a finite non-negative number");
            }
            Some(
                Tensor::from_slice(w)
                    .to_kind(logits.kind())
                    .to_device(logits.device()),
            )
        }
    };
    let out = match problem {
        ProblemType::SingleLabel => {
            if !matches!(
                targets.kind(),
                Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8
            ) {
                bail!(
                    "single-label targets must be integer class ids, got {:?}",
                    targets.kind()
                );
            }
            logits
                .view([-1, num_labels])
                .f_cross_entropy_loss(
                    &targets.view([-1]).to_kind(Kind::Int64),
                    weight.as_ref(),
                    Reduction::Mean,
                    IGNORE_INDEX,
                    0.0,
                )
                .context("single-label cross-entropy")?
        }
        ProblemType::MultiLabel => {
            if targets.size() != size {
                bail!(
                    "multi-label targets of shape {:?} for logits of shape {size:?}",
                    targets.size()
                );
            }
            logits
                .f_binary_cross_entropy_with_logits(
                    &targets.to_kind(logits.kind()),
                    None::<&Tensor>,
                    weight.as_ref(),
                    Reduction::Mean,
                )
                .context("multi-label binary cross-entropy with logits")?
        }
        ProblemType::Regression => {
            let (input, target) = if num_labels == 1 {
                (logits.squeeze(), targets.squeeze())
            } else {
                (logits.shallow_clone(), targets)
            };
            // MSELoss would broadcast mismatched shapes (with a warning); here that is a bug.
            if input.size() != target.size() {
                bail!(
                    "regression targets of shape {:?} for logits of shape {size:?}",
                    target.size()
                );
            }
            input
                .f_mse_loss(&target.to_kind(logits.kind()), Reduction::Mean)
                .context("regression mean squared error")?
        }
    };
    Ok(out)
}

/// sklearn's `compute_class_weight("balanced", classes=range(num_classes), y=labels)`:
/// `n / (num_classes * count[c])`. Like sklearn, refuses a class absent from `labels` (its
/// weight would be infinite) and a label outside the classes.
/// TRL `RewardTrainer`'s loss of preference pairs: `logits` `[2B, 1]` are the chosen texts'
/// rewards then the rejected ones' (its collator's order), `margins` `[B]`;
/// `−mean(log σ(r_c − r_r − margin))`, plus `center · mean((r_c + r_r)²)` when set.
pub fn pairwise_loss(logits: &Tensor, margins: &Tensor, center: Option<f64>) -> Result<Tensor> {
    let size = logits.size();
    let b = margins.size().first().copied().unwrap_or(0);
    if size != [2 * b, 1] {
        bail!("pair logits {size:?} must be [2·{b}, 1] for {b} pairs");
    }
    let r = logits.view([2, b]);
    let (chosen, rejected) = (r.get(0), r.get(1));
    let margins = margins.to_device(logits.device()).to_kind(logits.kind());
    let out = (&chosen - &rejected - margins)
        .log_sigmoid()
        .mean(None)
        .neg();
    Ok(match center {
        Some(c) => out + (chosen + rejected).square().mean(None) * c,
        None => out,
    })
}

pub fn balanced_class_weights(labels: &[i64], num_classes: usize) -> Result<Vec<f64>> {
    let mut counts = vec![0usize; num_classes];
    for &l in labels {
        match usize::try_from(l).ok().filter(|&c| c < num_classes) {
            Some(c) => counts[c] += 1,
            None => bail!("label {l} is not a class id below {num_classes}"),
        }
    }
    if let Some(c) = counts.iter().position(|&n| n == 0) {
        bail!("class {c} has no example, so no balanced weight");
    }
    let n = labels.len() as f64;
    Ok(counts
        .iter()
        .map(|&k| n / (num_classes as f64 * k as f64))
        .collect())
}

/// The `pos_weight` torch's `BCEWithLogitsLoss` documentation recommends for multi-hot
/// targets: per label, the count of negatives over the count of positives. A label that is
/// never (or always) present is refused.
pub fn balanced_pos_weight(rows: &[Vec<bool>], num_labels: usize) -> Result<Vec<f64>> {
    let mut positives = vec![0usize; num_labels];
    for (i, row) in rows.iter().enumerate() {
        if row.len() != num_labels {
            bail!(
                "multi-hot row {i} has {} labels, not {num_labels}",
                row.len()
            );
        }
        for (p, &on) in positives.iter_mut().zip(row) {
            *p += usize::from(on);
        }
    }
    positives
        .iter()
        .enumerate()
        .map(|(label, &pos)| {
            let neg = rows.len() - pos;
            if pos == 0 || neg == 0 {
                bail!(
                    "label {label} is on in {pos} of {} rows: no balanced pos_weight",
                    rows.len()
                );
            }
            Ok(neg as f64 / pos as f64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_type_names_round_trip() {
        for p in ProblemType::ALL {
            assert_eq!(ProblemType::parse(p.as_str()).unwrap(), p);
        }
        let err = ProblemType::parse("multilabel").unwrap_err().to_string();
        assert!(
            err.contains("multilabel") && err.contains("regression"),
            "{err}"
        );
    }

    #[test]
    fn balanced_weights() {
        // 4 of class 0, 1 of class 1, 1 of class 2: 6 / (3 * count).
        let w = balanced_class_weights(&[0, 0, 1, 0, 2, 0], 3).unwrap();
        assert_eq!(w, [0.5, 2.0, 2.0]);
        let err = balanced_class_weights(&[0, 0], 2).unwrap_err().to_string();
        assert!(err.contains("class 1"), "{err}");
        assert!(balanced_class_weights(&[0, 3], 2).is_err());
        assert!(balanced_class_weights(&[-1, 0], 2).is_err());
        let rows = vec![vec![true, false], vec![false, true], vec![false, true]];
        assert_eq!(balanced_pos_weight(&rows, 2).unwrap(), [2.0, 0.5]);
        assert!(balanced_pos_weight(&rows[..1], 2).is_err());
    }

    #[test]
    fn loss_refuses_mismatched_inputs() {
        let logits = Tensor::zeros([3, 2], (Kind::Float, tch::Device::Cpu));
        let float_targets = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu));
        let none = LossWeights::None;
        assert!(loss(&logits, &float_targets, ProblemType::SingleLabel, &none).is_err());
        assert!(loss(&logits, &float_targets, ProblemType::MultiLabel, &none).is_err());
        assert!(loss(&logits, &float_targets, ProblemType::Regression, &none).is_err());
        let three = LossWeights::PerClass(vec![1.0; 3]);
        let ids = Tensor::from_slice(&[0i64, 1, 1]);
        assert!(loss(&logits, &ids, ProblemType::SingleLabel, &three).is_err());
        let two = LossWeights::PerClass(vec![1.0; 2]);
        let one = logits.narrow(1, 0, 1);
        assert!(loss(&one, &float_targets, ProblemType::Regression, &two).is_err());
        let out_of_range = Tensor::from_slice(&[0i64, 2, 1]);
        assert!(loss(&logits, &out_of_range, ProblemType::SingleLabel, &none).is_err());
    }
}

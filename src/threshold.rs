//! Decision thresholds: how probabilities become labels. By default a single-label
//! classifier predicts its argmax (for two classes: class 1 when p₁ > 0.5) and a multi-label
//! one every label with p > 0.5. `threshold: tune` picks, on the validation split, the cut on
//! p₁ that maximises the task's main metric (binary), or per label the cut that maximises
//! that label's F1 (multi-label); a number fixes it. Saved beside the adapter
//! (`threshold.json`), it changes labels and never probabilities.
use crate::metrics::{self, Metric, Predictions};
use anyhow::{bail, ensure, Result};

/// The file beside an adapter holding its thresholds.
pub const FILE: &str = "threshold.json";

/// At most this many cut points are tried (quantiles of the distinct probabilities).
const MAX_CANDIDATES: usize = 2000;

/// How probabilities become labels.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Decision {
    /// argmax; multi-label: p > 0.5.
    #[default]
    Default,
    /// Two classes: class 1 when p₁ > t.
    Binary(f64),
    /// Multi-label: label l when p_l > t_l.
    PerLabel(Vec<f64>),
}

impl Decision {
    /// Class ids of single-label probability rows.
    pub fn classes(&self, probs: &[Vec<f64>]) -> Vec<i64> {
        probs
            .iter()
            .map(|row| match self {
                Decision::Binary(t) if row.len() == 2 => i64::from(row[1] > *t),
                _ => argmax(row) as i64,
            })
            .collect()
    }

    /// Label flags of multi-label probability rows.
    pub fn flags(&self, probs: &[Vec<f64>]) -> Vec<Vec<bool>> {
        probs
            .iter()
            .map(|row| {
                row.iter()
                    .enumerate()
                    .map(|(l, &p)| match self {
                        Decision::PerLabel(t) => p > t.get(l).copied().unwrap_or(0.5),
                        Decision::Binary(t) => p > *t,
                        Decision::Default => p > 0.5,
                    })
                    .collect()
            })
            .collect()
    }
}

/// The first index of the largest value (argmax's tie rule everywhere here).
pub fn argmax(row: &[f64]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f64::NEG_INFINITY),
            |b, (c, &v)| if v > b.1 { (c, v) } else { b },
        )
        .0
}

/// A tuned cut: the threshold, the metric's value there and at 0.5.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Tuned {
    pub threshold: f64,
    pub value: f64,
    pub at_half: f64,
}

/// Cut points between consecutive distinct probabilities (thinned to quantiles past
/// MAX_CANDIDATES), and 0.5.
fn candidates(p: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = p.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v.dedup();
    let mut cuts: Vec<f64> = v.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    if cuts.len() > MAX_CANDIDATES {
        let n = cuts.len();
        cuts = (0..MAX_CANDIDATES)
            .map(|i| cuts[i * n / MAX_CANDIDATES])
            .collect();
    }
    cuts.push(0.5);
    cuts
}

/// The cut of `score` (one probability per example) maximising `value(flags)`; ties go to
/// the cut nearest 0.5, so a flat metric keeps the default.
fn best_cut(score: &[f64], value: impl Fn(&[bool]) -> Result<f64>) -> Result<Tuned> {
    let at = |t: f64| -> Result<f64> {
        let flags: Vec<bool> = score.iter().map(|&p| p > t).collect();
        value(&flags)
    };
    let at_half = at(0.5)?;
    let mut best = Tuned {
        threshold: 0.5,
        value: at_half,
        at_half,
    };
    for t in candidates(score) {
        let v = at(t)?;
        if v > best.value || (v == best.value && (t - 0.5).abs() < (best.threshold - 0.5).abs()) {
            best.threshold = t;
            best.value = v;
        }
    }
    Ok(best)
}

/// Two classes: the threshold on p₁ maximising `metric` against the gold class ids.
pub fn tune_binary(probs: &[Vec<f64>], gold: &[i64], metric: Metric) -> Result<Tuned> {
    ensure!(!probs.is_empty(), "no examples to tune a threshold on");
    ensure!(
        probs.len() == gold.len(),
        "{} rows for {} labels",
        probs.len(),
        gold.len()
    );
    if probs.iter().any(|r| r.len() != 2) {
        bail!("a tuned threshold needs two classes (p₁ against the rest); this task has more");
    }
    let p1: Vec<f64> = probs.iter().map(|r| r[1]).collect();
    best_cut(&p1, |flags| {
        let pred = flags.iter().map(|&f| i64::from(f)).collect();
        let m = metrics::compute(
            &[metric],
            &Predictions::Classes {
                pred,
                gold: gold.to_vec(),
            },
        )?;
        Ok(m[0].1)
    })
}

/// Multi-label: per label, the threshold maximising that label's F1.
pub fn tune_per_label(probs: &[Vec<f64>], gold: &[Vec<bool>]) -> Result<Vec<Tuned>> {
    ensure!(!probs.is_empty(), "no examples to tune thresholds on");
    ensure!(
        probs.len() == gold.len(),
        "{} rows for {} labels",
        probs.len(),
        gold.len()
    );
    let labels = gold[0].len();
    (0..labels)
        .map(|l| {
            let p: Vec<f64> = probs.iter().map(|r| r[l]).collect();
            let g: Vec<i64> = gold.iter().map(|r| i64::from(r[l])).collect();
            best_cut(&p, |flags| {
                let pred: Vec<i64> = flags.iter().map(|&f| i64::from(f)).collect();
                Ok(metrics::f1_positive(&pred, &g))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shifted_binary_classifier_gets_a_lower_cut() {
        // Positives score 0.3..0.45, negatives 0.05..0.2: at 0.5 nothing is positive (F1 0);
        // any cut between 0.2 and 0.3 separates them.
        let mut probs = Vec::new();
        let mut gold = Vec::new();
        for i in 0..20 {
            let p = if i % 2 == 0 {
                0.3 + 0.0075 * i as f64
            } else {
                0.05 + 0.0075 * i as f64
            };
            probs.push(vec![1.0 - p, p]);
            gold.push(i64::from(i % 2 == 0));
        }
        let t = tune_binary(&probs, &gold, Metric::F1).unwrap();
        assert_eq!(t.at_half, 0.0);
        assert_eq!(t.value, 1.0);
        assert!(t.threshold > 0.19 && t.threshold < 0.3, "{t:?}");
        assert_eq!(Decision::Binary(t.threshold).classes(&probs), gold);
        assert!(tune_binary(&[vec![0.2, 0.3, 0.5]], &[0], Metric::F1).is_err());
    }

    #[test]
    fn a_flat_metric_keeps_one_half_and_labels_tune_apart() {
        // Every cut between the two groups is as good: the one nearest 0.5 is kept.
        let probs = vec![
            vec![0.9, 0.1],
            vec![0.8, 0.2],
            vec![0.2, 0.8],
            vec![0.1, 0.9],
        ];
        let t = tune_binary(&probs, &[0, 0, 1, 1], Metric::Accuracy).unwrap();
        assert_eq!(t.threshold, 0.5);
        // Label 0 is separable at 0.5; label 1's positives sit below 0.3.
        let probs = vec![
            vec![0.9, 0.25],
            vec![0.1, 0.28],
            vec![0.8, 0.05],
            vec![0.2, 0.1],
        ];
        let gold = vec![
            vec![true, true],
            vec![false, true],
            vec![true, false],
            vec![false, false],
        ];
        let ts = tune_per_label(&probs, &gold).unwrap();
        assert_eq!(ts[0].threshold, 0.5);
        assert!(ts[1].threshold > 0.1 && ts[1].threshold < 0.25, "{ts:?}");
        let d = Decision::PerLabel(ts.iter().map(|t| t.threshold).collect());
        assert_eq!(d.flags(&probs), gold);
        assert_eq!(Decision::Default.classes(&[vec![0.5, 0.5]]), [0]);
    }
}

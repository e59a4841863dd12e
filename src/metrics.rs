//! Evaluation metrics, each equal to scikit-learn's or scipy's on the same predictions and
//! named by the `evaluate` library's GLUE metric keys (docs/metrics.md lists the edge-case
//! conventions); and the CSV logs of the run folder.
use crate::runio;
use anyhow::{bail, Result};
use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;

/// Fraction of predictions equal to the labels.
pub fn accuracy(pred: &[i64], labels: &[i64]) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    let hit = pred.iter().zip(labels).filter(|(p, l)| p == l).count();
    hit as f64 / labels.len() as f64
}

/// F1 of the positive class (1), as sklearn's `f1_score` with its default `pos_label=1`
/// (0 when there are no true or predicted positives).
pub fn f1_positive(pred: &[i64], labels: &[i64]) -> f64 {
    let (mut tp, mut fp, mut fn_) = (0usize, 0usize, 0usize);
    for (p, l) in pred.iter().zip(labels) {
        match (*p == 1, *l == 1) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            _ => {}
        }
    }
    if tp == 0 {
        return 0.0;
    }
    2.0 * tp as f64 / (2 * tp + fp + fn_) as f64
}

/// sklearn's `f1_score(average="macro")`: the mean F1 over the classes present in the labels or
/// the predictions (so a class neither predicted nor present does not count), each F1 being
/// `2tp / (2tp + fp + fn)`. 0 for empty input.
pub fn macro_f1(pred: &[i64], labels: &[i64]) -> f64 {
    assert_eq!(pred.len(), labels.len(), "macro_f1: lengths differ");
    let classes: BTreeSet<i64> = pred.iter().chain(labels).copied().collect();
    if classes.is_empty() {
        return 0.0;
    }
    let sum: f64 = classes
        .iter()
        .map(|&c| {
            let (mut tp, mut fp, mut fn_) = (0usize, 0usize, 0usize);
            for (&p, &l) in pred.iter().zip(labels) {
                match (p == c, l == c) {
                    (true, true) => tp += 1,
                    (true, false) => fp += 1,
                    (false, true) => fn_ += 1,
                    _ => {}
                }
            }
            f1_from_counts(tp, fp, fn_)
        })
        .sum();
    sum / classes.len() as f64
}

/// `2tp / (2tp + fp + fn)`, 0 when nothing is true or predicted (sklearn's `zero_division=0`).
fn f1_from_counts(tp: usize, fp: usize, fn_: usize) -> f64 {
    let denom = 2 * tp + fp + fn_;
    if denom == 0 {
        return 0.0;
    }
    (2 * tp) as f64 / denom as f64
}

/// sklearn's `matthews_corrcoef`, the multi-class (Gorodkin) form of its source, which for two
/// classes is the usual MCC. 0 when it is undefined (every prediction or every label the same
/// class, or no input), as sklearn returns.
pub fn matthews_corrcoef(pred: &[i64], labels: &[i64]) -> f64 {
    assert_eq!(
        pred.len(),
        labels.len(),
        "matthews_corrcoef: lengths differ"
    );
    let classes: Vec<i64> = pred
        .iter()
        .chain(labels)
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let index = |c: i64| classes.binary_search(&c).unwrap_or(0);
    let mut t_sum = vec![0i128; classes.len()];
    let mut p_sum = vec![0i128; classes.len()];
    let mut correct = 0i128;
    for (&p, &l) in pred.iter().zip(labels) {
        t_sum[index(l)] += 1;
        p_sum[index(p)] += 1;
        correct += i128::from(p == l);
    }
    // Integer sums as sklearn's int64 confusion matrix; only the final ratio is in floats.
    let n = labels.len() as i128;
    let dot = |a: &[i128], b: &[i128]| a.iter().zip(b).map(|(x, y)| x * y).sum::<i128>();
    let cov_ytyp = correct * n - dot(&t_sum, &p_sum);
    let cov_ypyp = n * n - dot(&p_sum, &p_sum);
    let cov_ytyt = n * n - dot(&t_sum, &t_sum);
    if cov_ypyp == 0 || cov_ytyt == 0 {
        return 0.0;
    }
    cov_ytyp as f64 / ((cov_ytyt * cov_ypyp) as f64).sqrt()
}

/// scipy's `stats.pearsonr` statistic. NaN where scipy returns NaN (a constant input, a NaN
/// or infinite value) and where it raises (fewer than two points).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len(), "pearson: lengths differ");
    if x.len() < 2 || x.iter().chain(y).any(|v| !v.is_finite()) || constant(x) || constant(y) {
        return f64::NAN;
    }
    let centred = |v: &[f64]| {
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        v.iter().map(|a| a - mean).collect::<Vec<f64>>()
    };
    let (xm, ym) = (centred(x), centred(y));
    let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
    let cov: f64 = xm.iter().zip(&ym).map(|(a, b)| a * b).sum();
    (cov / (norm(&xm) * norm(&ym))).clamp(-1.0, 1.0)
}

/// scipy's `stats.spearmanr` statistic: the Pearson correlation of the ranks, tied values
/// sharing their average rank (`rankdata(method="average")`). NaN where scipy returns NaN (a
/// constant input, a NaN value) and for fewer than two points; infinities rank as the
/// largest or smallest values, as in scipy.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len(), "spearman: lengths differ");
    if x.len() < 2 || x.iter().chain(y).any(|v| v.is_nan()) || constant(x) || constant(y) {
        return f64::NAN;
    }
    pearson(&average_ranks(x), &average_ranks(y))
}

fn constant(v: &[f64]) -> bool {
    v.iter().all(|a| *a == v[0])
}

/// 1-based ranks, ties sharing the mean of the ranks they span; `v` holds no NaN.
fn average_ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut ranks = vec![0.0; v.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && v[order[end]] == v[order[start]] {
            end += 1;
        }
        // Positions start..end hold ranks start+1..=end; their mean is (start + 1 + end) / 2.
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

/// Per-label true positive, false positive and false negative counts of multi-hot rows.
fn label_counts(pred: &[Vec<bool>], gold: &[Vec<bool>]) -> Vec<(usize, usize, usize)> {
    assert_eq!(
        pred.len(),
        gold.len(),
        "multi-label metric: row counts differ"
    );
    let width = gold.first().map_or(0, Vec::len);
    let mut counts = vec![(0, 0, 0); width];
    for (p, g) in pred.iter().zip(gold) {
        assert!(
            p.len() == width && g.len() == width,
            "multi-label metric: rows of different widths"
        );
        for (c, (&pi, &gi)) in counts.iter_mut().zip(p.iter().zip(g)) {
            match (pi, gi) {
                (true, true) => c.0 += 1,
                (true, false) => c.1 += 1,
                (false, true) => c.2 += 1,
                _ => {}
            }
        }
    }
    counts
}

/// sklearn's `f1_score(average="micro")` on multi-hot rows: the F1 of the counts pooled over
/// every label; 0 when nothing is true or predicted.
pub fn micro_f1(pred: &[Vec<bool>], gold: &[Vec<bool>]) -> f64 {
    let (tp, fp, fn_) = label_counts(pred, gold)
        .into_iter()
        .fold((0, 0, 0), |a, c| (a.0 + c.0, a.1 + c.1, a.2 + c.2));
    f1_from_counts(tp, fp, fn_)
}

/// sklearn's `f1_score(average="macro")` on multi-hot rows: the mean over every label column
/// (present or not) of its F1, a label never true nor predicted counting 0
/// (`zero_division=0`). 0 for no rows.
pub fn macro_f1_multilabel(pred: &[Vec<bool>], gold: &[Vec<bool>]) -> f64 {
    let counts = label_counts(pred, gold);
    if counts.is_empty() {
        return 0.0;
    }
    let sum: f64 = counts
        .iter()
        .map(|&(tp, fp, fn_)| f1_from_counts(tp, fp, fn_))
        .sum();
    sum / counts.len() as f64
}

/// sklearn's `accuracy_score` on multi-hot rows (subset accuracy): the fraction of rows whose
/// every label is right. 0 for no rows.
pub fn exact_match(pred: &[Vec<bool>], gold: &[Vec<bool>]) -> f64 {
    assert_eq!(pred.len(), gold.len(), "exact_match: row counts differ");
    if gold.is_empty() {
        return 0.0;
    }
    let hit = pred.iter().zip(gold).filter(|(p, g)| p == g).count();
    hit as f64 / gold.len() as f64
}

/// A metric, named by the `evaluate` library's GLUE key where one exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    Accuracy,
    /// Binary F1 of class id 1.
    F1,
    MatthewsCorrelation,
    Pearson,
    Spearmanr,
    /// Macro F1 of classes, or of labels for multi-label predictions.
    MacroF1,
    MicroF1,
    ExactMatch,
}

impl Metric {
    pub const ALL: [Metric; 8] = [
        Metric::Accuracy,
        Metric::F1,
        Metric::MatthewsCorrelation,
        Metric::Pearson,
        Metric::Spearmanr,
        Metric::MacroF1,
        Metric::MicroF1,
        Metric::ExactMatch,
    ];

    /// The column name in `eval.csv` and the spelling of `metric_for_best_model`.
    pub fn key(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::F1 => "f1",
            Metric::MatthewsCorrelation => "matthews_correlation",
            Metric::Pearson => "pearson",
            Metric::Spearmanr => "spearmanr",
            Metric::MacroF1 => "macro_f1",
            Metric::MicroF1 => "micro_f1",
            Metric::ExactMatch => "exact_match",
        }
    }

    pub fn parse(key: &str) -> Result<Metric> {
        match Metric::ALL.into_iter().find(|m| m.key() == key) {
            Some(m) => Ok(m),
            None => {
                let keys: Vec<&str> = Metric::ALL.iter().map(|m| m.key()).collect();
                bail!(
                    "unknown metric `{key}` (expected one of: {})",
                    keys.join(", ")
                )
            }
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// Predictions of a split with their gold targets, in the form of the task's problem type.
#[derive(Clone, Debug, PartialEq)]
pub enum Predictions {
    /// Single-label classification: class ids.
    Classes { pred: Vec<i64>, gold: Vec<i64> },
    /// Multi-label classification: one row of flags per example, one flag per label.
    MultiHot {
        pred: Vec<Vec<bool>>,
        gold: Vec<Vec<bool>>,
    },
    /// Regression: one value per example.
    Values { pred: Vec<f64>, gold: Vec<f64> },
}

impl Predictions {
    fn kind(&self) -> &'static str {
        match self {
            Predictions::Classes { .. } => "class",
            Predictions::MultiHot { .. } => "multi-label",
            Predictions::Values { .. } => "regression",
        }
    }

    fn check(&self) -> Result<()> {
        let (np, ng) = match self {
            Predictions::Classes { pred, gold } => (pred.len(), gold.len()),
            Predictions::MultiHot { pred, gold } => {
                let width = gold.first().map_or(0, Vec::len);
                if let Some(i) = pred.iter().chain(gold).position(|r| r.len() != width) {
                    let (which, row) = if i < pred.len() {
                        ("predicted", i)
                    } else {
                        ("gold", i - pred.len())
                    };
                    bail!("multi-label {which} row {row} has a width other than {width}");
                }
                (pred.len(), gold.len())
            }
            Predictions::Values { pred, gold } => (pred.len(), gold.len()),
        };
        if np != ng {
            bail!("{np} predictions for {ng} gold targets");
        }
        Ok(())
    }
}

/// Each of `metrics` on `predictions`, in the order asked. A metric that does not apply to
/// the predictions' problem type (Pearson of class ids, say) is an error.
pub fn compute(metrics: &[Metric], predictions: &Predictions) -> Result<Vec<(Metric, f64)>> {
    predictions.check()?;
    metrics
        .iter()
        .map(|&m| {
            let value = match (m, predictions) {
                (Metric::Accuracy, Predictions::Classes { pred, gold }) => accuracy(pred, gold),
                (Metric::F1, Predictions::Classes { pred, gold }) => f1_positive(pred, gold),
                (Metric::MatthewsCorrelation, Predictions::Classes { pred, gold }) => {
                    matthews_corrcoef(pred, gold)
                }
                (Metric::MacroF1, Predictions::Classes { pred, gold }) => macro_f1(pred, gold),
                (Metric::MacroF1, Predictions::MultiHot { pred, gold }) => {
                    macro_f1_multilabel(pred, gold)
                }
                (Metric::MicroF1, Predictions::MultiHot { pred, gold }) => micro_f1(pred, gold),
                (Metric::ExactMatch, Predictions::MultiHot { pred, gold }) => {
                    exact_match(pred, gold)
                }
                (Metric::Pearson, Predictions::Values { pred, gold }) => pearson(pred, gold),
                (Metric::Spearmanr, Predictions::Values { pred, gold }) => spearman(pred, gold),
                _ => bail!(
                    "metric `{m}` does not apply to {} predictions",
                    predictions.kind()
                ),
            };
            Ok((m, value))
        })
        .collect()
}

/// scikit-learn's `confusion_matrix(gold, pred, labels=range(k))`: row = the gold class,
/// column = the predicted one.
pub fn confusion(pred: &[i64], gold: &[i64], k: usize) -> Vec<Vec<u64>> {
    let mut m = vec![vec![0u64; k]; k];
    for (&p, &g) in pred.iter().zip(gold) {
        if let (Ok(g), Ok(p)) = (usize::try_from(g), usize::try_from(p)) {
            if g < k && p < k {
                m[g][p] += 1;
            }
        }
    }
    m
}

/// One row of scikit-learn's `classification_report`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ReportRow {
    pub precision: f64,
    pub recall: f64,
    #[serde(rename = "f1-score")]
    pub f1: f64,
    pub support: u64,
}

/// scikit-learn's `classification_report(gold, pred, labels=range(k), zero_division=0)`:
/// each class, the accuracy, and the macro (unweighted) and support-weighted averages.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassReport {
    pub classes: Vec<ReportRow>,
    pub accuracy: f64,
    pub macro_avg: ReportRow,
    pub weighted_avg: ReportRow,
}

pub fn classification_report(pred: &[i64], gold: &[i64], k: usize) -> ClassReport {
    let m = confusion(pred, gold, k);
    let div = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let classes: Vec<ReportRow> = (0..k)
        .map(|c| {
            let tp = m[c][c];
            let predicted: u64 = (0..k).map(|g| m[g][c]).sum();
            let support: u64 = m[c].iter().sum();
            let (p, r) = (div(tp, predicted), div(tp, support));
            let f1 = if p + r == 0.0 {
                0.0
            } else {
                2.0 * p * r / (p + r)
            };
            ReportRow {
                precision: p,
                recall: r,
                f1,
                support,
            }
        })
        .collect();
    let n: u64 = classes.iter().map(|c| c.support).sum();
    let avg = |w: &dyn Fn(&ReportRow) -> f64| -> ReportRow {
        let total: f64 = classes.iter().map(w).sum();
        let mean = |f: fn(&ReportRow) -> f64| {
            if total == 0.0 {
                0.0
            } else {
                classes.iter().map(|c| w(c) * f(c)).sum::<f64>() / total
            }
        };
        ReportRow {
            precision: mean(|c| c.precision),
            recall: mean(|c| c.recall),
            f1: mean(|c| c.f1),
            support: n,
        }
    };
    let trace: u64 = (0..k).map(|c| m[c][c]).sum();
    ClassReport {
        accuracy: div(trace, n),
        macro_avg: avg(&|_| 1.0),
        weighted_avg: avg(&|c| c.support as f64),
        classes,
    }
}

impl ClassReport {
    /// scikit-learn's `output_dict=True` layout: each class by name, `accuracy`, `macro avg`,
    /// `weighted avg`.
    pub fn to_json(&self, names: &[String]) -> serde_json::Value {
        let mut v = serde_json::Map::new();
        for (n, c) in names.iter().zip(&self.classes) {
            v.insert(n.clone(), serde_json::json!(c));
        }
        v.insert("accuracy".into(), serde_json::json!(self.accuracy));
        v.insert("macro avg".into(), serde_json::json!(self.macro_avg));
        v.insert("weighted avg".into(), serde_json::json!(self.weighted_avg));
        serde_json::Value::Object(v)
    }

    /// The table scikit-learn prints (4 decimals).
    pub fn text(&self, names: &[String]) -> String {
        let w = names
            .iter()
            .map(String::len)
            .chain([12])
            .max()
            .unwrap_or(12);
        let row = |n: &str, r: &ReportRow| {
            format!(
                "{n:>w$} {:>9.4} {:>9.4} {:>9.4} {:>9}\n",
                r.precision, r.recall, r.f1, r.support
            )
        };
        let mut t = format!(
            "{:>w$} {:>9} {:>9} {:>9} {:>9}\n\n",
            "", "precision", "recall", "f1-score", "support"
        );
        for (n, c) in names.iter().zip(&self.classes) {
            t += &row(n, c);
        }
        t += &format!(
            "\n{:>w$} {:>9} {:>9} {:>9.4} {:>9}\n",
            "accuracy", "", "", self.accuracy, self.macro_avg.support
        );
        t += &row("macro avg", &self.macro_avg);
        t += &row("weighted avg", &self.weighted_avg);
        t
    }
}

/// A CSV file rewritten whole (atomically) on every flush, so a reader never sees half a row
/// and a crash never loses the rows already written.
pub struct CsvLog {
    path: PathBuf,
    text: String,
}

impl CsvLog {
    /// Starts a log with `header`, keeping the rows of an existing file (with the same
    /// header) for which `keep` says so: a resumed run keeps the rows up to its checkpoint.
    pub fn create(path: PathBuf, header: &[&str], keep: impl Fn(&[&str]) -> bool) -> Result<Self> {
        let mut text = format!("{}\n", header.join(","));
        if let Ok(old) = std::fs::read_to_string(&path) {
            if old.starts_with(&text) {
                for line in old.lines().skip(1) {
                    let fields: Vec<&str> = line.split(',').collect();
                    if keep(&fields) {
                        text.push_str(line);
                        text.push('\n');
                    }
                }
            }
        }
        let log = CsvLog { path, text };
        log.flush()?;
        Ok(log)
    }

    pub fn row(&mut self, fields: &[String]) {
        self.text.push_str(&fields.join(","));
        self.text.push('\n');
    }

    pub fn flush(&self) -> Result<()> {
        runio::write_text(&self.path, &self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_report_by_hand() {
        // gold 0 0 1 1 2, pred 0 1 1 1 0: class 0 p 1/2 r 1/2; class 1 p 2/3 r 1; class 2 p 0 r 0.
        let r = classification_report(&[0, 1, 1, 1, 0], &[0, 0, 1, 1, 2], 3);
        assert_eq!(
            confusion(&[0, 1, 1, 1, 0], &[0, 0, 1, 1, 2], 3),
            [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
        );
        assert_eq!((r.classes[0].precision, r.classes[0].recall), (0.5, 0.5));
        assert!((r.classes[1].f1 - 0.8).abs() < 1e-12);
        assert_eq!((r.classes[2].f1, r.classes[2].support), (0.0, 1));
        assert!((r.accuracy - 0.6).abs() < 1e-12);
        assert!((r.macro_avg.f1 - (0.5 + 0.8) / 3.0).abs() < 1e-12);
        assert!((r.weighted_avg.recall - (2.0 * 0.5 + 2.0 * 1.0) / 5.0).abs() < 1e-12);
        assert_eq!(r.macro_avg.support, 5);
    }

    #[test]
    fn accuracy_and_f1() {
        let pred = [1, 1, 0, 0, 1];
        let lab = [1, 0, 0, 1, 1];
        assert!((accuracy(&pred, &lab) - 0.6).abs() < 1e-12);
        // tp=2 fp=1 fn=1 -> 4/6
        assert!((f1_positive(&pred, &lab) - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(f1_positive(&[0, 0], &[0, 0]), 0.0);
    }

    #[test]
    fn macro_f1_counts_classes_present_in_either() {
        // class 0: tp1 fp0 fn1 -> 2/3; class 1: tp1 fp1 fn1 -> 1/2; class 2, only predicted: 0.
        let v = macro_f1(&[0, 1, 1, 2], &[0, 0, 1, 1]);
        assert!((v - (2.0 / 3.0 + 0.5 + 0.0) / 3.0).abs() < 1e-15);
    }

    #[test]
    fn matthews_is_zero_when_undefined_and_one_when_perfect() {
        assert_eq!(matthews_corrcoef(&[1, 1, 1], &[0, 1, 0]), 0.0);
        assert_eq!(matthews_corrcoef(&[], &[]), 0.0);
        assert!((matthews_corrcoef(&[0, 2, 1, 2], &[0, 2, 1, 2]) - 1.0).abs() < 1e-15);
        assert!((matthews_corrcoef(&[1, 0, 1, 0], &[0, 1, 0, 1]) + 1.0).abs() < 1e-15);
    }

    #[test]
    fn ranks_average_ties() {
        assert_eq!(
            average_ranks(&[3.0, 1.0, 3.0, 2.0, 3.0]),
            [4.0, 1.0, 4.0, 2.0, 4.0]
        );
        assert_eq!(average_ranks(&[f64::INFINITY, -1.0]), [2.0, 1.0]);
    }

    #[test]
    fn correlations_are_nan_where_undefined() {
        assert!(pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_nan());
        assert!(pearson(&[1.0], &[2.0]).is_nan());
        assert!(spearman(&[1.0, f64::NAN], &[1.0, 2.0]).is_nan());
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]) - 1.0).abs() < 1e-15);
        assert!((spearman(&[1.0, 2.0, 3.0], &[1.0, 8.0, 27.0]) - 1.0).abs() < 1e-15);
    }

    #[test]
    fn multilabel_metrics() {
        let gold = vec![vec![true, false, false], vec![true, true, false]];
        let pred = vec![vec![true, false, false], vec![false, true, false]];
        // pooled tp2 fp0 fn1 -> 4/5; per label 2/3, 1, 0 (never true nor predicted).
        assert!((micro_f1(&pred, &gold) - 0.8).abs() < 1e-15);
        assert!((macro_f1_multilabel(&pred, &gold) - (2.0 / 3.0 + 1.0) / 3.0).abs() < 1e-15);
        assert_eq!(exact_match(&pred, &gold), 0.5);
    }

    #[test]
    fn metric_keys_round_trip_and_compute_checks_its_input() {
        for m in Metric::ALL {
            assert_eq!(Metric::parse(m.key()).unwrap(), m);
        }
        let err = Metric::parse("f1_score").unwrap_err().to_string();
        assert!(
            err.contains("f1_score") && err.contains("matthews_correlation"),
            "{err}"
        );
        let classes = Predictions::Classes {
            pred: vec![0, 1],
            gold: vec![1, 1],
        };
        let got = compute(&[Metric::F1, Metric::Accuracy], &classes).unwrap();
        assert_eq!(got, [(Metric::F1, 2.0 / 3.0), (Metric::Accuracy, 0.5)]);
        let err = compute(&[Metric::Pearson], &classes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pearson") && err.contains("class"), "{err}");
        let short = Predictions::Values {
            pred: vec![0.0],
            gold: vec![1.0, 2.0],
        };
        assert!(compute(&[Metric::Pearson], &short).is_err());
        let ragged = Predictions::MultiHot {
            pred: vec![vec![true], vec![true, false]],
            gold: vec![vec![true, false], vec![true, false]],
        };
        let err = compute(&[Metric::MicroF1], &ragged)
            .unwrap_err()
            .to_string();
        assert!(err.contains("predicted row 0"), "{err}");
    }
}

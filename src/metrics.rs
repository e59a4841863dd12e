//! Classification metrics (GLUE MRPC reports accuracy and the F1 of class 1) and the CSV logs
//! of the run folder.
use crate::runio;
use anyhow::Result;
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
    fn accuracy_and_f1() {
        let pred = [1, 1, 0, 0, 1];
        let lab = [1, 0, 0, 1, 1];
        assert!((accuracy(&pred, &lab) - 0.6).abs() < 1e-12);
        // tp=2 fp=1 fn=1 -> 4/6
        assert!((f1_positive(&pred, &lab) - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(f1_positive(&[0, 0], &[0, 0]), 0.0);
    }
}

//! Evaluation: logits ─► argmax ─► accuracy, F1 (and the loss where labels exist). Under
//! data parallelism each rank scores its shard, the log-probabilities are gathered, and the
//! padding duplicates are dropped, so every example counts exactly once.
use crate::data::batch::{collate, epoch_batches, Encoded};
use crate::dist::{self, Dist};
use crate::metrics;
use crate::model::classifier::LlamaClassifier;
use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Default)]
pub struct EvalResult {
    /// None when the split has no labels (GLUE's test.tsv).
    pub accuracy: Option<f64>,
    pub f1: Option<f64>,
    pub loss: Option<f64>,
    pub idx: Vec<i64>,
    pub pred: Vec<i64>,
    pub probs: Vec<Vec<f64>>,
}

/// Log-probabilities [n, C] (f64, on `device`) of `items`, in order; no dropout, no graph.
fn log_probs(
    model: &LlamaClassifier,
    items: &[&Encoded],
    batch_size: usize,
    pad_id: i64,
    device: Device,
) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let mut parts = Vec::new();
    for batch_idx in epoch_batches(items.len(), batch_size, None, 0, None) {
        let batch: Vec<&Encoded> = batch_idx.iter().map(|&i| items[i]).collect();
        let b = collate(&batch, pad_id);
        let logits = model.logits(
            &b.input_ids.to_device(device),
            &b.attention_mask.to_device(device),
        )?;
        parts.push(logits.to_kind(Kind::Double).log_softmax(-1, Kind::Double));
    }
    ensure!(!parts.is_empty(), "nothing to evaluate");
    Ok(Tensor::cat(&parts, 0))
}

/// Metrics of `data` from its log-probabilities (rows in the same order).
fn summarize(data: &[Encoded], log_probs: &Tensor) -> Result<EvalResult> {
    let lp = log_probs.to_device(Device::Cpu);
    let rows: Vec<Vec<f64>> = Vec::<Vec<f64>>::try_from(&lp)?;
    ensure!(
        rows.len() == data.len(),
        "{} scores for {} examples",
        rows.len(),
        data.len()
    );
    let mut out = EvalResult::default();
    for (e, row) in data.iter().zip(&rows) {
        let pred = row
            .iter()
            .enumerate()
            .fold((0usize, f64::NEG_INFINITY), |best, (c, &v)| {
                if v > best.1 {
                    (c, v)
                } else {
                    best
                }
            })
            .0;
        out.idx.push(e.idx);
        out.pred.push(pred as i64);
        out.probs.push(row.iter().map(|v| v.exp()).collect());
    }
    let labels: Option<Vec<i64>> = data.iter().map(|e| e.label).collect();
    if let Some(labels) = labels.filter(|l| !l.is_empty()) {
        let nll: f64 = labels
            .iter()
            .zip(&rows)
            .map(|(&l, row)| -row.get(l as usize).copied().unwrap_or(f64::NEG_INFINITY))
            .sum();
        out.accuracy = Some(metrics::accuracy(&out.pred, &labels));
        out.f1 = Some(metrics::f1_positive(&out.pred, &labels));
        out.loss = Some(nll / labels.len() as f64);
    }
    Ok(out)
}

/// Runs the model over `data`: on this process alone, or sharded over the ranks of `dist`
/// (every rank gets the same, complete result).
pub fn evaluate(
    model: &LlamaClassifier,
    data: &[Encoded],
    batch_size: usize,
    pad_id: i64,
    device: Device,
    dist: Option<&Dist>,
) -> Result<EvalResult> {
    let lp = match dist {
        None => log_probs(
            model,
            &data.iter().collect::<Vec<_>>(),
            batch_size,
            pad_id,
            device,
        )?,
        Some(d) => {
            let shard = dist::shard_indices(data.len(), d.rank, d.world_size);
            let items: Vec<&Encoded> = shard.iter().map(|&i| &data[i]).collect();
            let local = log_probs(model, &items, batch_size, pad_id, device)?;
            let gathered = d.all_gather(&local)?;
            dist::unshard_tensors(&gathered, data.len())?
        }
    };
    summarize(data, &lp)
}

/// Fraction of the most frequent label: the accuracy a constant classifier gets.
pub fn majority_fraction(data: &[Encoded]) -> f64 {
    let mut counts = std::collections::BTreeMap::new();
    for e in data {
        if let Some(l) = e.label {
            *counts.entry(l).or_insert(0usize) += 1;
        }
    }
    let n: usize = counts.values().sum();
    counts
        .values()
        .max()
        .map_or(0.0, |m| *m as f64 / n.max(1) as f64)
}

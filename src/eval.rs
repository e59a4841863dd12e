//! Evaluation: logits ─► argmax ─► accuracy, F1 (and the loss where labels exist).
use crate::data::batch::{collate, epoch_batches, Encoded};
use crate::metrics;
use crate::model::classifier::LlamaClassifier;
use anyhow::Result;
use tch::{Device, Kind};

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

/// Runs the model over `data` in order (no dropout, no graph).
pub fn evaluate(
    model: &LlamaClassifier,
    data: &[Encoded],
    batch_size: usize,
    pad_id: i64,
    device: Device,
) -> Result<EvalResult> {
    let _guard = tch::no_grad_guard();
    let mut out = EvalResult::default();
    let mut labels = Vec::new();
    let mut loss_sum = 0.0;
    let all_labelled = data.iter().all(|e| e.label.is_some());
    for batch_idx in epoch_batches(data.len(), batch_size, None, 0, None) {
        let items: Vec<&Encoded> = batch_idx.iter().map(|&i| &data[i]).collect();
        let b = collate(&items, pad_id);
        let ids = b.input_ids.to_device(device);
        let mask = b.attention_mask.to_device(device);
        let logits = model.forward(&ids, &mask, false).to_kind(Kind::Float);
        let probs = logits.softmax(-1, Kind::Float).to_device(Device::Cpu);
        let pred = probs.argmax(-1, false);
        if all_labelled {
            if let Some(l) = &b.labels {
                let l = l.to_device(device);
                let loss = logits.cross_entropy_for_logits(&l);
                loss_sum += loss.double_value(&[]) * items.len() as f64;
                labels.extend(Vec::<i64>::try_from(&l.to_device(Device::Cpu))?);
            }
        }
        out.pred.extend(Vec::<i64>::try_from(&pred)?);
        let rows: Vec<Vec<f64>> = Vec::<Vec<f64>>::try_from(&probs.to_kind(Kind::Double))?;
        out.probs.extend(rows);
        out.idx.extend(b.idx.iter().copied());
    }
    if all_labelled && !data.is_empty() {
        out.accuracy = Some(metrics::accuracy(&out.pred, &labels));
        out.f1 = Some(metrics::f1_positive(&out.pred, &labels));
        out.loss = Some(loss_sum / data.len() as f64);
    }
    Ok(out)
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
    counts.values().max().map_or(0.0, |m| *m as f64 / n.max(1) as f64)
}


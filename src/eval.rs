//! Evaluation: logits ─► predictions (argmax, the 0.5 threshold of the sigmoid, or the value)
//! ─► the task's metrics (and the loss where labels exist). Under data parallelism each rank
//! scores its shard, the logits are gathered, and the padding duplicates are dropped, so
//! every example counts exactly once.
use crate::calibration;
use crate::config::Config;
use crate::data::batch::{collate, epoch_batches, target_tensor, Encoded};
use crate::data::long_text::{self, Aggregate};
use crate::dist::{self, Dist};
use crate::labels::Target;
use crate::labels::{LabelSpec, ProblemType};
use crate::metrics;
use crate::model::classifier::LlamaClassifier;
use crate::model::loss::{self, LossWeights};
use crate::task::TaskLabels;
use crate::threshold::Decision;
use anyhow::{bail, ensure, Result};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Default)]
pub struct EvalResult {
    /// None when the split has no labels (GLUE's test.tsv).
    pub loss: Option<f64>,
    /// The task's metrics (key, value), in its order; empty when the split has no labels.
    pub metrics: Vec<(String, f64)>,
    pub idx: Vec<i64>,
    /// Single-label: the class id the decision picks (argmax, or a threshold on p₁); 0
    /// otherwise.
    pub pred: Vec<i64>,
    /// Single-label: softmax; multi-label: sigmoid per label; regression: the value.
    pub probs: Vec<Vec<f64>>,
    /// The model's logits (divided by its temperature, if it has one), row by row.
    pub logits: Vec<Vec<f64>>,
    /// Single-label with labels: NLL, Brier and ECE of the probabilities.
    pub calibration: Option<calibration::Calibration>,
    /// Single-label with labels: the gold class ids, in `idx` order.
    pub gold: Vec<i64>,
    /// Multi-label with labels: the gold label flags, in `idx` order.
    pub gold_flags: Vec<Vec<bool>>,
    /// With `long_text: chunk`: every window's logits, which the rows above aggregate.
    pub windows: Option<Windows>,
    /// Preference pairs: `probs` and `logits` hold each pair's (chosen, rejected) rewards.
    pub pairs: bool,
    /// A reward model's plain rows: `probs` holds each row's reward.
    pub rewards: bool,
}

/// The windows of a chunked split, row by row: their document's idx, their place in it, and
/// their logits.
#[derive(Debug, Clone, Default)]
pub struct Windows {
    pub idx: Vec<i64>,
    pub window: Vec<u32>,
    pub logits: Vec<Vec<f64>>,
}

impl EvalResult {
    pub fn metric(&self, key: &str) -> Option<f64> {
        self.metrics.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

/// How to score a split: the label side and the metric keys.
#[derive(Debug, Clone)]
pub struct Scoring {
    pub spec: LabelSpec,
    pub metrics: Vec<String>,
    /// How probabilities become labels (argmax / 0.5 unless an adapter's threshold.json or
    /// the configuration sets a threshold).
    pub decision: Decision,
    /// How a chunked document's windows become its prediction.
    pub aggregate: Aggregate,
}

impl Scoring {
    /// MRPC as the reference scores it: accuracy and the F1 of class 1.
    pub fn mrpc(num_classes: usize) -> Scoring {
        Scoring {
            spec: LabelSpec::mrpc(num_classes),
            metrics: vec!["accuracy".into(), "f1".into()],
            decision: Decision::Default,
            aggregate: Aggregate::MeanLogits,
        }
    }

    /// How a run scores a task's evaluation split: MRPC as the reference does unless
    /// `metric_for_best_model` names another metric, else the task's metrics; chunked
    /// documents combined as `chunk_aggregate` says.
    pub fn for_task(labels: &TaskLabels, cfg: &Config) -> Result<Scoring> {
        let aggregate = cfg.chunk_aggregate()?;
        if aggregate == Aggregate::MaxProb && labels.spec.problem_type == ProblemType::Regression {
            bail!("key `chunk_aggregate`: max_prob has no meaning for regression; use mean_logits");
        }
        if labels.task.is_classic_mrpc() && cfg.metric_for_best_model.is_none() {
            return Ok(Scoring {
                aggregate,
                ..Scoring::mrpc(labels.spec.num_labels())
            });
        }
        Ok(Scoring {
            spec: labels.spec.clone(),
            metrics: labels.task.metrics_for(&labels.spec)?,
            decision: Decision::Default,
            aggregate,
        })
    }
}

/// Logits [n, C] (f64, on `device`) of `items`, in order; no dropout, no graph.
fn all_logits(
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
        // A batch of pairs scores its chosen texts then its rejected ones: one row per pair.
        let logits = match batch.first().and_then(|e| e.rejected.as_ref()) {
            Some(_) => logits.view([2, -1]).transpose(0, 1),
            None => logits,
        };
        parts.push(logits.to_kind(Kind::Double));
    }
    ensure!(!parts.is_empty(), "nothing to evaluate");
    Ok(Tensor::cat(&parts, 0))
}

/// Metrics of `data` from its logits (rows in the same order).
/// The loss is the one training minimises ([`loss::loss`], with the run's class weights), in
/// f64 over the whole split.
fn summarize(
    data: &[Encoded],
    logits: &Tensor,
    scoring: &Scoring,
    weights: &LossWeights,
    pairs: Option<Option<f64>>,
) -> Result<EvalResult> {
    if let Some(center) = pairs {
        return summarize_pairs(data, logits, center);
    }
    let problem = scoring.spec.problem_type;
    let logits = logits.to_device(Device::Cpu);
    let lp = logits.log_softmax(-1, Kind::Double);
    let rows: Vec<Vec<f64>> = match problem {
        ProblemType::SingleLabel => Vec::<Vec<f64>>::try_from(&lp)?,
        ProblemType::MultiLabel => Vec::<Vec<f64>>::try_from(&logits.sigmoid())?,
        ProblemType::Regression => Vec::<Vec<f64>>::try_from(&logits)?,
    };
    ensure!(
        rows.len() == data.len(),
        "{} scores for {} examples",
        rows.len(),
        data.len()
    );
    let mut out = EvalResult {
        logits: Vec::<Vec<f64>>::try_from(&logits)?,
        ..EvalResult::default()
    };
    for (e, row) in data.iter().zip(&rows) {
        out.idx.push(e.idx);
        out.probs.push(match problem {
            ProblemType::SingleLabel => row.iter().map(|v| v.exp()).collect(),
            _ => row.clone(),
        });
    }
    out.pred = match problem {
        ProblemType::SingleLabel => scoring.decision.classes(&out.probs),
        _ => vec![0; out.probs.len()],
    };
    let labels: Option<Vec<&Target>> = data.iter().map(|e| e.label.as_ref()).collect();
    let Some(labels) = labels.filter(|l| !l.is_empty()) else {
        return Ok(out);
    };
    let refs: Vec<&Encoded> = data.iter().collect();
    let targets = target_tensor(&refs)
        .ok_or_else(|| anyhow::anyhow!("targets of mixed kinds in one split"))?;
    out.loss = Some(loss::loss(&logits, &targets, problem, weights)?.double_value(&[]));
    let predictions = match problem {
        ProblemType::SingleLabel => {
            let gold: Vec<i64> = labels
                .iter()
                .map(|t| t.class())
                .collect::<Option<_>>()
                .ok_or_else(|| anyhow::anyhow!("a non-class target in a single-label split"))?;
            // A model gone non-finite still gets its loss and metrics reported (NaN), not an
            // error from calibration.
            let finite = out.logits.iter().flatten().all(|v| v.is_finite());
            out.calibration = finite
                .then(|| calibration::measure(&out.logits, &gold))
                .transpose()?;
            out.gold = gold.clone();
            metrics::Predictions::Classes {
                pred: out.pred.clone(),
                gold,
            }
        }
        ProblemType::MultiLabel => {
            let mut gold = Vec::new();
            for t in &labels {
                let Target::Multi(hot) = t else {
                    bail!("a non-multi-hot target in a multi-label split");
                };
                gold.push(hot.iter().map(|&y| y > 0.5).collect::<Vec<bool>>());
            }
            out.gold_flags = gold.clone();
            metrics::Predictions::MultiHot {
                pred: scoring.decision.flags(&out.probs),
                gold,
            }
        }
        ProblemType::Regression => {
            let mut gold = Vec::new();
            for t in &labels {
                let Target::Value(v) = t else {
                    bail!("a non-numeric target in a regression split");
                };
                gold.push(*v);
            }
            let pred: Vec<f64> = out.probs.iter().map(|r| r[0]).collect();
            metrics::Predictions::Values { pred, gold }
        }
    };
    let keys: Vec<metrics::Metric> = scoring
        .metrics
        .iter()
        .map(|k| metrics::Metric::parse(k))
        .collect::<Result<_>>()?;
    out.metrics = metrics::compute(&keys, &predictions)?
        .into_iter()
        .map(|(m, v)| (m.key().to_string(), v))
        .collect();
    Ok(out)
}

/// RewardTrainer's evaluation of preference pairs from their `[n, 2]` (chosen, rejected)
/// rewards: its loss, `accuracy` (the share with r_c > r_r) and `margin` (mean r_c − r_r).
fn summarize_pairs(data: &[Encoded], rewards: &Tensor, center: Option<f64>) -> Result<EvalResult> {
    let rows: Vec<Vec<f64>> = Vec::try_from(&rewards.to_device(Device::Cpu))?;
    ensure!(
        rows.len() == data.len(),
        "{} rewards for {} pairs",
        rows.len(),
        data.len()
    );
    let n = rows.len().max(1) as f64;
    let mut out = EvalResult {
        idx: data.iter().map(|e| e.idx).collect(),
        pred: vec![0; rows.len()],
        probs: rows.clone(),
        logits: rows.clone(),
        pairs: true,
        ..EvalResult::default()
    };
    let accuracy = rows.iter().filter(|r| r[0] > r[1]).count() as f64 / n;
    let margin = rows.iter().map(|r| r[0] - r[1]).sum::<f64>() / n;
    out.metrics = vec![("accuracy".into(), accuracy), ("margin".into(), margin)];
    let refs: Vec<&Encoded> = data.iter().collect();
    if let Some(margins) = target_tensor(&refs) {
        let stacked = rewards
            .to_device(Device::Cpu)
            .transpose(0, 1)
            .reshape([-1, 1]);
        out.loss = Some(loss::pairwise_loss(&stacked, &margins, center)?.double_value(&[]));
    }
    Ok(out)
}

/// Runs the model over `data`: on this process alone, or sharded over the ranks of `dist`
/// (every rank gets the same, complete result).
pub fn evaluate(
    model: &LlamaClassifier,
    data: &[Encoded],
    scoring: &Scoring,
    batch_size: usize,
    pad_id: i64,
    device: Device,
    dist: Option<&Dist>,
) -> Result<EvalResult> {
    let lp = match dist {
        None => all_logits(
            model,
            &data.iter().collect::<Vec<_>>(),
            batch_size,
            pad_id,
            device,
        )?,
        Some(d) => {
            let shard = dist::shard_indices(data.len(), d.rank, d.world_size);
            let items: Vec<&Encoded> = shard.iter().map(|&i| &data[i]).collect();
            let local = all_logits(model, &items, batch_size, pad_id, device)?;
            let gathered = d.all_gather(&local)?;
            dist::unshard_tensors(&gathered, data.len())?
        }
    };
    if !data.iter().any(|e| e.window > 0) {
        // A reward model scores pairs, or plain rows as a regression head does.
        let pairs = data.first().is_some_and(|e| e.rejected.is_some());
        let mut out = summarize(
            data,
            &lp,
            scoring,
            model.loss_weights(),
            model.pairwise().filter(|_| pairs),
        )?;
        out.rewards = model.pairwise().is_some() && !pairs;
        return Ok(out);
    }
    let rows: Vec<Vec<f64>> = Vec::try_from(&lp.to_device(Device::Cpu))?;
    let mut docs = Vec::new();
    let mut flat = Vec::new();
    for range in documents(data) {
        let agg = long_text::aggregate(
            &rows[range.clone()],
            scoring.spec.problem_type,
            scoring.aggregate,
        )?;
        flat.extend(agg);
        docs.push(data[range.start].clone());
    }
    let k = rows.first().map_or(0, Vec::len) as i64;
    let doc_logits = Tensor::from_slice(&flat).view([docs.len() as i64, k]);
    let mut out = summarize(&docs, &doc_logits, scoring, model.loss_weights(), None)?;
    out.windows = Some(Windows {
        idx: data.iter().map(|e| e.idx).collect(),
        window: data.iter().map(|e| e.window).collect(),
        logits: rows,
    });
    Ok(out)
}

/// The rows of each document of `data`: a new one starts at every window 0.
pub fn documents(data: &[Encoded]) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, e) in data.iter().enumerate() {
        match out.last_mut() {
            Some(last) if e.window > 0 => last.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// Fraction of the most frequent label: the accuracy a constant classifier gets.
pub fn majority_fraction(data: &[Encoded]) -> f64 {
    let mut counts = std::collections::BTreeMap::new();
    // A chunked document counts once.
    for e in data.iter().filter(|e| e.window == 0) {
        if let Some(l) = e.label.as_ref().and_then(Target::class) {
            *counts.entry(l).or_insert(0usize) += 1;
        }
    }
    let n: usize = counts.values().sum();
    counts
        .values()
        .max()
        .map_or(0.0, |m| *m as f64 / n.max(1) as f64)
}

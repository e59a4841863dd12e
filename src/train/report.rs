//! What a run says about itself: evaluations on the console and in eval.csv, summary.json's
//! view of them, the best adapter's choice, and profile.csv.
use super::trainer::Trainer;
use crate::adapter::TemperatureFit;
use crate::calibration;
use crate::config::ThresholdSetting;
use crate::eval::{self, EvalResult, Scoring};
use crate::labels::ProblemType;
use crate::metrics::Metric;
use crate::profile::Part;
use crate::runio;
use crate::threshold::{self, Decision};
use anyhow::Result;
use serde_json::json;
pub(super) fn opt_fmt(v: Option<f64>) -> String {
    v.map_or(String::new(), |x| format!("{x:.6}"))
}

pub(super) fn eval_json(r: &EvalResult) -> serde_json::Value {
    let mut v = json!({"loss": r.loss, "examples": r.pred.len()});
    for (k, m) in &r.metrics {
        v[k.as_str()] = json!(m);
    }
    if let Some(c) = r.calibration {
        v["calibration"] = json!(c);
    }
    v
}

/// "accuracy 0.812500 f1 0.870000 loss 0.421000": the metrics of a result, then its loss.
pub(super) fn metrics_text(scoring: &Scoring, r: &EvalResult) -> String {
    let mut parts: Vec<String> = scoring
        .metrics
        .iter()
        .map(|k| format!("{k} {}", opt_fmt(r.metric(k))))
        .collect();
    parts.push(format!("loss {}", opt_fmt(r.loss)));
    parts.join(" ")
}

impl Trainer<'_> {
    /// The model on each evaluation split (sharded over the ranks).
    pub(super) fn evaluate(&self) -> Result<Vec<EvalResult>> {
        self.eval_sets
            .iter()
            .map(|(_, set)| {
                eval::evaluate(
                    &self.model,
                    set,
                    &self.scoring,
                    self.cfg.eval_batch_size,
                    self.pad,
                    self.device,
                    self.dist.as_ref(),
                )
            })
            .collect()
    }

    /// eval.csv gets one row per evaluation split; the console one line per split, `what`
    /// saying when ("epoch 2", "step 40"). `epoch` is eval.csv's: the epoch ended, or for an
    /// evaluation within one (`eval_steps`) the fraction of epochs trained, as transformers
    /// logs it.
    pub(super) fn log_eval(&mut self, epoch: &str, what: &str, rs: &[EvalResult]) -> Result<()> {
        let lines: Vec<String> = self
            .eval_sets
            .iter()
            .zip(rs)
            .map(|((split, set), r)| {
                let majority =
                    if epoch == "0" && self.labels.spec.problem_type == ProblemType::SingleLabel {
                        format!(" (majority class {:.4})", eval::majority_fraction(set))
                    } else {
                        String::new()
                    };
                format!(
                    "{what}: {split} {}{majority}",
                    metrics_text(&self.scoring, r)
                )
            })
            .collect();
        say!(self, "{}", lines.join("\n"));
        if let Some((_, evals)) = &mut self.logs {
            for ((split, _), r) in self.eval_sets.iter().zip(rs) {
                let mut row = vec![epoch.to_string(), split.clone(), opt_fmt(r.loss)];
                row.extend(self.scoring.metrics.iter().map(|k| opt_fmt(r.metric(k))));
                if self.labels.spec.problem_type == ProblemType::SingleLabel {
                    let c = r.calibration;
                    row.extend(
                        [c.map(|c| c.nll), c.map(|c| c.brier), c.map(|c| c.ece)].map(opt_fmt),
                    );
                }
                row.push(self.st.step.to_string());
                evals.row(&row);
            }
            evals.flush()?;
        }
        Ok(())
    }

    /// `calibrate: temperature`: the temperature fitted on the first evaluation split's
    /// logits (those of the weights just evaluated); None when off or the split has no
    /// labels.
    pub(super) fn temperature_fit(&self, rs: &[EvalResult]) -> Result<Option<TemperatureFit>> {
        if self.cfg.calibrate != "temperature" {
            return Ok(None);
        }
        let (Some(r), Some((split, _))) = (rs.first(), self.eval_sets.first()) else {
            return Ok(None);
        };
        let Some(before) = r.calibration else {
            return Ok(None);
        };
        let t = calibration::fit_temperature(&r.logits, &r.gold)?;
        let after = calibration::measure(&calibration::scaled(&r.logits, t), &r.gold)?;
        Ok(Some(TemperatureFit {
            method: "temperature",
            temperature: t,
            split: split.clone(),
            examples: r.gold.len(),
            before,
            after,
        }))
    }

    /// `threshold`: what goes into `threshold.json` beside the adapter just evaluated, with
    /// the console line; None without the key (or, for `tune`, without labels). `tune` cuts
    /// the probabilities `predict` will cut: scaled by `fit`'s temperature when calibrating.
    pub(super) fn threshold_choice(
        &self,
        rs: &[EvalResult],
        fit: Option<&TemperatureFit>,
    ) -> Result<Option<(serde_json::Value, String)>> {
        let spec = &self.labels.spec;
        let tune_metric = match &self.cfg.threshold {
            None => return Ok(None),
            Some(ThresholdSetting::Fixed(t)) => {
                let file = match crate::loader::fixed_decision(*t, spec)? {
                    Decision::PerLabel(ts) => json!({"method": "fixed", "threshold": ts}),
                    _ => json!({"method": "fixed", "threshold": t}),
                };
                return Ok(Some((file, format!("  threshold (fixed): {t}"))));
            }
            // `metric_for_best_model` if set, else F1 where the task reports it (MRPC's
            // accuracy would not reward a cut), else the main metric.
            Some(ThresholdSetting::Named(_)) => match &self.cfg.metric_for_best_model {
                Some(m) => m.clone(),
                None if self.scoring.metrics.iter().any(|m| m == "f1") => "f1".into(),
                None => self.scoring.metrics[0].clone(),
            },
        };
        let (Some(r), Some((split, _))) = (rs.first(), self.eval_sets.first()) else {
            return Ok(None);
        };
        if spec.problem_type == ProblemType::SingleLabel {
            // No calibration: no labels, or a model gone non-finite.
            if r.calibration.is_none() {
                return Ok(None);
            }
            let probs = match fit {
                Some(f) => calibration::probabilities(&r.logits, f.temperature),
                None => r.probs.clone(),
            };
            let metric = Metric::parse(&tune_metric)?;
            let t = threshold::tune_binary(&probs, &r.gold, metric)?;
            let line = format!(
                "  threshold on {split}: class 1 when p > {:.4} ({tune_metric} {:.4}; {:.4} at 0.5)",
                t.threshold, t.value, t.at_half
            );
            let file = json!({"method": "tune", "metric": tune_metric, "split": split,
                "threshold": t.threshold, "value": t.value, "at_0.5": t.at_half,
                "temperature": fit.map(|f| f.temperature)});
            return Ok(Some((file, line)));
        }
        if r.gold_flags.is_empty() || r.probs.iter().flatten().any(|v| !v.is_finite()) {
            return Ok(None);
        }
        let ts = threshold::tune_per_label(&r.probs, &r.gold_flags)?;
        let line = format!(
            "  thresholds on {split} (each label's F1): {}",
            spec.names
                .iter()
                .zip(&ts)
                .map(|(n, t)| format!(
                    "{n} {:.4} ({:.4}; {:.4} at 0.5)",
                    t.threshold, t.value, t.at_half
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let file = json!({"method": "tune", "metric": "f1 of each label", "split": split,
            "labels": spec.names, "threshold": ts.iter().map(|t| t.threshold).collect::<Vec<_>>(),
            "value": ts.iter().map(|t| t.value).collect::<Vec<_>>(),
            "at_0.5": ts.iter().map(|t| t.at_half).collect::<Vec<_>>()});
        Ok(Some((file, line)))
    }

    /// `reliability.{png,svg}` of the final evaluation (first split), before and, with
    /// `calibrate: temperature`, after scaling. A drawing that fails (no font) is a warning:
    /// the trained run is not lost over a picture.
    pub(super) fn write_reliability(&self) {
        let Some(r) = self.last_eval.as_ref().and_then(|rs| rs.first()) else {
            return;
        };
        if r.calibration.is_none() {
            return;
        }
        let drawn = (|| -> Result<()> {
            let mut curves = vec![(
                format!("model (ECE {:.4})", r.calibration.map_or(0.0, |c| c.ece)),
                calibration::reliability(&r.logits, &r.gold)?,
            )];
            if let Some(fit) = &self.last_fit {
                let scaled = calibration::scaled(&r.logits, fit.temperature);
                curves.push((
                    format!(
                        "temperature {:.3} (ECE {:.4})",
                        fit.temperature, fit.after.ece
                    ),
                    calibration::reliability(&scaled, &r.gold)?,
                ));
            }
            let split = self.eval_sets.first().map_or("", |(s, _)| s.as_str());
            crate::plot::reliability_diagram(
                &self.run,
                "reliability",
                &format!("Reliability on {split} at step {}", self.st.step),
                &curves,
            )?;
            Ok(())
        })();
        if let Err(e) = drawn {
            eprintln!("warning: reliability diagram not drawn: {e:#}");
        }
    }

    /// summary.json's view of an evaluation: the first split's result (the one the best
    /// adapter is chosen by), with every split's under `splits` when there are several.
    pub(super) fn evals_json(&self, rs: &[EvalResult]) -> Option<serde_json::Value> {
        let mut v = eval_json(rs.first()?);
        if rs.len() > 1 {
            let mut splits = serde_json::Map::new();
            for ((split, _), r) in self.eval_sets.iter().zip(rs) {
                splits.insert(split.clone(), eval_json(r));
            }
            v["splits"] = serde_json::Value::Object(splits);
        }
        Some(v)
    }

    /// The reference's evaluation before any training (a fresh run only).
    pub fn evaluate_baseline(&mut self) -> Result<()> {
        if !self.cfg.eval_before_training || self.resumed {
            return Ok(());
        }
        let rs = self.evaluate()?;
        self.log_eval("0", "epoch 0 (before training)", &rs)?;
        self.baseline = self.evals_json(&rs);
        self.last_eval = Some(rs);
        Ok(())
    }

    /// An evaluation in training, judged: whether it is the best so far ([`Self::is_best`])
    /// and, with `early_stopping_patience`, transformers' `EarlyStoppingCallback`: against
    /// the best before this evaluation, an improvement by more than
    /// `early_stopping_threshold` resets the count of evaluations without one, anything else
    /// adds one, and the run stops when the count reaches the patience.
    pub(super) fn judge(&mut self, rs: &[EvalResult]) -> bool {
        let main = rs.first().and_then(|r| r.metric(&self.scoring.metrics[0]));
        if let (Some(patience), Some(m)) = (self.cfg.early_stopping_patience, main) {
            let improved = self
                .st
                .best_accuracy
                .is_none_or(|b| m > b && (m - b).abs() > self.cfg.early_stopping_threshold);
            self.st.patience_counter = if improved {
                0
            } else {
                self.st.patience_counter + 1
            };
            if self.st.patience_counter >= patience {
                self.st.early_stopped_at = Some(self.st.step);
            }
        }
        self.is_best(rs)
    }

    /// Early stopping ended the run (now, or before a resume with the same patience).
    pub fn stopped_early(&self) -> bool {
        self.st.early_stopped_at.is_some()
    }

    /// "early stopping at step 40: f1 did not improve ..." (console and resume).
    pub(super) fn early_stop_text(&self) -> String {
        format!(
            "early stopping at step {}: {} did not improve on its best ({}) by more than {} in {} \
             evaluation(s) in a row (early_stopping_patience {}); best_adapter holds the best; \
             a larger early_stopping_patience with --resume auto trains on",
            self.st.early_stopped_at.unwrap_or(self.st.step),
            self.scoring.metrics[0],
            opt_fmt(self.st.best_accuracy),
            self.cfg.early_stopping_threshold,
            self.st.patience_counter,
            self.cfg.early_stopping_patience.unwrap_or(0),
        )
    }

    /// summary.json's `early_stopping`.
    pub(super) fn early_stopping_json(&self) -> Option<serde_json::Value> {
        let patience = self.cfg.early_stopping_patience?;
        Some(json!({
            "metric": self.scoring.metrics[0],
            "patience": patience,
            "threshold": self.cfg.early_stopping_threshold,
            "evaluations_without_improvement": self.st.patience_counter,
            "best": self.st.best_accuracy,
            "stopped_at_step": self.st.early_stopped_at,
        }))
    }

    /// Whether `rs` beats the best evaluation so far by the task's main metric on the first
    /// evaluation split, recording it if so (`best_accuracy` keeps the value under its old name).
    pub(super) fn is_best(&mut self, rs: &[EvalResult]) -> bool {
        let main = rs.first().and_then(|r| r.metric(&self.scoring.metrics[0]));
        let best = main.is_some_and(|m| self.st.best_accuracy.is_none_or(|b| m > b));
        if best {
            self.st.best_accuracy = main;
        }
        best
    }
}

impl Trainer<'_> {
    /// `profile.csv` (one row per step of this session: seconds per part) and a line saying
    /// where the time went, when `profile` is on.
    pub(super) fn write_profile(&mut self) -> Result<()> {
        if self.profiled.is_empty() {
            return Ok(());
        }
        let mut text = String::from("step,tokens,total_s");
        for p in Part::ALL {
            text.push(',');
            text.push_str(p.name());
            text.push_str("_s");
        }
        text.push('\n');
        let mut sums = vec![0.0; Part::ALL.len()];
        for (step, tokens, parts) in &self.profiled {
            let total: f64 = parts.iter().sum();
            text.push_str(&format!("{step},{tokens},{total:.6}"));
            for (i, s) in parts.iter().enumerate() {
                text.push_str(&format!(",{s:.6}"));
                sums[i] += s;
            }
            text.push('\n');
        }
        runio::write_text(&self.run.join("profile.csv"), &text)?;
        let total: f64 = sums.iter().sum::<f64>().max(1e-12);
        let shares: Vec<String> = Part::ALL
            .iter()
            .zip(&sums)
            .filter(|(_, s)| **s > 0.0)
            .map(|(p, s)| format!("{} {:.1}%", p.name(), 100.0 * s / total))
            .collect();
        say!(
            self,
            "profile over {} steps ({total:.1} s): {}",
            self.profiled.len(),
            shares.join(", ")
        );
        Ok(())
    }
}

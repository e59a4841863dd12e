//! A run in progress ([`Trainer`]) and the named steps [`super::train`] calls in order: train
//! a step, log it, checkpoint, end an epoch, finish. Setting up is `start.rs`; evaluating and
//! reporting (eval.csv, summary.json's evaluations, profile.csv) is `report.rs`.
use super::memory::MemoryPlan;
use super::progress::{Progress, StepReport};
use super::step::{accumulate_gradients, grad_norm, micro_batches};
use super::{Interrupted, Summary};
use crate::adapter;
use crate::config::Config;
use crate::data::batch::{epoch_batches, Encoded};
use crate::dist::Dist;
use crate::eval::{EvalResult, Scoring};
use crate::hardware::peak_rss_bytes;
use crate::metrics::CsvLog;
use crate::model::classifier::LlamaClassifier;
use crate::model::hf_config::dtype_config_name;
use crate::model::loss;
use crate::optim::adamw8bit::Optimizer;
use crate::optim::schedule;
use crate::profile::{self, Part};
use crate::resume::{self, TrainState};
use crate::runio;
use crate::task::TaskLabels;
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Tensor};

pub const METRICS_HEADER: [&str; 8] = [
    "step",
    "epoch",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "elapsed_s",
    "peak_mem_bytes",
];
/// eval.csv's first columns; one column per metric of the task follows.
pub const EVAL_HEADER: [&str; 3] = ["epoch", "split", "loss"];

/// What one optimizer step did, summed over ranks.
pub struct StepStats {
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub interrupted: bool,
}

/// A run in progress: its configuration, ranks, model, data, optimizer and logs.
pub struct Trainer<'a> {
    pub(super) cfg: &'a Config,
    pub(super) dist: Option<Dist>,
    pub(super) rank: usize,
    pub(super) world: usize,
    pub main: bool,
    pub(super) device: Device,
    pub(super) run: PathBuf,
    pub(super) model: LlamaClassifier,
    /// The task and its label side (saved with every adapter).
    pub(super) labels: TaskLabels,
    pub(super) scoring: Scoring,
    pub(super) pad: i64,
    pub(super) train_set: Vec<Encoded>,
    /// The evaluation splits (MNLI's matched and mismatched), the first chooses the best adapter.
    pub(super) eval_sets: Vec<(String, Vec<Encoded>)>,
    pub(super) params: Vec<Tensor>,
    pub(super) optimizer: Box<dyn Optimizer>,
    pub(super) steps_per_epoch: usize,
    pub(super) planned: usize,
    pub(super) total_steps: usize,
    pub(super) warmup: usize,
    pub st: TrainState,
    pub(super) resumed: bool,
    /// (metrics.csv, eval.csv), on the main rank.
    pub(super) logs: Option<(CsvLog, CsvLog)>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) progress: Progress,
    pub(super) baseline: Option<serde_json::Value>,
    /// The latest evaluation, one result per evaluation split.
    pub(super) last_eval: Option<Vec<EvalResult>>,
    /// `calibrate: temperature`'s fit on that evaluation (for the reliability diagram).
    pub(super) last_fit: Option<adapter::TemperatureFit>,
    pub(super) unevaluated_steps: bool,
    pub(super) start: Instant,
    pub(super) session_start: Instant,
    pub(super) session_step: usize,
    pub(super) session_tokens: i64,
    pub(super) stepping_s: f64,
    pub(super) counts: (u64, u64),
    /// With `profile`: each step's (step, tokens, seconds per [`Part`]).
    pub(super) profiled: Vec<(usize, i64, Vec<f64>)>,
    /// `gradient_checkpointing`'s decision and its estimate.
    pub(super) memory: MemoryPlan,
}

impl<'a> Trainer<'a> {
    /// The first epoch still to train.
    pub fn first_epoch(&self) -> usize {
        self.st.epochs_done + 1
    }

    /// The global batches of `epoch` not yet trained (all of them unless resuming mid-epoch).
    pub fn batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let lengths: Vec<usize> = self.train_set.iter().map(|e| e.ids.len()).collect();
        let mut batches = epoch_batches(
            self.train_set.len(),
            self.cfg.batch_size,
            Some(self.cfg.seed),
            epoch,
            self.cfg.bucket_by_length.then_some(lengths.as_slice()),
        );
        batches.drain(..self.st.batch_in_epoch.min(batches.len()));
        batches
    }

    /// `max_steps` (or the planned steps) are done.
    pub fn finished(&self) -> bool {
        self.st.step >= self.total_steps
    }

    /// One optimizer step on global batch `batch`: forward and backward of this rank's
    /// micro-batches, the gradient all-reduce, clipping, the optimizer. `None` when a
    /// non-finite step was skipped (`on_nonfinite: skip`).
    pub fn train_step(&mut self, epoch: usize, batch: &[usize]) -> Result<Option<StepStats>> {
        let step_start = Instant::now();
        let _profile = profile::step();
        let cfg = self.cfg;
        let lr =
            cfg.lr * schedule::linear_warmup_multiplier(self.st.step, self.warmup, self.planned);
        let micro = micro_batches(
            batch,
            self.rank,
            self.world,
            cfg.gradient_accumulation_steps,
        );
        let (loss, tokens) = accumulate_gradients(
            &self.model,
            &self.train_set,
            &micro,
            self.st.step,
            self.pad,
            self.device,
        )?;
        let (loss, tokens, interrupted) = {
            let _p = profile::scope(Part::AllReduce);
            self.all_reduce(loss, tokens)?
        };
        let optimizer = profile::scope(Part::Optimizer);
        let gnorm = grad_norm(&self.params, cfg.max_grad_norm);
        if !loss.is_finite() || !gnorm.is_finite() {
            return self.non_finite(epoch, batch, loss, gnorm);
        }
        self.optimizer.step(lr)?;
        self.optimizer.zero_grad();
        drop(optimizer);
        self.st.step += 1;
        self.st.batch_in_epoch += 1;
        self.st.tokens_seen += tokens;
        self.unevaluated_steps = true;
        // Throughput counts training steps only, not evaluation or checkpoint saving.
        self.stepping_s += step_start.elapsed().as_secs_f64();
        if profile::enabled() {
            drop(_profile);
            let parts = profile::totals().into_iter().map(|(_, s)| s).collect();
            profile::reset();
            self.profiled.push((self.st.step, tokens, parts));
        }
        Ok(Some(StepStats {
            loss,
            lr,
            grad_norm: gnorm,
            interrupted,
        }))
    }

    /// Sums the ranks' weighted gradients (the global batch's mean gradient), their loss
    /// shares, token counts and stop requests, so every rank stops at the same step.
    fn all_reduce(&self, loss: f64, tokens: i64) -> Result<(f64, i64, bool)> {
        let interrupted = self.stop.load(Ordering::SeqCst);
        let Some(d) = &self.dist else {
            return Ok((loss, tokens, interrupted));
        };
        let grads: Vec<Tensor> = self.params.iter().map(|p| p.grad()).collect();
        d.all_reduce_sum_many(&grads)?;
        let stats = Tensor::from_slice(&[loss, tokens as f64, f64::from(u8::from(interrupted))])
            .to_device(self.device);
        d.all_reduce_sum(&stats)?;
        let v = Vec::<f64>::try_from(&stats.to_device(Device::Cpu))?;
        Ok((v[0], v[1] as i64, v[2] > 0.0))
    }

    /// A non-finite loss or gradient: skip the step or stop, naming the step and examples.
    fn non_finite(
        &mut self,
        epoch: usize,
        batch: &[usize],
        loss: f64,
        gnorm: f64,
    ) -> Result<Option<StepStats>> {
        let what = format!(
            "non-finite {} at step {} (epoch {epoch}, batch {}); the batch's example idx: {:?}",
            if loss.is_finite() {
                format!("gradient norm {gnorm}")
            } else {
                format!("loss {loss}")
            },
            self.st.step + 1,
            self.st.batch_in_epoch + 1,
            batch
                .iter()
                .map(|&i| self.train_set[i].idx)
                .collect::<Vec<_>>()
        );
        if self.cfg.on_nonfinite == "skip" {
            if self.main {
                self.progress.close();
                eprintln!("warning: {what}; step skipped (on_nonfinite: skip)");
            }
            self.optimizer.zero_grad();
            self.st.batch_in_epoch += 1;
            return Ok(None);
        }
        if let Some((metrics, _)) = &self.logs {
            metrics.flush()?;
        }
        let last_good =
            resume::latest(&self.run)?.map_or("none yet".to_string(), |p| p.display().to_string());
        bail!(
            "{what}. The last good checkpoint: {last_good}. Lower `lr`, set `max_grad_norm`, \
             or set `on_nonfinite: skip`"
        );
    }

    /// A metrics.csv row for every step, and the progress display.
    pub fn log_step(&mut self, epoch: usize, s: &StepStats) -> Result<()> {
        let Some((metrics, _)) = &mut self.logs else {
            return Ok(());
        };
        let session = self.session_start.elapsed().as_secs_f64();
        let tps = (self.st.tokens_seen - self.session_tokens) as f64 / self.stepping_s.max(1e-9);
        let step = self.st.step;
        metrics.row(&[
            step.to_string(),
            format!("{:.4}", step as f64 / self.steps_per_epoch as f64),
            format!("{:.6}", s.loss),
            format!("{:.6e}", s.lr),
            format!("{:.6}", s.grad_norm),
            format!("{tps:.1}"),
            format!("{:.3}", self.st.train_seconds + session),
            peak_rss_bytes().to_string(),
        ]);
        let last = step == self.total_steps || s.interrupted;
        if step.is_multiple_of(self.cfg.log_every) || last {
            metrics.flush()?;
        }
        let done_here = (step - self.session_step).max(1) as f64;
        self.progress.step(
            &StepReport {
                epoch,
                epochs: self.cfg.epochs,
                step,
                total_steps: self.total_steps,
                loss: s.loss,
                lr: s.lr,
                tokens_per_s: tps,
                eta_s: session / done_here * (self.total_steps - step) as f64,
            },
            last,
        );
        Ok(())
    }

    fn save_checkpoint(&self) -> Result<PathBuf> {
        let mut snap = self.st.clone();
        snap.train_seconds += self.session_start.elapsed().as_secs_f64();
        resume::save(
            &self.run,
            &snap,
            &self.model.trainable_parameters(),
            &self.optimizer.state_tensors(),
            self.cfg.keep_checkpoints,
        )
    }

    /// A checkpoint every `checkpoint_every` steps, where early stopping ended the run (so
    /// that it stays resumable), and after an interrupted step, which then ends the run with
    /// [`Interrupted`].
    pub fn checkpoint_if_due(&mut self, s: &StepStats) -> Result<()> {
        let every = self.cfg.checkpoint_every;
        let periodic = every > 0 && self.st.step.is_multiple_of(every);
        let stopped_here = self.st.early_stopped_at == Some(self.st.step);
        if !periodic && !s.interrupted && !stopped_here {
            return Ok(());
        }
        let saved = if self.main {
            Some(self.save_checkpoint()?)
        } else {
            None
        };
        if s.interrupted {
            say!(self, "");
            bail!(Interrupted(match saved {
                Some(dir) => format!(
                    "interrupted at step {}: checkpoint saved to {}; continue with --resume auto",
                    self.st.step,
                    dir.display()
                ),
                None => format!(
                    "rank {}: interrupted at step {} (rank 0 saved the checkpoint)",
                    self.rank, self.st.step
                ),
            }));
        }
        Ok(())
    }

    /// Every `eval_steps` optimizer steps, as well as at each epoch's end (an epoch's last
    /// step is left to [`Trainer::end_epoch`]).
    pub fn evaluate_if_due(&mut self) -> Result<()> {
        let due = self
            .cfg
            .eval_steps
            .is_some_and(|n| self.st.step.is_multiple_of(n));
        if !due || self.st.batch_in_epoch >= self.steps_per_epoch {
            return Ok(());
        }
        let epochs = format!("{:.4}", self.st.step as f64 / self.steps_per_epoch as f64);
        self.evaluate_and_save(&epochs, &format!("step {}", self.st.step))
    }

    /// After an epoch: evaluate, log, save the adapter (and the best one), checkpoint.
    pub fn end_epoch(&mut self, epoch: usize) -> Result<()> {
        self.st.epochs_done = epoch;
        self.st.batch_in_epoch = 0;
        self.evaluate_and_save(&epoch.to_string(), &format!("epoch {epoch}"))?;
        if self.main {
            self.save_checkpoint()?;
        }
        Ok(())
    }

    /// An evaluation in training: judged (the best adapter, early stopping), logged, and the
    /// adapter saved (and the best one).
    fn evaluate_and_save(&mut self, epoch: &str, what: &str) -> Result<()> {
        let rs = self.evaluate()?;
        self.unevaluated_steps = false;
        let best = self.judge(&rs);
        if let Some((metrics, _)) = &self.logs {
            metrics.flush()?;
        }
        self.log_eval(epoch, what, &rs)?;
        let fit = self.temperature_fit(&rs)?;
        if let Some(f) = &fit {
            say!(
                self,
                "  calibration on {}: temperature {:.4}, nll {:.4} -> {:.4}, ece {:.4} -> {:.4}",
                f.split,
                f.temperature,
                f.before.nll,
                f.after.nll,
                f.before.ece,
                f.after.ece
            );
        }
        let cut = self.threshold_choice(&rs, fit.as_ref())?;
        if let Some((_, line)) = &cut {
            say!(self, "{line}");
        }
        let cut = cut.map(|(file, _)| file);
        if self.main {
            self.save_adapter("adapter", fit.as_ref(), cut.as_ref())?;
            if best {
                self.save_adapter("best_adapter", fit.as_ref(), cut.as_ref())?;
            }
        }
        self.last_eval = Some(rs);
        self.last_fit = fit;
        if self.st.early_stopped_at == Some(self.st.step) {
            say!(self, "{}", self.early_stop_text());
        }
        Ok(())
    }

    /// The adapter (PEFT's files, the residual base, the labels) in `run/name`, with its
    /// temperature and threshold when `calibrate` / `threshold` chose them on the same weights.
    fn save_adapter(
        &self,
        name: &str,
        fit: Option<&adapter::TemperatureFit>,
        cut: Option<&serde_json::Value>,
    ) -> Result<()> {
        let dir = self.run.join(name);
        let trainable = self.model.trainable_parameters();
        adapter::save(&dir, self.cfg, &trainable)?;
        if let Some(fit) = fit {
            adapter::write_calibration(&dir, fit)?;
        }
        if let Some(cut) = cut {
            adapter::write_threshold(&dir, cut)?;
        }
        adapter::write_residual(&dir, &self.model.residual_base()?)?;
        if adapter::save_as_lora(&dir, self.cfg, &trainable, &self.model.initial_pairs())? {
            adapter::write_labels(&dir.join(adapter::AS_LORA_DIR), &self.labels)?;
        }
        adapter::write_labels(&dir, &self.labels)
    }

    /// A run cut short by `max_steps` in mid-epoch still evaluates the weights it ends with
    /// (`max_steps: 0` is the untrained baseline alone); then summary.json.
    pub fn finish(mut self) -> Result<Summary> {
        // Nothing was left to train (a finished or early-stopped run): its summary.json,
        // written when it ended, stays.
        let idle = self.resumed && self.st.step == self.session_step && self.last_eval.is_none();
        if idle {
            say!(
                self,
                "nothing left to train at step {}; {} kept",
                self.st.step,
                self.run.join("summary.json").display()
            );
        }
        if self.unevaluated_steps {
            // The weights a `max_steps` run ends with compete for best_adapter too, so a run
            // shorter than an epoch still has one.
            let epoch = (self.st.step as f64 / self.steps_per_epoch as f64).ceil() as usize;
            self.evaluate_and_save(&epoch.to_string(), &format!("step {}", self.st.step))?;
        }
        if self.main {
            self.write_reliability();
        }
        self.progress.close();
        let summary = Summary {
            baseline: self.baseline.take(),
            final_eval: self.last_eval.as_deref().and_then(|rs| self.evals_json(rs)),
            // TrainState keeps the main metric's best under its old name (checkpoints read it).
            best_accuracy: self
                .st
                .best_accuracy
                .filter(|_| self.scoring.metrics[0] == "accuracy"),
            best_metric_name: self.scoring.metrics[0].clone(),
            best_metric: self.st.best_accuracy,
            steps: self.st.step,
            train_examples: self.train_set.len(),
            eval_examples: self.eval_sets.iter().map(|(_, s)| s.len()).sum(),
            elapsed_s: self.start.elapsed().as_secs_f64(),
            peak_mem_bytes: peak_rss_bytes(),
            tokens_per_s: (self.st.tokens_seen - self.session_tokens) as f64
                / self.stepping_s.max(1e-9),
            trainable_params: self.counts.0,
            all_params: self.counts.1,
            world_size: self.world,
            memory_plan: self.memory,
            compute_dtype: dtype_config_name(self.cfg.compute_kind(self.device)).into(),
            matmul_dtype: dtype_config_name(crate::quant::qlinear::gemm_kind(
                self.cfg.compute_kind(self.device),
                self.device,
            ))
            .into(),
            class_weights: match self.model.loss_weights() {
                loss::LossWeights::PerClass(w) => Some(w.clone()),
                loss::LossWeights::None => None,
            },
            kernels: crate::kernels::summary_json(self.device),
            early_stopping: self.early_stopping_json(),
        };
        if self.main && !idle {
            self.write_profile()?;
            runio::write_json(&self.run.join("summary.json"), &summary)?;
            println!("run folder: {}", self.run.display());
        }
        if let Some(d) = &self.dist {
            d.barrier()?;
        }
        Ok(summary)
    }
}

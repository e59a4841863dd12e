//! The named steps of a training run ([`super::train`] calls them in order): set up, evaluate
//! the baseline, train a step, log it, checkpoint, end an epoch, finish.
use super::memory::{self, MemoryPlan};
use super::progress::{Progress, StepReport};
use super::step::{accumulate_gradients, grad_norm, micro_batches};
use super::{Interrupted, Summary};
use crate::adapter;
use crate::config::{ClassWeights, Config};
use crate::data::batch::{epoch_batches, Encoded};
use crate::data::prompt;
use crate::dist::Dist;
use crate::eval::{self, EvalResult, Scoring};
use crate::hardware::peak_rss_bytes;
use crate::kernel_choice;
use crate::labels::Target;
use crate::labels::{LabelSpec, ProblemType};
use crate::loader::{load_model, sized_for, Loaded};
use crate::metrics::CsvLog;
use crate::model::classifier::LlamaClassifier;
use crate::model::hf_config::dtype_config_name;
use crate::model::hf_config::peft_param_line;
use crate::model::loss;
use crate::optim::adamw8bit::{AdamW32, AdamW8bit, AdamWConfig, Optimizer};
use crate::optim::schedule;
use crate::profile::{self, Part};
use crate::resume::{self, TrainState};
use crate::runio;
use crate::splits::{encode_raw, load_split, prepare_task};
use crate::task::TaskLabels;
use anyhow::{bail, Context, Result};
use serde_json::json;
use signal_hook::consts::{SIGINT, SIGTERM};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

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

/// Prints on the main rank only (the others stay quiet, as accelerate's main process does).
macro_rules! say {
    ($t:expr, $($arg:tt)*) => {
        if $t.main {
            $t.progress.close();
            println!($($arg)*);
        }
    };
}

/// A run in progress: its configuration, ranks, model, data, optimizer and logs.
pub struct Trainer<'a> {
    cfg: &'a Config,
    dist: Option<Dist>,
    rank: usize,
    world: usize,
    pub main: bool,
    device: Device,
    run: PathBuf,
    model: LlamaClassifier,
    /// The task and its label side (saved with every adapter).
    labels: TaskLabels,
    scoring: Scoring,
    pad: i64,
    train_set: Vec<Encoded>,
    /// The evaluation splits (MNLI's matched and mismatched), the first chooses the best adapter.
    eval_sets: Vec<(String, Vec<Encoded>)>,
    params: Vec<Tensor>,
    optimizer: Box<dyn Optimizer>,
    steps_per_epoch: usize,
    planned: usize,
    total_steps: usize,
    warmup: usize,
    pub st: TrainState,
    resumed: bool,
    /// (metrics.csv, eval.csv), on the main rank.
    logs: Option<(CsvLog, CsvLog)>,
    stop: Arc<AtomicBool>,
    progress: Progress,
    baseline: Option<serde_json::Value>,
    /// The latest evaluation, one result per evaluation split.
    last_eval: Option<Vec<EvalResult>>,
    unevaluated_steps: bool,
    start: Instant,
    session_start: Instant,
    session_step: usize,
    session_tokens: i64,
    stepping_s: f64,
    counts: (u64, u64),
    /// With `profile`: each step's (step, tokens, seconds per [`Part`]).
    profiled: Vec<(usize, i64, Vec<f64>)>,
    /// `gradient_checkpointing`'s decision and its estimate.
    memory: MemoryPlan,
}

fn opt_fmt(v: Option<f64>) -> String {
    v.map_or(String::new(), |x| format!("{x:.6}"))
}

fn eval_json(r: &EvalResult) -> serde_json::Value {
    let mut v = json!({"loss": r.loss, "examples": r.pred.len()});
    for (k, m) in &r.metrics {
        v[k.as_str()] = json!(m);
    }
    v
}

/// "accuracy 0.812500 f1 0.870000 loss 0.421000": the metrics of a result, then its loss.
fn metrics_text(scoring: &Scoring, r: &EvalResult) -> String {
    let mut parts: Vec<String> = scoring
        .metrics
        .iter()
        .map(|k| format!("{k} {}", opt_fmt(r.metric(k))))
        .collect();
    parts.push(format!("loss {}", opt_fmt(r.loss)));
    parts.join(" ")
}

/// Handles on the same tensors (the optimizer updates the model's own parameters).
fn shallow(ts: &[Tensor]) -> Vec<Tensor> {
    ts.iter().map(Tensor::shallow_clone).collect()
}

/// Set by SIGINT/SIGTERM: the loop saves a checkpoint after the current step and stops.
fn install_signal_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        // A second signal, while the first is being handled, exits at once.
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())?;
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(flag)
}

impl<'a> Trainer<'a> {
    /// Seed, ranks, the run folder, data, model, optimizer and schedule; restores a
    /// checkpoint when resuming.
    pub fn start(cfg: &'a Config) -> Result<Self> {
        let start = Instant::now();
        tch::manual_seed(cfg.seed as i64);
        // Data parallelism when a launcher set RANK/WORLD_SIZE (torchrun, scripts/launch.sh, srun).
        let dist = Dist::from_env(Duration::from_secs(cfg.dist_timeout_s))?;
        let (rank, world) = dist.as_ref().map_or((0, 1), |d| (d.rank, d.world_size));
        let main = rank == 0;
        let device = match &dist {
            Some(d) => d.device_for(&cfg.device)?,
            None => cfg.device()?,
        };
        crate::cuda::set_device(device)?;
        if let Some(d) = &dist {
            d.check_one_gpu_per_rank(device)?;
        }
        let run = cfg.results_path.clone();
        if main {
            write_run_config(cfg)?;
        }
        // Before the model loads: its quantization already runs kernels.
        kernel_choice::set_mode(kernel_choice::Mode::parse(&cfg.kernels).context("kernels")?);
        crate::kernels::prepare(device);
        let resume_from = resume::resolve(&run, cfg.resume.as_deref().unwrap_or(""))?;

        let (labels, raw_train) = prepare_task(cfg)?;
        let scoring = Scoring::for_task(&labels, cfg.metric_for_best_model.as_deref())?;
        let Loaded {
            mut model,
            encoder,
            device,
        } = load_model(&sized_for(cfg, &labels.spec), device)?;
        let pad = encoder.pad_id();
        let train_set = match &raw_train {
            Some(raw) => encode_raw(&labels, &encoder, raw)?,
            None => load_split(cfg, &labels, &encoder, &cfg.train_splits, true)?,
        };
        let eval_sets = eval_splits(cfg, &labels)
            .into_iter()
            .map(|split| {
                let set = load_split(cfg, &labels, &encoder, &split, true)?;
                Ok((split, set))
            })
            .collect::<Result<Vec<_>>>()?;
        let weights = class_weights(cfg, &labels.spec, &train_set)?;
        if let (true, Some(w)) = (main, &weights) {
            let kind = match labels.spec.problem_type {
                ProblemType::MultiLabel => "pos_weight",
                _ => "class weights",
            };
            println!("{kind} (training and evaluation loss): {w:?}");
        }
        model.set_loss(labels.spec.problem_type, weights);
        let counts = model.param_counts();
        if main {
            println!("{}", peft_param_line(counts.0, counts.1));
            println!(
                "data: {} training examples ({}), {} evaluation examples ({}), prompt {:?}; device {:?} x {world} rank(s), compute {:?}",
                train_set.len(),
                cfg.train_splits,
                eval_sets.iter().map(|(_, s)| s.len()).sum::<usize>(),
                eval_sets
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                prompt::resolve_prompt(&cfg.prompt)?,
                device,
                cfg.compute_kind(device)
            );
            println!("{}", crate::kernels::start_line(device));
        }

        let micro = cfg
            .batch_size
            .div_ceil(world)
            .div_ceil(cfg.gradient_accumulation_steps);
        let memory = memory::plan(cfg, &model.config, counts.0, &train_set, micro, device)?;
        model.opts.recompute_layers = memory.recompute_layers;
        if main {
            println!("{}", memory.describe());
        }

        // Optimizer and schedule over the trainable tensors (LoRA A/B, head).
        let params: Vec<Tensor> = model
            .trainable_parameters()
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        if let Some(d) = &dist {
            // Every rank starts from rank 0's LoRA and head, and has gradients to all-reduce
            // even when its part of a batch is empty.
            d.broadcast(&params, 0)?;
            let zero: Tensor = params.iter().map(|p| p.sum(Kind::Float) * 0.0).sum();
            zero.backward();
        }
        let opt_cfg = AdamWConfig {
            weight_decay: cfg.weight_decay,
            ..AdamWConfig::default()
        };
        let mut optimizer: Box<dyn Optimizer> = match cfg.optimizer.as_str() {
            "adamw" => Box::new(AdamW32::new(shallow(&params), opt_cfg)),
            _ => Box::new(AdamW8bit::new(shallow(&params), opt_cfg)),
        };
        optimizer.zero_grad();
        // The schedule counts optimizer steps: one per global batch.
        let steps_per_epoch = train_set.len().div_ceil(cfg.batch_size);
        let planned = steps_per_epoch * cfg.epochs;
        let mut t = Trainer {
            cfg,
            dist,
            rank,
            world,
            main,
            device,
            run,
            model,
            labels,
            scoring,
            pad,
            train_set,
            eval_sets,
            params,
            optimizer,
            steps_per_epoch,
            planned,
            total_steps: cfg.max_steps.map_or(planned, |m| m.min(planned)),
            warmup: schedule::warmup_steps(planned, cfg.warmup_ratio),
            st: TrainState {
                step: 0,
                epochs_done: 0,
                batch_in_epoch: 0,
                tokens_seen: 0,
                best_accuracy: None,
                train_seconds: 0.0,
                seed: cfg.seed,
            },
            resumed: resume_from.is_some(),
            logs: None,
            stop: install_signal_flag()?,
            progress: Progress::for_stdout(cfg.log_every),
            baseline: None,
            last_eval: None,
            unevaluated_steps: false,
            start,
            session_start: Instant::now(),
            session_step: 0,
            session_tokens: 0,
            stepping_s: 0.0,
            counts,
            profiled: Vec::new(),
            memory,
        };
        if cfg.profile {
            profile::enable(device);
            profile::reset();
        }
        if let Some(dir) = &resume_from {
            t.restore(dir)?;
        }
        t.open_logs()?;
        t.session_start = Instant::now();
        t.session_step = t.st.step;
        t.session_tokens = t.st.tokens_seen;
        Ok(t)
    }

    /// Continues from a checkpoint (every rank reads it).
    fn restore(&mut self, dir: &std::path::Path) -> Result<()> {
        let ck = resume::load(dir)?;
        if ck.state.seed != self.cfg.seed {
            bail!(
                "{}: this checkpoint was made with seed {}, the configuration says {}; \
                 resume with the same configuration",
                dir.display(),
                ck.state.seed,
                self.cfg.seed
            );
        }
        self.model
            .load_trainable(&|n| ck.trainable.get(n).map(|t| t.shallow_clone()))
            .with_context(|| format!("cannot restore the weights of {}", dir.display()))?;
        self.optimizer
            .load_state_tensors(&|n| ck.optimizer.get(n).map(|t| t.shallow_clone()))
            .with_context(|| format!("cannot restore the optimizer of {}", dir.display()))?;
        self.st = ck.state;
        say!(
            self,
            "resuming from {} (step {}, epoch {}, batch {})",
            dir.display(),
            self.st.step,
            self.st.epochs_done + 1,
            self.st.batch_in_epoch
        );
        Ok(())
    }

    /// metrics.csv and eval.csv on the main rank; a resumed run keeps their rows up to its
    /// checkpoint.
    fn open_logs(&mut self) -> Result<()> {
        if !self.main {
            return Ok(());
        }
        let (resumed, keep_step, keep_epochs) = (self.resumed, self.st.step, self.st.epochs_done);
        let upto = move |limit: usize| {
            move |row: &[&str]| {
                resumed
                    && row
                        .first()
                        .and_then(|s| s.parse::<usize>().ok())
                        .is_some_and(|v| v <= limit)
            }
        };
        let metrics = CsvLog::create(
            self.run.join("metrics.csv"),
            &METRICS_HEADER,
            upto(keep_step),
        )?;
        let mut header: Vec<&str> = EVAL_HEADER.to_vec();
        header.extend(self.scoring.metrics.iter().map(String::as_str));
        let evals = CsvLog::create(self.run.join("eval.csv"), &header, upto(keep_epochs))?;
        self.logs = Some((metrics, evals));
        Ok(())
    }

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

    /// The model on each evaluation split (sharded over the ranks).
    fn evaluate(&self) -> Result<Vec<EvalResult>> {
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
    /// saying when ("epoch 2", "step 40").
    fn log_eval(&mut self, epoch: usize, what: &str, rs: &[EvalResult]) -> Result<()> {
        let lines: Vec<String> = self
            .eval_sets
            .iter()
            .zip(rs)
            .map(|((split, set), r)| {
                let majority =
                    if epoch == 0 && self.labels.spec.problem_type == ProblemType::SingleLabel {
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
                evals.row(&row);
            }
            evals.flush()?;
        }
        Ok(())
    }

    /// summary.json's view of an evaluation: the first split's result (the one the best
    /// adapter is chosen by), with every split's under `splits` when there are several.
    fn evals_json(&self, rs: &[EvalResult]) -> Option<serde_json::Value> {
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
        self.log_eval(0, "epoch 0 (before training)", &rs)?;
        self.baseline = self.evals_json(&rs);
        self.last_eval = Some(rs);
        Ok(())
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

    /// A checkpoint every `checkpoint_every` steps, and after an interrupted step, which
    /// then ends the run with [`Interrupted`].
    pub fn checkpoint_if_due(&mut self, s: &StepStats) -> Result<()> {
        let every = self.cfg.checkpoint_every;
        let periodic = every > 0 && self.st.step.is_multiple_of(every);
        if !periodic && !s.interrupted {
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

    /// After an epoch: evaluate, log, save the adapter (and the best one), checkpoint.
    pub fn end_epoch(&mut self, epoch: usize) -> Result<()> {
        let rs = self.evaluate()?;
        self.unevaluated_steps = false;
        let best = self.is_best(&rs);
        self.st.epochs_done = epoch;
        self.st.batch_in_epoch = 0;
        if let Some((metrics, _)) = &self.logs {
            metrics.flush()?;
        }
        self.log_eval(epoch, &format!("epoch {epoch}"), &rs)?;
        if self.main {
            self.save_adapter("adapter")?;
            if best {
                self.save_adapter("best_adapter")?;
            }
            self.save_checkpoint()?;
        }
        self.last_eval = Some(rs);
        Ok(())
    }

    /// Whether `rs` beats the best evaluation so far by the task's main metric on the first
    /// evaluation split, recording it if so (`best_accuracy` keeps the value under its old name).
    fn is_best(&mut self, rs: &[EvalResult]) -> bool {
        let main = rs.first().and_then(|r| r.metric(&self.scoring.metrics[0]));
        let best = main.is_some_and(|m| self.st.best_accuracy.is_none_or(|b| m > b));
        if best {
            self.st.best_accuracy = main;
        }
        best
    }

    fn save_adapter(&self, name: &str) -> Result<()> {
        let dir = self.run.join(name);
        adapter::save(&dir, self.cfg, &self.model.trainable_parameters())?;
        adapter::write_labels(&dir, &self.labels)
    }

    /// A run cut short by `max_steps` in mid-epoch still evaluates the weights it ends with
    /// (`max_steps: 0` is the untrained baseline alone); then summary.json.
    pub fn finish(mut self) -> Result<Summary> {
        if self.unevaluated_steps {
            let rs = self.evaluate()?;
            if let Some((metrics, _)) = &self.logs {
                metrics.flush()?;
            }
            let epoch = (self.st.step as f64 / self.steps_per_epoch as f64).ceil() as usize;
            self.log_eval(epoch, &format!("step {}", self.st.step), &rs)?;
            // The weights a `max_steps` run ends with compete for best_adapter too, so a run
            // shorter than an epoch still has one.
            let best = self.is_best(&rs);
            if self.main {
                self.save_adapter("adapter")?;
                if best {
                    self.save_adapter("best_adapter")?;
                }
            }
            self.last_eval = Some(rs);
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
        };
        if self.main {
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

impl Trainer<'_> {
    /// `profile.csv` (one row per step of this session: seconds per part) and a line saying
    /// where the time went, when `profile` is on.
    fn write_profile(&mut self) -> Result<()> {
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

/// The splits evaluated every epoch: `eval_split`, a comma-separated list; left at its default
/// (`validation`) for a GLUE task scored on other splits, the task's own (MNLI's
/// `validation_matched,validation_mismatched`).
pub fn eval_splits(cfg: &Config, labels: &TaskLabels) -> Vec<String> {
    let given: Vec<String> = cfg
        .eval_split
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if given == ["validation"] {
        if let Some(glue) = crate::task::glue(&labels.task.name) {
            return glue.eval_splits.iter().map(|s| s.to_string()).collect();
        }
    }
    if given.is_empty() {
        vec!["validation".into()]
    } else {
        given
    }
}

/// The loss weights of `class_weights`: one per label (cross-entropy `weight`, multi-label
/// `pos_weight`), or `balanced`: n / (K · count) per class (sklearn's `compute_class_weight`)
/// or negatives / positives per label (the usual `pos_weight`).
fn class_weights(cfg: &Config, spec: &LabelSpec, train: &[Encoded]) -> Result<Option<Vec<f64>>> {
    let Some(w) = &cfg.class_weights else {
        return Ok(None);
    };
    if spec.problem_type == ProblemType::Regression {
        bail!("key `class_weights`: a regression task has no classes to weight");
    }
    let k = spec.num_labels();
    let weights = match w {
        ClassWeights::List(v) => v.clone(),
        ClassWeights::Named(_) => balanced_weights(spec, train)?,
    };
    if weights.len() != k {
        bail!(
            "key `class_weights`: {} weights for {k} labels ({})",
            weights.len(),
            spec.names.join(", ")
        );
    }
    Ok(Some(weights))
}

/// `balanced` weights from the training targets.
fn balanced_weights(spec: &LabelSpec, train: &[Encoded]) -> Result<Vec<f64>> {
    let k = spec.num_labels();
    match spec.problem_type {
        ProblemType::MultiLabel => {
            let rows: Vec<Vec<bool>> = train
                .iter()
                .filter_map(|e| match &e.label {
                    Some(Target::Multi(hot)) => Some(hot.iter().map(|&y| y > 0.5).collect()),
                    _ => None,
                })
                .collect();
            loss::balanced_pos_weight(&rows, k).context("key `class_weights: balanced`")
        }
        _ => {
            let ids: Vec<i64> = train
                .iter()
                .filter_map(|e| e.label.as_ref().and_then(Target::class))
                .collect();
            loss::balanced_class_weights(&ids, k).context("key `class_weights: balanced`")
        }
    }
}

/// config.json, quant_config.json and lora_config.json in a fresh or resumed run folder.
fn write_run_config(cfg: &Config) -> Result<()> {
    let run = &cfg.results_path;
    std::fs::create_dir_all(run)
        .with_context(|| format!("cannot create the run folder {}", run.display()))?;
    runio::write_json(&run.join("config.json"), cfg)
        .with_context(|| format!("the run folder {} is not writable", run.display()))?;
    runio::write_json(
        &run.join("quant_config.json"),
        &adapter::quant_config_json(cfg),
    )?;
    runio::write_json(
        &run.join("lora_config.json"),
        &adapter::lora_config_json(cfg),
    )
}

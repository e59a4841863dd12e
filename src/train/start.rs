//! A run's setup ([`Trainer::start`]): seed, ranks, the run folder, task and data, model,
//! optimizer and schedule, and the checkpoint it resumes from.
use super::memory;
use super::progress::Progress;
use super::trainer::{Trainer, EVAL_HEADER, METRICS_HEADER};
use crate::adapter;
use crate::config::{ClassWeights, Config};
use crate::data::batch::Encoded;
use crate::data::prompt;
use crate::dist::Dist;
use crate::eval::Scoring;
use crate::kernel_choice;
use crate::labels::Target;
use crate::labels::{LabelSpec, ProblemType};
use crate::loader::{load_model, sized_for, Loaded};
use crate::metrics::CsvLog;
use crate::model::hf_config::peft_param_line;
use crate::model::loss;
use crate::optim::adamw8bit::{AdamW32, AdamW8bit, AdamWConfig, Optimizer};
use crate::optim::schedule;
use crate::profile;
use crate::resume::{self, TrainState};
use crate::runio;
use crate::splits::{encode_raw, load_split, prepare_task};
use crate::task::TaskLabels;
use anyhow::{bail, Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};
/// Handles on the same tensors (the optimizer updates the model's own parameters).
pub(super) fn shallow(ts: &[Tensor]) -> Vec<Tensor> {
    ts.iter().map(Tensor::shallow_clone).collect()
}

/// Set by SIGINT/SIGTERM: the loop saves a checkpoint after the current step and stops.
pub(super) fn install_signal_flag() -> Result<Arc<AtomicBool>> {
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
        let scoring = Scoring::for_task(&labels, cfg)?;
        if cfg.threshold.is_some() {
            // Refuses, naming the key, a task that takes no threshold (before any training).
            crate::loader::fixed_decision(0.5, &labels.spec)?;
        }
        if cfg.calibrate == "temperature" && labels.spec.problem_type != ProblemType::SingleLabel {
            bail!(
                "key `calibrate`: temperature scaling is for single-label classification; \
                 this task is {}",
                labels.spec.problem_type.as_str()
            );
        }
        let Loaded {
            mut model,
            encoder,
            device,
        } = load_model(&sized_for(cfg, &labels.spec), device)?;
        let pad = encoder.pad_id();
        let train_set = match &raw_train {
            Some(raw) => encode_raw(&labels, &encoder, raw, &cfg.train_splits)?,
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
        crate::loader::set_task_loss(&mut model, &labels, weights, cfg);
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
                patience_counter: 0,
                early_stopped_at: None,
            },
            resumed: resume_from.is_some(),
            logs: None,
            stop: install_signal_flag()?,
            progress: Progress::for_stdout(cfg.log_every),
            baseline: None,
            last_eval: None,
            last_fit: None,
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
    pub(super) fn restore(&mut self, dir: &std::path::Path) -> Result<()> {
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
        if let Some(at) = self.st.early_stopped_at {
            let patience = self.cfg.early_stopping_patience;
            if patience.is_some_and(|p| self.st.patience_counter >= p) {
                say!(
                    self,
                    "{} (resumed: nothing to train)",
                    self.early_stop_text()
                );
            } else {
                say!(
                    self,
                    "early stopping ended this run at step {at}; training on (early_stopping_patience now {})",
                    patience.map_or("off".to_string(), |p| p.to_string())
                );
                self.st.early_stopped_at = None;
            }
        }
        Ok(())
    }

    /// metrics.csv and eval.csv on the main rank; a resumed run keeps their rows up to its
    /// checkpoint.
    pub(super) fn open_logs(&mut self) -> Result<()> {
        if !self.main {
            return Ok(());
        }
        let (resumed, keep_step) = (self.resumed, self.st.step);
        let upto = move |step: Option<&&str>| {
            resumed
                && step
                    .and_then(|s| s.parse::<usize>().ok())
                    .is_some_and(|v| v <= keep_step)
        };
        let metrics = CsvLog::create(self.run.join("metrics.csv"), &METRICS_HEADER, |row| {
            upto(row.first())
        })?;
        let mut header: Vec<&str> = EVAL_HEADER.to_vec();
        header.extend(self.scoring.metrics.iter().map(String::as_str));
        if self.labels.spec.problem_type == ProblemType::SingleLabel {
            header.extend(["nll", "brier", "ece"]);
        }
        // The step last: evaluations every `eval_steps` fall mid-epoch.
        header.push("step");
        let evals = CsvLog::create(self.run.join("eval.csv"), &header, |row| upto(row.last()))?;
        self.logs = Some((metrics, evals));
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
pub(super) fn class_weights(
    cfg: &Config,
    spec: &LabelSpec,
    train: &[Encoded],
) -> Result<Option<Vec<f64>>> {
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
pub(super) fn balanced_weights(spec: &LabelSpec, train: &[Encoded]) -> Result<Vec<f64>> {
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
pub(super) fn write_run_config(cfg: &Config) -> Result<()> {
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

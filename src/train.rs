//! The training run, top to bottom like the reference script: seed, data, model, optimizer,
//! baseline evaluation, then per epoch train ─► evaluate ─► log ─► save the adapter.
use crate::adapter;
use crate::config::Config;
use crate::data::batch::{collate, encode_examples, epoch_batches, Encoded, TextEncoder};
use crate::data::{formats, prompt};
use crate::dist::{self, Dist};
use crate::eval::{self, EvalResult};
use crate::lora::LoraConfig;
use crate::metrics::CsvLog;
use crate::model::classifier::{LlamaClassifier, ModelOptions};
use crate::model::hf_config::peft_param_line;
use crate::optim::adamw8bit::{AdamW32, AdamW8bit, AdamWConfig, Optimizer};
use crate::optim::schedule;
use crate::quant::nf4::Nf4Options;
use crate::resume::{self, TrainState};
use crate::runio;
use anyhow::{bail, Context, Result};
use serde_json::json;
use signal_hook::consts::{SIGINT, SIGTERM};
use std::io::Write;
use std::path::Path;
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
pub const EVAL_HEADER: [&str; 5] = ["epoch", "split", "accuracy", "f1", "loss"];

/// Everything a run needs besides the optimizer: the model, the tokenised splits.
pub struct Loaded {
    pub model: LlamaClassifier,
    pub encoder: TextEncoder,
    pub device: Device,
}

pub fn model_options(cfg: &Config, device: Device, pad_id: i64) -> ModelOptions {
    ModelOptions {
        device,
        compute_dtype: cfg.compute_kind(device),
        quant: cfg.load_in_4bit.then_some(Nf4Options {
            blocksize: cfg.bnb_4bit_blocksize,
            double_quant: cfg.bnb_4bit_use_double_quant,
        }),
        lora: Some(LoraConfig {
            r: cfg.r,
            alpha: cfg.lora_alpha,
            dropout: cfg.lora_dropout,
            target_modules: cfg.target_modules.clone(),
        }),
        num_labels: cfg.num_classes,
        pad_token_id: pad_id,
        gradient_checkpointing: cfg.gradient_checkpointing,
        seed: cfg.seed,
    }
}

/// Loads the tokenizer and the (quantized) model with fresh LoRA adapters and head.
pub fn load_model(cfg: &Config, device: Device) -> Result<Loaded> {
    let encoder = TextEncoder::from_dir(cfg.tokenizer_dir()?, cfg.max_length)?;
    let model_dir = cfg.model_dir()?;
    let model = LlamaClassifier::load(model_dir, &model_options(cfg, device, encoder.pad_id()))
        .with_context(|| format!("cannot load the model from {}", model_dir.display()))?;
    let vocab = model.config.vocab_size;
    if encoder.max_id() >= vocab {
        bail!(
            "{}: the tokenizer produces ids up to {} but the model's embedding has only {vocab} rows ({}); \
             point tokenizer_dir at the model's own tokenizer",
            cfg.tokenizer_dir()?.join("tokenizer.json").display(),
            encoder.max_id(),
            model_dir.join("config.json").display()
        );
    }
    Ok(Loaded {
        model,
        encoder,
        device,
    })
}

/// Reads a split, checks its labels against num_classes, renders the prompt and tokenises.
pub fn load_split(cfg: &Config, encoder: &TextEncoder, split: &str) -> Result<Vec<Encoded>> {
    let dir = cfg.data_dir()?;
    let examples = formats::load_split(dir, split)?;
    // Name the file(s) the labels came from, so the user knows which one to fix.
    let files: Vec<String> = split
        .split('+')
        .filter_map(|part| formats::locate_split(dir, part).ok())
        .flat_map(|(_, files)| files)
        .map(|f| f.display().to_string())
        .collect();
    let source = if files.is_empty() {
        dir.display().to_string()
    } else {
        files.join(", ")
    };
    formats::check_labels(
        &examples,
        cfg.num_classes as usize,
        &format!("{source} ({split} split)"),
    )?;
    let text = prompt::resolve_prompt(&cfg.prompt)?;
    encode_examples(encoder, &examples, &text)
}

/// Peak resident memory of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn fmt_duration(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

fn opt_fmt(v: Option<f64>) -> String {
    v.map_or(String::new(), |x| format!("{x:.6}"))
}

fn log_eval(log: &mut CsvLog, epoch: usize, split: &str, r: &EvalResult) -> Result<()> {
    log.row(&[
        epoch.to_string(),
        split.to_string(),
        opt_fmt(r.accuracy),
        opt_fmt(r.f1),
        opt_fmt(r.loss),
    ]);
    log.flush()
}

/// Handles on the same tensors (the optimizer updates the model's own parameters).
fn shallow(ts: &[Tensor]) -> Vec<Tensor> {
    ts.iter().map(Tensor::shallow_clone).collect()
}

/// L2 norm of all gradients (optionally clipped to `max_norm`, as torch's clip_grad_norm_).
fn grad_norm(params: &[Tensor], max_norm: Option<f64>) -> f64 {
    let _g = tch::no_grad_guard();
    // One reduction on the device and one host sync per step, not one per tensor.
    let squares: Vec<Tensor> = params
        .iter()
        .map(Tensor::grad)
        .filter(Tensor::defined)
        .map(|g| g.to_kind(Kind::Double).square().sum(Kind::Double))
        .collect();
    let norm = if squares.is_empty() {
        0.0
    } else {
        Tensor::stack(&squares, 0)
            .sum(Kind::Double)
            .sqrt()
            .double_value(&[])
    };
    if let Some(max) = max_norm {
        let coef = max / (norm + 1e-6);
        if coef < 1.0 {
            for p in params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(coef);
                }
            }
        }
    }
    norm
}

/// The summary of a finished run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub baseline: Option<serde_json::Value>,
    pub final_eval: Option<serde_json::Value>,
    pub best_accuracy: Option<f64>,
    pub steps: usize,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub elapsed_s: f64,
    pub peak_mem_bytes: u64,
    pub tokens_per_s: f64,
    pub trainable_params: u64,
    pub all_params: u64,
    pub world_size: usize,
}

fn eval_json(r: &EvalResult) -> serde_json::Value {
    json!({"accuracy": r.accuracy, "f1": r.f1, "loss": r.loss, "examples": r.pred.len()})
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

/// Prints on the main rank only (the others stay quiet, as accelerate's main process does).
macro_rules! say {
    ($main:expr, $($arg:tt)*) => {
        if $main {
            println!($($arg)*);
        }
    };
}

pub fn train(cfg: &Config) -> Result<Summary> {
    let start = Instant::now();
    tch::manual_seed(cfg.seed as i64);
    // Data parallelism when a launcher set RANK/WORLD_SIZE (torchrun, scripts/launch.sh, srun).
    let dist = Dist::from_env(Duration::from_secs(cfg.dist_timeout_s))?;
    let (rank, world) = dist.as_ref().map_or((0, 1), |d| (d.rank, d.world_size));
    let main = rank == 0;
    let device = match &dist {
        Some(d) if cfg.device == "auto" => d.device(),
        _ => cfg.device(),
    };

    let run = cfg.results_path.clone();
    if main {
        std::fs::create_dir_all(&run)
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
        )?;
    }
    let resume_from = resume::resolve(&run, cfg.resume.as_deref().unwrap_or(""))?;

    // Data and model.
    let Loaded {
        mut model,
        encoder,
        device,
    } = load_model(cfg, device)?;
    let pad = encoder.pad_id();
    let train_set = load_split(cfg, &encoder, &cfg.train_splits)?;
    let eval_set = load_split(cfg, &encoder, &cfg.eval_split)?;
    let (trainable, all) = model.param_counts();
    say!(main, "{}", peft_param_line(trainable, all));
    say!(
        main,
        "data: {} training examples ({}), {} evaluation examples ({}), prompt {:?}; device {:?} x {world} rank(s), compute {:?}",
        train_set.len(),
        cfg.train_splits,
        eval_set.len(),
        cfg.eval_split,
        prompt::resolve_prompt(&cfg.prompt)?,
        device,
        cfg.compute_kind(device)
    );

    // Optimizer and schedule over the trainable tensors (LoRA A/B, head).
    let params: Vec<Tensor> = model
        .trainable_parameters()
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    if let Some(d) = &dist {
        // Every rank starts from rank 0's LoRA and head, and has gradients to all-reduce even
        // when its part of a batch is empty.
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
    let steps_per_epoch = train_set.len().div_ceil(cfg.batch_size);
    let planned = steps_per_epoch * cfg.epochs;
    let total_steps = cfg.max_steps.map_or(planned, |m| m.min(planned));
    let warmup = schedule::warmup_steps(planned, cfg.warmup_ratio);

    // Where we start: fresh, or from a checkpoint (every rank reads it).
    let mut st = TrainState {
        step: 0,
        epochs_done: 0,
        batch_in_epoch: 0,
        tokens_seen: 0,
        best_accuracy: None,
        train_seconds: 0.0,
        seed: cfg.seed,
    };
    if let Some(dir) = &resume_from {
        let ck = resume::load(dir)?;
        if ck.state.seed != cfg.seed {
            bail!(
                "{}: this checkpoint was made with seed {}, the configuration says {}; \
                 resume with the same configuration",
                dir.display(),
                ck.state.seed,
                cfg.seed
            );
        }
        model
            .load_trainable(&|n| ck.trainable.get(n).map(|t| t.shallow_clone()))
            .with_context(|| format!("cannot restore the weights of {}", dir.display()))?;
        optimizer
            .load_state_tensors(&|n| ck.optimizer.get(n).map(|t| t.shallow_clone()))
            .with_context(|| format!("cannot restore the optimizer of {}", dir.display()))?;
        st = ck.state;
        say!(
            main,
            "resuming from {} (step {}, epoch {}, batch {})",
            dir.display(),
            st.step,
            st.epochs_done + 1,
            st.batch_in_epoch
        );
    }
    let resumed = resume_from.is_some();
    let keep_step = st.step;
    let keep_epochs = st.epochs_done;
    let mut logs = if main {
        let metrics = CsvLog::create(run.join("metrics.csv"), &METRICS_HEADER, |row| {
            resumed
                && row
                    .first()
                    .and_then(|s| s.parse::<usize>().ok())
                    .is_some_and(|s| s <= keep_step)
        })?;
        let evals = CsvLog::create(run.join("eval.csv"), &EVAL_HEADER, |row| {
            resumed
                && row
                    .first()
                    .and_then(|s| s.parse::<usize>().ok())
                    .is_some_and(|e| e <= keep_epochs)
        })?;
        Some((metrics, evals))
    } else {
        None
    };
    let eval_split = cfg.eval_split.as_str();
    let stop = install_signal_flag()?;
    let evaluate = |model: &LlamaClassifier| {
        eval::evaluate(
            model,
            &eval_set,
            cfg.eval_batch_size,
            pad,
            device,
            dist.as_ref(),
        )
    };

    let mut baseline = None;
    let mut last_eval = None;
    if cfg.eval_before_training && !resumed {
        let r = evaluate(&model)?;
        say!(
            main,
            "epoch 0 (before training): {eval_split} accuracy {} f1 {} (majority class {:.4})",
            opt_fmt(r.accuracy),
            opt_fmt(r.f1),
            eval::majority_fraction(&eval_set)
        );
        if let Some((_, evals)) = &mut logs {
            log_eval(evals, 0, eval_split, &r)?;
        }
        baseline = Some(eval_json(&r));
        last_eval = Some(r);
    }

    let save_checkpoint = |st: &TrainState, model: &LlamaClassifier, optimizer: &dyn Optimizer| {
        resume::save(
            &run,
            st,
            &model.trainable_parameters(),
            &optimizer.state_tensors(),
            cfg.keep_checkpoints,
        )
    };
    let lengths: Vec<usize> = train_set.iter().map(|e| e.ids.len()).collect();
    let mut unevaluated_steps = false;
    let session_start = Instant::now();
    let session_tokens_start = st.tokens_seen;
    let mut stepping = 0.0f64;
    'epochs: for epoch in (st.epochs_done + 1)..=cfg.epochs {
        let batches = epoch_batches(
            train_set.len(),
            cfg.batch_size,
            Some(cfg.seed),
            epoch,
            cfg.bucket_by_length.then_some(lengths.as_slice()),
        );
        for batch_idx in batches.iter().skip(st.batch_in_epoch) {
            if st.step >= total_steps {
                break 'epochs;
            }
            // accelerate's split_batches: this rank's contiguous part of the global batch.
            let (part, weight) = dist::split_batch_weighted(batch_idx, rank, world);
            let step_start = Instant::now();
            let lr = cfg.lr * schedule::linear_warmup_multiplier(st.step, warmup, planned);
            model.set_dropout_step(st.step as u64);
            let (mut loss, mut tokens) = (0.0, 0i64);
            if !part.is_empty() {
                let items: Vec<&Encoded> = part.iter().map(|&i| &train_set[i]).collect();
                let b = collate(&items, pad);
                let labels = b
                    .labels
                    .as_ref()
                    .context("training examples must have labels")?
                    .to_device(device);
                (loss, _) = model.forward_backward(
                    &b.input_ids.to_device(device),
                    &b.attention_mask.to_device(device),
                    &labels,
                )?;
                tokens = b.n_tokens;
            }
            let mut interrupted = stop.load(Ordering::SeqCst);
            if let Some(d) = &dist {
                // The part's mean gradient, weighted by the part's share of the global batch:
                // the mean over ranks is then the global batch's mean gradient.
                let scale = weight * world as f64;
                let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).collect();
                {
                    let _g = tch::no_grad_guard();
                    for g in &grads {
                        let _ = g.shallow_clone().g_mul_scalar_(scale);
                    }
                }
                d.all_reduce_mean(&grads)?;
                // Loss, tokens and a stop request, summed over ranks in one small collective,
                // so that every rank stops at the same step.
                let stats = Tensor::from_slice(&[
                    loss * weight,
                    tokens as f64,
                    f64::from(u8::from(interrupted)),
                ])
                .to_device(device);
                d.all_reduce_sum(&stats)?;
                let v = Vec::<f64>::try_from(&stats.to_device(Device::Cpu))?;
                (loss, tokens, interrupted) = (v[0], v[1] as i64, v[2] > 0.0);
            }
            let gnorm = grad_norm(&params, cfg.max_grad_norm);
            if !loss.is_finite() || !gnorm.is_finite() {
                let what = format!(
                    "non-finite {} at step {} (epoch {epoch}, batch {}); the batch's example idx: {:?}",
                    if loss.is_finite() { format!("gradient norm {gnorm}") } else { format!("loss {loss}") },
                    st.step + 1,
                    st.batch_in_epoch + 1,
                    batch_idx.iter().map(|&i| train_set[i].idx).collect::<Vec<_>>()
                );
                if cfg.on_nonfinite == "skip" {
                    if main {
                        eprintln!("\nwarning: {what}; step skipped (on_nonfinite: skip)");
                    }
                    optimizer.zero_grad();
                    st.batch_in_epoch += 1;
                    continue;
                }
                if let Some((metrics, _)) = &logs {
                    metrics.flush()?;
                }
                let last_good = resume::latest(&run)?
                    .map_or("none yet".to_string(), |p| p.display().to_string());
                bail!(
                    "{what}. The last good checkpoint: {last_good}. Lower `lr`, set `max_grad_norm`, \
                     or set `on_nonfinite: skip`"
                );
            }
            optimizer.step(lr)?;
            optimizer.zero_grad();
            st.step += 1;
            st.batch_in_epoch += 1;
            st.tokens_seen += tokens;
            unevaluated_steps = true;
            // Throughput counts training steps only, not evaluation or checkpoint saving.
            stepping += step_start.elapsed().as_secs_f64();
            let session = session_start.elapsed().as_secs_f64();
            let tps = (st.tokens_seen - session_tokens_start) as f64 / stepping.max(1e-9);
            if let Some((metrics, _)) = &mut logs {
                metrics.row(&[
                    st.step.to_string(),
                    format!("{:.4}", st.step as f64 / steps_per_epoch as f64),
                    format!("{loss:.6}"),
                    format!("{lr:.6e}"),
                    format!("{gnorm:.6}"),
                    format!("{tps:.1}"),
                    format!("{:.3}", st.train_seconds + session),
                    peak_rss_bytes().to_string(),
                ]);
                if st.step.is_multiple_of(cfg.log_every) || st.step == total_steps || interrupted {
                    metrics.flush()?;
                    let done_here = (st.step - keep_step).max(1) as f64;
                    let eta = session / done_here * (total_steps - st.step) as f64;
                    print!(
                        "\repoch {epoch}/{} step {}/{total_steps} loss {loss:.4} lr {lr:.2e} tok/s {tps:.0} eta {}   ",
                        cfg.epochs,
                        st.step,
                        fmt_duration(eta)
                    );
                    let _ = std::io::stdout().flush();
                }
            }
            let periodic = cfg.checkpoint_every > 0 && st.step.is_multiple_of(cfg.checkpoint_every);
            if periodic || interrupted {
                let mut snap = st.clone();
                snap.train_seconds += session_start.elapsed().as_secs_f64();
                let saved = if main {
                    Some(save_checkpoint(&snap, &model, optimizer.as_ref())?)
                } else {
                    None
                };
                if interrupted {
                    say!(main, "");
                    bail!(Interrupted(match saved {
                        Some(dir) => format!(
                            "interrupted at step {}: checkpoint saved to {}; continue with --resume auto",
                            st.step,
                            dir.display()
                        ),
                        None => format!("rank {rank}: interrupted at step {} (rank 0 saved the checkpoint)", st.step),
                    }));
                }
            }
        }
        say!(main, "");
        let r = evaluate(&model)?;
        say!(
            main,
            "epoch {epoch}: {eval_split} accuracy {} f1 {} loss {}",
            opt_fmt(r.accuracy),
            opt_fmt(r.f1),
            opt_fmt(r.loss)
        );
        unevaluated_steps = false;
        let best = r
            .accuracy
            .is_some_and(|acc| st.best_accuracy.is_none_or(|b| acc > b));
        if best {
            st.best_accuracy = r.accuracy;
        }
        st.epochs_done = epoch;
        st.batch_in_epoch = 0;
        if let Some((metrics, evals)) = &mut logs {
            metrics.flush()?;
            log_eval(evals, epoch, eval_split, &r)?;
            adapter::save(&run.join("adapter"), cfg, &model.trainable_parameters())?;
            if best {
                adapter::save(
                    &run.join("best_adapter"),
                    cfg,
                    &model.trainable_parameters(),
                )?;
            }
            let mut snap = st.clone();
            snap.train_seconds += session_start.elapsed().as_secs_f64();
            save_checkpoint(&snap, &model, optimizer.as_ref())?;
        }
        last_eval = Some(r);
    }
    // A run cut short by max_steps in mid-epoch still evaluates the weights it ends with;
    // `max_steps: 0` is the untrained baseline alone.
    if unevaluated_steps {
        say!(main, "");
        let r = evaluate(&model)?;
        say!(
            main,
            "step {}: {eval_split} accuracy {} f1 {} loss {}",
            st.step,
            opt_fmt(r.accuracy),
            opt_fmt(r.f1),
            opt_fmt(r.loss)
        );
        if let Some((metrics, evals)) = &mut logs {
            metrics.flush()?;
            let epoch = st.step as f64 / steps_per_epoch as f64;
            log_eval(evals, epoch.ceil() as usize, eval_split, &r)?;
            adapter::save(&run.join("adapter"), cfg, &model.trainable_parameters())?;
        }
        last_eval = Some(r);
    }

    let summary = Summary {
        baseline,
        final_eval: last_eval.as_ref().map(eval_json),
        best_accuracy: st.best_accuracy,
        steps: st.step,
        train_examples: train_set.len(),
        eval_examples: eval_set.len(),
        elapsed_s: start.elapsed().as_secs_f64(),
        peak_mem_bytes: peak_rss_bytes(),
        tokens_per_s: (st.tokens_seen - session_tokens_start) as f64 / stepping.max(1e-9),
        trainable_params: trainable,
        all_params: all,
        world_size: world,
    };
    if main {
        runio::write_json(&run.join("summary.json"), &summary)?;
        println!("run folder: {}", run.display());
    }
    if let Some(d) = &dist {
        d.barrier()?;
    }
    Ok(summary)
}

/// What to do about an error the user can act on, if we recognise it.
pub fn error_hint(message: &str) -> Option<&'static str> {
    if message.contains("out of memory") || message.contains("CUDA error: out of memory") {
        return Some(
            "the GPU ran out of memory: lower `batch_size` / `eval_batch_size`, set `max_length`, \
             keep `gradient_checkpointing: true`, or use fewer `target_modules`",
        );
    }
    if message.contains("No space left on device") {
        return Some("the disk is full: free space in the run folder's file system (the previous checkpoint is intact)");
    }
    None
}

/// The error a run stopped by SIGINT/SIGTERM ends with (after saving its checkpoint).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Interrupted(pub String);

/// `qlora-cls eval`/`predict`: the model with a trained adapter loaded.
pub fn load_with_adapter(cfg: &Config, adapter_dir: &Path) -> Result<Loaded> {
    let meta = adapter::read_meta(adapter_dir)?;
    let mut cfg = cfg.clone();
    cfg.r = meta.r;
    cfg.lora_alpha = meta.lora_alpha;
    cfg.target_modules = meta.target_modules;
    let mut loaded = load_model(&cfg, cfg.device())?;
    let weights_path = adapter_dir.join(adapter::WEIGHTS_FILE);
    let weights = adapter::read_safetensors(&weights_path)?;
    loaded
        .model
        .load_trainable(&|name| weights.get(name).map(|t| t.shallow_clone()))
        .with_context(|| format!("cannot load the adapter {}", weights_path.display()))?;
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_for_oom_and_full_disk() {
        let oom =
            "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity)";
        assert!(error_hint(oom).unwrap().contains("batch_size"));
        assert!(
            error_hint("write failed: No space left on device (os error 28)")
                .unwrap()
                .contains("disk is full")
        );
        assert!(error_hint("something else").is_none());
    }
}

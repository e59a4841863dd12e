//! The training run, top to bottom like the reference script: set up; evaluate the
//! untrained model; for each epoch, for each batch: forward and backward, all-reduce, step,
//! log; then evaluate and save. Each named step is a method of [`Trainer`]
//! (`src/train/trainer.rs`); the gradient of one step (ranks, gradient accumulation) is
//! `src/train/step.rs`.
/// Prints on the main rank only (the others stay quiet, as accelerate's main process does).
macro_rules! say {
    ($t:expr, $($arg:tt)*) => {
        if $t.main {
            $t.progress.close();
            println!($($arg)*);
        }
    };
}

pub mod memory;
mod progress;
mod report;
mod start;
mod step;
mod trainer;

pub use step::{micro_batches, MicroBatch};
pub use trainer::{Trainer, EVAL_HEADER, METRICS_HEADER};

use crate::config::Config;
use anyhow::Result;

pub fn train(cfg: &Config) -> Result<Summary> {
    let mut run = Trainer::start(cfg)?;
    run.evaluate_baseline()?;
    'epochs: for epoch in run.first_epoch()..=cfg.epochs {
        for batch in run.batches(epoch) {
            if run.finished() || run.stopped_early() {
                break 'epochs;
            }
            let Some(step) = run.train_step(epoch, &batch)? else {
                continue; // a non-finite step, skipped
            };
            run.log_step(epoch, &step)?;
            run.evaluate_if_due()?;
            run.checkpoint_if_due(&step)?;
        }
        if run.stopped_early() {
            break;
        }
        run.end_epoch(epoch)?;
    }
    run.finish()
}

/// The summary of a finished run (summary.json).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub baseline: Option<serde_json::Value>,
    pub final_eval: Option<serde_json::Value>,
    /// The best evaluation's accuracy, when accuracy is the task's main metric (null otherwise).
    pub best_accuracy: Option<f64>,
    /// The task's main metric (the one the best adapter is chosen by) and its best value.
    pub best_metric_name: String,
    pub best_metric: Option<f64>,
    pub steps: usize,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub elapsed_s: f64,
    pub peak_mem_bytes: u64,
    pub tokens_per_s: f64,
    pub trainable_params: u64,
    pub all_params: u64,
    pub world_size: usize,
    /// `gradient_checkpointing`'s decision and the peak memory it estimated.
    pub memory_plan: memory::MemoryPlan,
    /// The compute dtype `bnb_4bit_compute_dtype` resolved to (`float32`, `bfloat16`, `float16`).
    pub compute_dtype: String,
    /// The type the frozen matmuls multiply in (`qlinear::gemm_kind`): the compute dtype, or
    /// `float32` for bf16 on a CPU without bf16 matrix instructions.
    pub matmul_dtype: String,
    /// The loss weights `class_weights` resolved to (`balanced` computed from the training
    /// labels): cross-entropy `weight` or multi-label `pos_weight`.
    pub class_weights: Option<Vec<f64>>,
    /// Per custom kernel: the implementation it ran (`custom` or `torch` twin) and its
    /// self-check (`kernels::summary_json`).
    pub kernels: serde_json::Value,
    /// With `early_stopping_patience`: the settings, the evaluations without improvement
    /// and the step early stopping ended the run at (null when it ran to its end).
    pub early_stopping: Option<serde_json::Value>,
}

/// What to do about an error the user can act on, if we recognise it.
pub fn error_hint(message: &str) -> Option<&'static str> {
    if message.contains("out of memory") || message.contains("CUDA error: out of memory") {
        return Some(
            "the GPU ran out of memory: lower `batch_size` / `eval_batch_size`, set `max_length`, \
             set `gradient_checkpointing: true` or a lower `max_memory`, or use fewer `target_modules`",
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

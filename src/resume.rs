//! Training checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding the trainable tensors
//! (PEFT key names), the optimizer's states (8-bit codes and absmax included) and
//! `state.json` (step, position in the epoch, counters). It is written under a temporary name
//! and renamed, so a crash or a full disk mid-save leaves the previous checkpoint intact.
//! Randomness needs no saved state: the data order is a function of (seed, epoch) and
//! dropout is reseeded from (seed, step) before every step.
use crate::adapter;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

pub const DIR: &str = "checkpoints";
const STATE: &str = "state.json";
const WEIGHTS: &str = "trainable.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Epochs whose evaluation is done (0 = none).
    pub epochs_done: usize,
    /// Batches of the current epoch already trained.
    pub batch_in_epoch: usize,
    pub tokens_seen: i64,
    pub best_accuracy: Option<f64>,
    /// Seconds of training before this checkpoint (for throughput after a resume).
    pub train_seconds: f64,
    /// The configuration's seed, to refuse resuming a different run.
    pub seed: u64,
    /// Evaluations in a row that did not improve the main metric by more than
    /// `early_stopping_threshold` (transformers' `early_stopping_patience_counter`).
    #[serde(default)]
    pub patience_counter: usize,
    /// The step at which early stopping ended the run, if it did.
    #[serde(default)]
    pub early_stopped_at: Option<usize>,
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
    pub trainable: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

fn step_dir(run: &Path, step: usize) -> PathBuf {
    run.join(DIR).join(format!("step-{step:08}"))
}

/// Writes a checkpoint atomically (temp folder + rename) and keeps only the newest `keep`.
pub fn save(
    run: &Path,
    state: &TrainState,
    trainable: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    keep: usize,
) -> Result<PathBuf> {
    let root = run.join(DIR);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let final_dir = step_dir(run, state.step);
    let tmp = root.join(format!(
        ".tmp-step-{:08}-{}",
        state.step,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let write = || -> Result<()> {
        std::fs::create_dir_all(&tmp)?;
        adapter::write_safetensors(&tmp.join(WEIGHTS), trainable)?;
        adapter::write_safetensors(&tmp.join(OPTIMIZER), optimizer)?;
        crate::runio::write_json(&tmp.join(STATE), state)?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir)?;
        }
        std::fs::rename(&tmp, &final_dir)?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e).with_context(|| {
            format!(
                "cannot save the checkpoint of step {} in {} (the previous checkpoints are intact)",
                state.step,
                root.display()
            )
        });
    }
    // Prune old checkpoints only once the new one is safely in place.
    let mut all = list(run)?;
    while all.len() > keep.max(1) {
        let old = all.remove(0);
        let _ = std::fs::remove_dir_all(old.1);
    }
    Ok(final_dir)
}

/// Completed checkpoints of a run, oldest first, as (step, folder).
pub fn list(run: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let root = run.join(DIR);
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(out);
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            if e.path().join(STATE).is_file() {
                out.push((n, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest checkpoint of a run, if any.
pub fn latest(run: &Path) -> Result<Option<PathBuf>> {
    Ok(list(run)?.pop().map(|(_, p)| p))
}

pub fn load(dir: &Path) -> Result<Checkpoint> {
    let state_path = dir.join(STATE);
    let text = std::fs::read_to_string(&state_path).with_context(|| {
        format!(
            "cannot read {} (not a checkpoint folder?)",
            state_path.display()
        )
    })?;
    let state: TrainState = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid checkpoint state", state_path.display()))?;
    let trainable = adapter::read_safetensors(&dir.join(WEIGHTS))?;
    let optimizer = adapter::read_safetensors(&dir.join(OPTIMIZER))?;
    if trainable.is_empty() {
        bail!("{}: no tensors", dir.join(WEIGHTS).display());
    }
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        state,
        trainable,
        optimizer,
    })
}

/// Resolves `resume`: `auto` = the newest checkpoint of the run folder (none is fine: a fresh
/// start), anything else = a checkpoint folder that must exist.
pub fn resolve(run: &Path, resume: &str) -> Result<Option<PathBuf>> {
    match resume {
        "" | "none" | "false" => Ok(None),
        "auto" | "true" => latest(run),
        path => {
            let p = PathBuf::from(path);
            if !p.join(STATE).is_file() {
                bail!(
                    "--resume {path}: no checkpoint there (expected {})",
                    p.join(STATE).display()
                );
            }
            Ok(Some(p))
        }
    }
}

//! The splits a command reads for a task: the examples, their labels checked against the
//! task's, rendered through the template and prompt, and tokenised.
use crate::config::Config;
use crate::data::batch::{encode_examples, encode_task_examples, Encoded, TextEncoder};
use crate::data::examples::{self, TaskExample};
use crate::data::long_text::Counted;
use crate::data::{formats, prompt};
use crate::labels::LabelSpec;
use crate::task::TaskLabels;
use anyhow::{bail, Result};

/// The task of `cfg` with its label side, and (for tasks read through the generic path) the
/// training examples the labels were inferred from.
pub fn prepare_task(cfg: &Config) -> Result<(TaskLabels, Option<Vec<TaskExample>>)> {
    let task = cfg.to_task()?;
    if task.is_classic_mrpc() {
        let spec = LabelSpec::mrpc(cfg.num_classes as usize);
        return Ok((TaskLabels { task, spec }, None));
    }
    let train = examples::load_split(cfg.data_dir()?, &task, &cfg.train_splits, true)?;
    let spec = examples::infer_labels(&task, &train)?;
    // The head is sized by the labels; a `num_classes` other than the default that
    // disagrees with them is a mistake to name, not a value to ignore.
    let default = Config::default().num_classes;
    if cfg.num_classes != default && cfg.num_classes != spec.num_labels() as i64 {
        bail!(
            "key `num_classes`: {} does not match task {}'s {} label(s) ({}); drop the key (the labels size the head) or fix the data",
            cfg.num_classes,
            task.name,
            spec.num_labels(),
            spec.names.join(", ")
        );
    }
    Ok((TaskLabels { task, spec }, Some(train)))
}

/// Reads a split, checks its labels, renders the prompt and tokenises. `require_labels`:
/// training and evaluation splits must be labelled; prediction reads unlabelled rows too.
pub fn load_split(
    cfg: &Config,
    labels: &TaskLabels,
    encoder: &TextEncoder,
    split: &str,
    require_labels: bool,
) -> Result<Vec<Encoded>> {
    if labels.task.is_classic_mrpc() {
        return load_mrpc_split(cfg, encoder, split);
    }
    let raw = examples::load_split(cfg.data_dir()?, &labels.task, split, require_labels)?;
    encode_raw(labels, encoder, &raw, split)
}

/// Encodes a task's examples with their targets (the prompt is the task's own); how many
/// were over `max_length` is said on the console, naming them `what`.
pub fn encode_raw(
    labels: &TaskLabels,
    encoder: &TextEncoder,
    raw: &[TaskExample],
    what: &str,
) -> Result<Vec<Encoded>> {
    let targets = examples::targets(&labels.spec, &labels.task, raw)?;
    let encoded = encode_task_examples(encoder, &labels.task, &labels.task.prompt, raw, targets)?;
    Ok(reported(encoded, encoder, what))
}

fn reported(
    (rows, counted): (Vec<Encoded>, Counted),
    encoder: &TextEncoder,
    what: &str,
) -> Vec<Encoded> {
    if let Some(line) = counted.line(what, encoder.long_text()) {
        println!("{line}");
    }
    rows
}

/// MRPC through its original reader: checks its labels against num_classes.
fn load_mrpc_split(cfg: &Config, encoder: &TextEncoder, split: &str) -> Result<Vec<Encoded>> {
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
    Ok(reported(
        encode_examples(encoder, &examples, &text)?,
        encoder,
        split,
    ))
}

//! What a user decides with: evaluations every `eval_steps` and early stopping with
//! transformers' `EarlyStoppingCallback` meaning, through the binary on the demo (the stop
//! said on the console and in summary.json, the run folder resumable after it).
mod common;
use serde_json::Value;
use std::path::Path;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn summary(run: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

/// transformers' rule replayed on eval.csv's main metric: against the best before each
/// evaluation (the baseline is not one), more than that evaluation's threshold better
/// resets the count, anything else adds one. The count after each evaluation.
fn transformers_counts(main: &[f64], thresholds: &[f64]) -> Vec<usize> {
    let (mut best, mut count, mut out) = (None::<f64>, 0, Vec::new());
    for (&m, &threshold) in main.iter().zip(thresholds) {
        let improved = best.is_none_or(|b| m > b && (m - b).abs() > threshold);
        count = if improved { 0 } else { count + 1 };
        if best.is_none_or(|b| m > b) {
            best = Some(m);
        }
        out.push(count);
    }
    out
}

#[test]
fn early_stopping_stops_a_plateau_and_the_run_resumes() {
    let d = common::tempdir();
    let demo = common::demo_assets(&d.path().join("demo"));
    let run = d.path().join("run");
    let cfg = common::root().join("configs/demo.yaml");
    let flags = |patience: &str, threshold: &str| -> Vec<String> {
        [
            "train",
            "--config",
            s(&cfg),
            "--model_dir",
            s(&demo.join("model")),
            "--data_dir",
            s(&demo.join("data")),
            "--results_path",
            s(&run),
            "--epochs",
            "1",
            "--eval_steps",
            "15",
            "--early_stopping_patience",
            patience,
            "--early_stopping_threshold",
            threshold,
            "--resume",
            "auto",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let run_with = |patience: &str, threshold: &str| -> String {
        let args = flags(patience, threshold);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        common::run_ok(&refs)
    };
    // No improvement can exceed 10: the second evaluation after the baseline stops the run.
    let out = run_with("1", "10");
    let evals = common::csv_rows(&run.join("eval.csv"));
    assert_eq!(evals[0].last().map(String::as_str), Some("step"));
    let steps: Vec<&str> = evals[1..].iter().map(|r| r[5].as_str()).collect();
    assert_eq!(steps, ["0", "15", "30"], "{evals:?}");
    // Mid-epoch rows carry the fraction of epochs trained (the demo: 200 steps an epoch).
    assert_eq!(evals[2][0], "0.0750");
    let main: Vec<f64> = evals[2..].iter().map(|r| r[3].parse().unwrap()).collect();
    assert_eq!(transformers_counts(&main, &[10.0; 2]), [0, 1]);
    assert!(
        out.contains("early stopping at step 30: accuracy did not improve"),
        "{out}"
    );
    let sum = summary(&run);
    let es = &sum["early_stopping"];
    assert_eq!(es["stopped_at_step"], 30, "{es}");
    assert_eq!(es["patience"], 1);
    assert_eq!(es["evaluations_without_improvement"], 1);
    assert_eq!(sum["steps"], 30);
    // eval.csv holds 6 decimals.
    assert!(
        (es["best"].as_f64().unwrap() - main[0]).abs() < 1e-6,
        "{es}"
    );
    let metrics = common::csv_rows(&run.join("metrics.csv"));
    assert_eq!(metrics.len(), 1 + 30, "one row per step trained");
    // Stopped where it is resumable: a checkpoint at the stop, and the adapters saved.
    assert!(run.join("checkpoints/step-00000030").is_dir());
    for a in ["adapter", "best_adapter"] {
        assert!(
            run.join(a).join("adapter_model.safetensors").is_file(),
            "{a}"
        );
    }

    // Resumed with the same patience: nothing to train, summary.json and eval.csv stay.
    let before = (
        std::fs::read(run.join("summary.json")).unwrap(),
        std::fs::read(run.join("eval.csv")).unwrap(),
    );
    let again = run_with("1", "10");
    assert!(again.contains("resumed: nothing to train"), "{again}");
    assert_eq!(std::fs::read(run.join("summary.json")).unwrap(), before.0);
    assert_eq!(std::fs::read(run.join("eval.csv")).unwrap(), before.1);

    // A larger patience trains on from the stop, keeping the rows before it; any real
    // improvement counts now (threshold 0), so where it stops again is transformers' rule.
    let on = run_with("3", "0");
    assert!(
        on.contains("early stopping ended this run at step 30; training on"),
        "{on}"
    );
    let evals = common::csv_rows(&run.join("eval.csv"));
    let steps: Vec<usize> = evals[1..].iter().map(|r| r[5].parse().unwrap()).collect();
    assert_eq!(steps[..3], [0, 15, 30], "{evals:?}");
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    let main: Vec<f64> = evals[2..].iter().map(|r| r[3].parse().unwrap()).collect();
    // The count carries over the resume: threshold 10 up to step 30, 0 after it.
    let thresholds: Vec<f64> = (0..main.len())
        .map(|i| if i < 2 { 10.0 } else { 0.0 })
        .collect();
    let counts = transformers_counts(&main, &thresholds);
    let want = (2..main.len())
        .find(|&i| counts[i] >= 3)
        .map(|i| steps[i + 1]);
    let sum = summary(&run);
    let es = &sum["early_stopping"];
    let stopped = es["stopped_at_step"].as_u64().map(|s| s as usize);
    eprintln!("accuracy {main:?}, counts {counts:?}, stopped at {stopped:?}");
    assert_eq!(
        stopped, want,
        "ours vs transformers' rule on {main:?} (counts {counts:?})"
    );
    assert_eq!(
        es["evaluations_without_improvement"],
        counts[counts.len() - 1]
    );
    match stopped {
        Some(at) => assert_eq!(Some(&at), steps.last(), "{es}"),
        None => assert_eq!(sum["steps"], 200, "ran to its end: {sum}"),
    }
}

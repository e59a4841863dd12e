//! End to end on the embedded demo: `demo-assets`, `train`, `eval`, `predict`, run through
//! the binary, reading the files it leaves.
mod common;

#[test]
fn demo_trains_evaluates_and_predicts() {
    let tmp = common::tempdir();
    let assets = tmp.path().join("assets");
    let run = tmp.path().join("run");
    let a = assets.to_str().unwrap();
    common::run_ok(&["demo-assets", "--out", a]);
    let model = format!("{a}/model");
    let data = format!("{a}/data");
    let cfg = common::root().join("configs/demo.yaml");
    let out = common::run_ok(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--model_dir",
        &model,
        "--tokenizer_dir",
        &model,
        "--data_dir",
        &data,
        "--results_path",
        run.to_str().unwrap(),
        "--prompt",
        "perfect",
    ]);
    assert!(out.contains("trainable params: "), "{out}");
    // Standard output is a pipe here, as in a log file: one plain line per `log_every` (20)
    // steps of the 800, no carriage-return redraws.
    assert!(
        !out.contains('\r'),
        "carriage returns in a piped log: {out:?}"
    );
    let progress: Vec<&str> = out.lines().filter(|l| l.contains(" step ")).collect();
    let want: Vec<String> = (1..=40).map(|i| format!("step {}/800 ", i * 20)).collect();
    assert_eq!(progress.len(), want.len(), "{out}");
    for (line, w) in progress.iter().zip(&want) {
        assert!(
            line.starts_with("epoch ") && line.contains(w.as_str()),
            "{line:?} lacks {w:?}"
        );
    }

    for f in [
        "config.json",
        "quant_config.json",
        "lora_config.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.csv",
        "eval.csv",
        "summary.json",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }

    // The loss goes down and validation accuracy climbs far above the majority class.
    let metrics = common::csv_rows(&run.join("metrics.csv"));
    assert_eq!(
        metrics[0],
        [
            "step",
            "epoch",
            "loss",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "elapsed_s",
            "peak_mem_bytes"
        ]
    );
    let losses: Vec<f64> = metrics[1..].iter().map(|r| r[2].parse().unwrap()).collect();
    let k = losses.len() / 5;
    let first: f64 = losses[..k].iter().sum::<f64>() / k as f64;
    let last: f64 = losses[losses.len() - k..].iter().sum::<f64>() / k as f64;
    assert!(
        last < 0.6 * first,
        "loss did not fall: first fifth {first:.4}, last fifth {last:.4}"
    );

    let evals = common::csv_rows(&run.join("eval.csv"));
    assert_eq!(
        evals[0],
        ["epoch", "split", "loss", "accuracy", "f1", "nll", "brier", "ece", "step"]
    );
    let acc: Vec<f64> = evals[1..].iter().map(|r| r[3].parse().unwrap()).collect();
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    let final_acc = *acc.last().unwrap();
    // The demo's dev split has about 68% positives, as MRPC.
    assert!(
        final_acc > 0.9,
        "final accuracy {final_acc:.4}; curve {acc:?}"
    );
    assert!(
        final_acc > acc[0] + 0.15,
        "no climb from the baseline: {acc:?}"
    );
    // eval.csv holds 6 decimals, summary.json the full value.
    let summary_acc = summary["final_eval"]["accuracy"].as_f64().unwrap();
    assert!((summary_acc - final_acc).abs() < 1e-6);

    // `eval` on the saved adapter reproduces the last epoch's validation accuracy.
    let adapter = run.join("adapter");
    let ad = adapter.to_str().unwrap();
    let out = common::run_ok(&[
        "eval",
        "--config",
        cfg.to_str().unwrap(),
        "--adapter",
        ad,
        "--split",
        "validation",
        "--model_dir",
        &model,
        "--data_dir",
        &data,
    ]);
    assert!(
        out.contains(&format!("accuracy {final_acc:.4}")),
        "{out} vs {final_acc}"
    );

    // `predict` writes one row per test example (unlabelled GLUE-style test.tsv).
    let pred = tmp.path().join("pred.csv");
    common::run_ok(&[
        "predict",
        "--config",
        cfg.to_str().unwrap(),
        "--adapter",
        ad,
        "--split",
        "test",
        "--model_dir",
        &model,
        "--data_dir",
        &data,
        "--out",
        pred.to_str().unwrap(),
    ]);
    let rows = common::csv_rows(&pred);
    assert_eq!(rows[0], ["index", "prediction", "prob_0", "prob_1"]);
    let test = std::fs::read_to_string(assets.join("data/test.tsv")).unwrap();
    assert_eq!(rows.len() - 1, test.lines().count() - 1);
    for r in &rows[1..] {
        let p0: f64 = r[2].parse().unwrap();
        let p1: f64 = r[3].parse().unwrap();
        assert!((p0 + p1 - 1.0).abs() < 1e-4);
        assert_eq!(r[1], if p1 > p0 { "1" } else { "0" });
    }
}

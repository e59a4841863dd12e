//! Any text-classification task, end to end through the binary on the demo's other data sets
//! (`demo-assets` writes them to `tasks/`): a multi-class CSV with renamed columns and string
//! labels, a multi-label JSONL with lists of names, a regression target in parquet. Each
//! trains, learns, evaluates and predicts; `predict`'s CSV re-scored by scikit-learn / scipy
//! gives the metrics of eval.csv; the labels travel with the adapter.
mod common;
use std::path::PathBuf;
use std::sync::OnceLock;

fn assets() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tasks-demo-assets");
        let _ = std::fs::remove_dir_all(&dir);
        common::demo_assets(&dir)
    })
}

/// Trains on `data` with `flags`, then checks eval.csv's header, the learning, `eval`, the
/// labels saved with the adapter, `predict`, and the re-scoring of its CSV.
struct Case<'a> {
    name: &'a str,
    data: PathBuf,
    flags: &'a [&'a str],
    gold_file: &'a str,
    label_column: &'a str,
    problem: &'a str,
    metrics: &'a [&'a str],
    names: &'a [&'a str],
    /// The main metric must end above this.
    floor: f64,
}

fn train_eval_predict(c: &Case) -> PathBuf {
    let run_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("tasks-runs")
        .join(c.name);
    let _ = std::fs::remove_dir_all(&run_dir);
    let tmp = common::tempdir();
    let model = assets().join("model");
    let cfg = common::root().join("configs/demo.yaml");
    let mut args: Vec<&str> = vec![
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--model_dir",
        model.to_str().unwrap(),
        "--data_dir",
        c.data.to_str().unwrap(),
        "--results_path",
        run_dir.to_str().unwrap(),
        "--task",
        "custom",
        "--prompt",
        "",
        "--epochs",
        "2",
        "--eval_batch_size",
        "64",
        "--log_every",
        "1000",
    ];
    args.extend_from_slice(c.flags);
    let out = common::run_ok(&args);

    let evals = common::csv_rows(&run_dir.join("eval.csv"));
    let mut header = vec!["epoch", "split", "loss"];
    header.extend_from_slice(c.metrics);
    assert_eq!(evals[0], header, "{}: eval.csv header", c.name);
    assert_eq!(evals.len(), 4, "{}: baseline + 2 epochs: {evals:?}", c.name);
    let main: Vec<f64> = evals[1..].iter().map(|r| r[3].parse().unwrap()).collect();
    eprintln!("{}: {} per epoch {main:?}\n{out}", c.name, c.metrics[0]);
    assert!(
        main[2] > c.floor && main[2] > main[0] + 0.1,
        "{}: {} did not climb: {main:?}",
        c.name,
        c.metrics[0]
    );
    let losses: Vec<f64> = evals[1..].iter().map(|r| r[2].parse().unwrap()).collect();
    assert!(losses[2] < losses[0], "{}: loss {losses:?}", c.name);

    // summary.json names the main metric the best adapter was chosen by; best_accuracy is
    // only accuracy.
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["best_metric_name"], c.metrics[0], "{}", c.name);
    assert!(summary["best_metric"].is_f64(), "{}: {summary}", c.name);
    if c.metrics[0] != "accuracy" {
        assert!(summary["best_accuracy"].is_null(), "{}: {summary}", c.name);
    }

    // The labels travel with the adapter (and with the best one).
    let adapter = run_dir.join("adapter");
    for dir in [&adapter, &run_dir.join("best_adapter")] {
        let labels: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("labels.json")).unwrap()).unwrap();
        assert_eq!(labels["problem_type"], c.problem, "{}", c.name);
        assert_eq!(labels["num_labels"], c.names.len(), "{}", c.name);
        for (i, n) in c.names.iter().enumerate() {
            assert_eq!(labels["id2label"][i.to_string()], *n, "{}", c.name);
            assert_eq!(labels["label2id"][n], i, "{}", c.name);
        }
    }

    // `eval` needs no task flags: the adapter says what it is.
    let ad = adapter.to_str().unwrap();
    let data = c.data.to_str().unwrap();
    let m = model.to_str().unwrap();
    let scored_on = [
        "--adapter",
        ad,
        "--split",
        "validation",
        "--model_dir",
        m,
        "--data_dir",
        data,
        "--bnb_4bit_compute_dtype",
        "float32",
    ];
    let out = common::run_ok(&[&["eval"], &scored_on[..]].concat());
    let last = &evals[3];
    for (k, key) in c.metrics.iter().enumerate() {
        let v: f64 = last[3 + k].parse().unwrap();
        assert!(
            out.contains(&format!("{key} {v:.4}")),
            "{}: {out} vs {key} {v}",
            c.name
        );
    }

    // `predict`, re-scored by scikit-learn / scipy against the gold file.
    let pred = tmp.path().join("pred.csv");
    common::run_ok(
        &[
            &["predict"],
            &scored_on[..],
            &["--out", pred.to_str().unwrap()],
        ]
        .concat(),
    );
    let rows = common::csv_rows(&pred);
    let mut want = vec!["index".to_string(), "prediction".to_string()];
    if c.problem != "regression" {
        want.extend((0..c.names.len()).map(|i| format!("prob_{i}")));
    }
    assert_eq!(rows[0], want, "{}: predict header", c.name);
    let gold = c.data.join(c.gold_file);
    let scored = common::oracle(
        "tasks_oracle.py",
        &[
            "score",
            pred.to_str().unwrap(),
            gold.to_str().unwrap(),
            c.problem,
            c.label_column,
            &c.names.join(","),
            &c.metrics.join(","),
        ],
    );
    let scored: serde_json::Value = serde_json::from_str(scored.trim()).unwrap();
    for (k, key) in c.metrics.iter().enumerate() {
        let ours: f64 = last[3 + k].parse().unwrap();
        let theirs = scored[key].as_f64().unwrap();
        // eval.csv holds 6 decimals; regression predictions are written with 6.
        assert!(
            (ours - theirs).abs() < 2e-5,
            "{}: {key}: eval.csv {ours} vs scikit-learn/scipy on predict's CSV {theirs}",
            c.name
        );
    }
    run_dir
}

#[test]
fn multi_class_csv_with_string_labels() {
    let run_dir = train_eval_predict(&Case {
        name: "topic",
        data: assets().join("tasks/topic"),
        flags: &["--text_columns", "headline", "--label_column", "topic"],
        gold_file: "validation.csv",
        label_column: "topic",
        problem: "single_label_classification",
        metrics: &["accuracy", "macro_f1"],
        names: &["profit", "sales", "shares"],
        floor: 0.8,
    });
    // `predict --input`: unlabelled rows of a file in another format, no task flags.
    let tmp = common::tempdir();
    let input = tmp.path().join("new.jsonl");
    std::fs::write(
        &input,
        "{\"headline\": \"Sales at Acme surged 4 percent on Monday.\"}\n\
         {\"headline\": \"Shares of Hooli fell 2 percent last week.\"}\n",
    )
    .unwrap();
    let pred = tmp.path().join("new.csv");
    common::run_ok(&[
        "predict",
        "--adapter",
        run_dir.join("adapter").to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--model_dir",
        assets().join("model").to_str().unwrap(),
        "--out",
        pred.to_str().unwrap(),
    ]);
    let rows = common::csv_rows(&pred);
    let got: Vec<&str> = rows[1..].iter().map(|r| r[1].as_str()).collect();
    assert_eq!(got, ["sales", "shares"], "{rows:?}");
}

#[test]
fn multi_label_jsonl_with_lists_of_names() {
    train_eval_predict(&Case {
        name: "tags",
        data: assets().join("tasks/tags"),
        flags: &["--text_columns", "text", "--label_column", "tags"],
        gold_file: "validation.jsonl",
        label_column: "tags",
        problem: "multi_label_classification",
        metrics: &["micro_f1", "macro_f1", "exact_match"],
        names: &["profit", "sales", "shares"],
        floor: 0.65,
    });
}

#[test]
fn regression_parquet_with_a_float_target() {
    let tmp = common::tempdir();
    let data = tmp.path().join("move");
    std::fs::create_dir_all(&data).unwrap();
    for split in ["train", "validation"] {
        let src = assets().join(format!("tasks/move/{split}.jsonl"));
        let dst = data.join(format!("{split}.parquet"));
        common::oracle(
            "tasks_oracle.py",
            &["to_parquet", src.to_str().unwrap(), dst.to_str().unwrap()],
        );
    }
    train_eval_predict(&Case {
        name: "move",
        data,
        flags: &["--text_columns", "text", "--label_column", "score"],
        gold_file: "validation.parquet",
        label_column: "score",
        problem: "regression",
        metrics: &["pearson", "spearmanr"],
        names: &["LABEL_0"],
        floor: 0.7,
    });
}

/// Outside MRPC the labels size the head: a `num_classes` that disagrees with them is named,
/// not silently ignored.
#[test]
fn num_classes_disagreeing_with_the_labels_is_refused() {
    let data = assets().join("tasks/topic");
    let flags = |n: &'static str| {
        common::config_from(&[
            "--data_dir",
            data.to_str().unwrap(),
            "--task",
            "custom",
            "--text_columns",
            "headline",
            "--label_column",
            "topic",
            "--num_classes",
            n,
        ])
    };
    let err = match qlora_cls::train::prepare_task(&flags("5")) {
        Ok(_) => panic!("5 classes for 3 labels is refused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("num_classes") && err.contains("profit, sales, shares"),
        "{err}"
    );
    let (labels, _) = qlora_cls::train::prepare_task(&flags("3")).expect("3 matches");
    assert_eq!(labels.spec.num_labels(), 3);
}

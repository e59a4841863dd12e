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
    if c.problem == "single_label_classification" {
        header.extend(["nll", "brier", "ece"]);
    }
    header.push("step");
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
    let err = match qlora_cls::splits::prepare_task(&flags("5")) {
        Ok(_) => panic!("5 classes for 3 labels is refused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("num_classes") && err.contains("profit, sales, shares"),
        "{err}"
    );
    let (labels, _) = qlora_cls::splits::prepare_task(&flags("3")).expect("3 matches");
    assert_eq!(labels.spec.num_labels(), 3);
}

/// `make glue`'s script on a GLUE_DIR with three tasks in two layouts: MNLI in GLUE's own TSV
/// files (scored on matched and mismatched in one run, with the diagnostic set), SST-2 in
/// GLUE's TSV, STS-B in HF's parquet shards (hidden test labels -1). Every task present trains;
/// the submission folder holds the server's file names, headers, test indices and label
/// spellings; results.md a row per evaluation split.
#[test]
fn glue_script_trains_every_task_present_and_writes_the_submission() {
    let tmp = common::tempdir();
    let glue = tmp.path().join("glue");
    let (train, dev, _) = qlora_cls::demo::demo_dataset();
    let pairs: Vec<(String, String)> = train
        .iter()
        .chain(&dev)
        .map(|e| (e.sentence1.clone(), e.sentence2.clone()))
        .collect();
    let mnli_names = ["entailment", "neutral", "contradiction"];
    let write = |path: &std::path::Path, text: String| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    // (file, rows, labelled): GLUE's MNLI columns, test files without the label columns.
    let mnli = glue.join("MNLI");
    let mut at = 0;
    for (file, n, labelled) in [
        ("train.tsv", 24, true),
        ("dev_matched.tsv", 6, true),
        ("dev_mismatched.tsv", 5, true),
        ("test_matched.tsv", 4, false),
        ("test_mismatched.tsv", 3, false),
    ] {
        let mut text = String::from(
            "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t\
             sentence1_parse\tsentence2_parse\tsentence1\tsentence2",
        );
        text.push_str(if labelled {
            "\tlabel1\tgold_label\n"
        } else {
            "\n"
        });
        for i in 0..n {
            let (a, b) = &pairs[at];
            at += 1;
            text.push_str(&format!(
                "{}\t{i}\t{i}e\tslate\t( x )\t( y )\t(ROOT)\t(ROOT)\t{a}\t{b}",
                100 + i
            ));
            if labelled {
                let l = mnli_names[i % 3];
                text.push_str(&format!("\t{l}\t{l}"));
            }
            text.push('\n');
        }
        write(&mnli.join(file), text);
    }
    let mut ax = String::from("index\tsentence1\tsentence2\n");
    for i in 0..2 {
        let (a, b) = &pairs[at + i];
        ax.push_str(&format!("{i}\t{a}\t{b}\n"));
    }
    write(&glue.join("diagnostic/diagnostic.tsv"), ax);

    let sst2 = glue.join("SST-2");
    for (file, n, labelled) in [
        ("train.tsv", 16, true),
        ("dev.tsv", 4, true),
        ("test.tsv", 3, false),
    ] {
        let mut text = String::from(if labelled {
            "sentence\tlabel\n"
        } else {
            "index\tsentence\n"
        });
        for i in 0..n {
            let s = &pairs[i + 40].0;
            text.push_str(&if labelled {
                format!("{s}\t{}\n", i % 2)
            } else {
                format!("{i}\t{s}\n")
            });
        }
        write(&sst2.join(file), text);
    }

    // HF's glue/stsb: parquet shards named {split}-00000-of-00001.parquet.
    let stsb = glue.join("stsb");
    for (split, n) in [("train", 16), ("validation", 4), ("test", 3)] {
        let rows: Vec<String> = (0..n)
            .map(|i| {
                let (a, b) = &pairs[i + 60];
                let label = if split == "test" {
                    -1.0
                } else {
                    (i % 6) as f64 * 0.9
                };
                serde_json::json!({"sentence1": a, "sentence2": b, "label": label, "idx": i})
                    .to_string()
            })
            .collect();
        let jsonl = tmp.path().join(format!("stsb-{split}.jsonl"));
        write(&jsonl, rows.join("\n") + "\n");
        std::fs::create_dir_all(&stsb).unwrap();
        let dst = stsb.join(format!("{split}-00000-of-00001.parquet"));
        common::oracle(
            "tasks_oracle.py",
            &["to_parquet", jsonl.to_str().unwrap(), dst.to_str().unwrap()],
        );
    }

    let out = tmp.path().join("out");
    let model = assets().join("model");
    let cfg = common::root().join("configs/demo.yaml");
    let run = std::process::Command::new("bash")
        .arg(common::root().join("scripts/glue.sh"))
        .args(["--bin", common::bin(), "--model_dir"])
        .arg(&model)
        .arg("--glue_dir")
        .arg(&glue)
        .arg("--out")
        .arg(&out)
        .arg("--")
        .arg("--config")
        .arg(&cfg)
        .args([
            "--max_steps",
            "2",
            "--batch_size",
            "8",
            "--log_every",
            "1000",
        ])
        .output()
        .expect("run scripts/glue.sh");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "glue.sh failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("skipping cola"), "{stdout}");
    assert!(stdout.contains("glue: 3 task(s)"), "{stdout}");

    // The leaderboard's files: names, header, one row per test row, the indices of the test
    // file, and each task's spelling of its labels.
    let sub = out.join("submission");
    let mut files: Vec<String> = std::fs::read_dir(&sub)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "AX.tsv",
            "MNLI-m.tsv",
            "MNLI-mm.tsv",
            "SST-2.tsv",
            "STS-B.tsv"
        ]
    );
    let check = |file: &str, indices: Vec<String>, ok: &dyn Fn(&str) -> bool| {
        let text = std::fs::read_to_string(sub.join(file)).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("index\tprediction"), "{file}");
        let rows: Vec<(String, String)> = lines
            .map(|l| {
                let (i, p) = l
                    .split_once('\t')
                    .unwrap_or_else(|| panic!("{file}: {l:?}"));
                (i.to_string(), p.to_string())
            })
            .collect();
        let got: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        assert_eq!(got, indices, "{file}: the test file's indices");
        for (_, p) in &rows {
            assert!(ok(p), "{file}: prediction {p:?}");
        }
    };
    let idx = |start: usize, n: usize| (start..start + n).map(|i| i.to_string()).collect();
    let is_mnli = |p: &str| mnli_names.contains(&p);
    check("MNLI-m.tsv", idx(100, 4), &is_mnli);
    check("MNLI-mm.tsv", idx(100, 3), &is_mnli);
    check("AX.tsv", idx(0, 2), &is_mnli);
    check("SST-2.tsv", idx(0, 3), &|p| p == "0" || p == "1");
    check("STS-B.tsv", idx(0, 3), &|p| {
        p.parse::<f64>().is_ok_and(|v| (0.0..=5.0).contains(&v))
    });

    // MNLI is scored on both of its evaluation splits in one run: eval.csv, summary.json and
    // results.md each carry both.
    let evals = common::csv_rows(&out.join("runs/mnli/eval.csv"));
    let splits: Vec<(&str, &str)> = evals[1..]
        .iter()
        .map(|r| (r[0].as_str(), r[1].as_str()))
        .collect();
    assert_eq!(
        splits,
        [
            ("0", "validation_matched"),
            ("0", "validation_mismatched"),
            ("1", "validation_matched"),
            ("1", "validation_mismatched"),
        ],
        "{evals:?}"
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("runs/mnli/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["eval_examples"], 11, "{summary}");
    let fe = &summary["final_eval"];
    assert_eq!(fe["examples"], 6, "{summary}");
    assert_eq!(
        fe["splits"]["validation_matched"]["examples"], 6,
        "{summary}"
    );
    assert_eq!(
        fe["splits"]["validation_mismatched"]["examples"], 5,
        "{summary}"
    );
    assert_eq!(
        fe["accuracy"],
        fe["splits"]["validation_matched"]["accuracy"]
    );
    let results = std::fs::read_to_string(out.join("results.md")).unwrap();
    for row in [
        "| mnli | validation_matched | accuracy ",
        "| mnli | validation_mismatched | accuracy ",
        "| sst2 | validation | accuracy ",
        "| stsb | validation | pearson ",
    ] {
        assert!(
            results.contains(row),
            "results.md lacks {row:?}:\n{results}"
        );
    }
    assert_eq!(results.lines().count(), 2 + 4, "{results}");
}

/// `class_weights: balanced` through the binary: the weights are sklearn's
/// `compute_class_weight("balanced")` of the training labels, and eval.csv's loss is torch's
/// `CrossEntropyLoss(weight=)` of the same predictions (training and evaluation weigh alike).
#[test]
fn balanced_class_weights_weigh_training_and_evaluation_loss() {
    // The topic data thinned to an imbalance: every `profit` row, every 2nd `sales`, every
    // 4th `shares`.
    let tmp = common::tempdir();
    let data = tmp.path().join("topic");
    std::fs::create_dir_all(&data).unwrap();
    let src = assets().join("tasks/topic");
    std::fs::copy(src.join("validation.csv"), data.join("validation.csv")).unwrap();
    let text = std::fs::read_to_string(src.join("train.csv")).unwrap();
    let mut seen = std::collections::HashMap::new();
    let kept: Vec<&str> = text
        .lines()
        .enumerate()
        .filter(|(i, line)| {
            let topic = line.rsplit(',').next().unwrap_or("");
            let n = seen.entry(topic.to_string()).or_insert(0usize);
            *n += 1;
            *i == 0 || topic == "profit" || (topic == "sales" && *n % 2 == 0) || *n % 4 == 0
        })
        .map(|(_, line)| line)
        .collect();
    std::fs::write(data.join("train.csv"), kept.join("\n") + "\n").unwrap();
    let run_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("tasks-runs")
        .join("topic-weighted");
    let _ = std::fs::remove_dir_all(&run_dir);
    let model = assets().join("model");
    let cfg = common::root().join("configs/demo.yaml");
    let common_flags = [
        "--model_dir",
        model.to_str().unwrap(),
        "--data_dir",
        data.to_str().unwrap(),
    ];
    let out = common::run_ok(
        &[
            &[
                "train",
                "--config",
                cfg.to_str().unwrap(),
                "--results_path",
                run_dir.to_str().unwrap(),
                "--task",
                "custom",
                "--text_columns",
                "headline",
                "--label_column",
                "topic",
                "--prompt",
                "",
                "--class_weights",
                "balanced",
                "--max_steps",
                "6",
                "--eval_batch_size",
                "64",
                "--log_every",
                "1000",
            ][..],
            &common_flags[..],
        ]
        .concat(),
    );
    assert!(
        out.contains("class weights (training and evaluation loss): ["),
        "{out}"
    );
    let tmp = common::tempdir();
    let pred = tmp.path().join("pred.csv");
    common::run_ok(
        &[
            &[
                "predict",
                "--adapter",
                run_dir.join("adapter").to_str().unwrap(),
                "--split",
                "validation",
                "--out",
                pred.to_str().unwrap(),
            ][..],
            &common_flags[..],
        ]
        .concat(),
    );
    let oracle = common::oracle(
        "tasks_oracle.py",
        &[
            "weighted_ce",
            pred.to_str().unwrap(),
            data.join("validation.csv").to_str().unwrap(),
            data.join("train.csv").to_str().unwrap(),
            "topic",
            "profit,sales,shares",
        ],
    );
    let oracle: serde_json::Value = serde_json::from_str(oracle.trim()).unwrap();
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("summary.json")).unwrap()).unwrap();
    let ours: Vec<f64> = summary["class_weights"]
        .as_array()
        .unwrap_or_else(|| panic!("{summary}"))
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let theirs: Vec<f64> = oracle["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(ours.len(), 3);
    for (a, b) in ours.iter().zip(&theirs) {
        assert!(
            (a - b).abs() < 1e-12,
            "class weights {ours:?} vs sklearn {theirs:?}"
        );
    }
    // Imbalanced enough that weighting moves the loss well past the tolerance below.
    assert!(ours.iter().any(|w| (w - 1.0).abs() > 0.5), "{ours:?}");
    let evals = common::csv_rows(&run_dir.join("eval.csv"));
    let last: f64 = evals.last().unwrap()[2].parse().unwrap();
    let want = oracle["loss"].as_f64().unwrap();
    // predict's probabilities carry 6 decimals.
    assert!(
        (last - want).abs() < 1e-4 * want.max(1.0),
        "eval.csv loss {last} vs torch's weighted cross-entropy on predict's probabilities {want}"
    );
}

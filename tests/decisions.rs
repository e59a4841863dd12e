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

/// `--config configs/demo.yaml --model_dir MODEL --data_dir DATA`: demo.yaml pins fp32
/// compute, so every comparison here holds on every CPU.
fn demo_flags(model: &Path, data: &Path) -> Vec<String> {
    let cfg = common::root().join("configs/demo.yaml");
    [
        "--config",
        s(&cfg),
        "--model_dir",
        s(model),
        "--data_dir",
        s(data),
    ]
    .map(String::from)
    .to_vec()
}

/// `qlora-cls CMD <demo_flags> EXTRA…`: (succeeded, stdout, stderr).
fn demo_cmd(cmd: &str, model: &Path, data: &Path, extra: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(common::bin())
        .arg(cmd)
        .args(demo_flags(model, data))
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`demo_cmd`] that must succeed; its stdout.
fn demo_ok(cmd: &str, model: &Path, data: &Path, extra: &[&str]) -> String {
    let (ok, out, err) = demo_cmd(cmd, model, data, extra);
    assert!(ok, "qlora-cls {cmd} {extra:?} failed:\n{out}\n{err}");
    out
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
    let (model, data) = (demo.join("model"), demo.join("data"));
    let run_with = |patience: &str, threshold: &str| -> String {
        demo_ok(
            "train",
            &model,
            &data,
            &[
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
            ],
        )
    };
    // No improvement can exceed 10: the second evaluation after the baseline stops the run.
    let out = run_with("1", "10");
    let evals = common::csv_rows(&run.join("eval.csv"));
    assert_eq!(evals[0].last().map(String::as_str), Some("step"));
    let steps: Vec<&str> = evals[1..]
        .iter()
        .map(|r| r.last().unwrap().as_str())
        .collect();
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
    let steps: Vec<usize> = evals[1..]
        .iter()
        .map(|r| r.last().unwrap().parse().unwrap())
        .collect();
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

/// The demo's validation pairs (MRPC TSV: label, ids, sentence 1, sentence 2), by row.
fn dev_pairs(data: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(data.join("dev.tsv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            (c[3].to_string(), c[4].to_string())
        })
        .collect()
}

#[test]
fn temperature_scaling_is_fitted_saved_and_applied_alike_everywhere() {
    let d = common::tempdir();
    let demo = common::demo_assets(&d.path().join("demo"));
    let (model, data) = (demo.join("model"), demo.join("data"));
    let run = d.path().join("run");
    let cfg = common::root().join("configs/demo.yaml");
    let run_ok = |cmd: &str, extra: &[&str]| demo_ok(cmd, &model, &data, extra);
    let out = run_ok(
        "train",
        &["--results_path", s(&run), "--calibrate", "temperature"],
    );
    assert!(
        out.contains("calibration on validation: temperature"),
        "{out}"
    );
    let adapter = run.join("adapter");
    let read_json =
        |p: &Path| -> Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let fit = read_json(&adapter.join("calibration.json"));
    let t = fit["temperature"].as_f64().unwrap();
    let (before, after) = (&fit["before"], &fit["after"]);
    eprintln!("fitted temperature {t}: {before} -> {after}");
    assert!(
        after["nll"].as_f64() < before["nll"].as_f64(),
        "temperature scaling did not lower the validation NLL: {fit}"
    );
    assert!(best_adapter_has(&run, "calibration.json"));
    for f in ["reliability.png", "reliability.svg"] {
        assert!(run.join(f).is_file(), "{f}");
    }
    // eval.csv's last row is the adapter's evaluation before scaling.
    let evals = common::csv_rows(&run.join("eval.csv"));
    let col = |name: &str| evals[0].iter().position(|h| h == name).unwrap();
    let last = evals.last().unwrap();
    for k in ["nll", "brier", "ece"] {
        let v: f64 = last[col(k)].parse().unwrap();
        assert!(
            (v - before[k].as_f64().unwrap()).abs() < 1e-6,
            "eval.csv {k}"
        );
    }

    // predict with and without the temperature; the oracle recomputes on its CSV.
    let raw = bare_copy(&adapter, &d.path().join("raw"));
    let (p0, p1) = (d.path().join("p0.csv"), d.path().join("p1.csv"));
    let split = ["--split", "validation"];
    run_ok(
        "predict",
        &[&split[..], &["--adapter", s(&raw), "--out", s(&p0)]].concat(),
    );
    let said = run_ok(
        "predict",
        &[&split[..], &["--adapter", s(&adapter), "--out", s(&p1)]].concat(),
    );
    assert!(said.contains("logits divided by the temperature"), "{said}");
    let oracle = |p: &Path| -> Value {
        serde_json::from_str(&common::oracle(
            "calibration_oracle.py",
            &[s(p), s(&data.join("dev.tsv"))],
        ))
        .unwrap()
    };
    let (o0, o1) = (oracle(&p0), oracle(&p1));
    // The probabilities in the CSV have 6 decimals: NLL and ECE to ~1e-6 here.
    let close = |a: &Value, b: &Value, what: &str| {
        for k in ["nll", "brier", "ece"] {
            let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
            assert!(
                (x - y).abs() < 2e-5,
                "{what} {k}: ours {x} vs NumPy/scikit-learn {y}"
            );
        }
    };
    close(before, &o0, "unscaled");
    close(after, &o1, "scaled");
    let t_scipy = o0["temperature"].as_f64().unwrap();
    assert!(
        (t - t_scipy).abs() < 1e-4 * t,
        "temperature {t} vs SciPy's minimiser on predict's CSV {t_scipy}"
    );
    // The saved temperature changes the probabilities and not the predictions.
    let (q0, q1) = (
        common::predicted_probabilities(&p0),
        common::predicted_probabilities(&p1),
    );
    let labels_of = |p: &Path| -> Vec<String> {
        common::csv_rows(p)[1..]
            .iter()
            .map(|r| r[1].clone())
            .collect()
    };
    assert_eq!(labels_of(&p0), labels_of(&p1));
    for (a, b) in q0.iter().zip(&q1) {
        // softmax(log p0 / T), from the rounded p0.
        let z: Vec<f64> = a.iter().map(|p| p.max(1e-12).ln() / t).collect();
        let m = z.iter().fold(f64::NEG_INFINITY, |x, &v| x.max(v));
        let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        for (k, w) in b.iter().enumerate() {
            let want = e[k] / sum;
            if a[k] > 1e-4 && a[k] < 1.0 - 1e-4 {
                assert!((w - want).abs() < 1e-4, "{a:?} at T {t}: {b:?} vs {want}");
            }
        }
    }
    // eval says both, and writes both.
    let said = run_ok("eval", &[&split[..], &["--adapter", s(&adapter)]].concat());
    assert!(said.contains("without it"), "{said}");
    let report = read_json(&adapter.join("eval-validation.json"));
    close(&report["calibration"], &o1, "eval");
    close(&report["uncalibrated"], &o0, "eval without the temperature");

    // serve answers predict's scaled probabilities.
    let pairs = dev_pairs(&data);
    let mut args = demo_flags(&model, &data);
    args.extend(["--adapter".to_string(), s(&adapter).to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = common::server::Server::serve(&refs);
    for i in [0usize, 1, 7, 42] {
        let (status, v) = server.predict(serde_json::json!({"inputs": [[pairs[i].0, pairs[i].1]]}));
        assert_eq!(status, 200, "{v}");
        for e in v[0].as_array().unwrap() {
            let k: usize = e["label"].as_str().unwrap().parse().unwrap();
            let got = e["score"].as_f64().unwrap();
            assert!(
                (got - q1[i][k]).abs() < 1e-5,
                "row {i}: served {v} vs predict {:?}",
                q1[i]
            );
        }
    }
    drop(server);

    // merge folds 1/T into the head: transformers' logits are our scaled ones.
    let merged = d.path().join("merged");
    let said = run_ok(
        "merge",
        &[
            "--adapter",
            s(&adapter),
            "--out",
            s(&merged),
            "--dtype",
            "float32",
        ],
    );
    assert!(said.contains("folded into score.weight"), "{said}");
    let texts = common::demo_texts(6);
    let texts_file = d.path().join("texts.json");
    std::fs::write(&texts_file, serde_json::to_string(&texts).unwrap()).unwrap();
    let v: Value = serde_json::from_str(&common::oracle(
        "merge_oracle.py",
        &["logits", s(&merged), s(&texts_file)],
    ))
    .unwrap();
    let rows: Vec<Vec<f64>> = serde_json::from_value(v["logits"].clone()).unwrap();
    let theirs = tch::Tensor::from_slice2(&rows);
    let overrides = qlora_cls::config::parse_flags(&[
        "--model_dir".to_string(),
        s(&model).to_string(),
        "--data_dir".to_string(),
        s(&data).to_string(),
    ])
    .unwrap();
    let config = qlora_cls::config::Config::load(Some(&cfg), &overrides)
        .unwrap()
        .0;
    let ours = common::adapter_logits(&config, &adapter, &texts);
    let unscaled = common::adapter_logits(&config, &raw, &texts);
    let d_scaled = common::max_abs_diff(&ours, &theirs);
    let d_raw = common::max_abs_diff(&unscaled, &theirs);
    eprintln!("merged vs ours: scaled {d_scaled:e}, unscaled {d_raw:e}");
    assert!(
        d_scaled < 1e-4,
        "merged logits vs our scaled ones: {d_scaled:e}"
    );
    assert!(
        d_raw > 1e-2,
        "the temperature made no difference ({d_raw:e})"
    );
}

/// The adapter's PEFT files and labels alone in `to` (no calibration.json, no threshold.json).
fn bare_copy(adapter: &Path, to: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "labels.json",
    ] {
        std::fs::copy(adapter.join(f), to.join(f)).unwrap();
    }
    to.to_path_buf()
}

fn best_adapter_has(run: &Path, file: &str) -> bool {
    run.join("best_adapter").join(file).is_file()
}

#[test]
fn a_tuned_threshold_beats_one_half_and_changes_only_the_labels() {
    // The demo with 7 of every 8 positive training pairs left out: the model learns a prior
    // far below the validation split's (68% positive), so at 0.5 it misses positives and a
    // lower cut on p(paraphrase) must do better on F1.
    let d = common::tempdir();
    let demo = common::demo_assets(&d.path().join("demo"));
    let (model, data) = (demo.join("model"), demo.join("data"));
    let train = std::fs::read_to_string(data.join("train.tsv")).unwrap();
    let mut kept = Vec::new();
    let mut positives = 0;
    for (i, line) in train.lines().enumerate() {
        let positive = line.starts_with("1\t");
        if i == 0 || !positive || {
            positives += 1;
            positives % 8 == 0
        } {
            kept.push(line);
        }
    }
    std::fs::write(data.join("train.tsv"), kept.join("\n") + "\n").unwrap();
    let run = d.path().join("run");
    let with = |cmd: &str, extra: &[&str]| demo_cmd(cmd, &model, &data, extra);
    let (ok, out, err) = with(
        "train",
        &[
            "--results_path",
            s(&run),
            "--threshold",
            "tune",
            "--epochs",
            "2",
        ],
    );
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("threshold on validation: class 1 when p >"),
        "{out}"
    );
    let adapter = run.join("adapter");
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("threshold.json")).unwrap())
            .unwrap();
    eprintln!("{file}");
    let t = file["threshold"].as_f64().unwrap();
    let (tuned, half) = (
        file["value"].as_f64().unwrap(),
        file["at_0.5"].as_f64().unwrap(),
    );
    assert_eq!(file["metric"], "f1");
    assert!(
        tuned > half + 0.01,
        "the tuned cut does not beat 0.5 on F1: {file}"
    );
    assert!(t < 0.5, "{file}");

    // predict: the same probabilities, the labels of the cut.
    let raw = bare_copy(&adapter, &d.path().join("raw"));
    let (p0, p1) = (d.path().join("p0.csv"), d.path().join("p1.csv"));
    let split = ["--split", "validation"];
    let predict = |a: &Path, out: &Path, extra: &[&str]| -> String {
        let (ok, o, e) = with(
            "predict",
            &[&split[..], &["--adapter", s(a), "--out", s(out)], extra].concat(),
        );
        assert!(ok, "{o}\n{e}");
        o
    };
    predict(&raw, &p0, &[]);
    let said = predict(&adapter, &p1, &[]);
    assert!(
        said.contains("threshold: class 1 when its probability >"),
        "{said}"
    );
    let (r0, r1) = (common::csv_rows(&p0), common::csv_rows(&p1));
    let mut changed = 0;
    for (a, b) in r0[1..].iter().zip(&r1[1..]) {
        assert_eq!((&a[0], &a[2..]), (&b[0], &b[2..]), "probabilities moved");
        let p: f64 = b[3].parse().unwrap();
        let names = ["0", "1"];
        // 6 decimals in the file: a probability within rounding of the cut may go either way.
        if (p - t).abs() > 1e-6 {
            assert_eq!(b[1], names[usize::from(p > t)], "{b:?} at {t}");
        }
        changed += usize::from(a[1] != b[1]);
    }
    assert!(changed > 0, "the threshold changed no label");
    // A number given to predict wins over the file; `tune` is for training.
    let p2 = d.path().join("p2.csv");
    predict(&adapter, &p2, &["--threshold", "0.5"]);
    assert_eq!(common::csv_rows(&p2), r0);
    let (ok, _, err) = with(
        "predict",
        &[
            &split[..],
            &[
                "--adapter",
                s(&adapter),
                "--out",
                s(&p2),
                "--threshold",
                "tune",
            ],
        ]
        .concat(),
    );
    assert!(!ok && err.contains("key `threshold`"), "{err}");

    // eval scores the cut: its F1 is the one tuned (the same rows, the same rule).
    let (ok, out, err) = with("eval", &[&split[..], &["--adapter", s(&adapter)]].concat());
    assert!(ok, "{err}");
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("eval-validation.json")).unwrap(),
    )
    .unwrap();
    let f1 = report["f1"].as_f64().unwrap();
    assert!(
        (f1 - tuned).abs() < 1e-9,
        "eval's F1 {f1} vs tuned {tuned}:\n{out}"
    );

    // serve tells clients the cut (TEI's /predict answers every label's probability).
    let mut args = demo_flags(&model, &data);
    args.extend(["--adapter".to_string(), s(&adapter).to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = common::server::Server::serve(&refs);
    let (status, info) = server.call("GET", "/info", "");
    assert_eq!(status, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert!(
        (info["threshold"].as_f64().unwrap() - t).abs() < 1e-12,
        "{info}"
    );
}

#[test]
fn classification_report_confusion_and_errors_equal_scikit_learn_s() {
    // Three topics, trained only a few steps so that every kind of mistake is there.
    let d = common::tempdir();
    let demo = common::demo_assets(&d.path().join("demo"));
    let data = demo.join("tasks/topic");
    let run = d.path().join("run");
    let model = demo.join("model");
    let task = [
        "--task",
        "custom",
        "--prompt",
        "",
        "--text_columns",
        "headline",
        "--label_column",
        "topic",
    ];
    let go = |cmd: &str, extra: &[&str]| demo_ok(cmd, &model, &data, &[&task[..], extra].concat());
    go("train", &["--results_path", s(&run), "--max_steps", "25"]);
    let adapter = run.join("adapter");
    let split = ["--split", "validation", "--adapter", s(&adapter)];
    let out = go("eval", &split);
    assert!(out.contains("weighted avg"), "{out}");
    let (pred, errors) = (d.path().join("pred.csv"), d.path().join("errors.csv"));
    let said = go(
        "predict",
        &[&split[..], &["--out", s(&pred), "--errors", s(&errors)]].concat(),
    );
    let names = "profit,sales,shares";
    let want: Value = serde_json::from_str(&common::oracle(
        "tasks_oracle.py",
        &[
            "report",
            s(&pred),
            s(&data.join("validation.csv")),
            "topic",
            names,
        ],
    ))
    .unwrap();
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("eval-validation.json")).unwrap(),
    )
    .unwrap();
    eprintln!("{}", report["classification_report"]);
    let (ours, theirs) = (&report["classification_report"], &want["report"]);
    assert_eq!(
        ours.as_object().unwrap().keys().collect::<Vec<_>>().len(),
        theirs.as_object().unwrap().len(),
        "{ours} vs {theirs}"
    );
    for (row, fields) in theirs.as_object().unwrap() {
        match fields {
            Value::Object(f) => {
                for (k, v) in f {
                    let (a, b) = (ours[row][k].as_f64().unwrap(), v.as_f64().unwrap());
                    assert!(
                        (a - b).abs() < 1e-12,
                        "{row} {k}: ours {a} vs scikit-learn's {b}"
                    );
                }
            }
            v => assert!((ours[row].as_f64().unwrap() - v.as_f64().unwrap()).abs() < 1e-12),
        }
    }
    // The mistakes are real ones, and the confusion matrix counts them as scikit-learn does.
    assert_eq!(report["confusion"], want["confusion"]);
    let wrong = want["errors"].as_array().unwrap();
    assert!(!wrong.is_empty(), "no mistakes to analyse: {want}");
    let csv = common::csv_rows(&adapter.join("confusion-validation.csv"));
    assert_eq!(csv[0], ["gold\\predicted", "profit", "sales", "shares"]);
    assert!(adapter.join("confusion-validation.png").is_file());
    // predict --errors: the misclassified rows, each with its text and the probability of
    // the label predicted (predict's own for that row). (The topic headlines hold no comma.)
    assert!(
        said.contains(&format!("wrote {} misclassified rows", wrong.len())),
        "{said}"
    );
    let rows = common::csv_rows(&errors);
    assert_eq!(
        rows[0],
        ["index", "text", "label", "prediction", "probability"]
    );
    let preds = common::csv_rows(&pred);
    let listed: Vec<i64> = rows[1..].iter().map(|r| r[0].parse().unwrap()).collect();
    let want_rows: Vec<i64> = wrong.iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(listed, want_rows);
    for r in &rows[1..] {
        assert_ne!(r[2], r[3], "{r:?}");
        assert!(!r[1].is_empty(), "{r:?}");
        let p = preds[1..].iter().find(|p| p[0] == r[0]).unwrap();
        assert_eq!(p[1], r[3]);
        let k = names.split(',').position(|n| n == r[3]).unwrap();
        assert_eq!(p[2 + k], r[4], "{r:?} vs {p:?}");
    }
    // An unlabelled split has no errors to keep: refused before anything is written.
    let input = d.path().join("new.jsonl");
    std::fs::write(
        &input,
        "{\"headline\": \"Sales at Acme surged 4 percent on Monday.\"}\n",
    )
    .unwrap();
    let nothing = d.path().join("nothing.csv");
    let (ok, _, err) = demo_cmd(
        "predict",
        &model,
        &data,
        &[
            &task[..],
            &["--adapter", s(&adapter), "--input", s(&input)],
            &["--out", s(&nothing), "--errors", s(&errors)],
        ]
        .concat(),
    );
    assert!(!ok && err.contains("--errors"), "{err}");
    assert!(!nothing.exists());
}

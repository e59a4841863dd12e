//! Documents longer than `max_length`, through the binary on the demo's `long/` task, whose
//! label is decided by a clause placed past the first `max_length` tokens: `long_text: chunk`
//! learns it (and `head_tail`, which keeps the end, mostly does) and `truncate` cannot;
//! `predict`'s per-document answer is the aggregate of its windows' logits (recomputed here
//! from `--windows`), the first window is what truncation reads, and `serve` answers what
//! `predict` does.
mod common;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

const MAX_LENGTH: &str = "32";

/// `qlora-cls CMD` on the demo model and the `long/` task (demo.yaml: fp32 on every CPU).
fn long_task_args(demo: &Path) -> Vec<String> {
    let cfg = common::root().join("configs/demo.yaml");
    let model = demo.join("model");
    let data = demo.join("tasks/long");
    [
        "--config",
        s(&cfg),
        "--model_dir",
        s(&model),
        "--data_dir",
        s(&data),
        "--task",
        "custom",
        "--prompt",
        "",
        "--text_columns",
        "text",
        "--label_column",
        "label",
        "--max_length",
        MAX_LENGTH,
    ]
    .map(String::from)
    .to_vec()
}

fn run_ok(cmd: &str, demo: &Path, extra: &[&str]) -> String {
    let out = std::process::Command::new(common::bin())
        .arg(cmd)
        .args(long_task_args(demo))
        .args(extra)
        .output()
        .unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "qlora-cls {cmd} {extra:?} failed:\n{o}\n{e}"
    );
    o
}

fn final_accuracy(run: &Path) -> f64 {
    let text = std::fs::read_to_string(run.join("eval.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == "accuracy").unwrap();
    let last: Vec<&str> = lines.last().unwrap().split(',').collect();
    last[col].parse().unwrap()
}

/// `index,window,logit_…` rows, grouped by document (a new one at every window 0).
fn windows(path: &Path) -> Vec<(i64, Vec<Vec<f64>>)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut docs: Vec<(i64, Vec<Vec<f64>>)> = Vec::new();
    for line in text.lines().skip(1) {
        let c: Vec<&str> = line.split(',').collect();
        let (idx, w): (i64, u32) = (c[0].parse().unwrap(), c[1].parse().unwrap());
        let logits: Vec<f64> = c[2..].iter().map(|x| x.parse().unwrap()).collect();
        if w == 0 {
            docs.push((idx, vec![logits]));
        } else {
            let last = docs.last_mut().unwrap();
            assert_eq!(last.0, idx, "window {w} of another document");
            assert_eq!(last.1.len(), w as usize, "windows in order");
            last.1.push(logits);
        }
    }
    docs
}

fn softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|v| v / sum).collect()
}

/// predict's CSV: idx → probabilities.
fn predictions(path: &Path) -> BTreeMap<i64, Vec<f64>> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            (
                c[0].parse().unwrap(),
                c[2..].iter().map(|x| x.parse().unwrap()).collect(),
            )
        })
        .collect()
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-5, "{what}: {got:?} vs {want:?}");
    }
}

#[test]
fn chunked_documents_are_learnt_where_truncation_is_at_chance() {
    let d = common::tempdir();
    let demo = common::demo_assets(&d.path().join("demo"));
    let (cut, chunked) = (d.path().join("truncate"), d.path().join("chunk"));
    let epochs = ["--epochs", "10"];
    let said = run_ok(
        "train",
        &demo,
        &[&epochs[..], &["--results_path", s(&cut)]].concat(),
    );
    // Every document is over max_length, and the load says so.
    assert!(
        said.contains("train: 240 of 240 inputs are over max_length 32 tokens"),
        "{said}"
    );
    let chunk = ["--long_text", "chunk", "--chunk_stride", "4"];
    let said = run_ok(
        "train",
        &demo,
        &[&chunk[..], &epochs[..], &["--results_path", s(&chunked)]].concat(),
    );
    assert!(said.contains("cut into windows"), "{said}");
    // head_tail keeps the last 3/4 of the room: most of the last two clauses.
    let head_tail = d.path().join("head_tail");
    let said = run_ok(
        "train",
        &demo,
        &[
            &["--long_text", "head_tail"][..],
            &epochs[..],
            &["--results_path", s(&head_tail)],
        ]
        .concat(),
    );
    assert!(said.contains("kept as head and tail"), "{said}");
    let (a_cut, a_chunk) = (final_accuracy(&cut), final_accuracy(&chunked));
    let a_ht = final_accuracy(&head_tail);
    eprintln!("validation accuracy: truncate {a_cut:.4}, head_tail {a_ht:.4}, chunk {a_chunk:.4}");
    assert!(
        a_cut < 0.7,
        "truncation cannot see the deciding clause: {a_cut}"
    );
    assert!(a_chunk > 0.9, "chunk reads every clause: {a_chunk}");
    assert!(
        a_ht > 0.8,
        "head_tail sees the end, where the deciding clause is: {a_ht}"
    );

    // predict's documents are the mean of their windows' logits, or the surest window.
    let adapter = chunked.join("adapter");
    let split = ["--split", "validation", "--adapter", s(&adapter)];
    let win = d.path().join("windows.csv");
    for aggregate in ["mean_logits", "max_prob"] {
        let pred = d.path().join(format!("pred-{aggregate}.csv"));
        run_ok(
            "predict",
            &demo,
            &[
                &chunk[..],
                &split[..],
                &["--chunk_aggregate", aggregate],
                &["--out", s(&pred), "--windows", s(&win)],
            ]
            .concat(),
        );
        let docs = windows(&win);
        let probs = predictions(&pred);
        assert_eq!(docs.len(), probs.len());
        assert!(
            docs.iter().all(|(_, w)| w.len() >= 2),
            "every document is cut"
        );
        for (idx, rows) in &docs {
            let want = match aggregate {
                "mean_logits" => {
                    let k = rows[0].len();
                    let mean: Vec<f64> = (0..k)
                        .map(|c| rows.iter().map(|r| r[c]).sum::<f64>() / rows.len() as f64)
                        .collect();
                    softmax(&mean)
                }
                _ => rows
                    .iter()
                    .map(|r| softmax(r))
                    .max_by(|a, b| {
                        let top = |p: &Vec<f64>| p.iter().cloned().fold(0.0, f64::max);
                        top(a).total_cmp(&top(b))
                    })
                    .unwrap(),
            };
            assert_close(&probs[idx], &want, &format!("{aggregate} document {idx}"));
        }
    }

    // The first window is what right truncation reads.
    let cut_pred = d.path().join("pred-truncate.csv");
    run_ok(
        "predict",
        &demo,
        &[&split[..], &["--out", s(&cut_pred)]].concat(),
    );
    let cut_probs = predictions(&cut_pred);
    for (idx, rows) in windows(&win) {
        assert_close(
            &cut_probs[&idx],
            &softmax(&rows[0]),
            &format!("window 0 of {idx}"),
        );
    }

    // serve combines a long input's windows as predict does.
    let texts: Vec<String> = std::fs::read_to_string(demo.join("tasks/long/validation.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let mean = predictions(&d.path().join("pred-mean_logits.csv"));
    let mut args = long_task_args(&demo);
    args.extend(
        [&chunk[..], &["--adapter", s(&adapter)]]
            .concat()
            .iter()
            .map(|a| a.to_string()),
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = common::server::Server::serve(&refs);
    let (status, info) = server.call("GET", "/info", "");
    assert_eq!(status, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["long_text"], "chunk", "{info}");
    let firsts: Vec<i64> = mean.keys().copied().take(4).collect();
    let batch: Vec<[&str; 1]> = firsts
        .iter()
        .map(|&i| [texts[i as usize].as_str()])
        .collect();
    let (status, v) = server.predict(serde_json::json!({ "inputs": batch }));
    assert_eq!(status, 200, "{v}");
    let names = ["none", "profit"];
    for (answer, idx) in v.as_array().unwrap().iter().zip(&firsts) {
        for e in answer.as_array().unwrap() {
            let k = names
                .iter()
                .position(|n| *n == e["label"].as_str().unwrap())
                .unwrap();
            let got = e["score"].as_f64().unwrap();
            assert!(
                (got - mean[idx][k]).abs() < 1e-5,
                "document {idx}: served {answer} vs predict {:?}",
                mean[idx]
            );
        }
    }
}

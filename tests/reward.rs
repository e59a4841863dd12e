//! Reward models: a one-output sequence classifier made elsewhere (transformers + PEFT, as
//! TRL's `RewardTrainer` saves one: `num_labels=1`, no `problem_type`, the head in
//! `modules_to_save`) loads here with no labels file and no `num_classes`; `predict` and
//! `serve`'s `/predict` give its rewards, and `/rerank` refuses it by name (one text, not a
//! pair).
mod common;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn a_peft_reward_model_predicts_and_serves_its_rewards() {
    let d = common::tempdir();
    let demo = common::demo_assets(&d.path().join("demo"));
    let model = demo.join("model");
    let adapter = d.path().join("reward_adapter");
    let data = d.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let texts: Vec<String> = qlora_cls::demo::demo_dataset()
        .1
        .iter()
        .take(8)
        .map(|e| e.sentence1.clone())
        .collect();
    let rows: Vec<String> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"text": t, "idx": i}).to_string())
        .collect();
    let input = data.join("texts.jsonl");
    std::fs::write(&input, rows.join("\n") + "\n").unwrap();
    let out = d.path().join("rewards.json");
    common::oracle(
        "reward_oracle.py",
        &["reward_adapter", s(&model), s(&adapter), s(&input), s(&out)],
    );
    let want: Vec<f64> = serde_json::from_str::<Value>(&std::fs::read_to_string(&out).unwrap())
        .unwrap()["rewards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();

    // The text verbatim (no prompt, no template words), in fp32 on every CPU.
    let task = [
        "--model_dir",
        s(&model),
        "--adapter",
        s(&adapter),
        "--task",
        "custom",
        "--text_columns",
        "text",
        "--prompt",
        "",
        "--template",
        "{text}",
        "--bnb_4bit_compute_dtype",
        "float32",
        "--load_in_4bit",
        "false",
    ];
    let pred = d.path().join("pred.csv");
    let o = Command::new(common::bin())
        .arg("predict")
        .args(task)
        .args(["--input", s(&input), "--out", s(&pred)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let csv = std::fs::read_to_string(&pred).unwrap();
    assert!(csv.starts_with("index,prediction\n"), "{csv}");
    let got: Vec<f64> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() < 1e-5, "text {i}: ours {g} vs PEFT's {w}");
    }

    let server = common::server::Server::serve(&task);
    let (status, info) = server.call("GET", "/info", "");
    assert_eq!(status, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["problem_type"], "regression", "{info}");
    assert_eq!(info["reranker"], false, "{info}");
    for (i, t) in texts.iter().enumerate().take(3) {
        let (status, v) = server.predict(json!({ "inputs": t }));
        assert_eq!(status, 200, "{v}");
        let r = v[0]["score"].as_f64().unwrap();
        assert!(
            (r - want[i]).abs() < 1e-5,
            "served {r} vs PEFT's {}",
            want[i]
        );
    }
    let body = json!({"query": "q", "texts": ["a"]}).to_string();
    let (status, text) = server.call("POST", "/rerank", &body);
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("trained on pairs"), "{text}");
}

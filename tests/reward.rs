//! Reward models. `task: preference` trains like TRL's `RewardTrainer` + PEFT (three steps
//! from the same adapter, with and without margins and reward centring, and its evaluation);
//! the demo's pairs are learnt on one process and on two Gloo ranks alike; predict, serve and
//! a merged checkpoint in transformers give the same rewards. A one-output classifier made
//! elsewhere (as TRL saves one: `num_labels=1`, no `problem_type`, the head in
//! `modules_to_save`) loads with no labels file; `predict` and `serve`'s `/predict` give its
//! rewards, and `/rerank` refuses it by name (one text, not a pair).
mod common;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `qlora-cls CMD ARGS…`, which must succeed; its stdout.
fn qlora(cmd: &str, args: &[&[&str]]) -> String {
    let o = Command::new(common::bin())
        .arg(cmd)
        .args(args.concat())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "qlora-cls {cmd} failed:\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
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
    qlora(
        "predict",
        &[&task[..], &["--input", s(&input), "--out", s(&pred)][..]],
    );
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

/// The first `n` pairs of the demo's preference `split`, with `margins` when given.
fn pairs(demo: &Path, split: &str, n: usize, margins: Option<&[f64]>) -> String {
    let text =
        std::fs::read_to_string(demo.join(format!("tasks/preference/{split}.jsonl"))).unwrap();
    let rows: Vec<String> = text
        .lines()
        .take(n)
        .enumerate()
        .map(|(i, l)| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            if let Some(m) = margins {
                v["margin"] = json!(m[i % m.len()]);
            }
            v.to_string()
        })
        .collect();
    rows.join("\n") + "\n"
}

/// `qlora-cls train` on a preference data folder with `extra` flags (fp32, dense weights,
/// dropout off, AdamW without weight decay or warmup: what the TRL oracle runs).
fn train_pairs(demo: &Path, data: &Path, run: &Path, extra: &[&str]) -> String {
    let cfg = common::root().join("configs/demo.yaml");
    let model = demo.join("model");
    let fixed = [
        "--config",
        s(&cfg),
        "--model_dir",
        s(&model),
        "--data_dir",
        s(data),
        "--task",
        "preference",
        "--results_path",
        s(run),
        "--batch_size",
        "4",
        "--eval_batch_size",
        "4",
        "--lora_dropout",
        "0",
        "--load_in_4bit",
        "false",
        "--optimizer",
        "adamw",
        "--warmup_ratio",
        "0",
        "--weight_decay",
        "0",
    ];
    qlora("train", &[&fixed[..], extra])
}

/// eval.csv's last row: column name → value.
fn last_eval(run: &Path) -> std::collections::HashMap<String, f64> {
    let text = std::fs::read_to_string(run.join("eval.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let last: Vec<&str> = lines.last().unwrap().split(',').collect();
    header
        .iter()
        .zip(last)
        .filter_map(|(h, v)| v.parse().ok().map(|x| (h.to_string(), x)))
        .collect()
}

// Three steps of ours and of TRL's RewardTrainer + PEFT from the same adapter, on the same
// four pairs (one batch, so the order inside it does not matter): the same LoRA pairs and
// head within 1e-4, and our evaluation = its evaluate(); plain, and with margins and
// center_rewards_coefficient.
#[test]
fn three_steps_equal_trl_reward_trainer_with_and_without_margin_and_centering() {
    let d = common::tempdir();
    let demo = common::demo_assets(&d.path().join("demo"));
    for (name, margins, center) in [
        ("plain", None, None),
        ("margin", Some(&[0.5, 1.0, 0.0, 2.0][..]), Some("0.01")),
    ] {
        let data = d.path().join(name).join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("train.jsonl"), pairs(&demo, "train", 4, margins)).unwrap();
        std::fs::write(
            data.join("validation.jsonl"),
            pairs(&demo, "validation", 4, margins),
        )
        .unwrap();
        let center_flag: Vec<&str> = match center {
            Some(c) => vec!["--center_rewards_coefficient", c],
            None => vec![],
        };
        // The starting adapter: one step of a learning rate too small to move an fp32 weight.
        let init = d.path().join(name).join("init");
        train_pairs(
            &demo,
            &data,
            &init,
            &[&["--lr", "1e-30", "--max_steps", "1"][..], &center_flag].concat(),
        );
        let ours = d.path().join(name).join("ours");
        train_pairs(
            &demo,
            &data,
            &ours,
            &[
                &["--lr", "1e-3", "--max_steps", "3", "--epochs", "3"][..],
                &center_flag,
            ]
            .concat(),
        );
        let trl = d.path().join(name).join("trl");
        std::fs::create_dir_all(&trl).unwrap();
        common::oracle(
            "reward_oracle.py",
            &[
                "trl_train",
                s(&demo.join("model")),
                s(&init.join("adapter")),
                s(&data),
                s(&trl),
                "1e-3",
                "3",
                "4",
                center.unwrap_or("none"),
            ],
        );
        let read = |p: &Path| {
            qlora_cls::adapter::read_safetensors(&p.join("adapter_model.safetensors")).unwrap()
        };
        let (a, b, start) = (
            read(&ours.join("adapter")),
            read(&trl.join("adapter")),
            read(&init.join("adapter")),
        );
        assert_eq!(a.len(), b.len(), "{name}: {:?} vs {:?}", a.keys(), b.keys());
        let (mut worst, mut moved) = (0f64, 0f64);
        for (k, t) in &a {
            let u = b
                .get(k)
                .unwrap_or_else(|| panic!("{name}: TRL's adapter lacks {k}"));
            worst = worst.max(common::max_abs_diff(t, u));
            moved = moved.max(common::max_abs_diff(t, &start[k]));
        }
        eprintln!("{name}: max |ours - TRL| {worst:.2e}, the weights moved up to {moved:.2e}");
        assert!(worst < 1e-4, "{name}: {worst}");
        assert!(
            moved > 100.0 * worst,
            "{name}: the steps moved the weights {moved}"
        );
        let theirs: Value =
            serde_json::from_str(&std::fs::read_to_string(trl.join("eval.json")).unwrap()).unwrap();
        let ev = last_eval(&ours);
        for (ours_key, trl_key) in [
            ("loss", "eval_loss"),
            ("accuracy", "eval_accuracy"),
            ("margin", "eval_margin"),
        ] {
            let (x, y) = (ev[ours_key], theirs[trl_key].as_f64().unwrap());
            assert!(
                (x - y).abs() < 1e-5,
                "{name} {ours_key}: ours {x} vs TRL's {y}"
            );
        }
    }
}

// The demo's preference pairs (a rise chosen over a fall) are learnt; 2 Gloo ranks with LoRA
// dropout train the adapter one process trains; predict writes both rewards, and the merged
// checkpoint gives them in transformers.
#[test]
fn preference_demo_is_learnt_on_one_and_two_ranks_and_merges() {
    let d = common::tempdir();
    let demo = common::demo_assets(&d.path().join("demo"));
    let data = demo.join("tasks/preference");
    let cfg = common::root().join("configs/demo.yaml");
    let args = |run: &Path| -> Vec<String> {
        [
            "train",
            "--config",
            s(&cfg),
            "--model_dir",
            s(&demo.join("model")),
            "--data_dir",
            s(&data),
            "--task",
            "preference",
            "--results_path",
            s(run),
            "--epochs",
            "1",
            "--lora_dropout",
            "0.1",
        ]
        .map(String::from)
        .to_vec()
    };
    let (one, two) = (d.path().join("one"), d.path().join("two"));
    common::ranks::run_ranks(&args(&one), 1);
    common::ranks::run_ranks(&args(&two), 2);
    let read = |r: &Path| {
        qlora_cls::adapter::read_safetensors(&r.join("adapter/adapter_model.safetensors")).unwrap()
    };
    let (a, b) = (read(&one), read(&two));
    let worst = a
        .iter()
        .map(|(k, t)| common::max_abs_diff(t, &b[k]))
        .fold(0f64, f64::max);
    eprintln!("1 rank vs 2 ranks: max |Δw| {worst:.2e}");
    assert!(worst < 1e-5, "{worst}");
    let ev = last_eval(&one);
    eprintln!(
        "pairwise accuracy {}, margin {}",
        ev["accuracy"], ev["margin"]
    );
    assert!(ev["accuracy"] > 0.95, "{ev:?}");

    let model = demo.join("model");
    let flags = [
        "--config",
        s(&cfg),
        "--model_dir",
        s(&model),
        "--data_dir",
        s(&data),
    ];
    let pred = d.path().join("pred.csv");
    qlora(
        "predict",
        &[
            &flags[..],
            &[
                "--adapter",
                s(&one.join("adapter")),
                "--split",
                "validation",
                "--out",
                s(&pred),
            ][..],
        ],
    );
    let csv = std::fs::read_to_string(&pred).unwrap();
    assert!(
        csv.starts_with("index,reward_chosen,reward_rejected\n"),
        "{csv}"
    );
    let rewards: Vec<(f64, f64)> = csv
        .lines()
        .skip(1)
        .take(4)
        .map(|l| {
            let c: Vec<f64> = l.split(',').skip(1).map(|x| x.parse().unwrap()).collect();
            (c[0], c[1])
        })
        .collect();

    let rows: Vec<Value> = std::fs::read_to_string(data.join("validation.jsonl"))
        .unwrap()
        .lines()
        .take(4)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Plain rows (a prompt and one text each) get one reward each: the pair's sides'.
    let plain = d.path().join("responses.jsonl");
    let lines: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            ["chosen", "rejected"]
                .map(|side| json!({"prompt": r["prompt"], "text": r[side]}).to_string())
        })
        .collect();
    std::fs::write(&plain, lines.join("\n") + "\n").unwrap();
    let plain_pred = d.path().join("responses.csv");
    qlora(
        "predict",
        &[
            &flags[..],
            &[
                "--adapter",
                s(&one.join("adapter")),
                "--input",
                s(&plain),
                "--out",
                s(&plain_pred),
            ][..],
        ],
    );
    let csv = std::fs::read_to_string(&plain_pred).unwrap();
    assert!(csv.starts_with("index,reward\n"), "{csv}");
    let single: Vec<f64> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    for (i, (c, r)) in rewards.iter().enumerate() {
        assert!(
            (single[2 * i] - c).abs() < 1e-5 && (single[2 * i + 1] - r).abs() < 1e-5,
            "pair {i}: ({c}, {r}) vs rows {:?}",
            &single[2 * i..2 * i + 2]
        );
    }

    // serve: /predict on (prompt, response) gives the reward, /rerank puts the chosen first.
    let adapter = one.join("adapter");
    let mut serve_args = flags.to_vec();
    serve_args.extend(["--adapter", s(&adapter)]);
    let server = common::server::Server::serve(&serve_args);
    for (i, r) in rows.iter().enumerate() {
        let (prompt, chosen, rejected) = (
            r["prompt"].as_str().unwrap(),
            r["chosen"].as_str().unwrap(),
            r["rejected"].as_str().unwrap(),
        );
        let (status, v) = server.predict(json!({ "inputs": [prompt, chosen] }));
        assert_eq!(status, 200, "{v}");
        let got = v[0]["score"].as_f64().unwrap();
        assert!(
            (got - rewards[i].0).abs() < 1e-5,
            "pair {i}: served {got} vs predict {}",
            rewards[i].0
        );
        let body = json!({"query": prompt, "texts": [rejected, chosen], "raw_scores": true});
        let (status, text) = server.call("POST", "/rerank", &body.to_string());
        assert_eq!(status, 200, "{text}");
        let ranked: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(ranked[0]["index"], 1, "the chosen response first: {ranked}");
        let top = ranked[0]["score"].as_f64().unwrap();
        assert!((top - rewards[i].0).abs() < 1e-5, "pair {i}: {ranked}");
    }
    drop(server);

    let merged = d.path().join("merged");
    qlora(
        "merge",
        &[
            &flags[..],
            &[
                "--adapter",
                s(&one.join("adapter")),
                "--out",
                s(&merged),
                "--dtype",
                "float32",
            ][..],
        ],
    );
    // The texts the reward model read: prompt + response + EOS (TRL's rendering).
    let eos = "<|end_of_text|>";
    let mut texts = Vec::new();
    for r in &rows {
        for side in ["chosen", "rejected"] {
            texts.push(format!(
                "{}{}{eos}",
                r["prompt"].as_str().unwrap(),
                r[side].as_str().unwrap()
            ));
        }
    }
    let texts_file = d.path().join("texts.json");
    std::fs::write(&texts_file, serde_json::to_string(&texts).unwrap()).unwrap();
    let hf: Value = serde_json::from_str(&common::oracle(
        "merge_oracle.py",
        &["logits", s(&merged), s(&texts_file)],
    ))
    .unwrap();
    assert_eq!(hf["num_labels"], 1, "{hf}");
    let logits = hf["logits"].as_array().unwrap();
    for (i, (c, r)) in rewards.iter().enumerate() {
        let (hc, hr) = (
            logits[2 * i][0].as_f64().unwrap(),
            logits[2 * i + 1][0].as_f64().unwrap(),
        );
        assert!(
            (c - hc).abs() < 1e-4 && (r - hr).abs() < 1e-4,
            "pair {i}: ours ({c}, {r}) vs transformers' ({hc}, {hr})"
        );
    }
}

/// Meta-Llama-3-8B-Instruct's chat template, as its tokenizer_config.json ships it.
const LLAMA3_CHAT_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Our token ids of a preference split's pairs: (chosen, rejected) per row.
fn our_pair_ids(tokenizer: &Path, file: &Path) -> Vec<(Vec<i64>, Vec<i64>)> {
    use qlora_cls::data::{batch, examples};
    let cfg = qlora_cls::config::Config {
        task: "preference".into(),
        ..Default::default()
    };
    let task = cfg.to_task().unwrap();
    let enc = batch::TextEncoder::from_dir(tokenizer, None).unwrap();
    let raw = examples::read_file(file, &task, true, 0).unwrap();
    let spec = examples::infer_labels(&task, &raw).unwrap();
    let targets = examples::targets(&spec, &task, &raw).unwrap();
    let (rows, _) = batch::encode_task_examples(&enc, &task, "", &raw, targets).unwrap();
    rows.into_iter()
        .map(|e| (e.ids, e.rejected.unwrap()))
        .collect()
}

// TRL's conversational form (prompt, chosen and rejected as lists of messages): our ids are
// the ones RewardTrainer prepares through `apply_chat_template`, token for token, with the
// demo tokenizer's template and with Llama-3's; and such data trains through the binary.
#[test]
fn conversational_pairs_render_as_trl_s_chat_template_does() {
    let d = common::tempdir();
    let demo = common::demo_assets(&d.path().join("demo"));
    let data = d.path().join("conv");
    std::fs::create_dir_all(&data).unwrap();
    let plain = std::fs::read_to_string(demo.join("tasks/preference/train.jsonl")).unwrap();
    let rows: Vec<String> = plain
        .lines()
        .take(6)
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let say = |role: &str, text: &Value| json!([{"role": role, "content": text}]);
            json!({
                "prompt": say("user", &v["prompt"]),
                "chosen": say("assistant", &v["chosen"]),
                "rejected": say("assistant", &v["rejected"]),
            })
            .to_string()
        })
        .collect();
    let train = data.join("train.jsonl");
    std::fs::write(&train, rows.join("\n") + "\n").unwrap();
    std::fs::write(data.join("validation.jsonl"), rows.join("\n") + "\n").unwrap();

    // The demo model again, its tokenizer carrying Llama-3's template.
    let llama3 = d.path().join("llama3-template");
    std::fs::create_dir_all(&llama3).unwrap();
    for f in std::fs::read_dir(demo.join("model")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, llama3.join(f.file_name().unwrap())).unwrap();
    }
    let cfg_path = llama3.join("tokenizer_config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = json!(LLAMA3_CHAT_TEMPLATE);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();

    for model in [demo.join("model"), llama3] {
        let out = d.path().join("trl_ids.json");
        common::oracle(
            "reward_oracle.py",
            &["trl_tokenize", s(&model), s(&data), s(&out)],
        );
        let trl: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let ours = our_pair_ids(&model, &train);
        assert_eq!(ours.len(), rows.len());
        for (i, (c, r)) in ours.iter().enumerate() {
            let want = |k: &str| -> Vec<i64> {
                trl[k][i]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_i64().unwrap())
                    .collect()
            };
            assert_eq!(
                c,
                &want("chosen_ids"),
                "{} row {i}: chosen",
                model.display()
            );
            assert_eq!(
                r,
                &want("rejected_ids"),
                "{} row {i}: rejected",
                model.display()
            );
        }
    }
    let run = d.path().join("run");
    let said = train_pairs(&demo, &data, &run, &["--max_steps", "2"]);
    assert!(said.contains("validation accuracy"), "{said}");
}

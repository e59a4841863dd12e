//! `qlora-cls merge`: transformers loads the merged checkpoint with no missing or unexpected
//! keys and its logits equal our unmerged model's (fp32), from an original-weights base
//! (quantised in training) and from a bitsandbytes 4-bit base; `--quantize nf4` reports its
//! drift; bad adapters and outputs are refused.
mod common;
use common::{adapter_logits, bin, config_from, demo_assets, demo_texts, random_adapter};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use tch::Tensor;

fn run_ok(args: &[&str]) -> String {
    let out = Command::new(bin())
        .args(args)
        .output()
        .expect("run qlora-cls");
    assert!(
        out.status.success(),
        "qlora-cls {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_err(args: &[&str]) -> String {
    let out = Command::new(bin())
        .args(args)
        .output()
        .expect("run qlora-cls");
    assert!(!out.status.success(), "qlora-cls {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Merges in fp32, loads the result with transformers and compares its logits with ours.
/// transformers loads `dir` as a user would (merge_oracle.py), with no missing, unexpected
/// or mismatched keys; its report, config fields and logits of `texts_file`'s texts.
fn load_in_transformers(dir: &Path, texts_file: &Path) -> Value {
    let v: Value = serde_json::from_str(&common::oracle(
        "merge_oracle.py",
        &["logits", s(dir), s(texts_file)],
    ))
    .expect("oracle JSON");
    assert_eq!(v["missing"], serde_json::json!([]), "{v}");
    assert_eq!(v["unexpected"], serde_json::json!([]), "{v}");
    assert_eq!(v["mismatched"], serde_json::json!([]), "{v}");
    v
}

fn check_merge(model_dir: &Path, work: &Path, extra: &[&str]) -> Value {
    let adapter = work.join("adapter");
    // Both sides in fp32 on every CPU (`auto` would be bf16 on one with AVX512-BF16), so the
    // merge is held to fp32's tolerance.
    let mut flags = vec![
        "--model_dir",
        s(model_dir),
        "--lora_dropout",
        "0",
        "--bnb_4bit_compute_dtype",
        "float32",
    ];
    flags.extend_from_slice(extra);
    let cfg = config_from(&flags);
    random_adapter(&cfg, &adapter);
    // Named labels travel with the adapter (labels.json, as `train` writes it).
    let labels = qlora_cls::task::TaskLabels {
        task: cfg.to_task().expect("task"),
        spec: qlora_cls::labels::LabelSpec {
            problem_type: qlora_cls::model::loss::ProblemType::SingleLabel,
            names: vec!["different".into(), "paraphrase".into()],
        },
    };
    qlora_cls::adapter::write_labels(&adapter, &labels).expect("labels.json");
    let merged = work.join("merged");
    let mut args = vec![
        "merge",
        "--adapter",
        s(&adapter),
        "--out",
        s(&merged),
        "--dtype",
        "float32",
        "--max_shard_size",
        "150KB",
    ];
    args.extend_from_slice(&flags);
    let stdout = run_ok(&args);
    assert!(stdout.contains("weights merged"), "{stdout}");
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(merged.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(shards.len() > 1, "expected several shards: {shards:?}");

    let texts = demo_texts(6);
    let texts_file = work.join("texts.json");
    std::fs::write(&texts_file, serde_json::to_string(&texts).unwrap()).unwrap();
    let v = load_in_transformers(&merged, &texts_file);
    assert_eq!(v["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(v["num_labels"], 2);
    assert_eq!(v["id2label"]["1"], "paraphrase");
    assert_eq!(v["label2id"]["different"], 0);
    assert_eq!(v["problem_type"], "single_label_classification");
    assert_eq!(v["pad_token_id"], v["tokenizer_pad_id"]);

    let ours = adapter_logits(&cfg, &adapter, &texts);
    let rows: Vec<Vec<f64>> = serde_json::from_value(v["logits"].clone()).unwrap();
    let theirs = Tensor::from_slice2(&rows);
    let diff = common::max_abs_diff(&ours, &theirs);
    eprintln!(
        "merged (transformers) vs unmerged (ours) logits: max |diff| {diff:.3e}, max |logit| {:.3}",
        common::max_abs(&ours)
    );
    assert!(diff < 1e-4, "logits differ by {diff}");
    // The LoRA pairs matter: with them zeroed (same head) the logits are elsewhere, so the
    // equality above is the merge's doing.
    let zeroed = work.join("adapter-no-lora");
    std::fs::create_dir_all(&zeroed).unwrap();
    let file = qlora_cls::adapter::WEIGHTS_FILE;
    let tensors: Vec<(String, Tensor)> = qlora_cls::adapter::read_safetensors(&adapter.join(file))
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let t = if k.contains("lora_B") {
                t.zeros_like()
            } else {
                t
            };
            (k, t)
        })
        .collect();
    qlora_cls::adapter::write_safetensors(&zeroed.join(file), &tensors).unwrap();
    let cfg_file = qlora_cls::adapter::CONFIG_FILE;
    std::fs::copy(adapter.join(cfg_file), zeroed.join(cfg_file)).unwrap();
    let without = common::max_abs_diff(&ours, &adapter_logits(&cfg, &zeroed, &texts));
    eprintln!("the LoRA pairs move the logits by up to {without:.3e}");
    assert!(without > 1e-3, "the LoRA pairs barely matter ({without})");
    v
}

#[test]
fn merged_checkpoint_loads_in_transformers_with_our_logits() {
    let _g = common::serial();
    let d = common::tempdir();
    let demo = demo_assets(&d.path().join("demo"));
    // Every projection targeted; the base is bf16, quantised to NF4 in training.
    check_merge(
        &demo.join("model"),
        d.path(),
        &[
            "--target_modules",
            "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        ],
    );
}

#[test]
fn merge_onto_a_bitsandbytes_checkpoint() {
    let _g = common::serial();
    let d = common::tempdir();
    let demo = demo_assets(&d.path().join("demo"));
    let bnb = d.path().join("bnb");
    run_ok(&[
        "quantize",
        "--model_dir",
        s(&demo.join("model")),
        "--out",
        s(&bnb),
    ]);
    check_merge(&bnb, d.path(), &["--bnb_4bit_blocksize", "64"]);
}

#[test]
fn nf4_merge_reports_its_drift() {
    let _g = common::serial();
    let d = common::tempdir();
    let demo = demo_assets(&d.path().join("demo"));
    let model = demo.join("model");
    let adapter = d.path().join("adapter");
    let pin = ["--bnb_4bit_compute_dtype", "float32"];
    let cfg = config_from(&[
        "--model_dir",
        s(&model),
        "--lora_dropout",
        "0",
        pin[0],
        pin[1],
    ]);
    random_adapter(&cfg, &adapter);
    let out = d.path().join("merged-nf4");
    let stdout = run_ok(&[
        "merge",
        "--adapter",
        s(&adapter),
        "--out",
        s(&out),
        "--quantize",
        "nf4",
        "--dtype",
        "float32",
        "--sample",
        "40",
        "--model_dir",
        s(&model),
        "--data_dir",
        s(&demo.join("data")),
        pin[0],
        pin[1],
    ]);
    assert!(
        stdout.contains("nf4 drift") && stdout.contains("40 rows"),
        "{stdout}"
    );
    let drift: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("merge_drift.json")).unwrap())
            .unwrap();
    let max = drift["max_abs_score_diff"].as_f64().unwrap();
    let agree = drift["top_label_agreement"].as_f64().unwrap();
    eprintln!("nf4 drift: {drift}");
    assert!(max.is_finite() && (0.0..=1.0).contains(&max), "{drift}");
    assert!((0.0..=1.0).contains(&agree), "{drift}");
    // Re-quantising moves the weights: the drift is measured, not assumed zero.
    assert!(
        drift["max_abs_logit_diff"].as_f64().unwrap() > 0.0,
        "{drift}"
    );
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["bnb_4bit_quant_type"], "nf4");
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    assert!(out.join("tokenizer.json").exists());

    // transformers + bitsandbytes load the NF4 checkpoint as it is (no missing, unexpected
    // or mismatched keys), and their logits are ours on the same checkpoint and token ids.
    let texts = demo_texts(6);
    let texts_file = d.path().join("texts.json");
    std::fs::write(&texts_file, serde_json::to_string(&texts).unwrap()).unwrap();
    let v = load_in_transformers(&out, &texts_file);
    let pad = v["pad_token_id"].as_i64().expect("pad_token_id");
    let rows: Vec<Vec<i64>> = serde_json::from_value(v["input_ids"].clone()).unwrap();
    let t = rows.iter().map(Vec::len).max().unwrap();
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for r in &rows {
        for j in 0..t {
            ids.push(r.get(j).copied().unwrap_or(pad));
            mask.push(i64::from(j < r.len()));
        }
    }
    let b = rows.len() as i64;
    let ours = qlora_cls::model::classifier::LlamaClassifier::load(
        &out,
        &qlora_cls::model::classifier::ModelOptions {
            device: tch::Device::Cpu,
            compute_dtype: tch::Kind::Float,
            quant: Some(qlora_cls::quant::nf4::Nf4Options::default()),
            lora: None,
            num_labels: 2,
            pad_token_id: pad,
            recompute_layers: 0,
            seed: 0,
            residual: None,
        },
    )
    .expect("our loader reads the NF4 merge")
    .forward(
        &Tensor::from_slice(&ids).view([b, t as i64]),
        &Tensor::from_slice(&mask).view([b, t as i64]),
    );
    let theirs: Vec<Vec<f64>> = serde_json::from_value(v["logits"].clone()).unwrap();
    let diff = common::max_abs_diff(&ours, &Tensor::from_slice2(&theirs));
    eprintln!("NF4 merge: transformers+bitsandbytes vs ours, max |logit diff| {diff:.3e}");
    assert!(diff < 1e-4, "logits differ by {diff}");
}

#[test]
fn merge_refuses_a_foreign_adapter_and_a_used_out_folder() {
    let _g = common::serial();
    let d = common::tempdir();
    let demo = demo_assets(&d.path().join("demo"));
    let model = demo.join("model");
    let adapter = d.path().join("adapter");
    let cfg = config_from(&["--model_dir", s(&model)]);
    random_adapter(&cfg, &adapter);
    // A LoRA pair for a layer the base does not have.
    let file = adapter.join(qlora_cls::adapter::WEIGHTS_FILE);
    let mut tensors: Vec<(String, Tensor)> = qlora_cls::adapter::read_safetensors(&file)
        .unwrap()
        .into_iter()
        .collect();
    let p = "base_model.model.model.layers.9.self_attn.q_proj";
    tensors.push((
        format!("{p}.lora_A.weight"),
        Tensor::zeros([8, 64], tch::kind::FLOAT_CPU),
    ));
    tensors.push((
        format!("{p}.lora_B.weight"),
        Tensor::zeros([64, 8], tch::kind::FLOAT_CPU),
    ));
    let foreign = d.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::copy(
        adapter.join(qlora_cls::adapter::CONFIG_FILE),
        foreign.join(qlora_cls::adapter::CONFIG_FILE),
    )
    .unwrap();
    qlora_cls::adapter::write_safetensors(
        &foreign.join(qlora_cls::adapter::WEIGHTS_FILE),
        &tensors,
    )
    .unwrap();
    let out = d.path().join("out");
    let err = run_err(&[
        "merge",
        "--adapter",
        s(&foreign),
        "--out",
        s(&out),
        "--model_dir",
        s(&model),
    ]);
    assert!(
        err.contains("model.layers.9.self_attn.q_proj") && err.contains("base model"),
        "{err}"
    );
    assert!(!out.exists(), "a failed merge must leave no output");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let err = run_err(&[
        "merge",
        "--adapter",
        s(&adapter),
        "--out",
        s(&out),
        "--model_dir",
        s(&model),
    ]);
    assert!(err.contains("--force"), "{err}");
    let err = run_err(&[
        "merge",
        "--adapter",
        s(&adapter),
        "--out",
        s(&d.path().join("o2")),
        "--model_dir",
        s(&model),
        "--dtype",
        "int8",
    ]);
    assert!(err.contains("--dtype"), "{err}");
}

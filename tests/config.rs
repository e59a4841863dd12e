//! Bad configurations: each is refused with a message naming the key and where it was set,
//! and a non-zero exit, before anything is loaded.
mod common;
use std::path::Path;
use std::process::Command;

/// Runs `qlora-cls train --config FILE FLAGS...`; returns (exit code, stderr).
fn train_with(yaml: &str, flags: &[&str]) -> (i32, String) {
    let dir = common::tempdir();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(common::bin())
        .arg("train")
        .arg("--config")
        .arg(&file)
        .args(flags)
        .output()
        .expect("run qlora-cls");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_refused(yaml: &str, flags: &[&str], needles: &[&str]) {
    let (code, err) = train_with(yaml, flags);
    assert_ne!(code, 0, "expected failure for {yaml:?} {flags:?}");
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "message {err:?} lacks {n:?}");
    }
}

#[test]
fn unknown_key_names_file_and_suggests() {
    assert_refused(
        "lora_alpah: 16\n",
        &[],
        &[
            "bad.yaml",
            "unknown key `lora_alpah`",
            "did you mean `lora_alpha`",
        ],
    );
}

#[test]
fn unknown_flag_suggests() {
    assert_refused(
        "",
        &["--batch_sise", "4"],
        &["unknown flag `--batch_sise`", "--batch_size"],
    );
}

#[test]
fn wrong_type_names_key() {
    assert_refused("lr: fast\n", &[], &["bad.yaml", "key `lr`"]);
    assert_refused("batch_size: -3\n", &[], &["bad.yaml", "key `batch_size`"]);
}

#[test]
fn impossible_values() {
    assert_refused("r: 0\n", &[], &["bad.yaml", "key `r`"]);
    assert_refused("lr: 0\n", &[], &["key `lr`", "positive"]);
    assert_refused("lr: -1e-4\n", &[], &["key `lr`"]);
    assert_refused("batch_size: 0\n", &[], &["key `batch_size`"]);
    assert_refused(
        "lora_dropout: 1.0\n",
        &[],
        &["key `lora_dropout`", "[0, 1)"],
    );
    assert_refused("lora_dropout: -0.1\n", &[], &["key `lora_dropout`"]);
    assert_refused("epochs: 0\n", &[], &["key `epochs`"]);
    assert_refused(
        "bnb_4bit_compute_dtype: float8\n",
        &[],
        &["key `bnb_4bit_compute_dtype`"],
    );
    assert_refused(
        "bnb_4bit_quant_type: fp4\n",
        &[],
        &["key `bnb_4bit_quant_type`", "nf4"],
    );
    assert_refused(
        "target_modules: [q_prj]\n",
        &[],
        &["key `target_modules`", "q_proj"],
    );
    assert_refused("optimizer: sgd\n", &[], &["key `optimizer`"]);
    assert_refused("eval_steps: 0\n", &[], &["bad.yaml", "key `eval_steps`"]);
    assert_refused(
        "early_stopping_patience: 0\n",
        &[],
        &["key `early_stopping_patience`"],
    );
    assert_refused(
        "",
        &["--early_stopping_threshold", "-0.1"],
        &["--early_stopping_threshold", "0 or more"],
    );
}

#[test]
fn flags_are_named_in_errors_and_win_over_the_file() {
    // The file is fine; the flag is not.
    assert_refused("r: 8\n", &["--r", "0"], &["command line (--r)", "key `r`"]);
    assert_refused(
        "",
        &["--lora-dropout=2"],
        &["--lora_dropout", "key `lora_dropout`"],
    );
}

#[test]
fn unknown_prompt_name() {
    assert_refused(
        "prompt: perfekt\n",
        &[],
        &["key `prompt`", "perfekt", "perfect"],
    );
}

#[test]
fn missing_dirs() {
    assert_refused(
        "model_dir: /nonexistent/model\n",
        &[],
        &["key `model_dir`", "/nonexistent/model"],
    );
    assert_refused(
        "",
        &["--data_dir", "/nonexistent/data"],
        &["key `data_dir`", "/nonexistent/data"],
    );
}

#[test]
fn no_model_dir_says_what_to_do() {
    assert_refused("", &[], &["model_dir"]);
}

#[test]
fn not_yaml_mapping() {
    assert_refused("- a\n- b\n", &[], &["bad.yaml", "mapping"]);
    assert_refused("r: [\n", &[], &["bad.yaml", "YAML"]);
}

#[test]
fn shipped_configs_are_valid() {
    let root = common::root();
    for name in ["mrpc.yaml", "demo.yaml"] {
        let path = root.join("configs").join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        // Dirs in the shipped configs may not exist yet; check everything else.
        let text: String = text
            .lines()
            .filter(|l| {
                !(l.starts_with("model_dir")
                    || l.starts_with("tokenizer_dir")
                    || l.starts_with("data_dir"))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let tmp = common::tempdir();
        let f = tmp.path().join(name);
        std::fs::write(&f, text).unwrap();
        let r = qlora_cls::config::Config::load(Some(Path::new(&f)), &[]);
        assert!(r.is_ok(), "{name}: {:?}", r.err());
    }
}

#[test]
fn cuda_device_without_a_gpu_is_refused() {
    if tch::Cuda::is_available() {
        return; // only meaningful where there is no GPU
    }
    assert_refused("device: cuda\n", &[], &["key `device`", "0 CUDA device"]);
    assert_refused("", &["--device", "cuda:1"], &["key `device`"]);
}

#[test]
fn inspect_prints_the_reference_parameter_line_for_llama3_8b() {
    // Meta-Llama-3-8B's config.json as published (only what `inspect` reads matters).
    let cfg = r#"{
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
      "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
      "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
      "hidden_act": "silu", "tie_word_embeddings": false, "bos_token_id": 128000,
      "eos_token_id": 128001, "initializer_range": 0.02, "torch_dtype": "bfloat16"
    }"#;
    let dir = common::tempdir();
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    let out = Command::new(common::bin())
        .args(["inspect", "--model_dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "trainable params: 3,416,064 || all params: 7,508,348,928 || trainable%: 0.0455"
        ),
        "{stdout}"
    );
}

#[test]
fn task_keys_name_the_key() {
    assert_refused(
        "task: sst3\n",
        &[],
        &["key `task`", "unknown task `sst3`", "sst2", "custom"],
    );
    assert_refused(
        "task: custom\n",
        &[],
        &["key `text_columns`", "one or two column names"],
    );
    assert_refused(
        "task: custom\ntext_columns: [title, body]\n",
        &["--template", "{prompt} {title} {bdy}"],
        &["key `template`", "{bdy}", "title, body"],
    );
    assert_refused(
        "task: custom\ntext_columns: [text]\n",
        &["--problem_type", "multilabel"],
        &[
            "key `problem_type`",
            "multilabel",
            "multi_label_classification",
        ],
    );
    assert_refused(
        "task: custom\ntext_columns: [text]\nclass_weights: heavy\n",
        &[],
        &["key `class_weights`", "heavy", "balanced"],
    );
}

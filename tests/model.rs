//! The Llama classifier against transformers, PEFT and bitsandbytes (tests/oracles/model_oracle.py
//! builds tiny random checkpoints and computes the references).
mod common;
use common::{max_abs, max_abs_diff};

use qlora_cls::lora::LoraConfig;
use qlora_cls::model::classifier::{LlamaClassifier, ModelOptions, RECOMPUTE_ALL};
use qlora_cls::model::hf_config::{peft_param_counts, peft_param_line, LlamaConfig, RopeScaling};
use qlora_cls::model::llama::inv_freq;
use qlora_cls::quant::nf4::Nf4Options;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

const PAD: i64 = 2;
const NUM_LABELS: i64 = 3;

/// The oracle's output, built once per test run.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::oracle_fixtures("model_oracle.py", "fixtures", "model_oracle"))
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn facts() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("facts.json")).expect("facts.json");
    serde_json::from_str(&text).expect("facts.json is JSON")
}

fn opts(quant: Option<Nf4Options>, lora: Option<LoraConfig>, gc: bool) -> ModelOptions {
    ModelOptions {
        device: Device::Cpu,
        compute_dtype: Kind::Float,
        quant,
        lora,
        num_labels: NUM_LABELS,
        pad_token_id: PAD,
        recompute_layers: if gc { RECOMPUTE_ALL } else { 0 },
        seed: 7,
        residual: None,
    }
}

fn load_with(dir: &str, o: &ModelOptions, trainable: &str) -> LlamaClassifier {
    load_from(fixtures(), dir, o, trainable)
}

/// `root/dir`'s model with the trainable tensors of `root/trainable`.
fn load_from(root: &Path, dir: &str, o: &ModelOptions, trainable: &str) -> LlamaClassifier {
    let mut m =
        LlamaClassifier::load(&root.join(dir), o).unwrap_or_else(|e| panic!("load {dir}: {e:#}"));
    let t = read(&root.join(trainable));
    m.load_trainable(&|k: &str| t.get(k).map(|x| x.shallow_clone()))
        .unwrap_or_else(|e| panic!("load_trainable: {e:#}"));
    m
}

fn batch(which: &str) -> (Tensor, Tensor) {
    batch_in(fixtures(), which)
}

fn batch_in(root: &Path, which: &str) -> (Tensor, Tensor) {
    let inputs = read(&root.join("inputs.safetensors"));
    (
        inputs[&format!("batch_{which}_ids")].shallow_clone(),
        inputs[&format!("batch_{which}_mask")].shallow_clone(),
    )
}

/// LoRA on every projection of Llama's layer.
fn lora_all(dropout: f64) -> LoraConfig {
    lora_on(
        qlora_cls::model::hf_config::SEPARATE_LINEARS
            .iter()
            .map(|(_, n)| n.to_string())
            .collect(),
        dropout,
    )
}

fn lora_on(target_modules: Vec<String>, dropout: f64) -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout,
        target_modules,
        use_rslora: false,
        layers: None,
        rank_pattern: Vec::new(),
        alpha_pattern: Vec::new(),
        use_dora: false,
        init: Default::default(),
    }
}

#[test]
fn fp32_logits_match_transformers() {
    let _turn = common::serial();
    let expected = read(&fixtures().join("expected.safetensors"));
    for model in ["gqa", "tied"] {
        let m = load_with(model, &opts(None, None, false), "score.safetensors");
        for which in ["pad", "full"] {
            let (ids, mask) = batch(which);
            let got = m.forward(&ids, &mask);
            let want = &expected[&format!("logits_{model}_{which}")];
            let d = max_abs_diff(&got, want);
            eprintln!("{model}/{which}: max |Δlogit| {d:e}");
            assert!(
                d <= 1e-4,
                "{model}/{which}: max |Δlogit| {d:e} > 1e-4\n{got}\n{want}"
            );
            assert!(max_abs(want) > 0.1, "reference logits are degenerate");
        }
    }
}

#[test]
fn nf4_logits_match_bitsandbytes() {
    let _turn = common::serial();
    let expected = read(&fixtures().join("expected.safetensors"));
    let q = Some(Nf4Options::default());
    // Quantised while loading the fp32 checkpoint, and read back from bitsandbytes' own file.
    for dir in ["gqa", "bnb"] {
        let m = load_with(dir, &opts(q, None, false), "score.safetensors");
        for which in ["pad", "full"] {
            let (ids, mask) = batch(which);
            let got = m.forward(&ids, &mask);
            let want = &expected[&format!("logits_nf4_{which}")];
            let d = max_abs_diff(&got, want);
            eprintln!("nf4 {dir}/{which}: max |Δlogit| {d:e}");
            assert!(d <= 1e-3, "{dir}/{which}: NF4 max |Δlogit| {d:e} > 1e-3");
            // The 4-bit model is measurably not the fp32 one, so the check has teeth.
            let fp32 = &expected[&format!("logits_gqa_{which}")];
            assert!(max_abs_diff(want, fp32) > 1e-3);
        }
    }
}

fn grads(m: &LlamaClassifier) -> Vec<(String, Tensor)> {
    m.trainable_parameters()
        .into_iter()
        .map(|(n, p)| {
            let g = p.grad();
            assert!(g.defined(), "{n} has no gradient");
            (n, g.copy())
        })
        .collect()
}

#[test]
fn lora_and_head_gradients_match_peft() {
    let _turn = common::serial();
    let (ids, mask) = batch("pad");
    let labels = read(&fixtures().join("inputs.safetensors"))["labels_pad"].shallow_clone();
    let adapter = "peft_adapter/adapter_model.safetensors";
    let m = load_with("gqa", &opts(None, Some(lora_all(0.0)), false), adapter);

    let (loss, plain) = grads_match_peft(&m, fixtures(), &facts());
    // Gradient checkpointing changes nothing.
    let gc = load_with("gqa", &opts(None, Some(lora_all(0.0)), true), adapter);
    let (gc_loss, _) = gc
        .forward_backward(&ids, &mask, &labels)
        .expect("checkpointed");
    assert_eq!(gc_loss.to_bits(), loss.to_bits());
    for ((name, a), (_, b)) in plain.iter().zip(grads(&gc)) {
        let d = max_abs_diff(a, &b);
        assert!(d <= 1e-6, "{name}: checkpointed gradient differs by {d:e}");
    }
}

/// One training pass of `m` (holding PEFT's saved adapter) on `root`'s padded batch against
/// PEFT's loss, logits and gradients: our trainable names are PEFT's saved adapter keys,
/// exactly, and every gradient is within 1e-4 of its tensor's largest. Returns our loss and
/// gradients.
fn grads_match_peft(
    m: &LlamaClassifier,
    root: &Path,
    facts: &serde_json::Value,
) -> (f64, Vec<(String, Tensor)>) {
    let (ids, mask) = batch_in(root, "pad");
    let labels = read(&root.join("inputs.safetensors"))["labels_pad"].shallow_clone();
    let want = read(&root.join("peft_grads.safetensors"));
    let expected = read(&root.join("expected.safetensors"));
    let mut ours: Vec<String> = m
        .trainable_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut theirs: Vec<String> = read(&root.join("peft_adapter/adapter_model.safetensors"))
        .into_keys()
        .collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);

    let (loss, logits) = m
        .forward_backward(&ids, &mask, &labels)
        .expect("forward_backward");
    let peft_loss = facts["loss_pad"].as_f64().expect("loss");
    assert!(
        (loss - peft_loss).abs() <= 1e-5 * peft_loss.abs().max(1.0),
        "loss {loss} vs {peft_loss}"
    );
    let dl = max_abs_diff(&logits, &expected["logits_peft_pad"]);
    assert!(dl <= 1e-4, "training logits differ from PEFT's by {dl:e}");
    let plain = grads(m);
    assert_eq!(plain.len(), want.len());
    let mut worst = 0f64;
    for (name, g) in &plain {
        let w = want
            .get(name)
            .unwrap_or_else(|| panic!("PEFT has no gradient for {name}"));
        let scale = max_abs(w);
        assert!(
            scale > 0.0,
            "{name}: PEFT gradient is zero, the check would be empty"
        );
        let d = max_abs_diff(g, w);
        worst = worst.max(d / scale);
        assert!(
            d <= 1e-4 * scale,
            "{name}: max |Δgrad| {d:e} > 1e-4 × {scale:e}"
        );
    }
    eprintln!("largest gradient difference vs PEFT: {worst:e} of the tensor's max");
    (loss, plain)
}

/// The training pass (unpadded rows, hand-written backward) against autograd through the
/// padded forward that evaluation uses, on batches with left, right and no padding, for
/// dense, NF4 and bf16 models, with every projection adapted and non-zero LoRA B.
#[test]
fn hand_written_backward_matches_autograd() {
    let _turn = common::serial();
    let cases = [
        ("gqa", None, Kind::Float, 1e-5),
        ("tied", None, Kind::Float, 1e-5),
        ("gqa", Some(Nf4Options::default()), Kind::Float, 1e-5),
        ("gqa", None, Kind::BFloat16, 3e-2), // ~4 bf16 ulps of the largest entry
    ];
    for (dir, quant, kind, tol) in cases {
        backward_matches_autograd(fixtures(), dir, quant, kind, tol, &lora_all(0.0));
    }
}

/// [`hand_written_backward_matches_autograd`] for `root/dir`, on the padded and the full batch.
fn backward_matches_autograd(
    root: &Path,
    dir: &str,
    quant: Option<Nf4Options>,
    kind: Kind,
    tol: f64,
    lora: &LoraConfig,
) {
    let inputs = read(&root.join("inputs.safetensors"));
    for which in ["pad", "full"] {
        let (ids, mask) = batch_in(root, which);
        let labels = &inputs[&format!("labels_{which}")];
        let mut o = opts(quant, Some(lora.clone()), false);
        o.compute_dtype = kind;
        let m = LlamaClassifier::load(&root.join(dir), &o).expect("load");
        tch::manual_seed(11);
        tch::no_grad(|| {
            for (_, mut p) in m.trainable_parameters() {
                let r = Tensor::randn(p.size(), (Kind::Float, Device::Cpu)) * 0.05;
                p.copy_(&r);
            }
        });
        let (loss, _) = m.forward_backward(&ids, &mask, labels).expect("rows");
        let ours = grads(&m);
        for (_, mut p) in m.trainable_parameters() {
            p.zero_grad();
        }
        let logits = m.try_forward(&ids, &mask).expect("padded");
        // Evaluation's logits come from the rows path too.
        let rows_logits = m.logits(&ids, &mask).expect("rows logits");
        let d = max_abs_diff(&rows_logits, &logits.detach());
        assert!(
            d <= tol * max_abs(&logits).max(1.0),
            "{dir}/{which}/{kind:?}: evaluation logits differ by {d:e}"
        );
        let reference = logits.cross_entropy_for_logits(labels);
        reference.backward();
        let ref_loss = reference.double_value(&[]);
        assert!(
            (loss - ref_loss).abs() <= tol * ref_loss.abs().max(1.0),
            "{dir}/{which}/{kind:?}: loss {loss} vs {ref_loss}"
        );
        let mut worst = 0f64;
        for ((name, g), (_, want)) in ours.iter().zip(grads(&m)) {
            let scale = max_abs(&want);
            assert!(scale > 0.0, "{dir}/{which}: {name} has a zero gradient");
            let d = max_abs_diff(g, &want);
            worst = worst.max(d / scale);
            assert!(
                d <= tol * scale,
                "{dir}/{which}/{kind:?}: {name}: max |Δgrad| {d:e} > {tol:e} × {scale:e}"
            );
        }
        eprintln!(
            "{dir}/{which}/{kind:?}: largest gradient difference {worst:e} of the tensor's max"
        );
    }
}

#[test]
fn checkpointing_reproduces_dropout_masks() {
    let _turn = common::serial();
    let (ids, mask) = batch("pad");
    let labels = read(&fixtures().join("inputs.safetensors"))["labels_pad"].shallow_clone();
    let adapter = "peft_adapter/adapter_model.safetensors";
    let a = load_with("gqa", &opts(None, Some(lora_all(0.3)), false), adapter);
    let b = load_with("gqa", &opts(None, Some(lora_all(0.3)), true), adapter);
    // Selective by layer: the first layer recomputed, the others kept.
    let mut first_only = opts(None, Some(lora_all(0.3)), false);
    first_only.recompute_layers = 1;
    let c = load_with("gqa", &first_only, adapter);
    assert!(
        c.config.num_hidden_layers > 1,
        "the fixture needs a kept layer"
    );
    let nodrop = load_with("gqa", &opts(None, Some(lora_all(0.0)), false), adapter);
    let (la, _) = a.forward_backward(&ids, &mask, &labels).expect("plain");
    let (lb, _) = b
        .forward_backward(&ids, &mask, &labels)
        .expect("checkpointed");
    let (lc, _) = c
        .forward_backward(&ids, &mask, &labels)
        .expect("first layer checkpointed");
    let (ln, _) = nodrop
        .forward_backward(&ids, &mask, &labels)
        .expect("no dropout");
    assert_eq!(la.to_bits(), lb.to_bits());
    assert_eq!(la.to_bits(), lc.to_bits());
    assert!((la - ln).abs() > 1e-6, "dropout had no effect");
    for (((name, x), (_, y)), (_, z)) in grads(&a).iter().zip(grads(&b)).zip(grads(&c)) {
        let d = max_abs_diff(x, &y);
        assert!(d <= 1e-6, "{name}: checkpointed gradient differs by {d:e}");
        let d = max_abs_diff(x, &z);
        assert!(
            d <= 1e-6,
            "{name}: gradient with layer 0 checkpointed differs by {d:e}"
        );
    }
    // Evaluation is deterministic and dropout-free.
    let e1 = a.forward(&ids, &mask);
    let e2 = nodrop.forward(&ids, &mask);
    assert_eq!(max_abs_diff(&e1, &e2), 0.0);
}

const LLAMA31_CONFIG: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
  "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
  "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
  "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256
}"#;

#[test]
fn hf_config_llama31_and_transformers5() {
    let _turn = common::serial();
    let expected = read(&fixtures().join("expected.safetensors"));
    let c = LlamaConfig::from_json_str(LLAMA31_CONFIG, "llama31/config.json").expect("3.1 config");
    assert_eq!(c.num_key_value_heads, 8);
    assert_eq!(c.head_dim, 128);
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    assert_eq!(c.bos_token_ids, vec![128000]);
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(
        c.rope_scaling,
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192
        }
    );
    assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
    // Bitwise the frequencies transformers derives.
    assert_eq!(
        max_abs_diff(&inv_freq(&c), &expected["inv_freq_llama31"]),
        0.0
    );

    // Written by transformers 5 (rope_parameters nested), compared with its own attributes.
    let f = facts();
    for name in ["gqa", "tied"] {
        let c = LlamaConfig::from_dir(&fixtures().join(name)).expect("t5 config");
        let want = &f[format!("config_{name}")];
        let int = |k: &str| want[k].as_i64().unwrap_or_else(|| panic!("{k}"));
        assert_eq!(c.vocab_size, int("vocab_size"));
        assert_eq!(c.hidden_size, int("hidden_size"));
        assert_eq!(c.intermediate_size, int("intermediate_size"));
        assert_eq!(c.num_hidden_layers, int("num_hidden_layers"));
        assert_eq!(c.num_attention_heads, int("num_attention_heads"));
        assert_eq!(c.num_key_value_heads, int("num_key_value_heads"));
        assert_eq!(c.head_dim, int("head_dim"));
        assert_eq!(c.max_position_embeddings, int("max_position_embeddings"));
        assert_eq!(c.rms_norm_eps, want["rms_norm_eps"].as_f64().unwrap());
        assert_eq!(
            c.initializer_range,
            want["initializer_range"].as_f64().unwrap()
        );
        assert_eq!(
            c.tie_word_embeddings,
            want["tie_word_embeddings"].as_bool().unwrap()
        );
        let eos: Vec<i64> = match &want["eos_token_id"] {
            serde_json::Value::Array(a) => a.iter().map(|v| v.as_i64().unwrap()).collect(),
            v => vec![v.as_i64().unwrap()],
        };
        assert_eq!(c.eos_token_ids, eos);
        let rope = &want["rope_parameters"];
        assert_eq!(c.rope_theta, rope["rope_theta"].as_f64().unwrap());
        match rope["rope_type"].as_str().unwrap() {
            "default" => assert_eq!(c.rope_scaling, RopeScaling::Default),
            "llama3" => {
                assert_eq!(
                    c.rope_scaling,
                    RopeScaling::Llama3 {
                        factor: rope["factor"].as_f64().unwrap(),
                        low_freq_factor: rope["low_freq_factor"].as_f64().unwrap(),
                        high_freq_factor: rope["high_freq_factor"].as_f64().unwrap(),
                        original_max_position_embeddings: rope["original_max_position_embeddings"]
                            .as_i64()
                            .unwrap(),
                    }
                );
                assert_eq!(max_abs_diff(&inv_freq(&c), &expected["inv_freq_gqa"]), 0.0);
            }
            other => panic!("unexpected rope_type {other}"),
        }
    }
    // The bitsandbytes checkpoint's quantization_config.
    let c = LlamaConfig::from_dir(&fixtures().join("bnb")).expect("bnb config");
    let q = c.quantization.expect("quantization_config");
    assert!(q.load_in_4bit && q.double_quant && q.quant_type == "nf4");
}

#[test]
fn peft_parameter_lines() {
    let _turn = common::serial();
    let c = LlamaConfig::from_json_str(LLAMA31_CONFIG, "llama3/config.json").expect("config");
    let qv = vec!["q_proj".to_string(), "v_proj".to_string()];
    let (t, a) = peft_param_counts(&c, 2, 8, &qv);
    assert_eq!(
        peft_param_line(t, a),
        "trainable params: 3,416,064 || all params: 7,508,348,928 || trainable%: 0.0455"
    );
    let tiny = LlamaConfig::from_dir(&fixtures().join("gqa")).expect("tiny config");
    let (t, a) = peft_param_counts(&tiny, NUM_LABELS, 8, &qv);
    let want = facts()["peft_line_tiny"]
        .as_str()
        .expect("line")
        .to_string();
    assert_eq!(peft_param_line(t, a), want);
    let lora = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: qv,
        use_rslora: false,
        layers: None,
        rank_pattern: Vec::new(),
        alpha_pattern: Vec::new(),
        use_dora: false,
        init: Default::default(),
    };
    let m = LlamaClassifier::load(
        &fixtures().join("gqa"),
        &opts(Some(Nf4Options::default()), Some(lora), false),
    )
    .expect("load");
    let (t2, a2) = m.param_counts();
    assert_eq!(peft_param_line(t2, a2), want);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    match LlamaClassifier::load(dir, &opts(None, None, false)) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn load_errors_name_the_file_and_tensor() {
    let _turn = common::serial();
    let tmp = common::tempdir();
    let t = tmp.path();

    let empty = t.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = load_err(&empty);
    assert!(e.contains("config.json"), "{e}");

    let bad = t.join("malformed");
    copy_dir(&fixtures().join("gqa"), &bad);
    std::fs::write(bad.join("config.json"), "{\"hidden_size\": 64,").unwrap();
    let e = load_err(&bad);
    assert!(e.contains("config.json") && e.contains("malformed"), "{e}");

    let text = std::fs::read_to_string(fixtures().join("gqa/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(bad.join("config.json"), v.to_string()).unwrap();
    let e = load_err(&bad);
    assert!(
        e.contains("config.json") && e.contains("hidden_size"),
        "{e}"
    );

    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["intermediate_size"] = serde_json::json!(96);
    std::fs::write(bad.join("config.json"), v.to_string()).unwrap();
    let e = load_err(&bad);
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight")
            && e.contains("shape")
            && e.contains("model.safetensors"),
        "{e}"
    );

    let sharded = t.join("sharded");
    copy_dir(&fixtures().join("tied"), &sharded);
    let index = std::fs::read_to_string(sharded.join("model.safetensors.index.json")).unwrap();
    let index: serde_json::Value = serde_json::from_str(&index).unwrap();
    let victim = index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
        .as_str()
        .expect("sharded fixture");
    std::fs::remove_file(sharded.join(victim)).unwrap();
    let e = load_err(&sharded);
    assert!(e.contains(victim) && e.contains("missing"), "{e}");

    let trunc = t.join("truncated");
    copy_dir(&fixtures().join("gqa"), &trunc);
    let f = trunc.join("model.safetensors");
    common::truncate_by(&f, 100);
    let e = load_err(&trunc);
    assert!(e.contains("model.safetensors"), "{e}");

    let lying = t.join("lying");
    copy_dir(&fixtures().join("gqa"), &lying);
    let f = lying.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&f, bytes).unwrap();
    let e = load_err(&lying);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn nf4_dequantised_weight_matches_bitsandbytes() {
    let _turn = common::serial();
    let expected = read(&fixtures().join("expected.safetensors"));
    let w = read(&fixtures().join("gqa/model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
        .shallow_clone();
    let q = qlora_cls::quant::nf4::quantize(&w, &Nf4Options::default()).expect("quantize");
    let d = qlora_cls::quant::nf4::dequantize(&q, Kind::Float).expect("dequantize");
    let want = &expected["nf4_dequant_down1"];
    let diff = max_abs_diff(&d, want);
    assert!(
        diff <= 1e-6,
        "NF4 dequantised weight differs from bitsandbytes by {diff:e}"
    );
}

#[test]
fn bf16_and_fp16_compute() {
    let _turn = common::serial();
    let expected = read(&fixtures().join("expected.safetensors"));
    let (ids, mask) = batch("pad");
    let labels = read(&fixtures().join("inputs.safetensors"))["labels_pad"].shallow_clone();
    let mut o = opts(None, None, false);
    o.compute_dtype = Kind::BFloat16;
    let m = load_with("gqa", &o, "score_bf16.safetensors");
    for which in ["pad", "full"] {
        let (ids, mask) = batch(which);
        let got = m.forward(&ids, &mask);
        assert_eq!(got.kind(), Kind::Float);
        let want = &expected[&format!("logits_bf16_{which}")];
        let d = max_abs_diff(&got, want);
        let scale = max_abs(want);
        eprintln!("bf16/{which}: max |Δlogit| {d:e} (logits up to {scale:e})");
        // Only the head differs (fp32 here, bf16 there): a few bf16 ulps of the logits.
        assert!(d <= 2e-2 * scale, "bf16/{which}: max |Δlogit| {d:e}");
    }
    // NF4 + LoRA training steps run in bf16 and fp16, with and without checkpointing.
    let adapter = "peft_adapter/adapter_model.safetensors";
    for kind in [Kind::BFloat16, Kind::Half] {
        let mut g = Vec::new();
        for gc in [false, true] {
            let mut o = opts(Some(Nf4Options::default()), Some(lora_all(0.0)), gc);
            o.compute_dtype = kind;
            let m = load_with("gqa", &o, adapter);
            let (loss, logits) = m.forward_backward(&ids, &mask, &labels).expect("step");
            assert!(loss.is_finite(), "{kind:?}: loss {loss}");
            assert_eq!(logits.kind(), Kind::Float);
            g.push(grads(&m));
        }
        for ((name, a), (_, b)) in g[0].iter().zip(&g[1]) {
            let d = max_abs_diff(a, b);
            assert!(
                d <= 1e-2 * max_abs(a).max(1e-3),
                "{kind:?} {name}: checkpointing changes the gradient by {d:e}"
            );
        }
    }
}

fn cuda_device() -> Option<Device> {
    (cfg!(qlora_cuda) && tch::Cuda::is_available()).then_some(Device::Cuda(0))
}

/// The LoRA dropout mask is a function of (seed, index) on both devices.
#[test]
fn dropout_cuda_matches_cpu_bit_for_bit() {
    let Some(gpu) = cuda_device() else {
        eprintln!(
            "dropout_cuda_matches_cpu_bit_for_bit: skipped, no CUDA device (or built without CUDA)"
        );
        return;
    };
    tch::manual_seed(3);
    let x = Tensor::randn([3, 1000, 77], (Kind::Float, Device::Cpu));
    for (p, seed) in [(0.1, 42u64), (0.5, u64::MAX), (0.0, 1)] {
        let d = qlora_cls::dropout::Dropout { p, seed };
        let cpu = d.apply(&x).expect("cpu");
        let cuda = d
            .apply(&x.to_device(gpu))
            .expect("cuda")
            .to_device(Device::Cpu);
        assert!(
            cpu.equal(&cuda),
            "p {p} seed {seed}: CUDA mask or values differ"
        );
    }
}

/// One training pass on the GPU (NF4, dropout, every projection adapted) gives the CPU's
/// loss and gradients up to the devices' matmul rounding.
#[test]
fn training_pass_on_cuda_matches_cpu() {
    let Some(gpu) = cuda_device() else {
        eprintln!(
            "training_pass_on_cuda_matches_cpu: skipped, no CUDA device (or built without CUDA)"
        );
        return;
    };
    let _turn = common::serial();
    let (ids, mask) = batch("pad");
    let labels = read(&fixtures().join("inputs.safetensors"))["labels_pad"].shallow_clone();
    let adapter = "peft_adapter/adapter_model.safetensors";
    let run = |device: Device| {
        let mut o = opts(Some(Nf4Options::default()), Some(lora_all(0.1)), true);
        o.device = device;
        let m = load_with("gqa", &o, adapter);
        let (loss, _) = m
            .forward_backward(&ids, &mask, &labels)
            .expect("forward_backward");
        let g: Vec<Tensor> = grads(&m)
            .into_iter()
            .map(|(_, g)| g.to_device(Device::Cpu))
            .collect();
        (loss, g)
    };
    let (cpu_loss, cpu) = run(Device::Cpu);
    let (gpu_loss, gpu_grads) = run(gpu);
    assert!(
        (cpu_loss - gpu_loss).abs() <= 1e-4 * cpu_loss.abs().max(1.0),
        "loss {cpu_loss} vs {gpu_loss}"
    );
    for (a, b) in cpu.iter().zip(&gpu_grads) {
        let scale = max_abs(a);
        assert!(
            max_abs_diff(a, b) <= 1e-3 * scale.max(1e-12),
            "gradient differs beyond matmul rounding"
        );
    }
}

/// `model_oracle.py family NAME`'s output, built once per family and test run.
fn family_fixtures(family: &str) -> PathBuf {
    static DIRS: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut dirs = DIRS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, d)) = dirs.iter().find(|(f, _)| f == family) {
        return d.clone();
    }
    let name = format!("model_oracle_{family}");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(&name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("fixture dir");
    common::oracle(
        "model_oracle.py",
        &["family", family, dir.to_str().expect("utf-8 path")],
    );
    dirs.push((family.to_string(), dir.clone()));
    dir
}

/// Everything the Llama tests above check, for another family's tiny checkpoint written by
/// transformers (every sequence longer than its sliding window): fp32 logits with left,
/// right and no padding against `<Family>ForSequenceClassification`; NF4 (quantised on load
/// and bitsandbytes' own file) against transformers + bitsandbytes; LoRA on every projection
/// and head gradients against PEFT; the hand-written backward against autograd (dense and
/// NF4); PEFT's parameter line for the tiny model and, through `qlora-cls inspect`, for the
/// family's default config.
fn family_matches_transformers_and_peft(family: &str) {
    let _turn = common::serial();
    let root = family_fixtures(family);
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("facts.json")).expect("facts"))
            .expect("facts.json is JSON");
    let expected = read(&root.join("expected.safetensors"));
    let cfg = LlamaConfig::from_dir(&root.join("ckpt")).expect("config");
    assert_eq!(cfg.switches.family.model_type(), family);
    let windows = cfg.switches.windows();
    let t = batch_in(&root, "pad").0.size()[1];
    assert!(
        windows.iter().all(|&w| w < t),
        "{family}: sequences must outgrow the sliding window {windows:?}"
    );

    for (dir, quant, key, tol) in [
        ("ckpt", None, "logits", 1e-4),
        ("ckpt", Some(Nf4Options::default()), "logits_nf4", 1e-3),
        ("bnb", Some(Nf4Options::default()), "logits_nf4", 1e-3),
    ] {
        let m = load_from(&root, dir, &opts(quant, None, false), "score.safetensors");
        for which in ["pad", "full"] {
            let (ids, mask) = batch_in(&root, which);
            let got = m.forward(&ids, &mask);
            let want = &expected[&format!("{key}_{which}")];
            let d = max_abs_diff(&got, want);
            eprintln!("{family} {dir} {key}/{which}: max |Δlogit| {d:e}");
            assert!(
                d <= tol,
                "{family} {dir} {key}/{which}: max |Δlogit| {d:e} > {tol:e}\n{got}\n{want}"
            );
            assert!(max_abs(want) > 0.1, "reference logits are degenerate");
            let rows = m.logits(&ids, &mask).expect("rows logits");
            let d = max_abs_diff(&rows, &got);
            assert!(
                d <= 1e-4,
                "{family} {dir}/{which}: evaluation logits differ by {d:e}"
            );
        }
        if quant.is_some() {
            let fp32 = &expected["logits_pad"];
            assert!(max_abs_diff(&expected["logits_nf4_pad"], fp32) > 1e-3);
        }
    }

    // bf16 compute against transformers in bf16 (the same tolerance as Llama's).
    let mut o = opts(None, None, false);
    o.compute_dtype = Kind::BFloat16;
    let m = load_from(&root, "ckpt", &o, "score_bf16.safetensors");
    for which in ["pad", "full"] {
        let (ids, mask) = batch_in(&root, which);
        let want = &expected[&format!("logits_bf16_{which}")];
        let d = max_abs_diff(&m.forward(&ids, &mask), want);
        let scale = max_abs(want);
        eprintln!("{family} bf16/{which}: max |Δlogit| {d:e} (logits up to {scale:e})");
        assert!(
            d <= 2e-2 * scale,
            "{family} bf16/{which}: max |Δlogit| {d:e}"
        );
    }

    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .expect("a list")
            .iter()
            .map(|x| x.as_str().expect("a string").to_string())
            .collect()
    };
    let targets = strings(&f["targets"]);
    let adapter = "peft_adapter/adapter_model.safetensors";
    let lora = lora_on(targets, 0.0);
    let m = load_from(
        &root,
        "ckpt",
        &opts(None, Some(lora.clone()), false),
        adapter,
    );
    grads_match_peft(&m, &root, &f);
    for quant in [None, Some(Nf4Options::default())] {
        backward_matches_autograd(&root, "ckpt", quant, Kind::Float, 1e-5, &lora);
    }
    // An NF4 + LoRA training pass in bf16: finite, and the same with and without
    // checkpointing.
    let labels = read(&root.join("inputs.safetensors"))["labels_pad"].shallow_clone();
    let (ids, mask) = batch_in(&root, "pad");
    let mut g = Vec::new();
    for gc in [false, true] {
        let mut o = opts(Some(Nf4Options::default()), Some(lora.clone()), gc);
        o.compute_dtype = Kind::BFloat16;
        let m = load_from(&root, "ckpt", &o, adapter);
        let (loss, _) = m.forward_backward(&ids, &mask, &labels).expect("bf16 step");
        assert!(loss.is_finite(), "{family} bf16: loss {loss}");
        g.push(grads(&m));
    }
    for ((name, a), (_, b)) in g[0].iter().zip(&g[1]) {
        let d = max_abs_diff(a, b);
        assert!(
            d <= 1e-2 * max_abs(a).max(1e-3),
            "{family} bf16 {name}: checkpointing changes the gradient by {d:e}"
        );
    }

    // `qlora-cls quantize` writes the family's bitsandbytes checkpoint: every decoder
    // tensor as transformers + bitsandbytes saved it, and it loads to the same logits.
    let tmp = common::tempdir();
    let q = tmp.path().join("bnb");
    let qo = qlora_cls::quantize::QuantizeOptions {
        compute_dtype: "float32".into(),
        ..Default::default()
    };
    qlora_cls::quantize::quantize_checkpoint(&root.join("ckpt"), &q, &qo)
        .unwrap_or_else(|e| panic!("{family}: quantize: {e:#}"));
    let ours = read(&q.join("model.safetensors"));
    let theirs = read(&root.join("bnb/model.safetensors"));
    let mut compared = 0;
    for (k, v) in &ours {
        if !k.contains("layers.") {
            continue;
        }
        let w = theirs
            .get(k)
            .unwrap_or_else(|| panic!("{family}: bitsandbytes saved no {k}"));
        assert!(v.equal(w), "{family}: {k} differs from bitsandbytes'");
        compared += 1;
    }
    assert!(compared > 0);
    let mut m = LlamaClassifier::load(&q, &opts(Some(Nf4Options::default()), None, false))
        .unwrap_or_else(|e| panic!("{family}: load our quantized checkpoint: {e:#}"));
    let score = read(&root.join("score.safetensors"));
    m.load_trainable(&|k: &str| score.get(k).map(|x| x.shallow_clone()))
        .expect("score");
    let (ids, mask) = batch_in(&root, "pad");
    let d = max_abs_diff(&m.forward(&ids, &mask), &expected["logits_nf4_pad"]);
    assert!(
        d <= 1e-3,
        "{family}: our quantized checkpoint: max |Δlogit| {d:e}"
    );

    // `qlora-cls merge` of PEFT's adapter (LoRA on every projection, the head) onto the
    // family's checkpoint: transformers' AutoModelForSequenceClassification loads it with no
    // missing or unexpected keys, as the family's class, and its fp32 logits equal our
    // unmerged NF4 model's with the adapter.
    merged_family_matches_unmerged(family, &root, &lora);

    // PEFT's parameter lines.
    let one = strings(&f["peft_line_tiny_targets"]);
    let (tr, all) = peft_param_counts(&cfg, NUM_LABELS, 8, &one);
    assert_eq!(
        peft_param_line(tr, all),
        f["peft_line_tiny"].as_str().unwrap()
    );
    let out = std::process::Command::new(common::bin())
        .args(["inspect", "--model_dir"])
        .arg(root.join("default"))
        .output()
        .expect("run qlora-cls inspect");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{family}: inspect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().unwrap_or_default();
    assert_eq!(line, f["peft_line_default"].as_str().unwrap(), "{family}");
}

/// See [`family_matches_transformers_and_peft`]: the merge part.
fn merged_family_matches_unmerged(family: &str, root: &Path, lora: &LoraConfig) {
    let tmp = common::tempdir();
    // The family fixtures carry no tokenizer (their config names the pad token): the merge
    // copies the demo's tokenizer files, which it needs for nothing else here.
    let demo = common::demo_assets(&tmp.path().join("demo"));
    let merged = tmp.path().join("merged");
    let ckpt = root.join("ckpt");
    let adapter = root.join("peft_adapter");
    let tok = demo.join("model");
    let stdout = common::run_ok(&[
        "merge",
        "--model_dir",
        ckpt.to_str().unwrap(),
        "--tokenizer_dir",
        tok.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
        "--dtype",
        "float32",
    ]);
    assert!(stdout.contains("weights merged"), "{family}: {stdout}");
    let (ids, mask) = batch_in(root, "pad");
    let ids_file = tmp.path().join("ids.json");
    let rows = |t: &Tensor| Vec::<Vec<i64>>::try_from(t).expect("ids");
    std::fs::write(
        &ids_file,
        serde_json::json!({"input_ids": rows(&ids), "attention_mask": rows(&mask)}).to_string(),
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&common::oracle(
        "merge_oracle.py",
        &[
            "logits_ids",
            merged.to_str().unwrap(),
            ids_file.to_str().unwrap(),
        ],
    ))
    .expect("oracle JSON");
    for k in ["missing", "unexpected", "mismatched"] {
        assert_eq!(v[k], serde_json::json!([]), "{family}: {k}: {v}");
    }
    let class = v["class"].as_str().unwrap_or_default().to_string();
    assert!(
        class.ends_with("ForSequenceClassification") && v["architectures"][0] == class.as_str(),
        "{family}: {v}"
    );
    let theirs: Vec<Vec<f64>> = serde_json::from_value(v["logits"].clone()).unwrap();
    let theirs = Tensor::from_slice2(&theirs);
    let ours = load_from(
        root,
        "ckpt",
        &opts(Some(Nf4Options::default()), Some(lora.clone()), false),
        "peft_adapter/adapter_model.safetensors",
    )
    .forward(&ids, &mask);
    let d = max_abs_diff(&ours, &theirs);
    eprintln!("{family}: merged (transformers) vs unmerged NF4 + LoRA (ours): max |Δlogit| {d:e}");
    assert!(
        d <= 1e-4,
        "{family}: merged logits differ by {d:e}\n{ours}\n{theirs}"
    );
}

#[test]
fn mistral_matches_transformers_and_peft() {
    family_matches_transformers_and_peft("mistral");
}

#[test]
fn qwen2_matches_transformers_and_peft() {
    family_matches_transformers_and_peft("qwen2");
}

#[test]
fn qwen3_matches_transformers_and_peft() {
    family_matches_transformers_and_peft("qwen3");
}

#[test]
fn phi3_matches_transformers_and_peft() {
    family_matches_transformers_and_peft("phi3");
}

#[test]
fn gemma2_matches_transformers_and_peft() {
    family_matches_transformers_and_peft("gemma2");
}

#[test]
fn gemma3_text_matches_transformers_and_peft() {
    family_matches_transformers_and_peft("gemma3_text");
}

/// What a family needs and we lack is refused, naming the key and the file.
#[test]
fn unsupported_family_features_are_refused_by_key() {
    let base = serde_json::json!({
        "model_type": "phi3", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128
    });
    let cases: [(&str, serde_json::Value, &str); 6] = [
        ("model_type", serde_json::json!("falcon"), "`model_type`"),
        (
            "rope_scaling",
            serde_json::json!({"type": "yarn", "factor": 4.0}),
            "`rope_type`",
        ),
        (
            // head_dim 16 needs 8 factors.
            "rope_scaling",
            serde_json::json!({"type": "longrope", "short_factor": [1.0], "long_factor": [1.0],
                               "original_max_position_embeddings": 8}),
            "`short_factor`",
        ),
        (
            "partial_rotary_factor",
            serde_json::json!(0.75),
            "`partial_rotary_factor`",
        ),
        ("resid_pdrop", serde_json::json!(0.1), "`resid_pdrop`"),
        ("hidden_act", serde_json::json!("gelu_new"), "`hidden_act`"),
    ];
    for (key, value, named) in cases {
        let mut v = base.clone();
        v[key] = value;
        let e = match LlamaConfig::from_json_str(&v.to_string(), "m/config.json") {
            Ok(_) => panic!("{key}: accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            e.contains(named) && e.contains("m/config.json"),
            "{key}: {e}"
        );
    }
    // A LoRA target the family lacks.
    let _turn = common::serial();
    let root = fixtures().join("gqa");
    let e = LlamaClassifier::load(
        &root,
        &opts(None, Some(lora_on(vec!["qkv_proj".into()], 0.0)), false),
    )
    .err()
    .map(|e| format!("{e:#}"))
    .expect("llama has no qkv_proj");
    assert!(e.contains("qkv_proj") && e.contains("config.json"), "{e}");
}

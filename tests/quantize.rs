//! `quantize_checkpoint` against transformers + bitsandbytes (tests/oracles/quantize_oracle.py):
//! a tiny sharded bf16 Llama quantised by us must load in transformers exactly like the model
//! transformers quantises itself, hold the same bytes as its `save_pretrained` output, and load
//! in our own classifier exactly like that output and like on-the-fly quantisation.
mod common;

use qlora_cls::model::checkpoint::{load_base, LoadOptions};
use qlora_cls::model::classifier::{LlamaClassifier, ModelOptions};
use qlora_cls::model::hf_config::LlamaConfig;
use qlora_cls::quant::nf4::{self, Nf4Options};
use qlora_cls::quant::qlinear::FrozenWeight;
use qlora_cls::quantize::{quantize_checkpoint, QuantizeOptions, QuantizeReport};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

const PAD: i64 = 0;
const NUM_LABELS: i64 = 2;

/// Tests share torch's global generator (the score head's init), so they take turns.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn opts() -> QuantizeOptions {
    QuantizeOptions {
        compute_dtype: "float32".into(),
        // Small enough that the ~100 kB output needs three shards.
        max_shard_bytes: 40_000,
        ..Default::default()
    }
}

/// The oracle's checkpoints (`orig`, `ref`) and ours (`out`), built once per test run.
fn fixtures() -> &'static (PathBuf, QuantizeReport) {
    static DIR: OnceLock<(PathBuf, QuantizeReport)> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("quantize_oracle");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("fixture dir");
        common::oracle(
            "quantize_oracle.py",
            &["make", dir.to_str().expect("utf-8")],
        );
        let t = std::time::Instant::now();
        let report = quantize_checkpoint(&dir.join("orig"), &dir.join("out"), &opts())
            .unwrap_or_else(|e| panic!("quantize: {e:#}"));
        eprintln!("quantized in {:?}: {report:?}", t.elapsed());
        (dir, report)
    })
}

fn dir() -> &'static Path {
    &fixtures().0
}

#[test]
fn transformers_loads_our_checkpoint_like_its_own() {
    let (dir, report) = fixtures();
    assert_eq!(report.quantized, 14, "{report:?}");
    assert_eq!(report.copied, 7, "{report:?}");
    assert!(report.shards >= 2, "{report:?}");
    assert_eq!(
        report.files_copied,
        [
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let out = dir.join("out");
    common::oracle(
        "quantize_oracle.py",
        &[
            "check",
            dir.to_str().expect("utf-8"),
            out.to_str().expect("utf-8"),
        ],
    );
    let text = std::fs::read_to_string(dir.join("check.json")).expect("check.json");
    let c: Value = serde_json::from_str(&text).expect("check.json is JSON");
    eprintln!("{c:#}");
    let empty = serde_json::json!({"missing_keys": [], "unexpected_keys": [],
                                   "mismatched_keys": [], "error_msgs": []});
    // As a causal LM: nothing missing, nothing unexpected, 14 Linear4bit modules.
    assert_eq!(c["causal_info"], empty);
    assert_eq!(c["causal_info_ref"], empty);
    assert_eq!(c["linear4bit_modules"], 14);
    assert_eq!(c["ours_is_4bit"], true);
    assert_eq!(c["ours_compute_dtype"], "torch.float32");
    // As a classifier: the same report as for the bf16 original (a fresh score, no lm_head).
    assert_eq!(c["seq_info"], c["seq_info_ref"]);
    assert_eq!(
        c["seq_info"]["missing_keys"],
        serde_json::json!(["score.weight"])
    );
    for which in ["causal", "seq"] {
        let d = c[format!("{which}_max_abs_diff")].as_f64().expect("diff");
        let m = c[format!("{which}_max_abs")].as_f64().expect("max");
        eprintln!("{which}: max |Δlogit| {d:e} (max |logit| {m})");
        assert!(d <= 1e-3, "{which}: max |Δlogit| {d:e} > 1e-3");
        assert!(m > 0.1, "{which}: degenerate reference logits");
    }
    // Every tensor equals, byte for byte, what transformers' save_pretrained wrote.
    assert_eq!(c["only_in_ours"], serde_json::json!([]));
    assert_eq!(c["only_in_ref"], serde_json::json!([]));
    assert_eq!(c["tensors_differ"], serde_json::json!([]));
    assert_eq!(c["tensors_identical"], 14 * 6 + 7);
    assert_eq!(c["shards"], report.shards);
    assert_eq!(c["index_ok"], true);
    assert_eq!(c["config_diff"], serde_json::json!([]));
    assert_eq!(c["config_quant_equal"], true);
    assert_eq!(c["tokenizer_same"], true);
}

fn load_opts() -> ModelOptions {
    ModelOptions {
        device: Device::Cpu,
        compute_dtype: Kind::Float,
        quant: Some(Nf4Options::default()),
        lora: None,
        num_labels: NUM_LABELS,
        pad_token_id: PAD,
        recompute_layers: 0,
        seed: 11,
        residual: None,
    }
}

/// Every frozen tensor our loader builds, dequantised to f32, in load order.
fn frozen(model_dir: &Path) -> Vec<(String, Tensor)> {
    let cfg = LlamaConfig::from_dir(model_dir).expect("config");
    let w = load_base(
        model_dir,
        &cfg,
        &LoadOptions {
            device: Device::Cpu,
            compute_dtype: Kind::Float,
            quant: Some(Nf4Options::default()),
            num_labels: NUM_LABELS,
            lora: None,
            residual: None,
        },
    )
    .unwrap_or_else(|e| panic!("load_base {}: {e:#}", model_dir.display()));
    let mut out = vec![("embed_tokens".to_string(), w.embed_tokens)];
    for (i, l) in w.layers.into_iter().enumerate() {
        for (name, t) in l.norms {
            out.push((format!("{i}.{name}"), t));
        }
        for lin in l.linears {
            let name = lin.name;
            let t = match lin.weight {
                FrozenWeight::Nf4(q) => nf4::dequantize(&q, Kind::Float).expect("dequantize"),
                FrozenWeight::Dense(_) => panic!("{name} was not quantised"),
            };
            out.push((format!("{i}.{name}"), t));
        }
    }
    out.push(("norm".to_string(), w.norm));
    out
}

#[test]
fn our_loader_reads_our_checkpoint_like_transformers_own() {
    let _turn = serial();
    let d = dir();
    let inputs: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(d.join("inputs.safetensors"))
            .expect("inputs")
            .into_iter()
            .collect();
    let (ids, mask) = (&inputs["ids"], &inputs["mask"]);
    let sources = ["out", "ref", "orig"];
    let weights: Vec<_> = sources.iter().map(|s| frozen(&d.join(s))).collect();
    let logits: Vec<Tensor> = sources
        .iter()
        .map(|s| {
            let m = LlamaClassifier::load(&d.join(s), &load_opts())
                .unwrap_or_else(|e| panic!("load {s}: {e:#}"));
            m.forward(ids, mask)
        })
        .collect();
    assert_eq!(weights[0].len(), 1 + 2 * 9 + 1);
    for (k, other) in sources.iter().enumerate().skip(1) {
        for ((name, a), (_, b)) in weights[0].iter().zip(&weights[k]) {
            assert_eq!(a.size(), b.size(), "{name}: out vs {other}");
            assert!(a.equal(b), "{name}: out and {other} dequantise differently");
        }
        assert!(
            logits[0].equal(&logits[k]),
            "logits of out and {other} differ:\n{}\n{}",
            logits[0],
            logits[k]
        );
    }
    let m = logits[0].abs().max().double_value(&[]);
    eprintln!("our loader: out, ref and orig (on-the-fly NF4) identical; max |logit| {m}");
    assert!(m > 0.01, "degenerate logits");
}

fn err(model_dir: &Path, out: &Path, o: &QuantizeOptions) -> String {
    match quantize_checkpoint(model_dir, out, o) {
        Ok(_) => panic!(
            "quantize {} -> {} succeeded",
            model_dir.display(),
            out.display()
        ),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn clear_errors_and_force() {
    let d = dir();
    let tmp = common::tempdir();
    let t = tmp.path();
    let o = opts();

    let e = err(&t.join("nowhere"), &t.join("a"), &o);
    assert!(e.contains("nowhere") && e.contains("does not exist"), "{e}");

    std::fs::create_dir_all(t.join("empty")).unwrap();
    let e = err(&t.join("empty"), &t.join("a"), &o);
    assert!(e.contains("config.json") && e.contains("not found"), "{e}");

    // Already quantised input.
    let e = err(&d.join("ref"), &t.join("a"), &o);
    assert!(
        e.contains("quantization_config") && e.contains("already"),
        "{e}"
    );

    // Bad options.
    let bad = QuantizeOptions {
        quant_storage: "bfloat16".into(),
        ..opts()
    };
    let e = err(&d.join("orig"), &t.join("a"), &bad);
    assert!(e.contains("bnb_4bit_quant_storage"), "{e}");

    // A non-empty output folder is refused unless forced, and left alone.
    let busy = t.join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), "x").unwrap();
    let e = err(&d.join("orig"), &busy, &o);
    assert!(
        e.contains("busy") && e.contains("not empty") && e.contains("--force"),
        "{e}"
    );
    assert!(busy.join("keep.txt").exists());
    // Nor may --force replace the model folder itself.
    let forced = QuantizeOptions {
        force: true,
        ..opts()
    };
    let e = err(&d.join("orig"), &d.join("orig"), &forced);
    assert!(e.contains("model folder"), "{e}");

    // An empty folder is fine; --force replaces a non-empty one with the same result as ours.
    let empty_out = t.join("empty_out");
    std::fs::create_dir_all(&empty_out).unwrap();
    quantize_checkpoint(&d.join("orig"), &empty_out, &o).expect("empty out");
    quantize_checkpoint(&d.join("orig"), &busy, &forced).expect("forced");
    assert!(!busy.join("keep.txt").exists());
    let names = |p: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let want = names(&d.join("out"));
    for p in [&busy, &empty_out] {
        assert_eq!(names(p), want);
        for f in &want {
            assert_eq!(
                std::fs::read(p.join(f)).unwrap(),
                std::fs::read(d.join("out").join(f)).unwrap(),
                "{f} differs between runs"
            );
        }
    }
    // No temporary folders left beside the outputs.
    let leftovers: Vec<_> = names(t)
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

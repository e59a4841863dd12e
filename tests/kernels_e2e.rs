//! `kernels` through the binary on the demo: the torch twins train the default's adapter;
//! with the test-only fault switch a perturbed CPU kernel fails its self-check, is named
//! with its Δ, and the run then equals `kernels: torch`; without it every check passes.
mod common;
use qlora_cls::kernel_choice::{Kernel, FAULT_ENV};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use tch::Tensor;

/// Trains 60 steps of the demo into `run`; returns stdout and stderr together.
fn train(assets: &Path, run: &Path, kernels: &str, fault: Option<&str>) -> String {
    let cfg = common::root().join("configs/demo.yaml");
    let model = assets.join("model");
    let mut cmd = Command::new(common::bin());
    cmd.arg("train")
        .arg("--config")
        .arg(&cfg)
        .arg("--model_dir")
        .arg(&model)
        .arg("--tokenizer_dir")
        .arg(&model)
        .arg("--data_dir")
        .arg(assets.join("data"))
        .arg("--results_path")
        .arg(run)
        .args(["--max_steps", "60", "--eval_before_training", "false"])
        .args(["--eval_batch_size", "64", "--kernels", kernels])
        .env_remove(FAULT_ENV);
    if let Some(k) = fault {
        cmd.env(FAULT_ENV, k);
    }
    let out = cmd.output().expect("run qlora-cls train");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "train --kernels {kernels} failed:\n{text}"
    );
    text
}

fn adapter_of(run: &Path) -> HashMap<String, Tensor> {
    qlora_cls::adapter::read_safetensors(&run.join("adapter/adapter_model.safetensors"))
        .unwrap_or_else(|e| panic!("{}: {e:#}", run.display()))
}

fn assert_close(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: tensor names");
    for (name, t) in a {
        let d = common::max_abs_diff(t, &b[name]);
        assert!(d <= 1e-5, "{what}: {name} differs by {d}");
    }
}

fn kernels_summary(run: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(run.join("summary.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["kernels"].clone()
}

#[test]
fn torch_twins_train_the_default_adapter_and_a_faulted_kernel_is_replaced() {
    let tmp = common::tempdir();
    let assets = common::demo_assets(&tmp.path().join("assets"));

    let default_run = tmp.path().join("auto");
    let out = train(&assets, &default_run, "auto", None);
    assert!(!out.contains("FAILED"), "{out}");
    assert!(out.contains("kernels: auto on Cpu: "), "{out}");
    let summary = kernels_summary(&default_run);
    assert_eq!(summary["mode"], "auto");
    for k in Kernel::ALL {
        let s = &summary[k.name()];
        assert_eq!(s["impl"], "custom", "{}: {s}", k.name());
        assert_eq!(s["check"], "passed", "{}: {s}", k.name());
        assert_eq!(s["max_abs_diff"], 0.0, "{}: {s}", k.name());
        assert!(s["check_ms"].as_f64().is_some(), "{}: {s}", k.name());
    }

    let torch_run = tmp.path().join("torch");
    train(&assets, &torch_run, "torch", None);
    let summary = kernels_summary(&torch_run);
    for k in Kernel::ALL {
        assert_eq!(summary[k.name()]["impl"], "torch", "{}", k.name());
    }
    let torch = adapter_of(&torch_run);
    assert_close(&adapter_of(&default_run), &torch, "kernels torch vs auto");

    // One kernel of each training phase: the frozen forward, the LoRA path, the update.
    for fault in ["nf4_dequantize", "dropout", "adamw_step"] {
        let run = tmp.path().join(fault);
        let out = train(&assets, &run, "auto", Some(fault));
        let line = out
            .lines()
            .find(|l| l.starts_with("kernel self-check FAILED: "))
            .unwrap_or_else(|| panic!("{fault}: no failure line in\n{out}"));
        // The switch adds 0.25 to a kernel output once per call (the AdamW check takes two
        // steps, so its Δ doubles).
        let delta = if fault == "adamw_step" {
            "5.000e-1"
        } else {
            "2.500e-1"
        };
        assert!(
            line.contains(&format!("FAILED: {fault} "))
                && line.contains(&format!("max |Δ| {delta} > tol 0.000e0"))
                && line.ends_with("using the torch twin for this run"),
            "{line}"
        );
        assert_eq!(
            out.matches("kernel self-check FAILED").count(),
            1,
            "only {fault} fails:\n{out}"
        );
        let summary = kernels_summary(&run);
        assert_eq!(summary[fault]["impl"], "torch", "{}", summary[fault]);
        assert_eq!(summary[fault]["check"], "failed", "{}", summary[fault]);
        let d = summary[fault]["max_abs_diff"].as_f64().unwrap_or(f64::NAN);
        assert!(
            (0.25 - 1e-6..=0.5 + 1e-6).contains(&d),
            "{}",
            summary[fault]
        );
        assert_close(
            &adapter_of(&run),
            &torch,
            &format!("fault in {fault} vs torch"),
        );
    }
}

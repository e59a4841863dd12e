//! `qlora-cls doctor` through the binary: on this machine every check it can run passes,
//! and a GPU asked for where none is usable is a clear non-zero exit, not a panic.
mod common;
use std::process::Command;

fn doctor(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(common::bin())
        .arg("doctor")
        .args(args)
        .output()
        .expect("run qlora-cls doctor");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn doctor_passes_here_and_lists_every_item() {
    let (code, stdout, stderr) = doctor(&[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    for item in [
        "CUDA kernels:",
        "NCCL:",
        "Gloo:",
        "libtorch: built against torch/CUDA 2.11.0",
        "device cpu:",
        "all-reduce (Gloo, cpu): one rank",
        "kernel nf4_dequantize on cpu:",
        "kernel adamw_step on cpu:",
        "kernel dropout on cpu:",
        "training step on cpu: 1 step + evaluation",
        "doctor: every check passed",
    ] {
        assert!(
            stdout.contains(item),
            "doctor's report lacks `{item}`:\n{stdout}"
        );
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
    if qlora_cls::hardware::usable_gpus() == 0 {
        // No GPU: the CUDA parts are reported, none fails the run.
        assert!(!stdout.contains("device cuda:"), "{stdout}");
    } else {
        assert!(stdout.contains("training step on cuda:0"), "{stdout}");
    }
}

#[test]
fn doctor_on_a_missing_gpu_fails_clearly() {
    if qlora_cls::hardware::usable_gpus() > 0 {
        eprintln!("skipped: this machine has a usable GPU");
        return;
    }
    for device in ["cuda", "cuda:0"] {
        let (code, stdout, stderr) = doctor(&["--device", device]);
        assert_ne!(code, 0, "{stdout}");
        assert_ne!(code, 101, "doctor panicked:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.contains("error: doctor: `devices` failed"),
            "{stderr}"
        );
        assert!(
            stderr.contains(qlora_cls::hardware::no_gpu_reason()),
            "{stderr}"
        );
        assert!(stdout.contains("[ FAIL ] devices"), "{stdout}");
    }
}

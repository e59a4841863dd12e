//! A run killed mid-epoch (SIGKILL) and resumed ends with the same weights and metrics as an
//! uninterrupted run; SIGINT saves a checkpoint and exits as interrupted.
mod common;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn train_cmd(assets: &Path, run: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(common::bin());
    c.arg("train")
        .arg("--config")
        .arg(common::root().join("configs/demo.yaml"))
        .arg("--model_dir")
        .arg(assets.join("model"))
        .arg("--tokenizer_dir")
        .arg(assets.join("model"))
        .arg("--data_dir")
        .arg(assets.join("data"))
        .arg("--results_path")
        .arg(run)
        // A short run with a checkpoint every 15 steps.
        .args([
            "--epochs",
            "2",
            "--max_steps",
            "70",
            "--checkpoint_every",
            "15",
            "--log_every",
            "5",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn wait_for(path: &Path, child: &mut Child, limit: Duration) {
    let t = Instant::now();
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "training ended ({status}) before {} appeared",
                path.display()
            );
        }
        assert!(
            t.elapsed() < limit,
            "{} did not appear in time",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// metrics.csv without the timing columns (tokens_per_s, elapsed_s, peak_mem_bytes).
fn metrics_numbers(run: &Path) -> Vec<String> {
    String::from_utf8(read(&run.join("metrics.csv")))
        .unwrap()
        .lines()
        .map(|l| l.split(',').take(5).collect::<Vec<_>>().join(","))
        .collect()
}

#[test]
fn sigkill_mid_epoch_then_resume_equals_uninterrupted() {
    let tmp = common::tempdir();
    let assets = common::demo_assets(&tmp.path().join("assets"));

    let straight = tmp.path().join("straight");
    let out = train_cmd(&assets, &straight, &[]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let broken = tmp.path().join("broken");
    let mut child = train_cmd(&assets, &broken, &[]).spawn().unwrap();
    // Step 30 is in the middle of the first epoch (the demo has 200 batches per epoch).
    wait_for(
        &broken.join("checkpoints/step-00000030/state.json"),
        &mut child,
        Duration::from_secs(300),
    );
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(
        !broken.join("summary.json").exists(),
        "the run finished before it was killed"
    );

    let out = train_cmd(&assets, &broken, &["--resume", "auto"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("resuming from"), "{stdout}");

    assert_eq!(
        read(&straight.join("adapter/adapter_model.safetensors")),
        read(&broken.join("adapter/adapter_model.safetensors")),
        "final weights differ"
    );
    assert_eq!(
        read(&straight.join("eval.csv")),
        read(&broken.join("eval.csv"))
    );
    assert_eq!(metrics_numbers(&straight), metrics_numbers(&broken));
}

#[test]
fn sigint_saves_a_checkpoint_and_exits_interrupted() {
    let tmp = common::tempdir();
    let assets = common::demo_assets(&tmp.path().join("assets"));
    let run = tmp.path().join("run");
    let mut child = train_cmd(
        &assets,
        &run,
        &["--checkpoint_every", "0", "--log_every", "1"],
    )
    .spawn()
    .unwrap();
    // Wait until training steps are being logged, then interrupt.
    common::wait_for_steps(&run, &mut child, 2);
    let pid = child.id().to_string();
    Command::new("kill").args(["-INT", &pid]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("checkpoint saved to") && err.contains("--resume auto"),
        "{err}"
    );
    let cks: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(cks.len(), 1);
    // And it continues from there to the end.
    let out = train_cmd(
        &assets,
        &run,
        &["--resume", "auto", "--checkpoint_every", "0"],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(run.join("summary.json").is_file());
}

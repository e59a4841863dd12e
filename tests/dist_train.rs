//! Data-parallel training on CPU with Gloo: 2 ranks = 1 rank = gradient accumulation = both,
//! LoRA dropout included; a rank killed mid-epoch stops the others, named, within the timeout.
mod common;
use common::ranks::{free_port, rank};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn train_args(assets: &Path, run: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["train".into(), "--config".into()];
    v.push(
        common::root()
            .join("configs/demo.yaml")
            .display()
            .to_string(),
    );
    for (k, p) in [
        ("--model_dir", "model"),
        ("--tokenizer_dir", "model"),
        ("--data_dir", "data"),
    ] {
        v.push(k.into());
        v.push(assets.join(p).display().to_string());
    }
    v.push("--results_path".into());
    v.push(run.display().to_string());
    for a in ["--eval_batch_size", "64"].iter().chain(extra) {
        v.push(a.to_string());
    }
    v
}

fn eval_rows(run: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(run.join("eval.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

/// Two eval.csv rows of runs that trained the same adapter (to 1e-5): epoch, split, the
/// predictions' metrics (accuracy, F1) and the step equal; loss, NLL, Brier and ECE, which
/// move with the weights' last bits, within 1e-5.
fn same_evaluation(x: &[String], y: &[String], what: &str) {
    // epoch, split, loss, accuracy, f1, nll, brier, ece, step
    assert_eq!(x.len(), 9, "{what}: {x:?}");
    assert_eq!(
        (&x[..2], &x[3..5], &x[8]),
        (&y[..2], &y[3..5], &y[8]),
        "{what}: {x:?} vs {y:?}"
    );
    for i in [2, 5, 6, 7] {
        let (a, b): (f64, f64) = (x[i].parse().unwrap(), y[i].parse().unwrap());
        assert!((a - b).abs() < 1e-5, "{what}: {x:?} vs {y:?}");
    }
}

/// The trainable tensors a run in `run` saved (its adapter).
fn adapter_of(run: &Path) -> std::collections::HashMap<String, tch::Tensor> {
    qlora_cls::adapter::read_safetensors(&run.join("adapter/adapter_model.safetensors"))
        .unwrap_or_else(|e| panic!("{}: {e:#}", run.display()))
}

/// Trains the demo with `world` Gloo ranks (1: a single process) and the given extra flags;
/// panics with the ranks' output on failure.
fn train_ranks(assets: &Path, run: &Path, world: usize, extra: &[&str]) {
    let args = train_args(assets, run, extra);
    common::ranks::run_ranks(&args, world);
    if world == 1 {
        return;
    }
    let summary = std::fs::read_to_string(run.join("summary.json")).unwrap();
    assert!(
        summary.contains(&format!("\"world_size\": {world}")),
        "{summary}"
    );
}

/// The demo's model with its first 403 training and 100 validation rows: a full epoch stays
/// short, and its last batch (403 = 50·8 + 3) splits unevenly over ranks and micro-steps.
fn small_demo(dir: &Path) -> std::path::PathBuf {
    let assets = common::demo_assets(dir);
    let data = assets.join("data");
    for (file, rows) in [("train.tsv", 403), ("dev.tsv", 100)] {
        let text = std::fs::read_to_string(data.join(file)).unwrap();
        let kept: Vec<&str> = text.lines().take(rows + 1).collect();
        std::fs::write(data.join(file), kept.join("\n") + "\n").unwrap();
    }
    assets
}

/// A full epoch of the demo with LoRA dropout 0.1 (masks keyed by each example's place in
/// the global batch): 1 rank, 2 ranks, 1 rank accumulating 2 micro-steps and 2 ranks × 2
/// micro-steps train the same adapter and evaluate the same.
#[test]
fn ranks_and_accumulation_equal_one_process_with_dropout() {
    let tmp = common::tempdir();
    let assets = small_demo(&tmp.path().join("assets"));
    let base = ["--epochs", "1", "--lora_dropout", "0.1"];
    let runs = [
        ("one", 1, "1"),
        ("two-ranks", 2, "1"),
        ("one-accumulating", 1, "2"),
        ("two-ranks-accumulating", 2, "2"),
    ];
    for (name, world, acc) in runs {
        let mut extra = base.to_vec();
        extra.extend(["--gradient_accumulation_steps", acc]);
        train_ranks(&assets, &tmp.path().join(name), world, &extra);
    }
    let adapter = |name: &str| adapter_of(&tmp.path().join(name));
    let one = adapter("one");
    let e1 = eval_rows(&tmp.path().join("one"));
    assert_eq!(e1.len(), 2, "baseline and epoch 1: {e1:?}");
    let m1 = std::fs::read_to_string(tmp.path().join("one/metrics.csv")).unwrap();
    assert_eq!(m1.lines().count(), 1 + 51, "51 steps in the epoch:\n{m1}");
    for (name, _, _) in &runs[1..] {
        let other = adapter(name);
        assert_eq!(one.len(), other.len());
        let mut worst = 0.0f64;
        for (k, t) in &one {
            worst = worst.max(common::max_abs_diff(t, &other[k]));
        }
        eprintln!("{name} vs one process: max |Δw| = {worst:e}");
        assert!(worst < 1e-5, "{name} vs one process: max |Δw| = {worst:e}");
        let e2 = eval_rows(&tmp.path().join(name));
        assert_eq!(e1.len(), e2.len());
        for (x, y) in e1.iter().zip(&e2) {
            same_evaluation(x, y, name);
        }
    }
    // Dropout is on: a run without it ends elsewhere.
    let nodrop = tmp.path().join("no-dropout");
    train_ranks(
        &assets,
        &nodrop,
        1,
        &["--epochs", "1", "--lora_dropout", "0"],
    );
    let other = adapter("no-dropout");
    let moved = one
        .iter()
        .map(|(k, t)| common::max_abs_diff(t, &other[k]))
        .fold(0.0f64, f64::max);
    eprintln!("dropout 0.1 vs 0: max |Δw| = {moved:e}");
    assert!(
        moved > 1e-4,
        "dropout 0.1 and 0 train the same adapter ({moved:e})"
    );
}

/// QDoRA on every linear layer (magnitudes trained beside the pairs, LoRA dropout 0.1, the
/// first layer recomputed): 2 ranks × 2 micro-steps train what one process trains.
#[test]
fn dora_all_linear_on_two_ranks_equals_one_process() {
    let tmp = common::tempdir();
    let assets = small_demo(&tmp.path().join("assets"));
    let base = [
        "--epochs",
        "1",
        "--max_steps",
        "8",
        "--lora_dropout",
        "0.1",
        "--target_modules",
        "all-linear",
        "--use_dora",
        "true",
        "--gradient_checkpointing",
        "1",
    ];
    let mut two = base.to_vec();
    two.extend(["--gradient_accumulation_steps", "2"]);
    train_ranks(&assets, &tmp.path().join("one"), 1, &base);
    train_ranks(&assets, &tmp.path().join("two"), 2, &two);
    let (one, other) = (
        adapter_of(&tmp.path().join("one")),
        adapter_of(&tmp.path().join("two")),
    );
    let magnitudes = one
        .keys()
        .filter(|k| k.contains("lora_magnitude_vector"))
        .count();
    assert!(
        magnitudes >= 7,
        "a magnitude per adapted module: {magnitudes}"
    );
    assert_eq!(one.len(), other.len());
    let (mut worst, mut moved) = (0.0f64, 0.0f64);
    let config = std::fs::read_to_string(tmp.path().join("one/adapter/adapter_config.json"))
        .expect("adapter_config.json");
    assert!(config.contains("\"use_dora\": true"), "{config}");
    for (k, t) in &one {
        worst = worst.max(common::max_abs_diff(t, &other[k]));
    }
    // The magnitudes train: 8 steps end elsewhere than 1 step.
    let start = tmp.path().join("start");
    let mut none = base.to_vec();
    none[3] = "1";
    train_ranks(&assets, &start, 1, &none);
    let initial = adapter_of(&start);
    for (k, t) in one
        .iter()
        .filter(|(k, _)| k.contains("lora_magnitude_vector"))
    {
        moved = moved.max(common::max_abs_diff(t, &initial[k]));
    }
    eprintln!(
        "2 ranks x 2 micro-steps vs one process: max |Δw| = {worst:e}; magnitudes moved {moved:e}"
    );
    assert!(worst < 1e-5, "max |Δw| = {worst:e}");
    assert!(moved > 1e-5, "the magnitudes did not train ({moved:e})");
}

/// Which layers the backward recomputes changes nothing but memory and time: keeping every
/// layer, recomputing the first (`gradient_checkpointing: 1`), every layer (`true`), and what
/// `auto` picks under a budget nothing fits (all layers but the last) train the same adapter
/// with LoRA dropout 0.1; summary.json says what each run did.
#[test]
fn checkpointing_by_layer_trains_the_same_adapter() {
    let tmp = common::tempdir();
    let assets = small_demo(&tmp.path().join("assets"));
    let runs = [
        ("kept", vec!["--gradient_checkpointing", "false"]),
        ("first-layer", vec!["--gradient_checkpointing", "1"]),
        ("all", vec!["--gradient_checkpointing", "true"]),
        ("auto-no-room", vec!["--max_memory", "1"]),
    ];
    let plan = |name: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(tmp.path().join(name).join("summary.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["memory_plan"].clone()
    };
    for (name, flags) in &runs {
        let mut extra = vec!["--max_steps", "6", "--lora_dropout", "0.1"];
        extra.extend(flags);
        train_ranks(&assets, &tmp.path().join(name), 1, &extra);
    }
    let layers = plan("kept")["layers"].as_u64().unwrap();
    assert!(layers > 1, "the demo model needs a kept layer: {layers}");
    for (name, recomputed, auto) in [
        ("kept", 0, false),
        ("first-layer", 1, false),
        ("all", layers, false),
        ("auto-no-room", layers - 1, true),
    ] {
        let p = plan(name);
        assert_eq!(
            p["recompute_layers"].as_u64(),
            Some(recomputed),
            "{name}: {p}"
        );
        assert_eq!(p["auto"].as_bool(), Some(auto), "{name}: {p}");
        let peak = p["peak_bytes"].as_u64().unwrap();
        let (keep, all) = (
            p["peak_keep_bytes"].as_u64().unwrap(),
            p["peak_recompute_bytes"].as_u64().unwrap(),
        );
        assert!(
            peak <= keep && (recomputed == 0 || peak < keep),
            "{name}: {p}"
        );
        // All but the last layer recomputed peaks below every layer recomputed.
        assert!(recomputed != layers - 1 || peak < all, "{name}: {p}");
    }
    let adapter = |name: &str| adapter_of(&tmp.path().join(name));
    let kept = adapter("kept");
    for (name, _) in &runs[1..] {
        let other = adapter(name);
        let worst = kept
            .iter()
            .map(|(k, t)| common::max_abs_diff(t, &other[k]))
            .fold(0.0f64, f64::max);
        eprintln!("{name} vs kept: max |Δw| = {worst:e}");
        assert!(worst < 1e-6, "{name} vs kept: max |Δw| = {worst:e}");
    }
    // More layers than the model has is refused, naming the key.
    let out = Command::new(common::bin())
        .args(train_args(
            &assets,
            &tmp.path().join("too-many"),
            &["--max_steps", "1", "--gradient_checkpointing", "99"],
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "99 layers accepted: {err}");
    assert!(
        err.contains("gradient_checkpointing") && err.contains("99"),
        "{err}"
    );
}

#[test]
fn killing_a_rank_stops_the_others_naming_it() {
    let tmp = common::tempdir();
    let assets = common::demo_assets(&tmp.path().join("assets"));
    let run = tmp.path().join("run");
    let args = train_args(
        &assets,
        &run,
        &["--dist_timeout_s", "10", "--log_every", "1"],
    );
    let port = free_port();
    let mut r0 = rank(&args, 0, 2, port);
    let mut r1 = rank(&args, 1, 2, port);
    // Wait until training steps are being logged (mid-epoch), then SIGKILL rank 1.
    common::wait_for_steps(&run, &mut r0, 4);
    r1.kill().unwrap();
    let _ = r1.wait();
    let killed = Instant::now();
    let out = loop {
        if r0.try_wait().unwrap().is_some() {
            break r0.wait_with_output().unwrap();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(40),
            "rank 0 still running 40 s after rank 1 died"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let waited = killed.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "rank 0 exited 0");
    assert!(
        err.contains("rank 1"),
        "message does not name rank 1: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // The configured timeout is 10 s; allow the detection period and exit on top.
    assert!(waited < Duration::from_secs(25), "took {waited:?}");
}

#[test]
fn launcher_exits_non_zero_when_a_rank_dies() {
    let tmp = common::tempdir();
    let assets = common::demo_assets(&tmp.path().join("assets"));
    let run = tmp.path().join("run");
    let args = train_args(
        &assets,
        &run,
        &["--dist_timeout_s", "10", "--log_every", "1"],
    );
    let mut launcher = Command::new("bash")
        .arg(common::root().join("scripts/launch.sh"))
        .args([
            "--nproc",
            "2",
            "--master-port",
            &free_port().to_string(),
            "--",
            common::bin(),
        ])
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_for_steps(&run, &mut launcher, 4);
    // Find the rank with RANK=1 among the launcher's descendants and SIGKILL it.
    let victim = find_rank_pid(1, &run.display().to_string()).expect("rank 1 process");
    Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()
        .unwrap();
    let killed = Instant::now();
    let out = loop {
        if launcher.try_wait().unwrap().is_some() {
            break launcher.wait_with_output().unwrap();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "launcher still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rank 1"), "{err}");
}

/// The pid of the qlora-cls process with RANK=<r> whose command line names `run` (the
/// test's own run folder, unique to it).
fn find_rank_pid(r: usize, run: &str) -> Option<u32> {
    let me = common::bin();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if !cmd.starts_with(me) || !cmd.contains(run) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let env = String::from_utf8_lossy(&env);
        if env.split('\0').any(|kv| kv == format!("RANK={r}")) {
            return Some(pid);
        }
    }
    None
}

/// Another family's checkpoint (written by transformers, sized for the demo's tokenizer)
/// through the binary: 2 Gloo ranks train the same adapter as 1 process with LoRA dropout on,
/// a run stopped at `max_steps` and resumed ends where the uninterrupted one does, and
/// `eval`/`predict` score the adapter. Gemma 2 (the family furthest from Llama: (1 + w)
/// norms, GeGLU, soft-capping, alternating sliding windows) and Qwen2 (biased q/k/v).
#[test]
fn other_families_train_in_parallel_resume_and_predict() {
    let tmp = common::tempdir();
    let assets = small_demo(&tmp.path().join("assets"));
    let vocab = {
        let t: serde_json::Value =
            serde_json::from_slice(&std::fs::read(assets.join("model/tokenizer.json")).unwrap())
                .unwrap();
        t["model"]["vocab"].as_object().unwrap().len() + t["added_tokens"].as_array().unwrap().len()
    };
    for family in ["gemma2", "qwen2"] {
        let dir = tmp.path().join(family);
        let ckpt = dir.join("ckpt");
        common::oracle(
            "model_oracle.py",
            &[
                "family_ckpt",
                family,
                ckpt.to_str().unwrap(),
                &vocab.to_string(),
            ],
        );
        // The family's checkpoint with the demo's tokenizer and data.
        let family_assets = dir.join("assets");
        std::fs::create_dir_all(&family_assets).unwrap();
        std::os::unix::fs::symlink(assets.join("data"), family_assets.join("data")).unwrap();
        std::fs::create_dir_all(family_assets.join("model")).unwrap();
        for f in std::fs::read_dir(&ckpt).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, family_assets.join("model").join(f.file_name().unwrap())).unwrap();
        }
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(
                assets.join("model").join(f),
                family_assets.join("model").join(f),
            )
            .unwrap();
        }
        let base = ["--lora_dropout", "0.1", "--epochs", "1"];
        let steps = |n: &'static str| [&base[..], &["--max_steps", n]].concat();
        train_ranks(&family_assets, &dir.join("one"), 1, &steps("8"));
        train_ranks(&family_assets, &dir.join("two"), 2, &steps("8"));
        train_ranks(&family_assets, &dir.join("resumed"), 1, &steps("4"));
        let resumed = [&steps("8")[..], &["--resume", "auto"]].concat();
        train_ranks(&family_assets, &dir.join("resumed"), 1, &resumed);
        let adapter = |name: &str| adapter_of(&dir.join(name));
        let one = adapter("one");
        let summary = std::fs::read_to_string(dir.join("one/summary.json")).unwrap();
        assert!(summary.contains("\"steps\": 8"), "{family}: {summary}");
        for name in ["two", "resumed"] {
            let other = adapter(name);
            assert_eq!(one.len(), other.len(), "{family} {name}");
            let worst = one
                .iter()
                .map(|(k, t)| common::max_abs_diff(t, &other[k]))
                .fold(0.0f64, f64::max);
            eprintln!("{family}: {name} vs one process: max |Δw| = {worst:e}");
            assert!(
                worst < 1e-5,
                "{family}: {name} vs one process: max |Δw| = {worst:e}"
            );
            let (e1, e2) = (eval_rows(&dir.join("one")), eval_rows(&dir.join(name)));
            same_evaluation(
                e1.last().expect("an evaluation"),
                e2.last().expect("an evaluation"),
                &format!("{family} {name}"),
            );
        }
        // The steps trained: the adapter moved from its start.
        let moved = one
            .iter()
            .filter(|(k, _)| k.contains("lora_B"))
            .map(|(_, t)| common::max_abs(t))
            .fold(0.0f64, f64::max);
        assert!(moved > 1e-4, "{family}: LoRA B never moved ({moved:e})");

        // eval and predict on the family's adapter need no family flags.
        let flags = |cmd: &'static str, extra: &[String]| -> Vec<String> {
            let mut v: Vec<String> = [cmd, "--adapter"].iter().map(|s| s.to_string()).collect();
            v.push(dir.join("one/adapter").display().to_string());
            for (k, p) in [("--model_dir", "model"), ("--data_dir", "data")] {
                v.push(k.into());
                v.push(family_assets.join(p).display().to_string());
            }
            v.extend(["--split".to_string(), "validation".to_string()]);
            v.extend_from_slice(extra);
            v
        };
        let refs = |v: &[String]| -> String {
            common::run_ok(&v.iter().map(String::as_str).collect::<Vec<_>>())
        };
        let out = refs(&flags("eval", &[]));
        let last = eval_rows(&dir.join("one")).pop().unwrap();
        let acc: f64 = last[3].parse().unwrap();
        assert!(
            out.contains(&format!("accuracy {acc:.4}")),
            "{family}: {out} vs {last:?}"
        );
        let pred = dir.join("pred.csv");
        refs(&flags(
            "predict",
            &["--out".into(), pred.display().to_string()],
        ));
        let rows = common::csv_rows(&pred);
        assert_eq!(rows.len(), 1 + 100, "{family}: predict rows");
    }
}

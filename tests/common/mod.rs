//! Helpers shared by the integration tests: the oracle Python in `.venv`, the shared MRPC
//! data, scratch folders.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;

pub mod ranks;
pub mod server;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The venv that `make setup` made; oracles (transformers, peft, bitsandbytes, pyarrow) live there.
pub fn python() -> PathBuf {
    let venv = std::env::var("QLORA_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join(".venv"));
    venv.join("bin").join("python")
}

/// Runs `tests/oracles/<script>` with the venv's Python; panics with its stderr on failure.
pub fn oracle(script: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(root().join("tests").join("oracles").join(script))
        .args(args)
        .env("PYTHONHASHSEED", "0")
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .unwrap_or_else(|e| panic!("cannot run oracle {script}: {e}"));
    if !out.status.success() {
        panic!(
            "oracle {script} {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `../shared/data/mrpc` beside the checkout (or `QLORA_SHARED/data/mrpc`).
pub fn mrpc_dir() -> PathBuf {
    let shared = std::env::var("QLORA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("..").join("shared"));
    let dir = shared.join("data").join("mrpc");
    assert!(
        dir.join("train.tsv").exists(),
        "MRPC not found at {}; set QLORA_SHARED",
        dir.display()
    );
    dir
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// The `qlora-cls` binary cargo built for these tests.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_qlora-cls")
}

/// `qlora-cls demo-assets --out dir`: the tiny model and synthetic data, written by the binary.
pub fn demo_assets(dir: &Path) -> PathBuf {
    let out = Command::new(bin())
        .args(["demo-assets", "--out"])
        .arg(dir)
        .output()
        .expect("run qlora-cls demo-assets");
    assert!(
        out.status.success(),
        "demo-assets failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.to_path_buf()
}

/// Waits until `run/metrics.csv` holds more than `steps` training rows (the run is
/// mid-epoch), failing if `child` ends first or nothing is logged within 300 s.
pub fn wait_for_steps(run: &Path, child: &mut std::process::Child, steps: usize) {
    let start = std::time::Instant::now();
    loop {
        let rows = std::fs::read_to_string(run.join("metrics.csv"))
            .map_or(0, |s| s.lines().count().saturating_sub(1));
        if rows > steps {
            return;
        }
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "training ended before {steps} steps were logged"
        );
        assert!(
            start.elapsed() < std::time::Duration::from_secs(300),
            "no training steps logged in {}",
            run.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Tests that share torch's global generator (LoRA init, dropout reseeding) take turns.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `tests/oracles/<script> <command> DIR` into a fresh `DIR` under cargo's test tmp
/// folder (`name`) and returns `DIR`; callers keep it in a `OnceLock` to build it once.
pub fn oracle_fixtures(script: &str, command: &str, name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("fixture dir");
    oracle(script, &[command, dir.to_str().expect("utf-8 path")]);
    dir
}

/// Largest absolute difference of two tensors of the same shape, in f64.
pub fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    use tch::Kind;
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Largest absolute entry, in f64.
pub fn max_abs(a: &tch::Tensor) -> f64 {
    a.to_kind(tch::Kind::Double).abs().max().double_value(&[])
}

/// Cuts the last `bytes` bytes off a file (a download or copy that stopped early).
pub fn truncate_by(file: &Path, bytes: u64) {
    let len = std::fs::metadata(file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .set_len(len - bytes)
        .unwrap();
}

/// A configuration from `--key value` flags (no file), as the binary builds it.
pub fn config_from(flags: &[&str]) -> qlora_cls::config::Config {
    let args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    let overrides = qlora_cls::config::parse_flags(&args).expect("flags");
    qlora_cls::config::Config::load(None, &overrides)
        .expect("config")
        .0
}

/// The task `key value` config pairs describe, as `train` would build it.
pub fn task(flags: &[(&str, &str)]) -> qlora_cls::task::Task {
    let overrides: Vec<qlora_cls::config::Override> = flags
        .iter()
        .map(|(k, v)| qlora_cls::config::Override {
            key: k.to_string(),
            value: v.to_string(),
        })
        .collect();
    let (cfg, _) = qlora_cls::config::Config::load(None, &overrides).expect("config");
    cfg.to_task().expect("task")
}

/// Writes a PEFT adapter folder for the model of `cfg` whose LoRA pairs and head are random
/// and non-zero (N(0, 0.05²), fixed seed), so that merging it changes every targeted weight
/// the way a trained adapter does.
pub fn random_adapter(cfg: &qlora_cls::config::Config, out: &Path) {
    let loaded = qlora_cls::loader::load_model(cfg, tch::Device::Cpu).expect("load the model");
    tch::manual_seed(7);
    let params = loaded.model.trainable_parameters();
    tch::no_grad(|| {
        for (_, t) in &params {
            let mut t = t.shallow_clone();
            let r = t.randn_like() * 0.05;
            t.copy_(&r);
        }
    });
    qlora_cls::adapter::save(out, cfg, &params).expect("save the adapter");
}

/// The first `n` demo validation pairs rendered with the `perfect` prompt (lengths vary).
pub fn demo_texts(n: usize) -> Vec<String> {
    let p = qlora_cls::data::prompt::resolve_prompt("perfect").expect("prompt");
    qlora_cls::demo::demo_dataset()
        .1
        .iter()
        .take(n)
        .map(|ex| qlora_cls::data::prompt::render(&p, ex))
        .collect()
}

/// fp32 logits of `texts` (one padded batch) from the model with the adapter in `adapter`.
pub fn adapter_logits(
    cfg: &qlora_cls::config::Config,
    adapter: &Path,
    texts: &[String],
) -> tch::Tensor {
    use qlora_cls::data::batch::{collate, Encoded};
    let (loaded, _) =
        qlora_cls::loader::load_with_adapter(cfg, adapter).expect("load with adapter");
    let enc: Vec<Encoded> = loaded
        .encoder
        .encode_many(texts.to_vec())
        .expect("encode")
        .into_iter()
        .map(|ids| Encoded {
            ids,
            label: None,
            idx: 0,
            window: 0,
            rejected: None,
        })
        .collect();
    let b = collate(&enc.iter().collect::<Vec<_>>(), loaded.encoder.pad_id());
    loaded
        .model
        .logits(&b.input_ids, &b.attention_mask)
        .expect("logits")
}

/// Runs the binary; panics with its output unless it succeeds. Returns standard output.
pub fn run_ok(args: &[&str]) -> String {
    let out = Command::new(bin())
        .args(args)
        .output()
        .expect("run qlora-cls");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "qlora-cls {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The comma-separated fields of each line of a CSV file the binary wrote.
pub fn csv_rows(path: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

/// `predict`'s CSV (`index,prediction,prob_0…`): the probabilities by row, in index order.
pub fn predicted_probabilities(path: &Path) -> Vec<Vec<f64>> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut rows: Vec<(i64, Vec<f64>)> = text
        .lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            (
                c[0].parse().unwrap(),
                c[2..].iter().map(|x| x.parse().unwrap()).collect(),
            )
        })
        .collect();
    rows.sort_by_key(|r| r.0);
    rows.into_iter().map(|r| r.1).collect()
}

//! `plot` reads sweep folders and draws the loss, accuracy per epoch (one line per prompt,
//! the untrained baseline flat) and a Markdown table.
mod common;
use std::path::Path;

fn fake_run(dir: &Path, prompt: &str, accs: &[f64], trained: bool) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        format!("{{\"prompt\": \"{prompt}\"}}"),
    )
    .unwrap();
    let mut ev = String::from("epoch,split,loss,accuracy,f1\n");
    for (e, a) in accs.iter().enumerate() {
        ev.push_str(&format!("{e},validation,{},{a},{}\n", 1.0 - a, a - 0.05));
    }
    std::fs::write(dir.join("eval.csv"), ev).unwrap();
    if trained {
        let mut m =
            String::from("step,epoch,loss,lr,grad_norm,tokens_per_s,elapsed_s,peak_mem_bytes\n");
        for s in 1..=200 {
            m.push_str(&format!(
                "{s},{},{},1e-4,1.0,100.0,{s}.0,1000\n",
                s as f64 / 50.0,
                0.7 / (1.0 + s as f64 / 50.0)
            ));
        }
        std::fs::write(dir.join("metrics.csv"), m).unwrap();
    }
}

#[test]
fn sweep_folders_become_pngs_svgs_and_a_table() {
    let tmp = common::tempdir();
    let runs = tmp.path().join("runs");
    fake_run(
        &runs.join("demo-perfect"),
        "perfect",
        &[0.55, 0.8, 0.88],
        true,
    );
    fake_run(&runs.join("demo-none"), "none", &[0.55, 0.7, 0.75], true);
    fake_run(&runs.join("baseline-perfect"), "perfect", &[0.55], false);
    std::fs::create_dir_all(runs.join("demo-assets")).unwrap(); // not a run: skipped
    let out = tmp.path().join("plots");
    let written = qlora_cls::plot::plot(&runs, &out).unwrap();
    assert_eq!(written.len(), 5);
    for f in [
        "loss.png",
        "loss.svg",
        "accuracy.png",
        "accuracy.svg",
        "results.md",
    ] {
        let meta = std::fs::metadata(out.join(f)).unwrap();
        assert!(
            meta.len() > 1000 || f == "results.md",
            "{f} is only {} bytes",
            meta.len()
        );
    }
    let png = std::fs::read(out.join("accuracy.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let svg = std::fs::read_to_string(out.join("accuracy.svg")).unwrap();
    for label in [
        "demo-perfect (perfect)",
        "demo-none (none)",
        "untrained baseline",
    ] {
        assert!(
            svg.contains(label),
            "accuracy.svg lacks the legend {label:?}"
        );
    }
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("| demo-perfect | perfect | 55.00% | 88.00% | 83.00% | 88.00% |"),
        "{md}"
    );
    assert!(
        md.contains("| baseline-perfect | perfect | 55.00% | 55.00% |"),
        "{md}"
    );
    // No temporary files are left behind.
    for e in std::fs::read_dir(&out).unwrap().flatten() {
        assert!(
            !e.file_name().to_string_lossy().starts_with('.'),
            "{:?}",
            e.file_name()
        );
    }
}

#[test]
fn no_runs_is_a_clear_error() {
    let tmp = common::tempdir();
    let err = qlora_cls::plot::plot(tmp.path(), &tmp.path().join("plots")).unwrap_err();
    assert!(format!("{err:#}").contains("no run folders"), "{err:#}");
}

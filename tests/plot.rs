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

/// `qlora-cls plot --scaling scaling.csv --out DIR`, through the binary: the bench's scaling
/// rows become tokens/s and memory against the sequence length and tokens/s against the
/// batch size, as PNG and SVG.
#[test]
fn scaling_csv_becomes_charts_through_the_binary() {
    let tmp = common::tempdir();
    let csv = tmp.path().join("scaling.csv");
    let mut text = String::from("impl,seq,batch,tokens_per_s,peak_rss_bytes,tokens,step_s\n");
    for (who, speed, mem) in [("ours", 900.0, 1.0e9), ("reference", 600.0, 1.6e9)] {
        for (seq, batch) in [(128, 8), (512, 8), (2048, 8), (128, 1), (128, 32)] {
            let tok = seq * batch;
            let tps = speed * (128.0 / seq as f64).sqrt() * (batch as f64 / 8.0).powf(0.2);
            let rss = mem * (1.0 + (seq * batch) as f64 / 4096.0);
            text.push_str(&format!(
                "{who},{seq},{batch},{tps},{rss},{tok},{}\n",
                tok as f64 / tps
            ));
        }
    }
    std::fs::write(&csv, text).unwrap();
    let out = tmp.path().join("plots");
    let res = std::process::Command::new(common::bin())
        .args(["plot", "--scaling"])
        .arg(&csv)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run qlora-cls plot");
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "plot --scaling failed: {stdout}\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
    for name in ["scaling_tokens_per_s", "scaling_memory", "scaling_batch"] {
        let png = std::fs::read(out.join(format!("{name}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{name}.png is not a PNG");
        assert!(png.len() > 1000, "{name}.png is only {} bytes", png.len());
        let svg = std::fs::read_to_string(out.join(format!("{name}.svg"))).unwrap();
        assert!(
            svg.trim_start().starts_with("<svg"),
            "{name}.svg: {}",
            &svg[..svg.len().min(80)]
        );
        assert!(
            svg.trim_end().ends_with("</svg>"),
            "{name}.svg is truncated"
        );
        for legend in ["ours", "reference"] {
            assert!(
                svg.contains(legend),
                "{name}.svg lacks the legend {legend:?}"
            );
        }
        assert!(
            stdout.contains(&format!("{name}.png")) && stdout.contains(&format!("{name}.svg")),
            "the paths are not printed: {stdout}"
        );
    }
    assert!(std::fs::read_to_string(out.join("scaling_memory.svg"))
        .unwrap()
        .contains("Peak resident memory vs sequence length (batch 8)"));
}

#[test]
fn a_bad_scaling_csv_names_the_file_and_line() {
    let tmp = common::tempdir();
    let csv = tmp.path().join("scaling.csv");
    std::fs::write(
        &csv,
        "impl,seq,batch,tokens_per_s,peak_rss_bytes\nours,128,8,900,1e9\nours,512,8,fast,1e9\n",
    )
    .unwrap();
    let res = std::process::Command::new(common::bin())
        .args(["plot", "--scaling"])
        .arg(&csv)
        .arg("--out")
        .arg(tmp.path().join("plots"))
        .output()
        .expect("run qlora-cls plot");
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains(&format!("{}:3", csv.display())) && err.contains("tokens_per_s"),
        "{err}"
    );
    // A header without a needed column.
    std::fs::write(&csv, "impl,seq,tokens_per_s\nours,128,900\n").unwrap();
    let err = qlora_cls::plot::read_scaling(&csv).unwrap_err();
    assert!(format!("{err:#}").contains("no column `batch`"), "{err:#}");
}

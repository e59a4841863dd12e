//! Every metric of `qlora_cls::metrics` against scikit-learn / scipy
//! (`tests/oracles/metrics_oracle.py`) on random and edge-case predictions, to 1e-12.
mod common;

use qlora_cls::metrics::{compute, Metric, Predictions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

/// Random class ids below `k`, `n` of them.
fn ids(rng: &mut ChaCha8Rng, n: usize, k: i64) -> Vec<i64> {
    (0..n).map(|_| rng.gen_range(0..k)).collect()
}

fn class_cases(rng: &mut ChaCha8Rng) -> Vec<(Vec<i64>, Vec<i64>)> {
    let mut cases = vec![
        // A single class everywhere: MCC undefined (0), no positives for F1.
        (vec![0, 0, 0], vec![0, 0, 0]),
        (vec![1, 1, 1, 1], vec![1, 1, 1, 1]),
        // All wrong, binary and multi-class.
        (vec![1, 0, 1, 0], vec![0, 1, 0, 1]),
        (vec![1, 2, 0, 1], vec![0, 0, 2, 2]),
        // No predicted positive; no gold positive.
        (vec![0, 0, 0, 0], vec![1, 0, 1, 0]),
        (vec![1, 0, 1, 1], vec![0, 0, 0, 0]),
        // A class only predicted, a class only in the labels.
        (vec![0, 1, 1, 3], vec![0, 0, 1, 2]),
        // Perfect multi-class; one example.
        (vec![2, 0, 1, 2], vec![2, 0, 1, 2]),
        (vec![1], vec![0]),
    ];
    for i in 0..40 {
        let n = rng.gen_range(1..60);
        let k = 2 + i % 4;
        let gold = ids(rng, n, k);
        // Mostly right, so the figures are not all near chance.
        let pred = gold
            .iter()
            .map(|&g| {
                if rng.gen_bool(0.6) {
                    g
                } else {
                    rng.gen_range(0..k)
                }
            })
            .collect();
        cases.push((pred, gold));
    }
    cases
}

/// Multi-hot rows, one flag per label.
type Rows = Vec<Vec<bool>>;

fn multihot_cases(rng: &mut ChaCha8Rng) -> Vec<(Rows, Rows)> {
    let rows = |v: &[&[u8]]| -> Rows {
        v.iter()
            .map(|r| r.iter().map(|&b| b == 1).collect())
            .collect()
    };
    let mut cases = vec![
        // Nothing true nor predicted anywhere.
        (rows(&[&[0, 0], &[0, 0]]), rows(&[&[0, 0], &[0, 0]])),
        // Nothing predicted.
        (
            rows(&[&[0, 0, 0], &[0, 0, 0]]),
            rows(&[&[1, 0, 0], &[0, 1, 1]]),
        ),
        // All wrong; perfect with a label column never used.
        (rows(&[&[0, 1], &[1, 0]]), rows(&[&[1, 0], &[0, 1]])),
        (
            rows(&[&[1, 0, 0], &[1, 1, 0]]),
            rows(&[&[1, 0, 0], &[1, 1, 0]]),
        ),
    ];
    for i in 0..30 {
        let n = rng.gen_range(1..40);
        let width = 2 + i % 5;
        let density = rng.gen_range(0.1..0.6);
        let gold: Rows = (0..n)
            .map(|_| (0..width).map(|_| rng.gen_bool(density)).collect())
            .collect();
        let pred = gold
            .iter()
            .map(|r| {
                r.iter()
                    .map(|&b| if rng.gen_bool(0.8) { b } else { !b })
                    .collect()
            })
            .collect();
        cases.push((pred, gold));
    }
    cases
}

fn value_cases(rng: &mut ChaCha8Rng) -> Vec<(Vec<f64>, Vec<f64>)> {
    let mut cases = vec![
        // Constant inputs: undefined (NaN) in scipy.
        (vec![1.0, 1.0, 1.0], vec![0.5, 2.0, 3.0]),
        (vec![0.5, 2.0, 3.0], vec![4.0, 4.0, 4.0]),
        // Ties, a perfect monotone but non-linear relation, a reversal, two points.
        (
            vec![1.0, 2.0, 2.0, 3.0, 3.0, 3.0],
            vec![0.1, 0.3, 0.2, 0.2, 0.9, 0.2],
        ),
        (vec![1.0, 2.0, 3.0, 4.0], vec![1.0, 8.0, 27.0, 64.0]),
        (vec![1.0, 2.0, 3.0], vec![3.0, 2.0, 1.0]),
        (vec![0.0, 1.0], vec![5.0, -5.0]),
        // One point: scipy refuses, we give NaN.
        (vec![1.0], vec![2.0]),
    ];
    for i in 0..30 {
        let n = rng.gen_range(2..80);
        let gold: Vec<f64> = (0..n).map(|_| rng.gen_range(0.0..5.0)).collect();
        let mut pred: Vec<f64> = gold
            .iter()
            .map(|g| g + rng.gen_range(-1.5..1.5) + 1000.0 * (i % 2) as f64)
            .collect();
        if i % 3 == 0 {
            // STS-B-like scores rounded to a few levels: many ties.
            for p in &mut pred {
                *p = (*p * 2.0).round() / 2.0;
            }
        }
        cases.push((pred, gold));
    }
    cases
}

fn expected<'a>(out: &'a Value, kind: &str, i: usize, key: &str) -> &'a Value {
    &out[kind][i][key]
}

fn close(got: f64, want: &Value, what: &str) {
    match want.as_f64() {
        Some(w) => assert!(
            (got - w).abs() <= 1e-12,
            "{what}: ours {got:e}, sklearn/scipy {w:e}"
        ),
        None => assert!(got.is_nan(), "{what}: ours {got}, scipy NaN or refused"),
    }
}

#[test]
fn metrics_match_sklearn_and_scipy() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let classes = class_cases(&mut rng);
    let multihot = multihot_cases(&mut rng);
    let values = value_cases(&mut rng);
    let to_json = |v: &[(Vec<i64>, Vec<i64>)]| -> Vec<Value> {
        v.iter()
            .map(|(p, g)| json!({"pred": p, "gold": g}))
            .collect()
    };
    let bits = |rows: &[Vec<bool>]| -> Vec<Vec<u8>> {
        rows.iter()
            .map(|r| r.iter().map(|&b| u8::from(b)).collect())
            .collect()
    };
    let cases = json!({
        "classes": to_json(&classes),
        "multihot": multihot.iter().map(|(p, g)| json!({"pred": bits(p), "gold": bits(g)})).collect::<Vec<_>>(),
        "values": values.iter().map(|(p, g)| json!({"pred": p, "gold": g})).collect::<Vec<_>>(),
    });
    let dir = common::tempdir();
    std::fs::write(dir.path().join("cases.json"), cases.to_string()).unwrap();
    common::oracle("metrics_oracle.py", &[dir.path().to_str().unwrap()]);
    let out: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("expected.json")).unwrap())
            .unwrap();

    let check = |kind: &str, i: usize, preds: Predictions, metrics: &[Metric]| {
        for (m, got) in compute(metrics, &preds).unwrap() {
            close(
                got,
                expected(&out, kind, i, m.key()),
                &format!("{kind} case {i} {m}"),
            );
        }
    };
    for (i, (pred, gold)) in classes.into_iter().enumerate() {
        let metrics = [
            Metric::Accuracy,
            Metric::F1,
            Metric::MatthewsCorrelation,
            Metric::MacroF1,
        ];
        check("classes", i, Predictions::Classes { pred, gold }, &metrics);
    }
    for (i, (pred, gold)) in multihot.into_iter().enumerate() {
        let metrics = [Metric::MicroF1, Metric::MacroF1, Metric::ExactMatch];
        check(
            "multihot",
            i,
            Predictions::MultiHot { pred, gold },
            &metrics,
        );
    }
    for (i, (pred, gold)) in values.into_iter().enumerate() {
        let metrics = [Metric::Pearson, Metric::Spearmanr];
        check("values", i, Predictions::Values { pred, gold }, &metrics);
    }
}

//! `qlora_cls::model::loss` against transformers' `LlamaForSequenceClassification` loss for
//! each `problem_type` and against torch's weighted losses (`tests/oracles/loss_oracle.py`):
//! the loss and d(loss)/d(logits), batch sizes 1 and 5, to 1e-6.
mod common;

use qlora_cls::model::loss::{loss, LossWeights, ProblemType};
use serde_json::json;
use tch::{Device, Kind, Tensor};

struct Case {
    name: String,
    problem: ProblemType,
    num_labels: i64,
    logits: Tensor,
    targets: Tensor,
    weights: LossWeights,
}

fn cases() -> Vec<Case> {
    tch::manual_seed(12);
    let opts = (Kind::Float, Device::Cpu);
    let mut cases = Vec::new();
    for batch in [1i64, 5] {
        for weighted in [false, true] {
            let tag = if weighted { "w" } else { "u" };
            let per_class = |k: usize| {
                if weighted {
                    // Uneven weights, one of them zero, so a wrong weighting shows.
                    LossWeights::PerClass((0..k).map(|c| [0.5, 2.0, 0.0, 1.25][c % 4]).collect())
                } else {
                    LossWeights::None
                }
            };
            let k = 4;
            let ids = Tensor::randint(k, [batch], (Kind::Int64, Device::Cpu));
            // Make sure class 2 (weight 0 when weighted) never takes all the targets.
            let _ = ids.get(0).fill_(1);
            cases.push(Case {
                name: format!("single_{tag}_{batch}"),
                problem: ProblemType::SingleLabel,
                num_labels: k,
                logits: Tensor::randn([batch, k], opts) * 2.0,
                targets: ids.copy(),
                weights: per_class(k as usize),
            });
            if batch > 1 {
                let _ = ids.get(batch - 1).fill_(-100);
                cases.push(Case {
                    name: format!("single_ignore_{tag}_{batch}"),
                    problem: ProblemType::SingleLabel,
                    num_labels: k,
                    logits: Tensor::randn([batch, k], opts) * 2.0,
                    targets: ids,
                    weights: per_class(k as usize),
                });
            }
            let k = 3;
            cases.push(Case {
                name: format!("multi_{tag}_{batch}"),
                problem: ProblemType::MultiLabel,
                num_labels: k,
                logits: Tensor::randn([batch, k], opts) * 2.0,
                targets: Tensor::rand([batch, k], opts).ge(0.5).to_kind(Kind::Float),
                weights: per_class(k as usize),
            });
        }
        // One output with [batch] or [batch, 1] targets (both squeezed), and three outputs.
        let shapes: [(&str, i64, &[i64]); 3] = [
            ("regression", 1, &[batch]),
            ("regression_col", 1, &[batch, 1]),
            ("regression_multi", 3, &[batch, 3]),
        ];
        for (name, k, target_shape) in shapes {
            cases.push(Case {
                name: format!("{name}_{batch}"),
                problem: ProblemType::Regression,
                num_labels: k,
                logits: Tensor::randn([batch, k], opts),
                targets: Tensor::randn(target_shape, opts) * 3.0,
                weights: LossWeights::None,
            });
        }
    }
    cases
}

#[test]
fn losses_match_transformers_and_torch() {
    let cases = cases();
    let dir = common::tempdir();
    let mut named: Vec<(String, Tensor)> = Vec::new();
    let mut listing = Vec::new();
    for c in &cases {
        named.push((format!("{}.logits", c.name), c.logits.shallow_clone()));
        named.push((format!("{}.targets", c.name), c.targets.shallow_clone()));
        if let LossWeights::PerClass(w) = &c.weights {
            named.push((
                format!("{}.weights", c.name),
                Tensor::from_slice(w).to_kind(Kind::Float),
            ));
        }
        listing.push(json!({
            "name": c.name,
            "problem_type": c.problem.as_str(),
            "num_labels": c.num_labels,
            "weighted": c.weights != LossWeights::None,
        }));
    }
    Tensor::write_safetensors(&named, dir.path().join("input.safetensors")).unwrap();
    std::fs::write(dir.path().join("cases.json"), json!(listing).to_string()).unwrap();
    common::oracle("loss_oracle.py", &[dir.path().to_str().unwrap()]);
    let expected: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("expected.safetensors"))
            .unwrap()
            .into_iter()
            .collect();

    for c in &cases {
        let logits = c.logits.copy().set_requires_grad(true);
        let out = loss(&logits, &c.targets, c.problem, &c.weights).unwrap();
        out.backward();
        let want_loss = &expected[&format!("{}.loss", c.name)];
        let want_grad = &expected[&format!("{}.grad", c.name)];
        let dl = (out.double_value(&[]) - want_loss.double_value(&[])).abs();
        let dg = common::max_abs_diff(&logits.grad(), want_grad);
        assert!(dl < 1e-6, "{}: loss differs by {dl:e}", c.name);
        assert!(dg < 1e-6, "{}: gradient differs by {dg:e}", c.name);
        assert!(
            common::max_abs(&logits.grad()) > 0.0,
            "{}: no gradient",
            c.name
        );
        assert_eq!(out.kind(), Kind::Float, "{}", c.name);
    }
}

/// The weighted cross-entropy is the weighted mean, not the plain mean of weighted terms.
#[test]
fn weighted_cross_entropy_is_a_weighted_mean() {
    let logits = Tensor::from_slice(&[0.0f32, 0.0, 0.0, 0.0]).reshape([2, 2]);
    let targets = Tensor::from_slice(&[0i64, 1]);
    let w = LossWeights::PerClass(vec![1.0, 3.0]);
    let got = loss(&logits, &targets, ProblemType::SingleLabel, &w).unwrap();
    // Each term is ln 2; (1 ln2 + 3 ln2) / (1 + 3) = ln 2.
    assert!((got.double_value(&[]) - 2f64.ln()).abs() < 1e-7);
}

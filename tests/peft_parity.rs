//! The training step and the adapter files against the reference stack: transformers'
//! LlamaForSequenceClassification under PEFT LoRA, bitsandbytes' AdamW8bit (and 4-bit NF4
//! base), transformers' linear warmup schedule. tests/oracles/peft_oracle.py builds a tiny
//! random Llama and runs the reference.
mod common;
use common::{max_abs, max_abs_diff};

use qlora_cls::adapter;
use qlora_cls::config::{Checkpointing, Config};
use qlora_cls::data::batch::Encoded;
use qlora_cls::eval;
use qlora_cls::loader;
use qlora_cls::model::classifier::LlamaClassifier;
use qlora_cls::model::hf_config::peft_param_line;
use qlora_cls::optim::adamw8bit::{dynamic_map, AdamW8bit, AdamWConfig, Optimizer, MIN_8BIT_SIZE};
use qlora_cls::optim::schedule::{linear_warmup_multiplier, warmup_steps};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

/// The oracle's output (model, inputs, reference runs), built once per test run.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::oracle_fixtures("peft_oracle.py", "setup", "peft_oracle"))
}

/// The oracle's output for another decoder family, built once per family and test run.
fn family_fixtures(family: &str) -> PathBuf {
    fixtures_for(family, None)
}

/// [`family_fixtures`], trained by the oracle with its LoRA `variant` (`options`).
fn fixtures_for(family: &str, variant: Option<&str>) -> PathBuf {
    static DIRS: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut dirs = DIRS.lock().unwrap_or_else(|e| e.into_inner());
    let name = match variant {
        Some(v) => format!("{family}_{v}"),
        None => family.to_string(),
    };
    if let Some((_, d)) = dirs.iter().find(|(f, _)| *f == name) {
        return d.clone();
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("peft_oracle_{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("fixture dir");
    common::oracle(
        "peft_oracle.py",
        &[
            &["setup", dir.to_str().expect("utf-8 path"), family][..],
            variant.as_slice(),
        ]
        .concat(),
    );
    dirs.push((name, dir.clone()));
    dir
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    adapter::read_safetensors(path).unwrap_or_else(|e| panic!("{e:#}"))
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

struct Facts {
    lr: f64,
    warmup: usize,
    total: usize,
    steps: usize,
    warmup_ratio: f64,
    num_labels: i64,
    pad: i64,
    r: i64,
    alpha: f64,
    targets: Vec<String>,
    /// The oracle's other LoRA options (`use_rslora`, `rank_pattern`, `alpha_pattern`).
    lora: serde_json::Value,
    peft_line_nf4: String,
    lora_fields: Vec<String>,
}

fn facts() -> Facts {
    facts_in(fixtures())
}

fn facts_in(root: &Path) -> Facts {
    let f = json(&root.join("facts.json"));
    let num = |k: &str| f[k].as_f64().unwrap_or_else(|| panic!("facts.{k}"));
    let strs = |k: &str| -> Vec<String> {
        f[k].as_array()
            .unwrap_or_else(|| panic!("facts.{k}"))
            .iter()
            .map(|v| v.as_str().expect("string").to_string())
            .collect()
    };
    Facts {
        lr: num("lr"),
        warmup: num("warmup") as usize,
        total: num("total") as usize,
        steps: num("steps") as usize,
        warmup_ratio: num("warmup_ratio"),
        num_labels: num("num_labels") as i64,
        pad: num("pad") as i64,
        r: num("r") as i64,
        alpha: num("lora_alpha"),
        targets: strs("targets"),
        lora: f["lora"].clone(),
        peft_line_nf4: f["peft_line_nf4"].as_str().expect("line").to_string(),
        lora_fields: strs("lora_config_fields"),
    }
}

/// The trainer's configuration for the oracle's setup (CPU, fp32 compute, no dropout).
fn config(nf4: bool) -> Config {
    config_in(fixtures(), nf4)
}

fn config_in(root: &Path, nf4: bool) -> Config {
    let f = facts_in(root);
    let patterns = |key: &str| -> Vec<(String, f64)> {
        f.lora[key]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.as_f64().expect("a number")))
            .collect()
    };
    Config {
        use_rslora: f.lora["use_rslora"].as_bool().unwrap_or(false),
        use_dora: f.lora["use_dora"].as_bool().unwrap_or(false),
        init_lora_weights: match &f.lora["init_lora_weights"] {
            serde_json::Value::String(s) => s.clone(),
            _ => "true".into(),
        },
        loftq_iter: f.lora["loftq_config"]["loftq_iter"].as_i64().unwrap_or(1),
        rank_pattern: patterns("rank_pattern")
            .into_iter()
            .map(|(k, v)| (k, v as i64))
            .collect(),
        alpha_pattern: patterns("alpha_pattern").into_iter().collect(),
        model_dir: Some(root.join("base")),
        device: "cpu".into(),
        bnb_4bit_compute_dtype: "float32".into(),
        load_in_4bit: nf4,
        num_classes: f.num_labels,
        r: f.r,
        lora_alpha: f.alpha,
        lora_dropout: 0.0,
        target_modules: f.targets.clone(),
        lr: f.lr,
        warmup_ratio: f.warmup_ratio,
        weight_decay: 0.01,
        optimizer: "adamw8bit".into(),
        // Checkpointing recomputes each layer in the backward; cover both paths.
        gradient_checkpointing: if nf4 {
            Checkpointing::Recompute
        } else {
            Checkpointing::Keep
        },
        ..Config::default()
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).double_value(&[0])
}

fn f64s(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.to_kind(Kind::Double).reshape([-1])).expect("values")
}

fn i64s(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(&t.to_kind(Kind::Int64).reshape([-1])).expect("values")
}

const F32_EPS: f64 = f32::EPSILON as f64;

/// What one optimizer step of ours produced.
struct Step {
    loss: f64,
    lr: f64,
    logits: Tensor,
    /// Gradients of this step (before the update), by PEFT key.
    grads: HashMap<String, Tensor>,
    /// Parameters after the update, by PEFT key.
    params: HashMap<String, Tensor>,
    /// (m, v) after the update, dequantized, by PEFT key.
    states: HashMap<String, (Tensor, Tensor)>,
    /// The 8-bit tensors' raw states (`state1`, `state2` codes, `absmax1`, `absmax2`), by
    /// "<raw>.<key>".
    raw: HashMap<String, Tensor>,
}

/// Our model and optimizer as the trainer builds them (train.rs), from the oracle's initial
/// LoRA/head weights.
struct Ours {
    root: PathBuf,
    cfg: Config,
    model: LlamaClassifier,
    keys: Vec<String>,
    opt: AdamW8bit,
    warmup: usize,
}

impl Ours {
    fn new_in(root: &Path, nf4: bool) -> Ours {
        let f = facts_in(root);
        let cfg = config_in(root, nf4);
        let opts = loader::model_options(&cfg, Device::Cpu, f.pad).expect("options");
        let mut model = one_thread(|| LlamaClassifier::load(&root.join("base"), &opts))
            .unwrap_or_else(|e| panic!("load: {e:#}"));
        let init = read(&root.join("init.safetensors"));
        model
            .load_trainable(&|k: &str| init.get(k).map(|t| t.shallow_clone()))
            .unwrap_or_else(|e| panic!("load_trainable: {e:#}"));
        let named = model.trainable_parameters();
        let keys: Vec<String> = named.iter().map(|(k, _)| k.clone()).collect();
        let (mut a, mut b): (Vec<&String>, Vec<&String>) =
            (keys.iter().collect(), init.keys().collect());
        a.sort();
        b.sort();
        assert_eq!(a, b, "our trainable tensors are not PEFT's");
        let opt = AdamW8bit::new(
            named.into_iter().map(|(_, p)| p).collect(),
            AdamWConfig {
                weight_decay: cfg.weight_decay,
                ..AdamWConfig::default()
            },
        );
        // The trainer's warmup: ceil(total * ratio), as TrainingArguments computes it.
        let warmup = warmup_steps(f.total, cfg.warmup_ratio);
        assert_eq!(warmup, f.warmup, "warmup steps");
        Ours {
            root: root.to_path_buf(),
            cfg,
            model,
            keys,
            opt,
            warmup,
        }
    }

    /// Puts the reference's parameters and bitsandbytes' optimizer state after step `s`
    /// into our model and optimizer, so that the next step starts where PEFT's did.
    fn load_reference_state(&mut self, reference: &HashMap<String, Tensor>, s: usize) {
        let get = |k: &str| {
            reference
                .get(&format!("s{s}.param.{k}"))
                .map(|t| t.shallow_clone())
        };
        self.model
            .load_trainable(&get)
            .unwrap_or_else(|e| panic!("loading PEFT's parameters: {e:#}"));
        let mut states: HashMap<String, Tensor> = HashMap::new();
        for (i, k) in self.keys.iter().enumerate() {
            let key = |raw: &str| format!("s{s}.{raw}.{k}");
            if reference.contains_key(&key("state1")) {
                for raw in ["state1", "state2", "absmax1", "absmax2"] {
                    states.insert(format!("{i}.{raw}"), reference[&key(raw)].shallow_clone());
                }
            } else {
                states.insert(format!("{i}.state1"), reference[&key("m")].shallow_clone());
                states.insert(format!("{i}.state2"), reference[&key("v")].shallow_clone());
            }
            states.insert(format!("{i}.step"), Tensor::from_slice(&[s as i64 + 1]));
        }
        states.insert("step".into(), Tensor::from_slice(&[s as i64 + 1]));
        self.opt
            .load_state_tensors(&|n: &str| states.get(n).map(|t| t.shallow_clone()))
            .unwrap_or_else(|e| panic!("loading bitsandbytes' state: {e:#}"));
    }

    /// One step of train.rs' loop: the schedule's lr, forward_backward, AdamW8bit, zero_grad.
    fn step(&mut self, s: usize) -> Step {
        let f = facts_in(&self.root);
        let inputs = read(&self.root.join("inputs.safetensors"));
        let lr = self.cfg.lr * linear_warmup_multiplier(s, self.warmup, f.total);
        self.model.set_dropout_step(s as u64);
        let (loss, logits) = self
            .model
            .forward_backward(
                &inputs[&format!("b{s}_ids")],
                &inputs[&format!("b{s}_mask")],
                &inputs[&format!("b{s}_labels")],
            )
            .unwrap_or_else(|e| panic!("step {s}: {e:#}"));
        let named = self.model.trainable_parameters();
        let grads = named
            .iter()
            .map(|(k, p)| (k.clone(), p.grad().copy()))
            .collect();
        self.opt
            .step(lr)
            .unwrap_or_else(|e| panic!("optimizer step {s}: {e:#}"));
        self.opt.zero_grad();
        let params = named
            .iter()
            .map(|(k, p)| (k.clone(), p.detach().copy()))
            .collect();
        let states = self
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), self.opt.dequantized_states(i)))
            .collect();
        let mut raw = HashMap::new();
        for (name, t) in self.opt.state_tensors() {
            if let Some((i, what)) = name.split_once('.') {
                if t.kind() == Kind::Uint8 || what.starts_with("absmax") {
                    let i: usize = i.parse().expect("state index");
                    raw.insert(format!("{what}.{}", self.keys[i]), t);
                }
            }
        }
        Step {
            loss,
            lr,
            logits,
            grads,
            params,
            states,
            raw,
        }
    }
}

/// Codes of an 8-bit state that differ from bitsandbytes', and the largest difference in
/// position among the codes the quantizer can produce (1 = neighbours: near zero its
/// 65536-bin lookup is coarser than the dynamic map, so some codes are never chosen and the
/// two sides of one bin edge can be two map positions apart).
struct CodeDiff {
    flipped: Vec<bool>,
    count: usize,
    max_step: i64,
}

/// The positions of `code` (sorted) that bitsandbytes' CPU quantizer chooses for some input:
/// bin i of 65536 stands for 2i/65535 − 1 and gets the number of code midpoints below it
/// (kernels/optim8bit.h).
fn reachable_codes(code: &[f32]) -> Vec<i64> {
    let mids: Vec<f64> = code
        .windows(2)
        .map(|w| (w[0] as f64 + w[1] as f64) / 2.0)
        .collect();
    let mut seen: Vec<i64> = (0..65536)
        .map(|i| mids.partition_point(|&m| m < 2.0 * i as f64 / 65535.0 - 1.0) as i64)
        .collect();
    seen.dedup();
    seen
}

fn code_diff(ours: &Tensor, theirs: &Tensor, reachable: &[i64]) -> CodeDiff {
    let (a, b) = (i64s(ours), i64s(theirs));
    assert_eq!(a.len(), b.len(), "code counts differ");
    let flipped: Vec<bool> = a.iter().zip(&b).map(|(x, y)| x != y).collect();
    let step = |x: i64, y: i64| {
        let (lo, hi) = (x.min(y), x.max(y));
        reachable.iter().filter(|&&c| lo < c && c <= hi).count() as i64
    };
    CodeDiff {
        count: flipped.iter().filter(|&&f| f).count(),
        max_step: a
            .iter()
            .zip(&b)
            .map(|(x, y)| step(*x, *y))
            .max()
            .unwrap_or(0),
        flipped,
    }
}

/// The reference's tensors of step `s`.
fn rget<'a>(reference: &'a HashMap<String, Tensor>, s: usize, what: &str, key: &str) -> &'a Tensor {
    reference
        .get(&format!("s{s}.{what}.{key}"))
        .unwrap_or_else(|| panic!("the reference has no s{s}.{what}.{key}"))
}

/// One step of ours against the reference's step `s`, both starting from the same
/// parameters and optimizer state. What may differ, and by how much:
/// * the forward and backward sum in other orders (threads, blocking, fused kernels): fp32
///   round-off, measured ~1e-7 relative on loss, logits and gradients; we allow 5e-6 of
///   the loss, 1e-5 on the O(1) logits and 1e-5 of each gradient tensor's largest entry;
/// * bitsandbytes' update takes the new m, v in fp32 before quantizing them, so the
///   parameter update sees the gradient's round-off and one thing more: torch's CPU sqrt
///   (MKL) is not correctly rounded, ours is (1 ulp in √v for ~0.6% of elements, see
///   tests/optim.rs). Both move the update u = m̂/(√v̂+ε), |u| ≲ 3.2, by a relative ~1e-6
///   where the element's gradient is near its tensor's largest, proportionally more where
///   it is smaller (measured up to ~5e-5·lr), and p + lr·u rounds to within an ulp either
///   way: |Δp| ≤ 4ε|p| + 3e-4·lr covers elements down to ~1% of the largest gradient.
///   Below that the element's own relative round-off |Δg|/|g| dominates: from a state, u's
///   sensitivity is bounded by |∂u/∂g| ≤ ((1−β₁)/c₁ + |u|(1−β₂)/c₂·|g|²/v̂)/√v̂ ≤ ~4/|g|
///   (√v̂ ≥ |g|·√((1−β₂)/c₂)), so such elements get 8·lr·|Δg|/|g| more (twice the bound);
/// * the fp32 states m, v are gradient-linear: 1e-5 of the tensor's largest m, 3e-5 of v
///   (v = β₂v + (1−β₂)g², whose round-off doubles the gradient's);
/// * the 8-bit states: their block absmax (a max of fp32 values) within `tight` of the
///   tensor's largest (2× for v); a code differs only where the new state lies within
///   round-off of a decision boundary between two neighbouring codes, so each differing
///   code is a neighbour (one position among the codes the quantizer can choose), they
///   are rare (≤ 0.5% of a tensor), and the dequantized state differs by at most that one
///   code gap; elsewhere the dequantized values differ only through absmax.
///
/// `tight` is the fp32 round-off allowed, relative to each tensor's largest element (1e-5
/// where logits, gradients and absmax are named above; Gemma 3 with DoRA, whose scaled
/// embeddings and extra norms add operations per layer, measures up to 1.2e-5).
fn check_step(
    tag: &str,
    s: usize,
    ours: &Step,
    reference: &HashMap<String, Tensor>,
    tight: f64,
) -> Vec<String> {
    let mut notes = Vec::new();
    let want_lr = scalar(&reference[&format!("s{s}.lr")]);
    assert_eq!(
        ours.lr.to_bits(),
        want_lr.to_bits(),
        "{tag} step {s}: lr {} vs {want_lr}",
        ours.lr
    );
    let want_loss = scalar(&reference[&format!("s{s}.loss")]);
    let dl = (ours.loss - want_loss).abs();
    assert!(
        dl <= 5e-6 * want_loss.abs().max(1.0),
        "{tag} step {s}: loss {} vs {want_loss}",
        ours.loss
    );
    let dlog = max_abs_diff(&ours.logits, &reference[&format!("s{s}.logits")]);
    assert!(dlog <= tight, "{tag} step {s}: logits differ by {dlog:e}");
    notes.push(format!(
        "{tag} step {s} (lr {:.2e}): |Δloss| {dl:.1e}, |Δlogits| {dlog:.1e}",
        ours.lr
    ));
    let (sm, su) = (dynamic_map(true), dynamic_map(false));
    let (rm, ru) = (reachable_codes(&sm), reachable_codes(&su));
    for k in sorted_keys(&ours.grads) {
        let g = &ours.grads[k];
        let wg = rget(reference, s, "grad", k);
        let scale = max_abs(wg);
        assert!(
            scale > 0.0,
            "{tag} step {s} {k}: zero reference gradient, the check is empty"
        );
        let dg = max_abs_diff(g, wg);
        assert!(
            dg <= tight * scale,
            "{tag} step {s} {k}: |Δgrad| {dg:e} > {tight:e} × {scale:e}"
        );

        let (p, wp) = (f64s(&ours.params[k]), f64s(rget(reference, s, "param", k)));
        let mut worst_p = 0f64;
        let (gx, gy) = (f64s(g), f64s(wg));
        for (i, (x, y)) in p.iter().zip(&wp).enumerate() {
            // Where an element's gradient is far below its tensor's largest, the gradient's
            // round-off is a large part of it: Adam's u moves by up to ~4·|Δg|/|g| (above).
            let ill = 8.0 * (gx[i] - gy[i]).abs() / gx[i].abs().max(gy[i].abs()).max(1e-30);
            let tol = 4.0 * F32_EPS * y.abs() + (3e-4 + ill) * ours.lr;
            assert!(
                (x - y).abs() <= tol,
                "{tag} step {s} {k}: parameter {x} vs {y} (tolerance {tol:e})"
            );
            worst_p = worst_p.max((x - y).abs() / tol);
        }
        let (m, v) = &ours.states[k];
        let (wm, wv) = (rget(reference, s, "m", k), rget(reference, s, "v", k));
        let eight = reference.contains_key(&format!("s{s}.state1.{k}"));
        let mut line = format!(
            "  {k}: |Δgrad| {:.1e} of max, |Δp| ≤ {worst_p:.2} of tolerance",
            dg / scale
        );
        if !eight {
            let (dm, dv) = (max_abs_diff(m, wm), max_abs_diff(v, wv));
            assert!(dm <= 1e-5 * max_abs(wm), "{tag} step {s} {k}: |Δm| {dm:e}");
            assert!(dv <= 3e-5 * max_abs(wv), "{tag} step {s} {k}: |Δv| {dv:e}");
            line += &format!(
                ", fp32 m/v |Δ| {:.1e}/{:.1e} of max",
                dm / max_abs(wm),
                dv / max_abs(wv)
            );
        } else {
            for (which, deq, wdeq, code, reachable) in
                [("1", m, wm, &sm, &rm), ("2", v, wv, &su, &ru)]
            {
                let q = &ours.raw[&format!("state{which}.{k}")];
                let wq = rget(reference, s, &format!("state{which}"), k);
                let am = f64s(&ours.raw[&format!("absmax{which}.{k}")]);
                let wam = f64s(rget(reference, s, &format!("absmax{which}"), k));
                // The gradients agree to `tight` of the tensor's largest (above), so the
                // block maxima are held to that of the tensor's largest block maximum: m
                // follows g, v follows g², so twice that.
                let rel = if which == "1" { tight } else { 2.0 * tight };
                let top = wam.iter().fold(0f64, |a, y| a.max(y.abs()));
                for (x, y) in am.iter().zip(&wam) {
                    assert!(
                        (x - y).abs() <= rel * top,
                        "{tag} step {s} {k}: absmax{which} {x} vs {y}"
                    );
                }
                let d = code_diff(q, wq, reachable);
                let n = d.flipped.len();
                assert!(
                    d.max_step <= 1,
                    "{tag} step {s} {k}: state{which} codes {} positions apart",
                    d.max_step
                );
                assert!(
                    d.count * 200 <= n,
                    "{tag} step {s} {k}: {} of {n} state{which} codes differ",
                    d.count
                );
                let (qa, qb) = (i64s(q), i64s(wq));
                let (x, y) = (f64s(deq), f64s(wdeq));
                for i in 0..n {
                    let blk = i / 256;
                    let a = wam[blk].max(am[blk]);
                    let gap = if d.flipped[i] {
                        (code[qa[i] as usize] as f64 - code[qb[i] as usize] as f64).abs() * a
                    } else {
                        0.0
                    };
                    let tol = gap * (1.0 + rel) + rel * top;
                    assert!(
                        (x[i] - y[i]).abs() <= tol,
                        "{tag} step {s} {k}: dequantized state{which}[{i}] {} vs {} (tolerance {tol:e})",
                        x[i],
                        y[i]
                    );
                }
                line += &format!(", 8-bit state{which}: {}/{n} codes differ", d.count);
            }
        }
        notes.push(line);
    }
    notes
}

fn sorted_keys<V>(m: &HashMap<String, V>) -> Vec<&String> {
    let mut k: Vec<&String> = m.keys().collect();
    k.sort();
    k
}

/// Three steps of ours, run freely, against the reference's three; then each later step
/// again from the reference's own parameters and optimizer state (see `check_step`).
fn compare_training(nf4: bool) {
    compare_training_in(fixtures(), nf4, TIGHT)
}

/// fp32 round-off relative to a tensor's largest element, for [`check_step`].
const TIGHT: f64 = 1e-5;

fn compare_training_in(root: &Path, nf4: bool, tight: f64) {
    let tag = if nf4 { "nf4" } else { "fp32" };
    let f = facts_in(root);
    let reference = read(&root.join(format!("ref_{tag}.safetensors")));
    let mut ours = Ours::new_in(root, nf4);
    let init = read(&root.join("init.safetensors"));
    let eight: Vec<&String> = ours
        .keys
        .iter()
        .filter(|k| init[*k].numel() as i64 >= MIN_8BIT_SIZE)
        .collect();
    assert!(eight.len() >= 2, "the 8-bit state path is not exercised");
    assert!(
        ours.keys
            .iter()
            .any(|k| (init[k].numel() as i64) < MIN_8BIT_SIZE),
        "the 32-bit state path is not exercised"
    );
    let free: Vec<Step> = (0..f.steps).map(|s| ours.step(s)).collect();
    let mut notes = check_step(tag, 0, &free[0], &reference, tight);

    // Free run. Step 0 starts from the same weights and states, so it is checked tightly
    // above. After it, the runs part by more than round-off wherever an 8-bit code fell on
    // the other side of a decision boundary (check_step): that element's next update uses
    // a state one code gap away. So later steps are held to what the measured parameter
    // differences explain: to first order, Δloss = Σ g·Δp over every trainable element.
    let mut lr_sum = free[0].lr;
    for s in 1..f.steps {
        let want = scalar(&reference[&format!("s{s}.loss")]);
        let mut explained = 0.0;
        for k in &ours.keys {
            let dp = (&free[s - 1].params[k] - rget(&reference, s - 1, "param", k)).abs();
            let g = rget(&reference, s, "grad", k).abs();
            explained += (dp * g).sum(Kind::Double).double_value(&[]);
        }
        let dl = (free[s].loss - want).abs();
        notes.push(format!(
            "{tag} free run step {s}: loss {} vs {want}, |Δ| {dl:.1e} (first-order Σ|g·Δp| {explained:.1e})",
            free[s].loss
        ));
        assert!(
            dl <= 5e-6 * want.abs().max(1.0) + 2.0 * explained,
            "{tag} free run step {s}: loss {} vs {want}",
            free[s].loss
        );
        // A state one code off moves that element's update by a fraction of lr (measured
        // < 4%); the forward then carries the change into every gradient, by ~1e-4 of
        // their scale. So: no element off by a quarter of all the updates so far, and the
        // tensor as a whole (rms) within 1% of how far it moved; likewise m and v.
        lr_sum += free[s].lr;
        for k in sorted_keys(&free[s].params) {
            let want_p = rget(&reference, s, "param", k);
            let diff = &free[s].params[k] - want_p;
            let dp = max_abs(&diff);
            let rms = |t: &Tensor| {
                t.to_kind(Kind::Double)
                    .square()
                    .mean(Kind::Double)
                    .sqrt()
                    .double_value(&[])
            };
            let (rms_dp, rms_move) = (rms(&diff), rms(&(want_p - &init[k])));
            notes.push(format!(
                "  {k}: max|Δp| {dp:.1e} = {:.3} of Σlr, rms Δp {:.1e} of the rms move",
                dp / lr_sum,
                rms_dp / rms_move
            ));
            assert!(
                dp <= 0.25 * lr_sum,
                "{tag} free run step {s} {k}: max |Δp| {dp:e}"
            );
            assert!(
                rms_dp <= 1e-2 * rms_move,
                "{tag} free run step {s} {k}: rms Δp {rms_dp:e} vs move {rms_move:e}"
            );
            let (m, v) = &free[s].states[k];
            for (name, x, y) in [
                ("m", m, rget(&reference, s, "m", k)),
                ("v", v, rget(&reference, s, "v", k)),
            ] {
                let (d, r) = (rms(&(x - y)), rms(y));
                assert!(
                    d <= 1e-2 * r,
                    "{tag} free run step {s} {k}: rms Δ{name} {d:e} vs rms {r:e}"
                );
                let (dm, mm) = (max_abs_diff(x, y), max_abs(y));
                assert!(
                    dm <= 2e-2 * mm,
                    "{tag} free run step {s} {k}: max |Δ{name}| {dm:e} vs max {mm:e}"
                );
            }
        }
    }

    // Each later step from the reference's own state: as tight as step 0.
    for s in 1..f.steps {
        ours.load_reference_state(&reference, s - 1);
        let step = ours.step(s);
        notes.extend(check_step(
            &format!("{tag} (from PEFT's state)"),
            s,
            &step,
            &reference,
            tight,
        ));
    }
    eprintln!("{}", notes.join("\n"));
}

#[test]
fn three_steps_match_peft_and_bitsandbytes_fp32() {
    let _turn = common::serial();
    compare_training(false);
}

#[test]
fn three_steps_match_peft_and_bitsandbytes_nf4() {
    let _turn = common::serial();
    compare_training(true);
}

fn eval_batch(root: &Path) -> (Tensor, Tensor, Tensor) {
    let inputs = read(&root.join("inputs.safetensors"));
    (
        inputs["eval_ids"].shallow_clone(),
        inputs["eval_mask"].shallow_clone(),
        inputs["eval_labels"].shallow_clone(),
    )
}

fn as_set(v: &serde_json::Value) -> std::collections::BTreeSet<String> {
    match v {
        serde_json::Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().expect("string").to_string())
            .collect(),
        serde_json::Value::String(s) => [s.clone()].into(),
        other => panic!("expected a list of strings, found {other}"),
    }
}

#[test]
fn peft_loads_our_adapter() {
    let _turn = common::serial();
    peft_loads_our_adapter_in(fixtures());
}

/// PEFT loads the adapter we save after a few steps, as its own, to our logits.
fn peft_loads_our_adapter_in(root: &Path) {
    let f = facts_in(root);
    let mut ours = Ours::new_in(root, false);
    for s in 0..f.steps {
        ours.step(s);
    }
    let tmp = common::tempdir();
    let dir = tmp.path().join("adapter");
    adapter::save(&dir, &ours.cfg, &ours.model.trainable_parameters()).expect("adapter::save");
    // PiSSA / LoftQ: PEFT ignores the residual base beside the adapter and computes it again.
    adapter::write_residual(&dir, &ours.model.residual_base().expect("residual"))
        .expect("write_residual");
    common::oracle(
        "peft_oracle.py",
        &["load", root.to_str().unwrap(), dir.to_str().unwrap()],
    );
    let report = json(&root.join("load.json"));
    eprintln!("{report:#}");

    // Every tensor we wrote is one PEFT's model has, every adapter tensor it has is in the
    // file, and they load unchanged; PEFT says nothing it does not say for its own adapter
    // (library deprecation notices), nothing about keys in particular.
    let warned = as_set(&report["warnings"]);
    assert_eq!(
        warned,
        as_set(&report["baseline_warnings"]),
        "PEFT warned while loading our adapter"
    );
    for w in &warned {
        let l = w.to_lowercase();
        assert!(
            !l.contains("key") && !l.contains("missing") && !l.contains("unexpected"),
            "{w}"
        );
    }
    assert_eq!(report["file_keys_not_in_model"], serde_json::json!([]));
    assert_eq!(report["model_keys_not_in_file"], serde_json::json!([]));
    assert_eq!(report["max_abs_loaded_minus_file"].as_f64(), Some(0.0));

    // Its logits are ours.
    let (ids, mask, _) = eval_batch(root);
    let mine = tch::no_grad(|| ours.model.forward(&ids, &mask));
    let theirs = &read(&root.join("load.safetensors"))["eval_logits"];
    let d = max_abs_diff(&mine, theirs);
    eprintln!("our adapter in PEFT: max |Δlogit| {d:e}");
    assert!(d <= 1e-4, "PEFT's logits with our adapter differ by {d:e}");
    assert!(max_abs(theirs) > 0.1, "degenerate logits");

    // adapter_config.json: only keys LoraConfig knows; the ones that shape the model as
    // PEFT itself saves them (model.save_pretrained in the oracle), and as PEFT parsed ours.
    let written = json(&dir.join(adapter::CONFIG_FILE));
    let peft_saved = json(&root.join("peft_adapter_fp32").join(adapter::CONFIG_FILE));
    let fields: std::collections::BTreeSet<&str> =
        f.lora_fields.iter().map(String::as_str).collect();
    for k in written.as_object().expect("a JSON object").keys() {
        assert!(
            fields.contains(k.as_str()),
            "adapter_config.json key {k:?} is not a LoraConfig field"
        );
    }
    let parsed = &report["parsed_config"];
    for k in [
        "peft_type",
        "task_type",
        "bias",
        "use_rslora",
        "use_dora",
        "fan_in_fan_out",
    ] {
        assert_eq!(written[k], peft_saved[k], "adapter_config.json {k}");
    }
    for k in ["r", "lora_alpha", "lora_dropout"] {
        let (a, b) = (written[k].as_f64(), peft_saved[k].as_f64());
        assert!(
            a.is_some() && a == b,
            "adapter_config.json {k}: {a:?} vs PEFT's {b:?}"
        );
        assert_eq!(parsed[k].as_f64(), b, "{k} as PEFT parsed it");
    }
    // PEFT saves all-linear's modules as full names, which name the same modules.
    let short = |v: &serde_json::Value| -> std::collections::BTreeSet<String> {
        as_set(v)
            .into_iter()
            .map(|n| n.rsplit('.').next().unwrap_or(&n).to_string())
            .collect()
    };
    for k in ["target_modules", "modules_to_save"] {
        assert_eq!(
            short(&written[k]),
            short(&peft_saved[k]),
            "adapter_config.json {k}"
        );
        assert_eq!(
            short(&parsed[k]),
            short(&peft_saved[k]),
            "{k} as PEFT parsed it"
        );
    }
    let numbers = |v: &serde_json::Value| -> Vec<(String, f64)> {
        v.as_object()
            .into_iter()
            .flatten()
            .map(|(k, x)| (k.clone(), x.as_f64().unwrap_or(f64::NAN)))
            .collect()
    };
    for k in ["rank_pattern", "alpha_pattern"] {
        assert_eq!(
            numbers(&written[k]),
            numbers(&peft_saved[k]),
            "adapter_config.json {k}"
        );
    }
    assert_eq!(report["task_type"], "SEQ_CLS");
    assert_eq!(report["peft_type"], "LORA");

    // PiSSA: PEFT's plain-LoRA conversion (as_lora/, rank 2r) loads onto the original
    // weights, with no residual base at all, to our logits.
    let trainable = ours.model.trainable_parameters();
    if adapter::save_as_lora(&dir, &ours.cfg, &trainable, &ours.model.initial_pairs())
        .expect("save_as_lora")
    {
        let conv = dir.join(adapter::AS_LORA_DIR);
        common::oracle(
            "peft_oracle.py",
            &["load", root.to_str().unwrap(), conv.to_str().unwrap()],
        );
        let report = json(&root.join("load.json"));
        assert_eq!(report["file_keys_not_in_model"], serde_json::json!([]));
        assert_eq!(report["model_keys_not_in_file"], serde_json::json!([]));
        assert_eq!(
            report["parsed_config"]["r"].as_f64(),
            Some(2.0 * ours.cfg.r as f64)
        );
        let theirs = &read(&root.join("load.safetensors"))["eval_logits"];
        let d = max_abs_diff(&mine, theirs);
        eprintln!("as_lora on the original weights in PEFT: max |Δlogit| {d:e}");
        assert!(d <= 1e-4, "PEFT's logits with as_lora/ differ by {d:e}");
    }
}

#[test]
fn our_trainer_loads_peft_adapters() {
    let _turn = common::serial();
    our_trainer_loads_peft_adapters_in(fixtures());
}

/// PEFT's saved adapters load into our trainer and evaluate to PEFT's logits.
fn our_trainer_loads_peft_adapters_in(root: &Path) {
    for (nf4, tag) in [(false, "fp32"), (true, "nf4")] {
        let mut cfg = config_in(root, nf4);
        let dir = root.join(format!("peft_adapter_{tag}"));
        if nf4 && root.join("residual").exists() {
            // PEFT's 4-bit PiSSA / LoftQ recipe: a plain LoRA on the saved residual model.
            cfg.model_dir = Some(root.join("residual"));
        }
        let (loaded, _) = one_thread(|| loader::load_with_adapter(&cfg, &dir))
            .unwrap_or_else(|e| panic!("{tag}: {e:#}"));
        assert_eq!(
            loaded.encoder.pad_id(),
            facts_in(root).pad,
            "pad = eos of the tokenizer"
        );
        // The tensors PEFT saved are the ones we hold.
        let file = read(&dir.join(adapter::WEIGHTS_FILE));
        let mine = loaded.model.trainable_parameters();
        assert_eq!(mine.len(), file.len(), "{tag}: tensor count");
        for (k, t) in &mine {
            let want = file
                .get(k)
                .unwrap_or_else(|| panic!("{tag}: PEFT saved no {k}"));
            assert_eq!(max_abs_diff(t, want), 0.0, "{tag}: {k} not loaded as saved");
        }
        let reference = read(&root.join(format!("ref_{tag}.safetensors")));
        let want = &reference["eval_logits"];
        let (ids, mask, labels) = eval_batch(root);
        let got = tch::no_grad(|| loaded.model.forward(&ids, &mask));
        let d = max_abs_diff(&got, want);
        eprintln!("{tag}: PEFT's adapter in our model: max |Δlogit| {d:e}");
        assert!(d <= 1e-4, "{tag}: logits differ from PEFT's by {d:e}");

        // The evaluation path (collate, right padding, softmax, argmax) on the same rows.
        let lens = i64s(&mask.sum_dim_intlist([1i64].as_slice(), false, Kind::Int64));
        let rows = i64s(&ids.reshape([-1]));
        let t = ids.size()[1] as usize;
        let label_v = i64s(&labels);
        let data: Vec<Encoded> = lens
            .iter()
            .enumerate()
            .map(|(r, &n)| Encoded {
                ids: rows[r * t..r * t + n as usize].to_vec(),
                label: Some(label_v[r].into()),
                idx: r as i64,
                window: 0,
                rejected: None,
            })
            .collect();
        let r = eval::evaluate(
            &loaded.model,
            &data,
            &eval::Scoring::mrpc(2),
            4,
            loaded.encoder.pad_id(),
            Device::Cpu,
            None,
        )
        .unwrap_or_else(|e| panic!("{tag}: evaluate: {e:#}"));
        let want_probs = f64s(&want.softmax(-1, Kind::Float));
        let want_pred = i64s(&want.argmax(-1, false));
        let got_probs: Vec<f64> = r.probs.iter().flatten().copied().collect();
        assert_eq!(r.idx, (0..data.len() as i64).collect::<Vec<_>>());
        assert_eq!(r.pred, want_pred, "{tag}: predictions differ from PEFT's");
        for (a, b) in got_probs.iter().zip(&want_probs) {
            assert!(
                (a - b).abs() <= 1e-5,
                "{tag}: probability {a} vs PEFT's {b}"
            );
        }
        let correct = want_pred
            .iter()
            .zip(&label_v)
            .filter(|(p, l)| p == l)
            .count();
        assert_eq!(
            r.metric("accuracy"),
            Some(correct as f64 / label_v.len() as f64)
        );
    }
}

#[test]
fn trainable_parameter_line_matches_peft_4bit() {
    let _turn = common::serial();
    let f = facts();
    let cfg = config(true);
    let m = LlamaClassifier::load(
        &fixtures().join("base"),
        &loader::model_options(&cfg, Device::Cpu, f.pad).expect("options"),
    )
    .expect("load");
    let (t, a) = m.param_counts();
    assert_eq!(peft_param_line(t, a), f.peft_line_nf4);
}

/// Three steps of each other family, fp32 and NF4, against transformers'
/// `<Family>ForSequenceClassification` + PEFT + AdamW8bit (every batch longer than the
/// family's sliding window); PEFT loading our adapter and we PEFT's; PEFT's 4-bit parameter
/// line.
fn family_trains_like_peft(family: &str) {
    trains_like_peft(family_fixtures(family))
}

fn trains_like_peft(root: PathBuf) {
    trains_like_peft_within(root, TIGHT)
}

fn trains_like_peft_within(root: PathBuf, tight: f64) {
    let _turn = common::serial();
    for nf4 in [false, true] {
        compare_training_in(&root, nf4, tight);
    }
    peft_loads_our_adapter_in(&root);
    our_trainer_loads_peft_adapters_in(&root);
    let f = facts_in(&root);
    let m = LlamaClassifier::load(
        &root.join("base"),
        &loader::model_options(&config_in(&root, true), Device::Cpu, f.pad).expect("options"),
    )
    .expect("load");
    let (t, a) = m.param_counts();
    assert_eq!(peft_param_line(t, a), f.peft_line_nf4);
}

// All-linear + rsLoRA + a rank and an alpha pattern (the oracle's OPTIONS), trained by PEFT
// and by us, on Llama and on two families with other projections' shapes and switches.
#[test]
fn llama_with_lora_options_trains_like_peft() {
    trains_like_peft(fixtures_for("llama", Some("options")))
}

#[test]
fn qwen2_with_lora_options_trains_like_peft() {
    trains_like_peft(fixtures_for("qwen2", Some("options")))
}

#[test]
fn gemma3_text_with_lora_options_trains_like_peft() {
    trains_like_peft(fixtures_for("gemma3_text", Some("options")))
}

// The same with DoRA (QDoRA on the NF4 base): the magnitudes train like PEFT's.
#[test]
fn llama_with_dora_trains_like_peft() {
    trains_like_peft(fixtures_for("llama", Some("dora")))
}

#[test]
fn qwen2_with_dora_trains_like_peft() {
    trains_like_peft(fixtures_for("qwen2", Some("dora")))
}

#[test]
fn gemma3_text_with_dora_trains_like_peft() {
    trains_like_peft_within(fixtures_for("gemma3_text", Some("dora")), 2e-5)
}

// PiSSA (QPiSSA on the NF4 base, with an alpha pattern) and LoftQ (two alternations): the
// residual base is PEFT's, so the same starting pair trains as PEFT's does; PEFT's pissa
// adapter loads into our model with its logits (the base computed again), ours into PEFT.
/// `f` on one intra-op thread, as the oracle runs: LAPACK's SVD (and so PiSSA's and LoftQ's
/// starting pairs) depends on the thread count in the last bits, which LoftQ's NF4 rounding
/// can turn into a whole code step. (Why the trainer saves the residual base it used.)
fn one_thread<T>(f: impl FnOnce() -> T) -> T {
    let before = tch::get_num_threads();
    tch::set_num_threads(1);
    let out = f();
    tch::set_num_threads(before);
    out
}

#[test]
fn pissa_and_loftq_start_where_peft_s_do() {
    use qlora_cls::lora_init::{decompose, LoraInit};
    // PEFT's `pissa_init` / `loftq_init` methods on two of the tiny model's weights, the
    // generator seeded as we seed it (pissa_niter's test matrix).
    let tmp = private_fixtures(fixtures());
    common::oracle("peft_oracle.py", &["inits", tmp.path().to_str().unwrap()]);
    let want = read(&tmp.path().join("inits.safetensors"));
    let base = read(&tmp.path().join("base").join("model.safetensors"));
    let cases = [
        ("pissa", LoraInit::Pissa { niter: None }),
        ("pissa_niter_2", LoraInit::Pissa { niter: Some(2) }),
        ("loftq_1", LoraInit::Loftq { iter: 1 }),
        ("loftq_3", LoraInit::Loftq { iter: 3 }),
    ];
    for w in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
    ] {
        for (tag, init) in cases {
            tch::manual_seed(17);
            let d = one_thread(|| decompose(init, &base[w], 8, 16.0 / 8.0))
                .unwrap_or_else(|e| panic!("{e:#}"));
            for (part, got) in [("A", &d.a), ("B", &d.b), ("base", &d.base)] {
                let theirs = &want[&format!("{tag}.{w}.{part}")];
                let diff = max_abs_diff(got, theirs);
                eprintln!(
                    "{tag} {w} {part}: max |Δ| {diff:e} (max {:e})",
                    max_abs(theirs)
                );
                assert_eq!(diff, 0.0, "{tag} {w} {part}: {diff:e} from PEFT's");
            }
        }
    }
}

#[test]
fn llama_with_pissa_trains_like_peft() {
    trains_like_peft(fixtures_for("llama", Some("pissa")))
}

#[test]
fn llama_with_loftq_trains_like_peft() {
    trains_like_peft(fixtures_for("llama", Some("loftq")))
}

#[test]
fn mistral_trains_like_peft() {
    family_trains_like_peft("mistral");
}

#[test]
fn qwen2_trains_like_peft() {
    family_trains_like_peft("qwen2");
}

#[test]
fn qwen3_trains_like_peft() {
    family_trains_like_peft("qwen3");
}

#[test]
fn phi3_trains_like_peft() {
    family_trains_like_peft("phi3");
}

#[test]
fn gemma2_trains_like_peft() {
    family_trains_like_peft("gemma2");
}

#[test]
fn gemma3_text_trains_like_peft() {
    family_trains_like_peft("gemma3_text");
}

/// A copy of the fixtures' base model, inputs and PEFT adapter in a fresh folder, so an
/// oracle run that writes its report there races no other test.
fn private_fixtures(root: &Path) -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("read fixtures") {
            let p = e.expect("entry").path();
            let dest = to.join(p.file_name().expect("a name"));
            if p.is_dir() {
                copy(&p, &dest);
            } else {
                std::fs::copy(&p, &dest).expect("copy a fixture");
            }
        }
    }
    let tmp = common::tempdir();
    for name in ["base", "peft_adapter_fp32"] {
        copy(&root.join(name), &tmp.path().join(name));
    }
    for f in std::fs::read_dir(root).expect("read fixtures") {
        let p = f.expect("entry").path();
        if p.is_file() {
            std::fs::copy(&p, tmp.path().join(p.file_name().expect("a name"))).expect("copy");
        }
    }
    tmp
}

#[test]
fn rslora_adapters_load_and_save_like_peft() {
    // PEFT's trained adapter with `use_rslora: true` (scale alpha/√r instead of alpha/r):
    // PEFT's logits for it are ours, and the adapter we save from it PEFT reads back with
    // rsLoRA on and our logits.
    let tmp = private_fixtures(fixtures());
    let root = tmp.path();
    let rs = root.join("rslora_adapter");
    std::fs::create_dir_all(&rs).unwrap();
    let src = root.join("peft_adapter_fp32");
    std::fs::copy(
        src.join(adapter::WEIGHTS_FILE),
        rs.join(adapter::WEIGHTS_FILE),
    )
    .unwrap();
    let mut conf = json(&src.join(adapter::CONFIG_FILE));
    conf["use_rslora"] = serde_json::json!(true);
    std::fs::write(rs.join(adapter::CONFIG_FILE), conf.to_string()).unwrap();
    common::oracle(
        "peft_oracle.py",
        &["load", root.to_str().unwrap(), rs.to_str().unwrap()],
    );
    let theirs = read(&root.join("load.safetensors"))["eval_logits"].shallow_clone();
    let report = json(&root.join("load.json"));
    assert_eq!(
        report["parsed_config"]["use_rslora"],
        serde_json::json!(true)
    );

    let cfg = config_in(root, false);
    let (loaded, _) = loader::load_with_adapter(&cfg, &rs).expect("load the rsLoRA adapter");
    let (ids, mask, _) = eval_batch(root);
    let mine = tch::no_grad(|| loaded.model.forward(&ids, &mask));
    let d = max_abs_diff(&mine, &theirs);
    eprintln!("PEFT's rsLoRA adapter in our model: max |Δlogit| {d:e}");
    assert!(d <= 1e-4, "rsLoRA logits differ from PEFT's by {d:e}");
    // The scaling matters here: the plain-LoRA logits of the same weights are not PEFT's.
    let plain = &read(&fixtures().join("ref_fp32.safetensors"))["eval_logits"];
    assert!(
        max_abs_diff(plain, &theirs) > 1e-3,
        "rsLoRA changed nothing"
    );

    // Saved by us with `use_rslora` (as `train --use_rslora true` saves), read by PEFT.
    let ours = root.join("ours_rslora");
    let mut save_cfg = cfg.clone();
    save_cfg.use_rslora = true;
    adapter::save(&ours, &save_cfg, &loaded.model.trainable_parameters()).expect("save");
    assert_eq!(json(&ours.join(adapter::CONFIG_FILE))["use_rslora"], true);
    common::oracle(
        "peft_oracle.py",
        &["load", root.to_str().unwrap(), ours.to_str().unwrap()],
    );
    let back = &read(&root.join("load.safetensors"))["eval_logits"];
    let d = max_abs_diff(&mine, back);
    assert!(
        d <= 1e-4,
        "PEFT reading our rsLoRA adapter differs by {d:e}"
    );
}

#[test]
fn rank_alpha_patterns_and_layer_choice_are_peft_s() {
    // PEFT's `rank_pattern` / `alpha_pattern` (a short name, a full name, a regex),
    // `layers_to_transform` with rsLoRA, and DoRA with moved magnitudes: PEFT's adapters give
    // PEFT's logits and parameter counts in our model, the adapters we save from them PEFT
    // reads back with our logits, and `merge` writes PEFT's merge_and_unload weights.
    let tmp = private_fixtures(fixtures());
    let root = tmp.path();
    common::oracle("peft_oracle.py", &["patterns", root.to_str().unwrap()]);
    let facts = json(&root.join("patterns.json"));
    // The options took effect in PEFT: ranks 4 and 2 beside 8, scales 32/8 and 4/8 beside 2.
    let ranks: std::collections::BTreeSet<u64> = facts["patterns"]["ranks"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|r| r.as_u64())
        .collect();
    assert_eq!(ranks, [2, 4, 8].into());
    let layer_one = facts["layers"]["ranks"].as_object().unwrap();
    assert!(
        layer_one.keys().all(|k| k.contains(".layers.1.")),
        "{layer_one:?}"
    );
    let (ids, mask, _) = eval_batch(root);
    let plain = &read(&fixtures().join("ref_fp32.safetensors"))["eval_logits"];
    for tag in ["patterns", "layers", "dora"] {
        let dir = root.join(format!("{tag}_adapter"));
        let cfg = config_in(root, false);
        let (loaded, _) =
            loader::load_with_adapter(&cfg, &dir).unwrap_or_else(|e| panic!("{tag}: {e:#}"));
        let mine = tch::no_grad(|| loaded.model.forward(&ids, &mask));
        let theirs = read(&root.join(format!("{tag}.safetensors")))["eval_logits"].shallow_clone();
        let d = max_abs_diff(&mine, &theirs);
        eprintln!("{tag}: PEFT's adapter in our model: max |Δlogit| {d:e}");
        assert!(d <= 1e-4, "{tag}: logits differ from PEFT's by {d:e}");
        assert!(
            max_abs_diff(plain, &theirs) > 1e-3,
            "{tag}: the adapter changed nothing"
        );
        assert_eq!(
            loaded.model.param_counts(),
            (
                facts[tag]["trainable"].as_u64().unwrap(),
                facts[tag]["all"].as_u64().unwrap()
            ),
            "{tag}: parameter counts"
        );
        // Saved by us with the same options (as `train` saves), read back by PEFT.
        let mut save_cfg = cfg.clone();
        loader::with_adapter_options(&mut save_cfg, adapter::read_meta(&dir).expect("meta"));
        let ours = root.join(format!("ours_{tag}"));
        adapter::save(&ours, &save_cfg, &loaded.model.trainable_parameters()).expect("save");
        common::oracle(
            "peft_oracle.py",
            &["load", root.to_str().unwrap(), ours.to_str().unwrap()],
        );
        let report = json(&root.join("load.json"));
        assert_eq!(
            report["file_keys_not_in_model"],
            serde_json::json!([]),
            "{tag}"
        );
        assert_eq!(
            report["model_keys_not_in_file"],
            serde_json::json!([]),
            "{tag}"
        );
        let back = &read(&root.join("load.safetensors"))["eval_logits"];
        let d = max_abs_diff(&mine, back);
        assert!(
            d <= 1e-4,
            "{tag}: PEFT reading our adapter differs by {d:e}"
        );

        // `merge` folds each pair with its own scale, as PEFT's merge_and_unload.
        let merged = root.join(format!("merged_{tag}"));
        let opts = qlora_cls::merge::MergeOptions {
            dtype: Kind::Float,
            quantize_nf4: false,
            max_shard_bytes: 1 << 40,
            force: false,
            sample: 0,
            sample_split: "validation".into(),
        };
        qlora_cls::merge::merge(&cfg, &dir, &merged, &opts).expect("merge");
        let mut ours = HashMap::new();
        for e in std::fs::read_dir(&merged).expect("merged folder") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                ours.extend(read(&p));
            }
        }
        let peft = read(&root.join(format!("{tag}_merged.safetensors")));
        let base = read(&root.join("base").join("model.safetensors"));
        let moved = peft
            .iter()
            .filter(|(n, w)| base.get(*n).is_some_and(|b| max_abs_diff(b, w) > 1e-4))
            .count();
        assert!(moved >= 2, "{tag}: PEFT's merge moved {moved} weights");
        let mut worst = 0f64;
        for (name, w) in &peft {
            let mine = ours
                .get(name)
                .unwrap_or_else(|| panic!("{tag}: merged checkpoint has no {name}"));
            worst = worst.max(max_abs_diff(mine, w));
        }
        eprintln!("{tag}: merged weights vs PEFT's merge_and_unload: max |Δ| {worst:e}");
        assert!(
            worst <= 1e-6,
            "{tag}: merged weights differ from PEFT's by {worst:e}"
        );
    }
}

#[test]
fn all_linear_is_the_modules_peft_picks() {
    // `target_modules: all-linear` resolves to the projections PEFT's "all-linear" wraps in
    // a sequence classifier (never the `score` head), and `inspect`'s parameter counts are
    // PEFT's for them; Llama's, Qwen2's (biased q/k/v) and Gemma 3's seven projections and Phi-3's
    // four fused ones.
    for (family, root) in [
        ("llama", fixtures().to_path_buf()),
        ("phi3", family_fixtures("phi3")),
        ("qwen2", family_fixtures("qwen2")),
        ("gemma3_text", family_fixtures("gemma3_text")),
    ] {
        common::oracle("peft_oracle.py", &["all_linear", root.to_str().unwrap()]);
        let want = json(&root.join("all_linear.json"));
        let base = root.join("base");
        let cfg = common::config_from(&[
            "--model_dir",
            base.to_str().unwrap(),
            "--target_modules",
            "all-linear",
            "--r",
            "8",
        ]);
        // PEFT lists the full names it matched; their last parts are our modules.
        let peft_short: std::collections::BTreeSet<String> = as_set(&want["target_modules"])
            .iter()
            .map(|n| n.rsplit('.').next().unwrap_or(n).to_string())
            .collect();
        let ours: std::collections::BTreeSet<String> = cfg.target_modules.iter().cloned().collect();
        assert_eq!(peft_short, ours, "{family}");
        let mc = qlora_cls::model::hf_config::LlamaConfig::from_dir(&base).expect("config.json");
        let (t, a) = qlora_cls::model::hf_config::peft_param_counts(&mc, 2, 8, &cfg.target_modules);
        assert_eq!(
            (t, a),
            (
                want["trainable"].as_u64().unwrap(),
                want["all"].as_u64().unwrap()
            ),
            "{family}: parameter counts"
        );
        // PEFT's all-linear adapter (full names in its adapter_config.json) in our model gives
        // PEFT's logits.
        let mut lcfg = config_in(&root, false);
        lcfg.target_modules = cfg.target_modules.clone();
        let (loaded, _) = loader::load_with_adapter(&lcfg, &root.join("all_linear_adapter"))
            .unwrap_or_else(|e| panic!("{family}: {e:#}"));
        let (ids, mask, _) = eval_batch(&root);
        let mine = tch::no_grad(|| loaded.model.forward(&ids, &mask));
        let theirs = &read(&root.join("all_linear.safetensors"))["eval_logits"];
        let d = max_abs_diff(&mine, theirs);
        eprintln!("{family}: PEFT's all-linear adapter in our model: max |Δlogit| {d:e}");
        assert!(
            d <= 1e-4,
            "{family}: all-linear logits differ from PEFT's by {d:e}"
        );
    }
    // A YAML file may write it as a string, as PEFT's users do.
    let d = common::tempdir();
    let yaml = d.path().join("c.yaml");
    std::fs::write(
        &yaml,
        format!(
            "model_dir: {}\ntarget_modules: all-linear\n",
            fixtures().join("base").display()
        ),
    )
    .unwrap();
    let (cfg, _) = Config::load(Some(&yaml), &[]).expect("load");
    assert_eq!(cfg.target_modules.len(), 7);
}

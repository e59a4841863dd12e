//! Each torch twin (`kernels: torch`) against its CPU kernel, bit for bit, on random problems
//! with odd sizes, partial blocks and NaN/inf/zero blocks; the CPU self-checks of `auto`; the
//! `kernels` config key.
mod common;

use qlora_cls::dropout::{row_key, Dropout};
use qlora_cls::kernel_check::{max_abs_diff, rand_codes, randn};
use qlora_cls::kernel_choice::{Impl, Kernel};
use qlora_cls::optim::adamw8bit::{AdamW32, AdamW8bit, AdamWConfig};
use qlora_cls::quant::nf4::{self, Absmax, Nf4Options, Nf4Tensor, DYNAMIC_MAP};
use tch::{Device, Kind, Tensor};

const CPU: Device = Device::Cpu;

/// Equal bit for bit, except that any NaN equals any NaN (payloads are not part of the
/// kernels' contract).
fn assert_same(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.size(), b.size(), "{what}: shapes");
    assert_eq!(a.kind(), b.kind(), "{what}: kinds");
    let bits = match a.kind() {
        Kind::Float => Some(Kind::Int),
        Kind::Double => Some(Kind::Int64),
        Kind::BFloat16 | Kind::Half => Some(Kind::Int16),
        _ => None,
    };
    let same = match bits {
        Some(k) => {
            let (a, b) = (a.contiguous(), b.contiguous());
            a.view_dtype(k)
                .eq_tensor(&b.view_dtype(k))
                .logical_or(&a.isnan().logical_and(&b.isnan()))
        }
        None => a.eq_tensor(b),
    };
    let bad = same.logical_not().sum(Kind::Int64).int64_value(&[]);
    assert_eq!(
        bad,
        0,
        "{what}: {bad} of {} elements differ, max |Δ| {}",
        a.numel(),
        max_abs_diff(a, b)
    );
}

fn nf4_parts(q: &Nf4Tensor) -> Vec<Tensor> {
    let mut out = vec![q.packed.shallow_clone()];
    match &q.absmax {
        Absmax::Plain(a) => out.push(a.shallow_clone()),
        Absmax::Nested {
            quant,
            offset,
            nested_absmax,
            ..
        } => {
            out.push(quant.shallow_clone());
            out.push(nested_absmax.shallow_clone());
            out.push(Tensor::from_slice(&[*offset]));
        }
    }
    out
}

/// A weight with the awkward parts: an all-zero block, an inf, a NaN (optional), outliers.
fn weight(rows: i64, cols: i64, seed: u64, specials: bool) -> Tensor {
    let w = randn(rows * cols, seed, 0.02, CPU);
    let n = rows * cols;
    let _ = w.narrow(0, 0, 64.min(n)).fill_(0.0);
    if n > 200 {
        let _ = w.narrow(0, 150, 1).fill_(3.0);
        let _ = w.narrow(0, n - 3, 1).fill_(-1e-30);
    }
    if specials && n > 300 {
        let _ = w.narrow(0, 260, 1).fill_(f64::INFINITY);
        let _ = w.narrow(0, 300, 1).fill_(f64::NAN);
    }
    w.reshape([rows, cols])
}

const SHAPES: [(i64, i64); 4] = [(33, 70), (1, 7), (64, 64), (129, 131)];

#[test]
fn nf4_quantize_twin_equals_the_kernel() {
    for (i, &(r, c)) in SHAPES.iter().enumerate() {
        for specials in [false, true] {
            for kind in [Kind::Float, Kind::BFloat16, Kind::Half, Kind::Double] {
                for (blocksize, dq) in [(64, true), (32, false), (256, true), (4096, false)] {
                    let w = weight(r, c, i as u64, specials).to_kind(kind);
                    let opts = Nf4Options {
                        blocksize,
                        double_quant: dq,
                    };
                    let what =
                        format!("[{r}, {c}] {kind:?} bs{blocksize} dq {dq} nan/inf {specials}");
                    let k = nf4::quantize_with(&w, &opts, Impl::Custom).unwrap();
                    let t = nf4::quantize_with(&w, &opts, Impl::Torch).unwrap();
                    for (a, b) in nf4_parts(&k).iter().zip(&nf4_parts(&t)) {
                        assert_same(&what, a, b);
                    }
                }
            }
        }
    }
}

#[test]
fn nf4_dequantize_twin_equals_the_kernel() {
    for (i, &(r, c)) in SHAPES.iter().enumerate() {
        for (blocksize, dq) in [(64, true), (128, false), (4096, true)] {
            let w = weight(r, c, 10 + i as u64, true);
            let opts = Nf4Options {
                blocksize,
                double_quant: dq,
            };
            let q = nf4::quantize_with(&w, &opts, Impl::Custom).unwrap();
            for kind in [Kind::Float, Kind::BFloat16, Kind::Half, Kind::Double] {
                let what = format!("[{r}, {c}] bs{blocksize} dq {dq} -> {kind:?}");
                let a = nf4::dequantize_with(&q, kind, Impl::Custom).unwrap();
                let b = nf4::dequantize_with(&q, kind, Impl::Torch).unwrap();
                assert_same(&what, &a, &b);
            }
            // Into a non-contiguous output (the kernel's copy path).
            let mut a = Tensor::zeros([c, r], (Kind::Float, CPU)).transpose(0, 1);
            let mut b = Tensor::zeros([c, r], (Kind::Float, CPU)).transpose(0, 1);
            nf4::dequantize_into_with(&q, &mut a, Impl::Custom).unwrap();
            nf4::dequantize_into_with(&q, &mut b, Impl::Torch).unwrap();
            assert_same("dequantize_into, transposed output", &a, &b);
        }
    }
}

#[test]
fn nf4_matmul_small_twin_equals_the_kernel() {
    for &(n_out, k) in &[(19, 333), (37, 200), (8, 1024), (3, 4)] {
        let w = weight(n_out, k, n_out as u64, false);
        for dq in [true, false] {
            let opts = Nf4Options {
                blocksize: 64,
                double_quant: dq,
            };
            let q = nf4::quantize_with(&w, &opts, Impl::Custom).unwrap();
            for m in [1, 5, 17] {
                for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
                    let x = randn(m * k, m as u64, 1.0, CPU)
                        .reshape([m, k])
                        .to_kind(kind);
                    let what = format!("x [{m}, {k}] {kind:?} . W [{n_out}, {k}] dq {dq}");
                    let a = nf4::matmul_small_with(&x, &q, Impl::Custom).unwrap();
                    let b = nf4::matmul_small_with(&x, &q, Impl::Torch).unwrap();
                    assert_same(&what, &a, &b);
                }
            }
        }
    }
}

#[test]
fn q8_quantize_and_dequantize_twins_equal_the_kernels() {
    let code = Tensor::from_slice(&DYNAMIC_MAP);
    for (n, blocksize, sub) in [
        (1000, 256, 0.1f32),
        (4096, 64, 0.0),
        (77, 4096, -2.5),
        (300, 256, 0.0),
    ] {
        let x = randn(n, n as u64, 1.0, CPU);
        // A zero block, an inf block and a block holding NaNs.
        let _ = x.narrow(0, 0, blocksize.min(n)).fill_(f64::from(sub));
        if n >= 3 * blocksize {
            let _ = x.narrow(0, blocksize + 3, 1).fill_(f64::INFINITY);
            let _ = x.narrow(0, 2 * blocksize + 1, 2).fill_(f64::NAN);
        }
        let what = format!("[{n}] bs{blocksize} sub {sub}");
        let (qa, aa) = nf4::q8_quantize_with(&x, &code, sub, blocksize, Impl::Custom).unwrap();
        let (qb, ab) = nf4::q8_quantize_with(&x, &code, sub, blocksize, Impl::Torch).unwrap();
        assert_same(&format!("{what}: codes"), &qa, &qb);
        assert_same(&format!("{what}: absmax"), &aa, &ab);
        for add in [-0.0f32, 0.3, -1e-3] {
            let a = nf4::q8_dequantize_with(&qa, &aa, &code, blocksize, add, Impl::Custom).unwrap();
            let b = nf4::q8_dequantize_with(&qa, &aa, &code, blocksize, add, Impl::Torch).unwrap();
            assert_same(&format!("{what}: dequantize + {add}"), &a, &b);
        }
        let q = rand_codes(n, 5, CPU);
        let absmax = randn((n + blocksize - 1) / blocksize, 6, 1.0, CPU).abs();
        let a = nf4::q8_dequantize_with(&q, &absmax, &code, blocksize, 0.25, Impl::Custom).unwrap();
        let b = nf4::q8_dequantize_with(&q, &absmax, &code, blocksize, 0.25, Impl::Torch).unwrap();
        assert_same(&format!("{what}: random codes"), &a, &b);
    }
}

/// Parameters of the 8-bit path (a partial last block) and of the 32-bit one, with
/// gradients; the 8-bit one's gradient has an inf and a NaN in its last block.
fn optimizer_problem() -> (Vec<Tensor>, Vec<Vec<Tensor>>) {
    // 2-D like the LoRA matrices: the states are flat, the parameter and gradient are not.
    let params = vec![
        randn(4096 + 300, 1, 1.0, CPU).reshape([157, 28]),
        randn(100, 2, 1.0, CPU).reshape([4, 25]),
    ];
    let grads = (0..3u64)
        .map(|s| {
            let g0 = randn(4096 + 300, 10 + s, 0.1, CPU);
            if s == 2 {
                let _ = g0.narrow(0, 4200, 1).fill_(f64::INFINITY);
                let _ = g0.narrow(0, 4300, 1).fill_(f64::NAN);
            }
            vec![
                g0.reshape([157, 28]),
                randn(100, 20 + s, 0.1, CPU).reshape([4, 25]),
            ]
        })
        .collect();
    (params, grads)
}

fn leaves(ps: &[Tensor]) -> Vec<Tensor> {
    ps.iter()
        .map(|p| p.detach().copy().set_requires_grad(true))
        .collect()
}

fn set_grads(ps: &[Tensor], gs: &[Tensor]) {
    for (p, g) in ps.iter().zip(gs) {
        let mut p = p.shallow_clone();
        p.zero_grad();
        (&p * g).sum(Kind::Float).backward();
    }
}

#[test]
fn adamw_twins_equal_the_kernels() {
    let (init, grads) = optimizer_problem();
    let cfg = AdamWConfig::default();
    let (pa, pb) = (leaves(&init), leaves(&init));
    let mut a = AdamW8bit::new(pa.iter().map(Tensor::shallow_clone).collect(), cfg);
    let mut b = AdamW8bit::new(pb.iter().map(Tensor::shallow_clone).collect(), cfg);
    let (qa, qb) = (leaves(&init), leaves(&init));
    let mut c = AdamW32::new(qa.iter().map(Tensor::shallow_clone).collect(), cfg);
    let mut d = AdamW32::new(qb.iter().map(Tensor::shallow_clone).collect(), cfg);
    for (step, gs) in grads.iter().enumerate() {
        let lr = 1e-3 * (step + 1) as f64;
        set_grads(&pa, gs);
        set_grads(&pb, gs);
        set_grads(&qa, gs);
        set_grads(&qb, gs);
        a.step_with(lr, Impl::Custom).unwrap();
        b.step_with(lr, Impl::Torch).unwrap();
        c.step_with(lr, Impl::Custom).unwrap();
        d.step_with(lr, Impl::Torch).unwrap();
        for i in 0..init.len() {
            let what = |o: &str| format!("{o} step {} param {i}", step + 1);
            assert_same(&what("AdamW8bit p"), &pa[i], &pb[i]);
            let (ma, va) = a.dequantized_states(i);
            let (mb, vb) = b.dequantized_states(i);
            assert_same(&what("AdamW8bit m"), &ma, &mb);
            assert_same(&what("AdamW8bit v"), &va, &vb);
            assert_same(&what("AdamW p"), &qa[i], &qb[i]);
            let (ma, va) = c.states(i);
            let (mb, vb) = d.states(i);
            assert_same(&what("AdamW m"), &ma, &mb);
            assert_same(&what("AdamW v"), &va, &vb);
        }
    }
}

#[test]
fn dropout_twin_equals_the_kernel() {
    for (p, seed) in [(0.1, 7u64), (0.5, u64::MAX - 3), (0.0, 1)] {
        let d = Dropout { p, seed };
        let x = randn(6 * 513, seed, 1.0, CPU).reshape([6, 513]);
        let _ = x.narrow(1, 0, 1).fill_(f64::INFINITY);
        let keys = Tensor::from_slice(&[
            0,
            row_key(3, 17),
            row_key(1 << 20, 5),
            (1i64 << 40) + 11,
            5,
            i64::MAX / 1024,
        ]);
        let a = d.run_with(&x, 6, 513, Some(&keys), Impl::Custom).unwrap();
        let b = d.run_with(&x, 6, 513, Some(&keys), Impl::Torch).unwrap();
        assert_same(&format!("rows p {p} seed {seed}"), &a, &b);
        let flat = randn(70_001, 3, 1.0, CPU);
        let a = d.run_with(&flat, 1, 70_001, None, Impl::Custom).unwrap();
        let b = d.run_with(&flat, 1, 70_001, None, Impl::Torch).unwrap();
        assert_same(&format!("flat p {p} seed {seed}"), &a, &b);
        // Ten short rows keyed by their index (the kernel's row-parallel path).
        let rows = randn(10 * 9, 4, 1.0, CPU).reshape([10, 9]);
        let a = d.run_with(&rows, 10, 9, None, Impl::Custom).unwrap();
        let b = d.run_with(&rows, 10, 9, None, Impl::Torch).unwrap();
        assert_same(&format!("row index keys p {p}"), &a, &b);
    }
}

#[test]
fn every_cpu_self_check_passes_with_zero_difference() {
    for k in Kernel::ALL {
        let c = qlora_cls::kernels::check(k, CPU);
        assert!(c.passed(), "{}: {c:?}", k.name());
        assert_eq!(c.max_abs_diff, 0.0, "{}: {c:?}", k.name());
        assert!(!c.shape.is_empty(), "{}: no problem ran", k.name());
    }
}

#[test]
fn the_kernels_key_takes_auto_custom_torch_and_names_itself_otherwise() {
    for mode in ["auto", "custom", "torch"] {
        assert_eq!(common::config_from(&["--kernels", mode]).kernels, mode);
    }
    assert_eq!(common::config_from(&[]).kernels, "auto");
    let args = vec!["--kernels".to_string(), "cuda".to_string()];
    let overrides = qlora_cls::config::parse_flags(&args).unwrap();
    let err = qlora_cls::config::Config::load(None, &overrides).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("`kernels`") && msg.contains("auto, custom, torch"),
        "{msg}"
    );
}

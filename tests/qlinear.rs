//! QLinear (NF4 weight + LoRA bypass) against a dense fp32 reference built from the
//! dequantized weight: forward and the gradients with respect to x, A and B.
use qlora_cls::dropout::Dropout;
use qlora_cls::lora::{LoraAdapter, LoraConfig};
use qlora_cls::quant::nf4::{self, Nf4Options};
use qlora_cls::quant::qlinear::{FrozenWeight, QLinear, Scratch};
use tch::{Device, Kind, Tensor};

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let num = (a - b).abs().max().double_value(&[]);
    let den = b.abs().max().double_value(&[]).max(1e-30);
    num / den
}

fn layer(out: i64, inp: i64) -> (QLinear, Tensor) {
    tch::manual_seed(7);
    let w = Tensor::randn([out, inp], (Kind::Float, Device::Cpu)) * 0.05;
    let q = nf4::quantize(&w, &Nf4Options::default()).unwrap();
    let wd = nf4::dequantize(&q, Kind::Float).unwrap();
    let cfg = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into()],
        use_rslora: false,
        layers: None,
        rank_pattern: Vec::new(),
        alpha_pattern: Vec::new(),
        use_dora: false,
        init: Default::default(),
    };
    let mut lora = LoraAdapter::new(inp, out, &cfg, Device::Cpu);
    // B starts at zero in PEFT; make it non-zero so the bypass and A's gradient are exercised.
    lora.b = (Tensor::randn([out, 8], (Kind::Float, Device::Cpu)) * 0.1).set_requires_grad(true);
    (
        QLinear {
            weight: FrozenWeight::Nf4(q),
            bias: None,
            lora: Some(lora),
        },
        wd,
    )
}

#[test]
fn forward_and_gradients_match_a_dense_reference() {
    let (ql, wd) = layer(96, 192);
    let lora = ql.lora.as_ref().unwrap();
    let x = (Tensor::randn([3, 40, 192], (Kind::Float, Device::Cpu))).set_requires_grad(true);
    let y = ql.forward(&x).unwrap();
    let gy = Tensor::randn(y.size(), (Kind::Float, Device::Cpu));
    (&y * &gy).sum(Kind::Float).backward();
    let (gx, ga, gb) = (x.grad(), lora.a.grad(), lora.b.grad());

    // The reference: plain fp32 algebra on copies of the same tensors.
    let xr = x.detach().set_requires_grad(true);
    let ar = lora.a.detach().set_requires_grad(true);
    let br = lora.b.detach().set_requires_grad(true);
    let yr = xr.matmul(&wd.tr()) + xr.matmul(&ar.tr()).matmul(&br.tr()) * lora.scale;
    (&yr * &gy).sum(Kind::Float).backward();

    // fp32 with different summation orders: a few ulps of the largest value.
    assert!(rel_err(&y, &yr) <= 1e-5, "forward {}", rel_err(&y, &yr));
    assert!(
        rel_err(&gx, &xr.grad()) <= 1e-5,
        "dx {}",
        rel_err(&gx, &xr.grad())
    );
    assert!(
        rel_err(&ga, &ar.grad()) <= 1e-5,
        "dA {}",
        rel_err(&ga, &ar.grad())
    );
    assert!(
        rel_err(&gb, &br.grad()) <= 1e-5,
        "dB {}",
        rel_err(&gb, &br.grad())
    );
}

/// The training pass of one projection (`forward_saved` + the hand-written `backward`, LoRA
/// dropout on) against autograd through dense fp32 algebra with the same mask.
#[test]
fn hand_written_backward_matches_a_dense_reference() {
    let (mut ql, wd) = layer(96, 192);
    let p = 0.25;
    if let Some(l) = ql.lora.as_mut() {
        l.dropout = p;
    }
    let lora = ql.lora.as_ref().unwrap();
    let x = Tensor::randn([120, 192], (Kind::Float, Device::Cpu));
    let seed = 99u64;
    let (y, saved) = ql
        .forward_saved(&x, Some(seed.into()), &Scratch::default())
        .unwrap();
    let gy = Tensor::randn(y.size(), (Kind::Float, Device::Cpu));
    let gx = ql
        .backward(
            saved.as_ref(),
            || x.shallow_clone(),
            &gy,
            &Scratch::default(),
        )
        .unwrap();
    let (ga, gb) = (lora.a.grad(), lora.b.grad());

    // The mask the kernel applies: 0 or 1/(1-p), a function of (seed, index).
    let mask = Dropout { p, seed }.apply(&Tensor::ones_like(&x)).unwrap();
    let kept = mask
        .ne(0.0)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    assert!((kept - (1.0 - p)).abs() < 0.02, "kept {kept}");
    let xr = x.detach().set_requires_grad(true);
    let ar = lora.a.detach().set_requires_grad(true);
    let br = lora.b.detach().set_requires_grad(true);
    let yr = xr.matmul(&wd.tr()) + (&xr * &mask).matmul(&ar.tr()).matmul(&br.tr()) * lora.scale;
    (&yr * &gy).sum(Kind::Float).backward();
    for (what, got, want) in [
        ("forward", &y, &yr.detach()),
        ("dx", &gx, &xr.grad()),
        ("dA", &ga, &ar.grad()),
        ("dB", &gb, &br.grad()),
    ] {
        assert!(rel_err(got, want) <= 1e-5, "{what} {}", rel_err(got, want));
    }
    // Without a seed (evaluation) there is no dropout: the autograd forward's output.
    let (y_eval, _) = ql.forward_saved(&x, None, &Scratch::default()).unwrap();
    assert!(rel_err(&y_eval, &ql.forward(&x).unwrap().detach()) <= 1e-6);
}

#[test]
fn small_batches_without_a_graph_use_the_fused_kernel_and_agree() {
    let (ql, wd) = layer(64, 256);
    let lora = ql.lora.as_ref().unwrap();
    let _g = tch::no_grad_guard();
    for rows in [1, 5, 16] {
        let x = Tensor::randn([rows, 256], (Kind::Float, Device::Cpu));
        let y = ql.forward(&x).unwrap();
        let yr = x.matmul(&wd.tr()) + x.matmul(&lora.a.tr()).matmul(&lora.b.tr()) * lora.scale;
        assert!(
            rel_err(&y, &yr) <= 1e-5,
            "rows {rows}: {}",
            rel_err(&y, &yr)
        );
    }
}

/// bf16 products on a CPU without bf16 matrix instructions are multiplied in fp32 and
/// rounded once (`qlinear::gemm_kind`); torch's bf16 GEMM accumulates in fp32 and rounds
/// once too, so the two differ by at most one bf16 rounding (where the two fp32 summation
/// orders land on either side of a rounding boundary) plus, for a product that nearly
/// cancels, the fp32 sums' own error (γ_K·Σ|x||w| for each, K = 576 terms).
#[test]
fn bf16_products_multiplied_in_fp32_round_like_torchs_bf16_gemm() {
    use qlora_cls::quant::qlinear::{linear_in, mm_in};
    tch::manual_seed(3);
    let x = Tensor::randn([96, 576], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
    let w = (Tensor::randn([1536, 576], (Kind::Float, Device::Cpu)) * 0.05).to_kind(Kind::BFloat16);
    let dy = Tensor::randn([96, 1536], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
    let w32 = w.to_kind(Kind::Float);
    let abs = |t: &Tensor| t.to_kind(Kind::Float).abs();
    for (name, ours, torch, magnitude, k) in [
        (
            "x·wᵀ",
            linear_in(&x, &w32, None),
            x.linear(&w, None::<Tensor>),
            abs(&x).mm(&abs(&w).tr()),
            576,
        ),
        (
            "dy·w",
            mm_in(&dy, &w32),
            dy.mm(&w),
            abs(&dy).mm(&abs(&w)),
            1536,
        ),
    ] {
        assert_eq!(ours.kind(), Kind::BFloat16, "{name}");
        let (a, b) = (ours.to_kind(Kind::Float), torch.to_kind(Kind::Float));
        let gamma = k as f64 * 2f64.powi(-24);
        let bound = b.abs() * 2f64.powi(-7) + magnitude * (2.0 * gamma);
        let over = ((&a - &b).abs() - bound).max().double_value(&[]);
        let same = a
            .eq_tensor(&b)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        eprintln!(
            "{name}: {:.3}% of the products bit-equal to torch's bf16 GEMM",
            100.0 * same
        );
        assert!(
            over <= 0.0,
            "{name}: a product differs from torch's beyond one rounding"
        );
        assert!(
            same > 0.99,
            "{name}: only {same} of the products agree bit for bit"
        );
    }
}

/// DoRA's training pass (forward_saved + the hand-written backward, with and without LoRA
/// dropout, with a frozen bias as Qwen2's q/k/v have) against autograd through PEFT's DoRA
/// formula on dense fp32 copies, and the autograd forward and the fp32 fold against it.
#[test]
fn dora_backward_matches_peft_s_formula_under_autograd() {
    for p in [0.0, 0.25] {
        let (mut ql, wd) = layer(96, 192);
        let bias = Tensor::randn([96], (Kind::Float, Device::Cpu)) * 0.1;
        ql.bias = Some(bias.shallow_clone());
        if let Some(l) = ql.lora.as_mut() {
            l.dropout = p;
            l.init_dora(&wd);
            // Off its initial norm, so that g ≠ 1 and every term matters.
            let m = l.magnitude.as_ref().unwrap().detach();
            let noise = Tensor::randn(m.size(), (Kind::Float, Device::Cpu)) * 0.1 + 1.0;
            l.magnitude = Some((m * noise).set_requires_grad(true));
        }
        let lora = ql.lora.as_ref().unwrap();
        let x = Tensor::randn([120, 192], (Kind::Float, Device::Cpu));
        let seed = 5u64;
        let key = (p > 0.0).then(|| seed.into());
        let (y, saved) = ql.forward_saved(&x, key, &Scratch::default()).unwrap();
        let gy = Tensor::randn(y.size(), (Kind::Float, Device::Cpu));
        let gx = ql
            .backward(
                saved.as_ref(),
                || x.shallow_clone(),
                &gy,
                &Scratch::default(),
            )
            .unwrap();
        let m = lora.magnitude.as_ref().unwrap();
        let (ga, gb, gm) = (lora.a.grad(), lora.b.grad(), m.grad());

        let mask = if p > 0.0 {
            Dropout { p, seed }.apply(&Tensor::ones_like(&x)).unwrap()
        } else {
            Tensor::ones_like(&x)
        };
        let xr = x.detach().set_requires_grad(true);
        let ar = lora.a.detach().set_requires_grad(true);
        let br = lora.b.detach().set_requires_grad(true);
        let mr = m.detach().set_requires_grad(true);
        let s = lora.scale;
        let norm = (&wd + br.detach().matmul(&ar.detach()) * s)
            .square()
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
            .sqrt();
        let g = &mr / norm;
        let xd = &xr * &mask;
        let yr = xr.matmul(&wd.tr())
            + &bias
            + (&g - 1.0) * xd.matmul(&wd.tr())
            + &g * xd.matmul(&ar.tr()).matmul(&br.tr()) * s;
        (&yr * &gy).sum(Kind::Float).backward();
        for (what, got, want) in [
            ("forward", &y, &yr.detach()),
            ("dx", &gx, &xr.grad()),
            ("dA", &ga, &ar.grad()),
            ("dB", &gb, &br.grad()),
            ("dm", &gm, &mr.grad()),
        ] {
            let e = rel_err(got, want);
            assert!(e <= 1e-5, "dropout {p}: {what} {e}");
        }
        // Evaluation: the autograd forward and the fp32 fold give the dropout-free output.
        let (y_eval, _) = ql.forward_saved(&x, None, &Scratch::default()).unwrap();
        let y_auto = ql.forward(&x).unwrap().detach();
        assert!(rel_err(&y_eval, &y_auto) <= 1e-6, "dropout {p}: eval");
        let folded = qlora_cls::lora::fold_dora(&wd, &lora.a, &lora.b, s, m);
        let y_fold = x.matmul(&folded.tr()) + &bias;
        assert!(rel_err(&y_fold, &y_auto) <= 1e-5, "dropout {p}: fold");
    }
}

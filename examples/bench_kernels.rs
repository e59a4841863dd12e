//! Timings of our kernels as JSON on stdout, for `bench/run.py` and `scripts/gpu-check.sh`.
//!
//!   bench_kernels nf4   [--rows 4096 --cols 4096 --reps 5 --threads 2 --device cpu]
//!   bench_kernels adamw [--reps 10 --threads 2 --device cpu]
//!   bench_kernels order --n N --batch 8 --seed 42 --epoch 1
//!   bench_kernels gemm  [--m 512 --hidden 576 --intermediate 1536 --heads 9 --kv_heads 3
//!                        --head_dim 64 --reps 5 --dtypes float32,bfloat16 --threads 2]
//!
//! `nf4` quantizes a bf16 [rows, cols] normal matrix (blocksize 64, double quantization) and
//! dequantizes it back to bf16, both through a fresh output and in place (`dequantize_into`).
//! `adamw` times `AdamW8bit::step` on the Llama-3-8B LoRA r=8 q/v + head shapes (3,416,064
//! parameters); the first step (state allocation) is reported apart. `order` prints the
//! batches of example indices the trainer draws in that epoch, so that the reference run can
//! feed the same rows in the same order. `gemm` is the machine's own matmul peak for a decoder
//! layer's frozen projections (defaults: the SmolLM2-135M shape of the training bench): plain
//! `x[M, in] · W[out, in]ᵀ` (`Tensor::linear`, no bias) for each distinct (in, out) of q, k,
//! v, o, gate, up and down, per dtype; each shape's median is weighted by how often it occurs
//! in one layer, and the figure is one layer's forward FLOPs (2·M·in·out summed) over the sum
//! of those times. Every timing is wall-clock seconds per repetition,
//! with the device synchronised on CUDA.
use anyhow::{bail, Context, Result};
use qlora_cls::data::batch::epoch_batches;
use qlora_cls::optim::adamw8bit::{AdamW8bit, AdamWConfig, Optimizer};
use qlora_cls::quant::nf4::{self, Nf4Options};
use serde_json::json;
use std::collections::HashMap;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

struct Args {
    mode: String,
    flags: HashMap<String, String>,
}

impl Args {
    fn parse() -> Result<Args> {
        let mut it = std::env::args().skip(1);
        let mode = it
            .next()
            .context("usage: bench_kernels nf4|adamw|order|gemm [--flag value ...]")?;
        let mut flags = HashMap::new();
        while let Some(k) = it.next() {
            let Some(name) = k.strip_prefix("--") else {
                bail!("unexpected argument `{k}` (flags are `--name value`)");
            };
            let v = it
                .next()
                .with_context(|| format!("flag --{name} needs a value"))?;
            flags.insert(name.replace('-', "_"), v);
        }
        Ok(Args { mode, flags })
    }

    fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T> {
        match self.flags.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| anyhow::anyhow!("--{name}: `{v}` is not a valid number")),
        }
    }

    fn device(&self) -> Result<Device> {
        match self
            .flags
            .get("device")
            .map(String::as_str)
            .unwrap_or("cpu")
        {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            d => match d.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
                Some(i) => Ok(Device::Cuda(i)),
                None => bail!("--device: `{d}` is not cpu, cuda or cuda:N"),
            },
        }
    }
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Seconds per call of `f`. On the CPU each of `reps` calls is timed alone. On a GPU a
/// ~50 µs kernel would be dominated by the syncs around it, so after one warm-up call each of
/// three samples times `reps` calls queued back to back between two syncs, divided by `reps`.
fn time_reps(device: Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    if device.is_cuda() {
        f()?;
        let mut out = Vec::with_capacity(3);
        for _ in 0..3 {
            sync(device);
            let t = Instant::now();
            for _ in 0..reps {
                f()?;
            }
            sync(device);
            out.push(t.elapsed().as_secs_f64() / reps.max(1) as f64);
        }
        return Ok(out);
    }
    let mut out = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        out.push(t.elapsed().as_secs_f64());
    }
    Ok(out)
}

fn bench_nf4(a: &Args, device: Device) -> Result<serde_json::Value> {
    let rows: i64 = a.num("rows", 4096)?;
    let cols: i64 = a.num("cols", 4096)?;
    let reps: usize = a.num("reps", 5)?;
    let opts = Nf4Options {
        blocksize: 64,
        double_quant: true,
    };
    tch::manual_seed(0);
    let w = Tensor::randn([rows, cols], (Kind::BFloat16, device));
    // One untimed round: first-touch page faults, CUDA context and kernel loading.
    let q = nf4::quantize(&w, &opts)?;
    let mut out = nf4::dequantize(&q, Kind::BFloat16)?;
    let quantize_s = time_reps(device, reps, || nf4::quantize(&w, &opts).map(drop))?;
    let dequantize_s = time_reps(device, reps, || {
        nf4::dequantize(&q, Kind::BFloat16).map(drop)
    })?;
    let dequantize_into_s = time_reps(device, reps, || nf4::dequantize_into(&q, &mut out))?;
    let numel = rows * cols;
    Ok(json!({
        "rows": rows,
        "cols": cols,
        "numel": numel,
        "bf16_bytes": numel * 2,
        "nf4_bytes": q.nbytes(),
        "quantize_s": quantize_s,
        "dequantize_s": dequantize_s,
        "dequantize_into_s": dequantize_into_s,
    }))
}

/// Llama-3-8B, LoRA r=8 on q_proj/v_proj (A [r, in], B [out, r]) and the [2, 4096] head.
fn lora_8b_shapes() -> Vec<[i64; 2]> {
    let (r, h, kv) = (8, 4096, 1024);
    let mut shapes = Vec::new();
    for _ in 0..32 {
        shapes.extend([[r, h], [h, r], [r, h], [kv, r]]);
    }
    shapes.push([2, h]);
    shapes
}

fn bench_adamw(a: &Args, device: Device) -> Result<serde_json::Value> {
    let reps: usize = a.num("reps", 10)?;
    tch::manual_seed(0);
    let params: Vec<Tensor> = lora_8b_shapes()
        .iter()
        .map(|s| (Tensor::randn(*s, (Kind::Float, device)) * 0.02).set_requires_grad(true))
        .collect();
    // Gradients: d/dp sum(p * g) = g; they stay in place across steps (no zero_grad).
    for p in &params {
        let g = Tensor::randn(p.size(), (Kind::Float, device)) * 1e-3;
        (p * &g).sum(Kind::Float).backward();
    }
    let n: i64 = params.iter().map(|p| p.numel() as i64).sum();
    let mut opt = AdamW8bit::new(params, AdamWConfig::default());
    // The first step allocates the states: timed alone, not as a warm-up.
    sync(device);
    let t = Instant::now();
    opt.step(3e-4)?;
    sync(device);
    let first = [t.elapsed().as_secs_f64()];
    let step_s = time_reps(device, reps, || opt.step(3e-4))?;
    Ok(
        json!({"params": n, "tensors": lora_8b_shapes().len(), "first_step_s": first[0], "step_s": step_s}),
    )
}

fn batch_order(a: &Args) -> Result<serde_json::Value> {
    let n: usize = a.num("n", 0)?;
    if n == 0 {
        bail!("order: --n (number of training examples) is required");
    }
    let batch: usize = a.num("batch", 8)?;
    let seed: u64 = a.num("seed", 42)?;
    let epoch: usize = a.num("epoch", 1)?;
    Ok(json!(epoch_batches(n, batch, Some(seed), epoch, None)))
}

/// The frozen projections of one Llama decoder layer as (name, in, out).
fn layer_projections(a: &Args) -> Result<Vec<(&'static str, i64, i64)>> {
    let hidden: i64 = a.num("hidden", 576)?;
    let inter: i64 = a.num("intermediate", 1536)?;
    let heads: i64 = a.num("heads", 9)?;
    let kv: i64 = a.num("kv_heads", 3)?;
    let hd: i64 = a.num("head_dim", 64)?;
    if [hidden, inter, heads, kv, hd].iter().any(|&v| v <= 0) {
        bail!(
            "gemm: --hidden, --intermediate, --heads, --kv_heads and --head_dim must be positive"
        );
    }
    Ok(vec![
        ("q_proj", hidden, heads * hd),
        ("k_proj", hidden, kv * hd),
        ("v_proj", hidden, kv * hd),
        ("o_proj", heads * hd, hidden),
        ("gate_proj", hidden, inter),
        ("up_proj", hidden, inter),
        ("down_proj", inter, hidden),
    ])
}

fn parse_kind(name: &str) -> Result<Kind> {
    Ok(match name {
        "float32" | "fp32" => Kind::Float,
        "bfloat16" | "bf16" => Kind::BFloat16,
        "float16" | "fp16" => Kind::Half,
        d => bail!("gemm: --dtypes: `{d}` is not float32, bfloat16 or float16"),
    })
}

fn bench_gemm(a: &Args, device: Device) -> Result<serde_json::Value> {
    let m: i64 = a.num("m", 512)?;
    let reps: usize = a.num("reps", 5)?;
    if m <= 0 || reps == 0 {
        bail!("gemm: --m and --reps must be positive");
    }
    let projections = layer_projections(a)?;
    // Distinct (in, out) shapes and how often each occurs in one layer.
    let mut shapes: Vec<((i64, i64), usize)> = Vec::new();
    for &(_, i, o) in &projections {
        match shapes.iter_mut().find(|(s, _)| *s == (i, o)) {
            Some((_, n)) => *n += 1,
            None => shapes.push(((i, o), 1)),
        }
    }
    let layer_flops: f64 = projections
        .iter()
        .map(|&(_, i, o)| 2.0 * (m * i * o) as f64)
        .sum();
    let dtypes = a
        .flags
        .get("dtypes")
        .map(String::as_str)
        .unwrap_or("float32,bfloat16");
    let mut per_dtype = serde_json::Map::new();
    for name in dtypes.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let kind = parse_kind(name)?;
        tch::manual_seed(0);
        let mut rows = Vec::new();
        let mut layer_s = 0.0;
        for &((i, o), count) in &shapes {
            let x = Tensor::randn([m, i], (kind, device));
            let w = Tensor::randn([o, i], (kind, device)) * 0.02;
            // Untimed: first touch, packing caches, kernel selection.
            drop(x.linear::<&Tensor>(&w, None));
            let secs = time_reps(device, reps, || {
                drop(x.linear::<&Tensor>(&w, None));
                Ok(())
            })?;
            let med = median(&secs);
            layer_s += med * count as f64;
            rows.push(
                json!({"in": i, "out": o, "count": count, "median_s": med, "s": secs,
                "gflops": 2.0 * (m * i * o) as f64 / med / 1e9}),
            );
        }
        per_dtype.insert(
            name.to_string(),
            json!({"shapes": rows, "layer_s": layer_s, "gflops": layer_flops / layer_s / 1e9}),
        );
    }
    let p_layer: i64 = projections.iter().map(|&(_, i, o)| i * o).sum();
    Ok(json!({
        "m": m,
        "reps": reps,
        "projections": projections.iter().map(|&(n, i, o)| json!({"name": n, "in": i, "out": o})).collect::<Vec<_>>(),
        "linear_params_per_layer": p_layer,
        "layer_forward_flops": layer_flops,
        "dtypes": per_dtype,
    }))
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn run() -> Result<()> {
    let a = Args::parse()?;
    let threads: i32 = a.num("threads", 0)?;
    if threads > 0 {
        tch::set_num_threads(threads);
    }
    let device = a.device()?;
    let mut value = match a.mode.as_str() {
        "nf4" => bench_nf4(&a, device)?,
        "adamw" => bench_adamw(&a, device)?,
        "order" => batch_order(&a)?,
        "gemm" => bench_gemm(&a, device)?,
        m => bail!("unknown mode `{m}`: nf4, adamw, order or gemm"),
    };
    if let Some(obj) = value.as_object_mut() {
        obj.insert("threads".into(), json!(tch::get_num_threads()));
        obj.insert("device".into(), json!(format!("{device:?}")));
    }
    println!("{value}");
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench_kernels: {e:#}");
        std::process::exit(1);
    }
}

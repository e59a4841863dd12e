//! AdamW over the trainable parameters: bitsandbytes' `AdamW8bit` and torch's `AdamW`.
//!
//! [`AdamW8bit`] is `bnb.optim.AdamW8bit` as bitsandbytes 0.50.2 runs it on the CPU backend
//! (`backends/cpu/ops.py` + `libbitsandbytes_cpu`): tensors with at least 4096 elements
//! (`min_8bit_size`) keep m and v as blockwise 8-bit codes (block 256; the signed dynamic map
//! for m, the unsigned one for v; one fp32 absmax per block), smaller tensors keep fp32 m and
//! v and take bitsandbytes' 32-bit update. Weight decay is decoupled (`p *= 1 - lr*wd`, only
//! when wd > 0); bias correction uses the parameter's own step count (incremented before the
//! update, so the first update uses step 1); states start as zeros on the first step a
//! parameter has a gradient; percentile clipping and max_unorm are off (bnb's defaults).
//! Each 8-bit step dequantizes m and v (`code[q] * absmax`), updates them and the parameter
//! from the unquantized new states, and re-quantizes them with a fresh per-block absmax the
//! way bnb's `quantize_cpu` does (a 65536-bin lookup of the nearest code, see
//! `kernels/optim8bit.h`). [`AdamW32`] is `torch.optim.AdamW` (fp32 states, lerp for m).
//!
//! Numerics: every float operation is rounded where torch/bnb round it (including the fmas
//! torch's vectorised CPU kernels perform), so results are bit-identical to the references
//! except for one thing: torch computes `Tensor.sqrt()` on CPU through MKL's vector math,
//! which is not correctly rounded (about 0.6% of values come out 1 ulp off); the kernels use
//! the IEEE square root, identical on CPU and CUDA. That only touches the parameter update
//! (the states never depend on the square root), by at most an ulp or so per step.
//!
//! Kernels: `kernels/optim8bit_cpu.cpp` (OpenMP) and its CUDA twin `kernels/optim8bit.cu`,
//! picked by the parameter's device. Updates are written in place through raw pointers into
//! the (contiguous, fp32) parameter tensors, outside autograd.
//!
//! Why one file: both optimizers share the state layout, the checkpoint form and the kernel
//! dispatch that make a resumed run bit-identical; the C ABI is `optim/ffi.rs`.
use super::adamw_torch;
use super::ffi::{c as ffi, tables_ok, Scalars};
pub use super::ffi::{dynamic_map, BLOCK};
use crate::kernel_choice::{self, Impl, Kernel};
use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

/// bitsandbytes' `min_8bit_size`: smaller tensors keep 32-bit states.
pub const MIN_8BIT_SIZE: i64 = 4096;

#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

pub trait Optimizer {
    /// One update of every parameter from its `.grad()` (parameters without grad are skipped), at learning rate `lr`.
    fn step(&mut self, lr: f64) -> anyhow::Result<()>;
    fn zero_grad(&mut self);
    /// Every state tensor with a stable name (for checkpoints): e.g. "0.state1", "0.absmax1", ..., plus "step".
    fn state_tensors(&self) -> Vec<(String, tch::Tensor)>;
    fn load_state_tensors(
        &mut self,
        get: &dyn Fn(&str) -> Option<tch::Tensor>,
    ) -> anyhow::Result<()>;
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Flavor {
    /// bitsandbytes' Optimizer2State("adam", optim_bits=8).
    Bnb8,
    /// torch.optim.AdamW (single-tensor path).
    Torch,
}

enum State {
    /// Blockwise 8-bit m (`q1`, signed map) and v (`q2`, unsigned map).
    Eight {
        q1: Tensor,
        q2: Tensor,
        absmax1: Tensor,
        absmax2: Tensor,
        step: i64,
    },
    /// fp32 m and v.
    Full { m: Tensor, v: Tensor, step: i64 },
}

impl State {
    fn step(&self) -> i64 {
        match self {
            State::Eight { step, .. } | State::Full { step, .. } => *step,
        }
    }
}

fn blocks(n: i64) -> i64 {
    (n + BLOCK - 1) / BLOCK
}

/// Python's arithmetic for the step scalars (f64), rounded to f32 as torch casts a Python
/// scalar for a float32 op. `powf` is libm's `pow`, the function CPython's `**` calls.
fn scalars(flavor: Flavor, eight_bit: bool, cfg: &AdamWConfig, lr: f64, step: i64) -> Scalars {
    let (b1, b2) = cfg.betas;
    let wd = cfg.weight_decay;
    let t = step as f64;
    let c1 = 1.0 - b1.powf(t);
    let (eps, correction2, step_size, apply_decay) = match flavor {
        Flavor::Bnb8 => {
            let c2 = (1.0 - b2.powf(t)).sqrt();
            if eight_bit {
                // backends/cpu/ops.py, 8-bit: denom = sqrt(v)/c2 + eps; p.addcdiv_(m, denom, value=-lr/c1)
                (cfg.eps, c2, -lr / c1, wd > 0.0)
            } else {
                // 32-bit: update = m / (sqrt(v) + eps*c2); p.add_(update, alpha=-lr*c2/c1)
                (cfg.eps * c2, c2, -lr * c2 / c1, wd > 0.0)
            }
        }
        Flavor::Torch => {
            // torch/optim/adam.py (_single_tensor_adam): bias_correction2 ** 0.5, -(lr / bc1)
            let c2 = (1.0 - b2.powf(t)).powf(0.5);
            (cfg.eps, c2, -(lr / c1), wd != 0.0)
        }
    };
    Scalars {
        beta1: b1 as f32,
        omb1: (1.0 - b1) as f32,
        beta2: b2 as f32,
        omb2: (1.0 - b2) as f32,
        eps: eps as f32,
        correction2: correction2 as f32,
        decay: (1.0 - lr * wd) as f32,
        step_size: step_size as f32,
        apply_decay: apply_decay as i32,
    }
}

fn fptr(t: &Tensor) -> *mut f32 {
    t.data_ptr() as *mut f32
}

fn bptr(t: &Tensor) -> *mut u8 {
    t.data_ptr() as *mut u8
}

#[cfg(qlora_cuda)]
fn cuda_result(code: i32, what: &str) -> Result<()> {
    ensure!(
        code == 0,
        "CUDA kernel `{what}` failed: {} (cudaError {code}; CUDA_LAUNCH_BLOCKING=1 reports a \
         fault at the kernel that made it)",
        crate::cuda::error_name(code)
    );
    Ok(())
}

#[cfg(not(qlora_cuda))]
fn no_cuda() -> Result<()> {
    bail!("parameter is on CUDA but this build has no CUDA kernels (built with QLORA_NO_CUDA=1)")
}

/// Runs one update of `p` (contiguous fp32) with gradient `g` (contiguous fp32, same device)
/// by the given implementation.
fn run_update(
    flavor: Flavor,
    p: &Tensor,
    g: &Tensor,
    state: &State,
    s: Scalars,
    imp: Impl,
) -> Result<()> {
    if imp == Impl::Torch {
        return match (state, flavor) {
            (
                State::Eight {
                    q1,
                    q2,
                    absmax1,
                    absmax2,
                    ..
                },
                _,
            ) => adamw_torch::bnb8(p, g, q1, q2, absmax1, absmax2, &s),
            (State::Full { m, v, .. }, Flavor::Bnb8) => adamw_torch::bnb32(p, g, m, v, &s),
            (State::Full { m, v, .. }, Flavor::Torch) => adamw_torch::torch32(p, g, m, v, &s),
        };
    }
    if matches!(state, State::Eight { .. }) {
        tables_ok()?;
    }
    let n = p.numel() as i64;
    match p.device() {
        Device::Cpu => {
            // SAFETY: all tensors are contiguous, on the CPU, of the kinds and sizes the kernel
            // expects (checked by the caller and at state creation), and alive for the call.
            unsafe {
                match (state, flavor) {
                    (
                        State::Eight {
                            q1,
                            q2,
                            absmax1,
                            absmax2,
                            ..
                        },
                        _,
                    ) => ffi::qlora_adam_bnb8_cpu(
                        fptr(p),
                        fptr(g),
                        bptr(q1),
                        bptr(q2),
                        fptr(absmax1),
                        fptr(absmax2),
                        n,
                        s,
                    ),
                    (State::Full { m, v, .. }, Flavor::Bnb8) => {
                        ffi::qlora_adam_bnb32_cpu(fptr(p), fptr(g), fptr(m), fptr(v), n, s)
                    }
                    (State::Full { m, v, .. }, Flavor::Torch) => {
                        ffi::qlora_adam_torch32_cpu(fptr(p), fptr(g), fptr(m), fptr(v), n, s)
                    }
                }
            }
            kernel_choice::inject_fault(Kernel::AdamwStep, p);
            Ok(())
        }
        #[cfg(qlora_cuda)]
        Device::Cuda(dev) => {
            let stream = crate::cuda::current_stream(dev);
            let dev = dev as i32;
            // SAFETY: as above, with device pointers on CUDA device `dev`; the kernels run on
            // libtorch's current stream, ordered with torch's work on these tensors.
            let code = unsafe {
                match (state, flavor) {
                    (
                        State::Eight {
                            q1,
                            q2,
                            absmax1,
                            absmax2,
                            ..
                        },
                        _,
                    ) => ffi::qlora_adam_bnb8_cuda(
                        fptr(p),
                        fptr(g),
                        bptr(q1),
                        bptr(q2),
                        fptr(absmax1),
                        fptr(absmax2),
                        n,
                        s,
                        dev,
                        stream,
                    ),
                    (State::Full { m, v, .. }, Flavor::Bnb8) => ffi::qlora_adam_bnb32_cuda(
                        fptr(p),
                        fptr(g),
                        fptr(m),
                        fptr(v),
                        n,
                        s,
                        dev,
                        stream,
                    ),
                    (State::Full { m, v, .. }, Flavor::Torch) => ffi::qlora_adam_torch32_cuda(
                        fptr(p),
                        fptr(g),
                        fptr(m),
                        fptr(v),
                        n,
                        s,
                        dev,
                        stream,
                    ),
                }
            };
            cuda_result(code, "AdamW")
        }
        #[cfg(not(qlora_cuda))]
        Device::Cuda(_) => no_cuda(),
        other => bail!("parameters on {other:?} are not supported (CPU or CUDA only)"),
    }
}

/// A detached copy on the CPU (checkpoint material must not alias live state).
fn cpu_copy(t: &Tensor) -> Tensor {
    if t.device() == Device::Cpu {
        t.copy()
    } else {
        t.to_device(Device::Cpu)
    }
}

/// A fresh tensor of `kind` and `shape` on `device` holding `src`'s values (same kind and
/// element count required).
fn owned(src: &Tensor, name: &str, kind: Kind, shape: &[i64], device: Device) -> Result<Tensor> {
    ensure!(
        src.kind() == kind,
        "optimizer state {name}: expected {kind:?}, found {:?}",
        src.kind()
    );
    let numel: i64 = shape.iter().product();
    ensure!(
        src.numel() as i64 == numel,
        "optimizer state {name}: expected {numel} elements (shape {shape:?}), found {:?}",
        src.size()
    );
    let mut out = Tensor::zeros(shape, (kind, device));
    out.f_copy_(&src.reshape(shape))
        .with_context(|| format!("cannot copy optimizer state {name}"))?;
    Ok(out)
}

fn scalar_i64(t: &Tensor, name: &str) -> Result<i64> {
    ensure!(
        t.numel() == 1,
        "optimizer state {name}: expected one value, found shape {:?}",
        t.size()
    );
    t.to_kind(Kind::Int64)
        .reshape([1])
        .f_int64_value(&[0])
        .with_context(|| format!("optimizer state {name}: not an integer"))
}

/// What the two optimizers share: parameters, per-parameter states, the update loop.
struct Core {
    params: Vec<Tensor>,
    states: Vec<Option<State>>,
    cfg: AdamWConfig,
    flavor: Flavor,
    /// Number of `step` calls (the per-parameter counts drive the bias correction).
    steps: i64,
}

impl Core {
    fn new(params: Vec<Tensor>, cfg: AdamWConfig, flavor: Flavor) -> Self {
        let states = params.iter().map(|_| None).collect();
        Core {
            params,
            states,
            cfg,
            flavor,
            steps: 0,
        }
    }

    fn uses_8bit(&self, p: &Tensor) -> bool {
        self.flavor == Flavor::Bnb8 && p.numel() as i64 >= MIN_8BIT_SIZE
    }

    fn fresh_state(&self, p: &Tensor) -> State {
        let n = p.numel() as i64;
        let dev = p.device();
        if self.uses_8bit(p) {
            // bnb: zeros_like(p, uint8) codes and zero absmax, so the first dequantization
            // yields code[0] * 0 (a signed zero), exactly as bnb's does.
            State::Eight {
                q1: Tensor::zeros([n], (Kind::Uint8, dev)),
                q2: Tensor::zeros([n], (Kind::Uint8, dev)),
                absmax1: Tensor::zeros([blocks(n)], (Kind::Float, dev)),
                absmax2: Tensor::zeros([blocks(n)], (Kind::Float, dev)),
                step: 0,
            }
        } else {
            State::Full {
                m: Tensor::zeros([n], (Kind::Float, dev)),
                v: Tensor::zeros([n], (Kind::Float, dev)),
                step: 0,
            }
        }
    }

    /// One update; `imp` forces an implementation, `None` lets `kernel_choice` pick.
    fn step(&mut self, lr: f64, imp: Option<Impl>) -> Result<()> {
        ensure!(lr.is_finite() && lr >= 0.0, "invalid learning rate {lr}");
        let _no_grad = tch::no_grad_guard();
        for i in 0..self.params.len() {
            let p = &self.params[i];
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            ensure!(
                p.kind() == Kind::Float,
                "parameter {i}: the optimizer updates fp32 parameters, found {:?}",
                p.kind()
            );
            ensure!(p.is_contiguous(), "parameter {i} is not contiguous");
            ensure!(
                g.device() == p.device(),
                "parameter {i} is on {:?} but its gradient on {:?}",
                p.device(),
                g.device()
            );
            ensure!(
                g.numel() == p.numel(),
                "parameter {i}: gradient shape {:?} differs from the parameter's {:?}",
                g.size(),
                p.size()
            );
            let g = if g.kind() == Kind::Float {
                g
            } else {
                g.to_kind(Kind::Float)
            };
            let g = g.contiguous();
            if self.states[i].is_none() {
                let fresh = self.fresh_state(p);
                self.states[i] = Some(fresh);
            }
            let state = self.states[i].as_mut().expect("state was just created");
            let step = match state {
                State::Eight { step, .. } | State::Full { step, .. } => {
                    *step += 1;
                    *step
                }
            };
            let s = scalars(
                self.flavor,
                matches!(state, State::Eight { .. }),
                &self.cfg,
                lr,
                step,
            );
            let imp =
                imp.unwrap_or_else(|| kernel_choice::choose(Kernel::AdamwStep, p.device(), check));
            run_update(self.flavor, p, &g, state, s, imp)
                .with_context(|| format!("updating parameter {i}"))?;
        }
        self.steps += 1;
        Ok(())
    }

    /// Zeroes the gradients in place (tch has no way to reset them to None as torch's
    /// `zero_grad(set_to_none=True)` does): a parameter that once had a gradient keeps taking
    /// part in later steps even if a backward pass leaves its gradient at zero.
    fn zero_grad(&mut self) {
        for p in self.params.iter_mut() {
            p.zero_grad();
        }
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (p, st)) in self.params.iter().zip(&self.states).enumerate() {
            let Some(st) = st else { continue };
            let shape = p.size();
            match st {
                State::Eight {
                    q1,
                    q2,
                    absmax1,
                    absmax2,
                    ..
                } => {
                    out.push((
                        format!("{i}.state1"),
                        cpu_copy(&q1.reshape(shape.as_slice())),
                    ));
                    out.push((
                        format!("{i}.state2"),
                        cpu_copy(&q2.reshape(shape.as_slice())),
                    ));
                    out.push((format!("{i}.absmax1"), cpu_copy(absmax1)));
                    out.push((format!("{i}.absmax2"), cpu_copy(absmax2)));
                }
                State::Full { m, v, .. } => {
                    out.push((
                        format!("{i}.state1"),
                        cpu_copy(&m.reshape(shape.as_slice())),
                    ));
                    out.push((
                        format!("{i}.state2"),
                        cpu_copy(&v.reshape(shape.as_slice())),
                    ));
                }
            }
            out.push((format!("{i}.step"), Tensor::from_slice(&[st.step()])));
        }
        out.push(("step".to_string(), Tensor::from_slice(&[self.steps])));
        out
    }

    fn load_state_tensors(&mut self, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<()> {
        let mut states = Vec::with_capacity(self.params.len());
        for (i, p) in self.params.iter().enumerate() {
            let name = |k: &str| format!("{i}.{k}");
            let Some(s1) = get(&name("state1")) else {
                states.push(None);
                continue;
            };
            let need = |k: &str| {
                get(&name(k)).with_context(|| format!("optimizer state {} is missing", name(k)))
            };
            let s2 = need("state2")?;
            let step = scalar_i64(&need("step")?, &name("step"))?;
            ensure!(
                step >= 0,
                "optimizer state {}: negative step {step}",
                name("step")
            );
            let n = p.numel() as i64;
            let dev = p.device();
            let eight = self.uses_8bit(p);
            let found_eight = s1.kind() == Kind::Uint8;
            ensure!(
                eight == found_eight,
                "optimizer state {}: parameter {i} ({n} elements) needs {} states, the checkpoint has {:?}",
                name("state1"),
                if eight { "8-bit" } else { "fp32" },
                s1.kind()
            );
            let st = if eight {
                let nb = blocks(n);
                State::Eight {
                    q1: owned(&s1, &name("state1"), Kind::Uint8, &[n], dev)?,
                    q2: owned(&s2, &name("state2"), Kind::Uint8, &[n], dev)?,
                    absmax1: owned(&need("absmax1")?, &name("absmax1"), Kind::Float, &[nb], dev)?,
                    absmax2: owned(&need("absmax2")?, &name("absmax2"), Kind::Float, &[nb], dev)?,
                    step,
                }
            } else {
                State::Full {
                    m: owned(&s1, &name("state1"), Kind::Float, &[n], dev)?,
                    v: owned(&s2, &name("state2"), Kind::Float, &[n], dev)?,
                    step,
                }
            };
            states.push(Some(st));
        }
        let steps = match get("step") {
            Some(t) => scalar_i64(&t, "step")?,
            None => states.iter().flatten().map(State::step).max().unwrap_or(0),
        };
        self.states = states;
        self.steps = steps;
        Ok(())
    }

    /// (m, v) of parameter `i` as fp32 CPU tensors of its shape; zeros before its first step.
    fn states_f32(&self, i: usize) -> (Tensor, Tensor) {
        let p = self.params.get(i).unwrap_or_else(|| {
            panic!(
                "parameter index {i} out of range ({} parameters)",
                self.params.len()
            )
        });
        let shape = p.size();
        match &self.states[i] {
            None => (
                Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu)),
                Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu)),
            ),
            Some(State::Full { m, v, .. }) => (
                cpu_copy(&m.reshape(shape.as_slice())),
                cpu_copy(&v.reshape(shape.as_slice())),
            ),
            Some(State::Eight {
                q1,
                q2,
                absmax1,
                absmax2,
                ..
            }) => {
                let deq = |q: &Tensor, absmax: &Tensor, signed: bool| {
                    let q = cpu_copy(q);
                    let absmax = cpu_copy(absmax);
                    let out = Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu));
                    // SAFETY: contiguous CPU copies of the right kinds; `out` has n floats.
                    unsafe {
                        ffi::qlora_dequant_dynamic_cpu(
                            bptr(&q),
                            fptr(&absmax),
                            signed as i32,
                            q.numel() as i64,
                            fptr(&out),
                        )
                    };
                    out
                };
                (deq(q1, absmax1, true), deq(q2, absmax2, false))
            }
        }
    }
}

/// `bnb.optim.AdamW8bit(params, lr, betas, eps, weight_decay)` (bitsandbytes 0.50.2, CPU numerics).
pub struct AdamW8bit {
    core: Core,
}

impl AdamW8bit {
    pub fn new(params: Vec<Tensor>, cfg: AdamWConfig) -> Self {
        AdamW8bit {
            core: Core::new(params, cfg, Flavor::Bnb8),
        }
    }

    /// Dequantized states (m, v) as f32 tensors of the parameter's shape, for tests/inspection.
    /// CPU tensors; zeros before the parameter's first step. Panics if `i` is out of range.
    pub fn dequantized_states(&self, i: usize) -> (Tensor, Tensor) {
        self.core.states_f32(i)
    }

    /// [`Optimizer::step`] by the given implementation (kernel or torch twin).
    pub fn step_with(&mut self, lr: f64, imp: Impl) -> Result<()> {
        self.core.step(lr, Some(imp))
    }
}

impl Optimizer for AdamW8bit {
    fn step(&mut self, lr: f64) -> Result<()> {
        self.core.step(lr, None)
    }
    fn zero_grad(&mut self) {
        self.core.zero_grad()
    }
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.core.state_tensors()
    }
    fn load_state_tensors(&mut self, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<()> {
        self.core.load_state_tensors(get)
    }
}

/// `torch.optim.AdamW(params, lr, betas, eps, weight_decay)` with fp32 states.
pub struct AdamW32 {
    core: Core,
}

impl AdamW32 {
    pub fn new(params: Vec<Tensor>, cfg: AdamWConfig) -> Self {
        AdamW32 {
            core: Core::new(params, cfg, Flavor::Torch),
        }
    }

    /// [`Optimizer::step`] by the given implementation (kernel or torch twin).
    pub fn step_with(&mut self, lr: f64, imp: Impl) -> Result<()> {
        self.core.step(lr, Some(imp))
    }

    /// (m, v) of parameter `i` as f32 CPU tensors (see [`AdamW8bit::dequantized_states`]).
    pub fn states(&self, i: usize) -> (Tensor, Tensor) {
        self.core.states_f32(i)
    }
}

impl Optimizer for AdamW32 {
    fn step(&mut self, lr: f64) -> Result<()> {
        self.core.step(lr, None)
    }
    fn zero_grad(&mut self) {
        self.core.zero_grad()
    }
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.core.state_tensors()
    }
    fn load_state_tensors(&mut self, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<()> {
        self.core.load_state_tensors(get)
    }
}

/// The self-check of the update kernels.
pub fn check(device: Device) -> crate::kernel_choice::Check {
    crate::kernel_check::run(
        device,
        vec![(
            "[4396] 8-bit + [777] bnb 32-bit + [777] torch, 2 steps".into(),
            Box::new(move |imp| check_problem(device, imp)),
        )],
    )
}

/// The self-check problem of the update kernels (`kernel_check`): two steps of each flavour
/// (bitsandbytes 8-bit with a partial last block, bitsandbytes 32-bit, torch) from random
/// states on `device`, by `imp`; returns every updated tensor.
pub(crate) fn check_problem(device: Device, imp: Impl) -> Result<Vec<Tensor>> {
    use crate::kernel_check::{rand_codes, randn};
    let cfg = AdamWConfig::default();
    let n8 = MIN_8BIT_SIZE + 300;
    let p = randn(n8, 1, 1.0, device);
    let q1 = rand_codes(n8, 2, device);
    let q2 = rand_codes(n8, 3, device);
    let absmax1 = randn(blocks(n8), 4, 0.01, device).abs();
    let absmax2 = randn(blocks(n8), 5, 1e-4, device).abs();
    let eight = State::Eight {
        q1: q1.shallow_clone(),
        q2: q2.shallow_clone(),
        absmax1: absmax1.shallow_clone(),
        absmax2: absmax2.shallow_clone(),
        step: 0,
    };
    let n32 = 777;
    let mut out = Vec::new();
    for step in 1..=2 {
        let g = randn(n8, 10 + step as u64, 0.1, device);
        let s = scalars(Flavor::Bnb8, true, &cfg, 1e-3, step);
        run_update(Flavor::Bnb8, &p, &g, &eight, s, imp)?;
    }
    out.extend([p, q1, q2, absmax1, absmax2]);
    for flavor in [Flavor::Bnb8, Flavor::Torch] {
        let p = randn(n32, 20, 1.0, device);
        let m = randn(n32, 21, 0.01, device);
        let v = randn(n32, 22, 1e-3, device).square();
        let full = State::Full {
            m: m.shallow_clone(),
            v: v.shallow_clone(),
            step: 0,
        };
        for step in 1..=2 {
            let g = randn(n32, 30 + step as u64, 0.1, device);
            let s = scalars(flavor, false, &cfg, 1e-3, step);
            run_update(flavor, &p, &g, &full, s, imp)?;
        }
        out.extend([p, m, v]);
    }
    Ok(out)
}

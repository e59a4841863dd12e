//! Which implementation each custom kernel runs in this process: the hand-written kernel
//! (`kernels/*.cpp`, `kernels/*.cu`) or its torch twin (libtorch tensor ops only, any
//! device). `kernels: auto | custom | torch` (config key and flag) sets the mode:
//!
//! * `torch`: every kernel runs its twin.
//! * `custom`: every kernel runs the hand-written code, unchecked.
//! * `auto` (default): the first use of a kernel on a device runs it on a small random
//!   problem against its twin on the same device (`kernel_check`); a kernel that errors or
//!   differs beyond its tolerance is reported in one line and replaced by its twin for the
//!   rest of the run. Devices without custom kernels (or a build without CUDA kernels on a
//!   CUDA device) run the twins.
//!
//! `QLORA_TEST_KERNEL_FAULT=<kernel name>` is a test-only fault switch: it perturbs that CPU
//! kernel's output (every call, self-check included), so a test can prove on the CPU that a
//! failing check is caught, named, and that the twin then takes over.
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use tch::{Device, Tensor};

/// The test-only fault switch (see the module docs).
pub const FAULT_ENV: &str = "QLORA_TEST_KERNEL_FAULT";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Auto,
    Custom,
    Torch,
}

impl Mode {
    pub fn parse(text: &str) -> Result<Mode> {
        Ok(match text {
            "auto" => Mode::Auto,
            "custom" => Mode::Custom,
            "torch" => Mode::Torch,
            other => bail!("`{other}` is not one of auto, custom, torch"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Custom => "custom",
            Mode::Torch => "torch",
        }
    }
}

/// The custom kernels that have a torch twin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Nf4Quantize,
    Nf4Dequantize,
    Nf4MatmulSmall,
    Q8Quantize,
    Q8Dequantize,
    AdamwStep,
    Dropout,
}

impl Kernel {
    pub const ALL: [Kernel; 7] = [
        Kernel::Nf4Quantize,
        Kernel::Nf4Dequantize,
        Kernel::Nf4MatmulSmall,
        Kernel::Q8Quantize,
        Kernel::Q8Dequantize,
        Kernel::AdamwStep,
        Kernel::Dropout,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Nf4Quantize => "nf4_quantize",
            Kernel::Nf4Dequantize => "nf4_dequantize",
            Kernel::Nf4MatmulSmall => "nf4_matmul_small",
            Kernel::Q8Quantize => "q8_quantize",
            Kernel::Q8Dequantize => "q8_dequantize",
            Kernel::AdamwStep => "adamw_step",
            Kernel::Dropout => "dropout",
        }
    }

    pub fn from_name(name: &str) -> Option<Kernel> {
        Kernel::ALL.into_iter().find(|k| k.name() == name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    Custom,
    Torch,
}

impl Impl {
    pub fn name(self) -> &'static str {
        match self {
            Impl::Custom => "custom",
            Impl::Torch => "torch",
        }
    }
}

/// The outcome of one self-check.
#[derive(Clone, Debug)]
pub struct Check {
    /// The problem(s) it ran, e.g. `[33, 70] bs64 dq`.
    pub shape: String,
    /// Largest |custom − twin| over all outputs (NaN where both are NaN counts as equal).
    pub max_abs_diff: f64,
    pub tol: f64,
    /// The custom kernel's error, when it failed to run.
    pub error: Option<String>,
    pub check_ms: f64,
    pub custom_ms: f64,
    pub torch_ms: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.max_abs_diff <= self.tol
    }

    /// The one line a failed check is reported in.
    pub fn failure_line(&self, kernel: Kernel) -> String {
        match &self.error {
            Some(e) => format!(
                "kernel self-check FAILED: {} {} error: {e}; using the torch twin for this run",
                kernel.name(),
                self.shape
            ),
            None => format!(
                "kernel self-check FAILED: {} {} max |Δ| {:.3e} > tol {:.3e}; using the torch twin for this run",
                kernel.name(),
                self.shape,
                self.max_abs_diff,
                self.tol
            ),
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    kernel: Kernel,
    device: Device,
    imp: Impl,
    check: Option<Check>,
}

const MODE_UNSET: u8 = 0;
static MODE: AtomicU8 = AtomicU8::new(MODE_UNSET);
static CHOICES: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

fn choices() -> std::sync::MutexGuard<'static, Vec<Entry>> {
    // The entries stay consistent even if a holder panicked: each push is one whole entry.
    CHOICES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sets the mode for the rest of the process (a change drops the decisions already taken).
pub fn set_mode(mode: Mode) {
    let code = match mode {
        Mode::Auto => 1,
        Mode::Custom => 2,
        Mode::Torch => 3,
    };
    // The same mode again (train, then the model loader) keeps the checks already run.
    if MODE.swap(code, Ordering::SeqCst) != code {
        choices().clear();
    }
}

/// The mode in effect; `auto` until [`set_mode`] says otherwise.
pub fn mode() -> Mode {
    match MODE.load(Ordering::SeqCst) {
        2 => Mode::Custom,
        3 => Mode::Torch,
        _ => Mode::Auto,
    }
}

/// Whether this build has the hand-written kernel family for `device`.
pub fn custom_available(device: Device) -> bool {
    device == Device::Cpu || (cfg!(qlora_cuda) && device.is_cuda())
}

/// The implementation `kernel` runs on `device`. In `auto` mode the first call for a
/// (kernel, device) pair runs `check`, the kernel's self-check against its twin (and prints
/// the line of a failure). Each kernel's module passes its own check, so this registry
/// needs to know none of them.
pub fn choose(kernel: Kernel, device: Device, check: fn(Device) -> Check) -> Impl {
    match mode() {
        Mode::Torch => Impl::Torch,
        Mode::Custom => Impl::Custom,
        Mode::Auto if !custom_available(device) => Impl::Torch,
        Mode::Auto => {
            if let Some(imp) = chosen(kernel, device) {
                return imp;
            }
            // The check runs without the lock: it calls the kernels, which ask here again
            // only through their explicit implementation.
            let check = check(device);
            if !check.passed() {
                eprintln!("{}", check.failure_line(kernel));
            }
            let imp = if check.passed() {
                Impl::Custom
            } else {
                Impl::Torch
            };
            let mut all = choices();
            if let Some(e) = all
                .iter()
                .find(|e| e.kernel == kernel && e.device == device)
            {
                return e.imp;
            }
            all.push(Entry {
                kernel,
                device,
                imp,
                check: Some(check),
            });
            imp
        }
    }
}

/// The decision taken for (kernel, device), without copying its check: this runs on every
/// kernel call of every training step.
fn chosen(kernel: Kernel, device: Device) -> Option<Impl> {
    choices()
        .iter()
        .find(|e| e.kernel == kernel && e.device == device)
        .map(|e| e.imp)
}

/// The self-check behind the decision for (kernel, device), when one ran.
pub fn check_of(kernel: Kernel, device: Device) -> Option<Check> {
    choices()
        .iter()
        .find(|e| e.kernel == kernel && e.device == device)
        .and_then(|e| e.check.clone())
}

/// The kernel the fault switch names, if any (read once).
fn faulted() -> Option<Kernel> {
    static FAULT: OnceLock<Option<Kernel>> = OnceLock::new();
    *FAULT.get_or_init(|| {
        let name = std::env::var(FAULT_ENV).ok()?;
        let k = Kernel::from_name(&name);
        if k.is_none() {
            eprintln!("warning: {FAULT_ENV}={name:?} names no kernel; no fault injected");
        }
        k
    })
}

/// Test-only: perturbs the first element of a CPU kernel's output `t` when the fault switch
/// names `kernel` (floats get +0.25, integer codes their lowest bit flipped).
pub fn inject_fault(kernel: Kernel, t: &Tensor) {
    if faulted() != Some(kernel) || t.device() != Device::Cpu || t.numel() == 0 {
        return;
    }
    let _guard = tch::no_grad_guard();
    let mut first = t.view([-1]).narrow(0, 0, 1);
    if t.is_floating_point() {
        let _ = first.g_add_scalar_(0.25);
    } else {
        let _ = first.bitwise_xor_(1);
    }
}

//! Every custom kernel by name: its self-check ([`check`], each stated by the kernel's own
//! module), the decision for a device ([`choose`], [`prepare`]) and how the decisions are
//! reported (the start line, summary.json's `kernels`). Above the kernels, so that the
//! registry below them (`kernel_choice`) names no kernel's module.
use crate::kernel_choice::{self, mode, Check, Impl, Kernel};
use crate::quant::{blockwise8, nf4};
use serde_json::{json, Value};
use tch::Device;

/// The self-check of `kernel`, by the kernel's module.
pub fn check_fn(kernel: Kernel) -> fn(Device) -> Check {
    match kernel {
        Kernel::Nf4Quantize => nf4::check_quantize,
        Kernel::Nf4Dequantize => nf4::check_dequantize,
        Kernel::Nf4MatmulSmall => nf4::check_matmul_small,
        Kernel::Q8Quantize => blockwise8::check_quantize,
        Kernel::Q8Dequantize => blockwise8::check_dequantize,
        Kernel::AdamwStep => crate::optim::adamw8bit::check,
        Kernel::Dropout => crate::dropout::check,
    }
}

/// Runs the self-check of `kernel` on `device` (`doctor`, the tests).
pub fn check(kernel: Kernel, device: Device) -> Check {
    check_fn(kernel)(device)
}

/// The implementation `kernel` runs on `device` (`kernel_choice::choose` with its check).
pub fn choose(kernel: Kernel, device: Device) -> Impl {
    kernel_choice::choose(kernel, device, check_fn(kernel))
}

/// Decides every kernel for `device` now (in `auto` mode: runs all self-checks), so the
/// start line can report them.
pub fn prepare(device: Device) {
    for k in Kernel::ALL {
        choose(k, device);
    }
}

/// One line for the start of a run: mode and each kernel's implementation and check.
pub fn start_line(device: Device) -> String {
    let parts: Vec<String> = Kernel::ALL
        .into_iter()
        .map(|k| {
            let imp = choose(k, device);
            match kernel_choice::check_of(k, device) {
                Some(c) if c.passed() => format!(
                    "{} {} (check passed in {:.1} ms)",
                    k.name(),
                    imp.name(),
                    c.check_ms
                ),
                Some(c) => format!(
                    "{} {} (check FAILED, max |Δ| {:.3e} > tol {:.3e})",
                    k.name(),
                    imp.name(),
                    c.max_abs_diff,
                    c.tol
                ),
                None => format!("{} {}", k.name(), imp.name()),
            }
        })
        .collect();
    format!(
        "kernels: {} on {device:?}: {}",
        mode().name(),
        parts.join(", ")
    )
}

/// summary.json's `kernels`: the mode, and per kernel its implementation and check.
pub fn summary_json(device: Device) -> Value {
    let mut out = serde_json::Map::new();
    out.insert("mode".into(), json!(mode().name()));
    for k in Kernel::ALL {
        let imp = choose(k, device);
        let v = match kernel_choice::check_of(k, device) {
            Some(c) => json!({
                "impl": imp.name(),
                "check": if c.passed() { "passed" } else { "failed" },
                "shape": c.shape,
                "max_abs_diff": finite_or_null(c.max_abs_diff),
                "tol": c.tol,
                "error": c.error,
                "check_ms": c.check_ms,
                "custom_ms": c.custom_ms,
                "torch_ms": c.torch_ms,
            }),
            None => json!({"impl": imp.name(), "check": "not run"}),
        };
        out.insert(k.name().into(), v);
    }
    Value::Object(out)
}

fn finite_or_null(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

//! Where a training step's time goes: wall time per kind of work (NF4 dequantize, frozen
//! matmuls, LoRA, attention, norms and elementwise, head and loss, optimizer, all-reduce,
//! host and data), so that each speed change is aimed by a measurement (`--profile true`
//! writes `profile.json` beside `metrics.csv`; `make bench` prints it).
//!
//! Scopes nest, and each instant is charged to the innermost open scope only, so the parts
//! add up to the step's wall time. Only time inside a training step's root scope counts:
//! the same code called by evaluation, outside any step, is not charged. On CUDA every scope
//! boundary synchronises the device, which makes the breakdown true and the run slower: keep
//! profiling off for runs whose speed matters on a GPU (on a CPU, work is synchronous and a
//! boundary costs a clock read).
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Instant;

/// A kind of work a step's time is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Batch collation, host↔device copies, row bookkeeping, the loop's own work.
    HostData,
    /// NF4 (and double-quantised absmax) dequantisation of frozen weights.
    Dequantize,
    /// The frozen projections' matmuls (forward and input-gradient).
    Matmul,
    /// LoRA branches, forward and backward, dropout masks included.
    Lora,
    /// Scaled-dot-product attention, forward and backward.
    Attention,
    /// Norms, rotary embeddings, activations, residual adds, gathers and scatters.
    Elementwise,
    /// Pooling, the classifier head, the loss and its backward.
    HeadLoss,
    /// Gradient clipping and the optimizer step.
    Optimizer,
    /// Gradient all-reduce across ranks.
    AllReduce,
}

impl Part {
    pub const ALL: [Part; 9] = [
        Part::HostData,
        Part::Dequantize,
        Part::Matmul,
        Part::Lora,
        Part::Attention,
        Part::Elementwise,
        Part::HeadLoss,
        Part::Optimizer,
        Part::AllReduce,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Part::HostData => "host_and_data",
            Part::Dequantize => "nf4_dequantize",
            Part::Matmul => "frozen_matmul",
            Part::Lora => "lora",
            Part::Attention => "attention",
            Part::Elementwise => "norms_and_elementwise",
            Part::HeadLoss => "head_and_loss",
            Part::Optimizer => "optimizer",
            Part::AllReduce => "all_reduce",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
/// CUDA device index to synchronise at scope boundaries; -1 for none.
static SYNC_DEVICE: AtomicI64 = AtomicI64::new(-1);

#[derive(Default)]
struct State {
    /// Open scopes, innermost last.
    stack: Vec<Part>,
    /// When the innermost scope was last charged.
    mark: Option<Instant>,
    seconds: [f64; Part::ALL.len()],
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Turns profiling on for this process; `device` is synchronised at scope boundaries when
/// it is a CUDA device.
pub fn enable(device: tch::Device) {
    if let tch::Device::Cuda(i) = device {
        SYNC_DEVICE.store(i as i64, Ordering::Relaxed);
    }
    ENABLED.store(true, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn now() -> Instant {
    let d = SYNC_DEVICE.load(Ordering::Relaxed);
    if d >= 0 {
        tch::Cuda::synchronize(d);
    }
    Instant::now()
}

/// An open scope; closing it (drop) charges its time since the last boundary.
#[must_use = "the scope closes when this guard is dropped"]
pub struct Scope {
    active: bool,
}

/// Opens a scope charged to `part`. `root` scopes (one per training step) start the
/// accounting; a non-root scope outside any root is inert.
fn open(part: Part, root: bool) -> Scope {
    if !enabled() {
        return Scope { active: false };
    }
    let active = STATE.with(|s| {
        let mut s = s.borrow_mut();
        if s.stack.is_empty() && !root {
            return false;
        }
        let t = now();
        if let (Some(&outer), Some(mark)) = (s.stack.last(), s.mark) {
            s.seconds[outer.index()] += (t - mark).as_secs_f64();
        }
        s.stack.push(part);
        s.mark = Some(t);
        true
    });
    Scope { active }
}

/// A scope charged to `part` inside the current step (inert outside one).
pub fn scope(part: Part) -> Scope {
    open(part, false)
}

/// The root scope of one training step: time not in an inner scope goes to `HostData`.
pub fn step() -> Scope {
    open(Part::HostData, true)
}

impl Drop for Scope {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            let t = now();
            if let (Some(part), Some(mark)) = (s.stack.pop(), s.mark) {
                s.seconds[part.index()] += (t - mark).as_secs_f64();
            }
            s.mark = if s.stack.is_empty() { None } else { Some(t) };
        });
    }
}

/// Seconds charged to each part so far on this thread, in [`Part::ALL`] order.
pub fn totals() -> Vec<(Part, f64)> {
    STATE.with(|s| {
        let s = s.borrow();
        Part::ALL
            .iter()
            .map(|&p| (p, s.seconds[p.index()]))
            .collect()
    })
}

/// Clears the totals (e.g. after warm-up steps).
pub fn reset() {
    STATE.with(|s| s.borrow_mut().seconds = Default::default());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::sleep;
    use std::time::Duration;

    #[test]
    fn nested_scopes_charge_the_innermost_and_add_up() {
        enable(tch::Device::Cpu);
        reset();
        {
            let _outside = scope(Part::Matmul);
            sleep(Duration::from_millis(5));
        }
        assert!(totals().iter().all(|&(_, s)| s == 0.0), "no step open");
        let t0 = Instant::now();
        {
            let _root = step();
            sleep(Duration::from_millis(10));
            {
                let _l = scope(Part::Elementwise);
                sleep(Duration::from_millis(10));
                {
                    let _m = scope(Part::Matmul);
                    sleep(Duration::from_millis(20));
                }
                sleep(Duration::from_millis(10));
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        let t = totals();
        let get = |p| t.iter().find(|(q, _)| *q == p).map(|x| x.1).unwrap_or(0.0);
        assert!(get(Part::Matmul) >= 0.020 && get(Part::Matmul) < 0.035);
        assert!(get(Part::Elementwise) >= 0.020 && get(Part::Elementwise) < 0.035);
        assert!(get(Part::HostData) >= 0.010 && get(Part::HostData) < 0.025);
        let sum: f64 = t.iter().map(|x| x.1).sum();
        assert!((sum - wall).abs() < 0.005, "parts {sum} vs wall {wall}");
        reset();
    }
}

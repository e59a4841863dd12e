//! The learning-rate schedule: `transformers.get_linear_schedule_with_warmup`.
//!
//! `LambdaLR` evaluates the multiplier at construction (step 0) and after every
//! `scheduler.step()`, so the k-th optimizer update (0-based) runs at
//! `base_lr * linear_warmup_multiplier(k, warmup, total)`.

/// transformers.get_linear_schedule_with_warmup's multiplier at `step` (0-based, as LambdaLR sees it).
pub fn linear_warmup_multiplier(step: usize, warmup_steps: usize, total_steps: usize) -> f64 {
    // transformers/optimization.py, _get_linear_schedule_with_warmup_lr_lambda, in Python's
    // float arithmetic (f64); the integer differences may be negative there, hence i128.
    if step < warmup_steps {
        return step as f64 / warmup_steps.max(1) as f64;
    }
    let remaining = total_steps as i128 - step as i128;
    let decay_len = (total_steps as i128 - warmup_steps as i128).max(1);
    (remaining as f64 / decay_len as f64).max(0.0)
}

/// Warmup steps for a ratio of the total, the way the reference script / HF compute it (document the rounding).
///
/// `TrainingArguments.get_warmup_steps`: `math.ceil(total_steps * ratio)`, the product taken in
/// f64, so it rounds *up* and inherits binary rounding (30 * 0.1 = 3.0000000000000004 gives 4).
/// HF reads a value >= 1 as an absolute step count; here `ratio` is always a ratio (callers
/// validate it to [0, 1]). A negative or NaN product gives 0.
pub fn warmup_steps(total_steps: usize, ratio: f64) -> usize {
    let w = (total_steps as f64 * ratio).ceil();
    if w.is_nan() || w <= 0.0 {
        0
    } else {
        w as usize
    }
}

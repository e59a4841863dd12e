//! Optimizers over the trainable (LoRA + head) parameters, and the LR schedule.
pub mod adamw8bit;
pub mod adamw_torch;
pub mod ffi;
pub mod schedule;

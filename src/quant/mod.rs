//! 4-bit NF4 weights (bitsandbytes-exact) and the linear layer that uses them.
pub mod nf4;
pub mod nf4_torch;
pub mod qlinear;

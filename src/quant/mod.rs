//! 4-bit NF4 weights (bitsandbytes-exact) and the linear layer that uses them: the format
//! (`format`), the kernels' C ABI (`ffi`), NF4 quantize/dequantize/matmul (`nf4`, twin
//! `nf4_torch`), the 8-bit blockwise code (`blockwise8`), bitsandbytes' serialisation
//! (`bnb_format`) and the frozen linear with its LoRA bypass (`qlinear`).
pub mod blockwise8;
pub mod bnb_format;
pub mod ffi;
pub mod format;
pub mod nf4;
pub mod nf4_torch;
pub mod qlinear;

//! qlora-cls: QLoRA fine-tuning of Llama sequence classifiers on libtorch.
//!
//! The path of one example: `config` ─► `data` (formats, prompt, batch) ─► `model`
//! (HF checkpoint ─► NF4 via `quant`) ─► `train` (LoRA via `lora`, 8-bit AdamW via `optim`)
//! ─► `eval` ─► run folder (`runio`).
pub mod config;
pub mod data;
pub mod demo;
pub mod lora;
pub mod model;
pub mod optim;
pub mod quant;
pub mod runio;
pub mod adapter;
pub mod eval;
pub mod metrics;
pub mod train;
pub mod plot;
pub mod dist;

//! qlora-cls: QLoRA fine-tuning of Llama sequence classifiers on libtorch.
//!
//! The path of one example: `config` ─► `data` (formats, prompt, batch) ─► `model`
//! (HF checkpoint ─► NF4 via `quant`) ─► `train` (LoRA via `lora`, 8-bit AdamW via `optim`,
//! gradients averaged across ranks by `dist`) ─► `eval` ─► run folder (`runio`, `adapter`,
//! `resume`, `metrics`, `plot`).
pub mod adapter;
pub mod calibration;
pub mod config;
pub mod cuda;
pub mod data;
pub mod demo;
pub mod demo_tasks;
pub mod dist;
pub mod doctor;
pub mod dropout;
pub mod dropout_torch;
pub mod eval;
pub mod exact_f32;
pub mod hardware;
pub mod kernel_check;
pub mod kernel_choice;
pub mod kernels;
pub mod labels;
pub mod loader;
pub mod lora;
pub mod lora_init;
pub mod merge;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod plot;
pub mod profile;
pub mod quant;
pub mod quantize;
pub mod resume;
pub mod runio;
pub mod scored;
pub mod serve;
pub mod splitmix;
pub mod splits;
pub mod suggest;
pub mod task;
pub mod threshold;
pub mod train;
pub mod units;

//! The Llama sequence classifier and the Hugging Face files it is read from.
pub mod backward;
pub mod checkpoint;
pub mod classifier;
pub mod hf_config;
pub mod llama;
pub mod loss;

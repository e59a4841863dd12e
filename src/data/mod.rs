//! Examples from disk, the prompt template, tokenisation and batches.
pub mod batch;
pub mod chat;
pub mod examples;
pub mod formats;
pub mod long_text;
pub mod prompt;
pub mod table;

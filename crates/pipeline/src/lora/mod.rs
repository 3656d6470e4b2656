//! LoRA adapters: their files' key layouts (`keys.rs`).

pub mod keys;

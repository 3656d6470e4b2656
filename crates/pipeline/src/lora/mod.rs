//! LoRA adapters: their files' key layouts (`keys.rs`) and reading one file against the base
//! model's layers (`adapter.rs`).

pub mod adapter;
pub mod keys;

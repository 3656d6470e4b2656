//! LoRA adapters: their files' key layouts (`keys.rs`), reading one file against the base
//! model's layers (`adapter.rs`), the base weights kept to build networks again (`base.rs`),
//! and a job's adapters merged into private copies of the layers they adapt (`variant.rs`).

pub mod adapter;
pub mod base;
pub mod keys;
pub mod variant;

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    /// The repository root, where the tiny models and adapters are.
    pub fn root() -> PathBuf {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).to_path_buf()
    }
}

//! LoRA adapters: their files' key layouts (`keys.rs`) and reading one file against the base
//! model's layers (`adapter.rs`).

pub mod adapter;
pub mod keys;

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    /// The repository root, where the tiny models and adapters are.
    pub fn root() -> PathBuf {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).to_path_buf()
    }
}

//! Errors raised while loading a model folder.
//!
//! Every variant names the file (and the key or tensor) it is about, so an operator can fix the
//! folder without reading code.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file is malformed, or one of its keys has a value we cannot run.
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    /// A weight file is missing, refused, corrupt, or does not hold what the config implies.
    #[error("{}: {message}", path.display())]
    Weights { path: PathBuf, message: String },
    /// `tokenizer/` could not be loaded (the message names the file).
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// `scheduler/scheduler_config.json` is unreadable or names a scheduler we lack.
    #[error(transparent)]
    Scheduler(#[from] crate::schedulers::SchedulerError),
    /// The folder is a kind of model this server does not run.
    #[error("{0}")]
    Unsupported(String),
    /// `parameters.extra` asked for a device or dtype we cannot provide.
    #[error("{0}")]
    Options(String),
    /// Building a model component failed (the message names the component).
    #[error("{component}: {message}")]
    Model { component: String, message: String },
}

impl PipelineError {
    pub(crate) fn config(path: &Path, message: impl Into<String>) -> Self {
        Self::Config {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    pub(crate) fn key(path: &Path, key: &str, message: impl std::fmt::Display) -> Self {
        Self::Config {
            path: path.to_path_buf(),
            message: format!("key `{key}`: {message}"),
        }
    }

    pub(crate) fn weights(path: &Path, message: impl Into<String>) -> Self {
        Self::Weights {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn model(component: &str, e: candle_core::Error) -> Self {
        Self::Model {
            component: component.to_string(),
            message: candle_message(&e),
        }
    }
}

/// A candle error's message without the backtrace candle attaches when `RUST_BACKTRACE` is set.
pub fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => candle_message(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        other => other.to_string(),
    }
}

/// Turns a candle failure at `stage` into the generator's internal error.
pub(crate) fn internal(
    stage: impl Into<String>,
) -> impl FnOnce(candle_core::Error) -> sdserve_generation::GenerateError {
    let stage = stage.into();
    move |e| sdserve_generation::GenerateError::Internal {
        stage,
        message: candle_message(&e),
    }
}

//! Errors of settings loading. Every variant names where the bad value came from: a file (and the
//! key in it), an environment variable (and its value) or a command-line flag.

use std::fmt;
use std::path::PathBuf;

/// Where a model's settings came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A `settings.json` or `model-settings.json` file.
    File(PathBuf),
    /// The `MLSERVER_MODEL_*` environment variables (no `model-settings.json` in the repository).
    Environment,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "{}", path.display()),
            Origin::Environment => f.write_str("environment (MLSERVER_MODEL_* variables)"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The folder given to `sdserve start` is missing or not a folder.
    #[error("model repository {}: {reason}", path.display())]
    Root { path: PathBuf, reason: String },

    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: invalid JSON at line {line}, column {column}: {message}", path.display())]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },

    /// A known key has a value of the wrong type or out of range.
    #[error("{origin}: `{key}`: {message}")]
    InvalidValue {
        origin: Origin,
        key: String,
        message: String,
    },

    #[error("environment variable {var}={value:?}: {message}")]
    InvalidEnv {
        var: String,
        value: String,
        message: String,
    },

    #[error("command-line flag {flag} {value:?}: {message}")]
    InvalidFlag {
        flag: String,
        value: String,
        message: String,
    },

    #[error(
        "{origin}: `implementation` is required (use \"sdserve.StableDiffusion\", \
         or set MLSERVER_MODEL_IMPLEMENTATION)"
    )]
    MissingImplementation { origin: Origin },

    #[error("{origin}: `implementation` {value:?} {reason}")]
    UnsupportedImplementation {
        origin: Origin,
        value: String,
        reason: String,
    },

    #[error(
        "two models named {name:?} with {}: {first} and {second}",
        version.as_deref().map(|v| format!("version {v:?}")).unwrap_or_else(|| "no version".into())
    )]
    DuplicateModel {
        name: String,
        version: Option<String>,
        first: Origin,
        second: Origin,
    },

    /// A model name asked of the repository that cannot be a model name (a path, `..`, empty).
    #[error("invalid model name {name:?}: {reason}")]
    InvalidModelName { name: String, reason: String },

    /// Settings that are each valid but do not fit together.
    #[error("invalid settings: {message}")]
    Conflict { message: String },
}

//! What every handler can reach.

use std::sync::Arc;

use sdserve_engine::{Engine, ModelSpec};

/// Server-level settings the HTTP layer needs.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    /// `server_name`, reported by `GET /v2` and in CloudEvents headers ("mlserver" by default).
    pub server_name: String,
    pub server_version: String,
    pub extensions: Vec<String>,
    pub max_request_body_bytes: usize,
    /// Compress responses of 500 bytes and more when the client accepts gzip.
    pub gzip_enabled: bool,
    /// When set, inference and repository routes need `Authorization: Bearer <token>`.
    pub auth_token: Option<String>,
    /// Kubernetes namespace, when running in a pod (CloudEvents `ce-namespace`).
    pub namespace: Option<String>,
    /// `cors_settings`: no CORS headers at all when `None`, as in MLServer.
    pub cors: Option<Cors>,
}

/// MLServer's `cors_settings`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cors {
    pub allow_origins: Vec<String>,
    pub allow_origin_regex: Option<String>,
    pub allow_credentials: bool,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub max_age: u64,
}

/// A model repository problem, for the repository API.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RepositoryError {
    #[error("Model {0} not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Failed(String),
}

/// The models on disk, re-read on every call (as MLServer's index and load do).
pub trait ModelRepository: Send + Sync {
    /// `(name, version)` of every model found under the repository root.
    fn list(&self) -> Result<Vec<(String, Option<String>)>, RepositoryError>;
    /// Every version of one model, only from inside the repository root.
    fn find(&self, name: &str) -> Result<Vec<ModelSpec>, RepositoryError>;
}

pub struct AppState {
    pub engine: Engine,
    pub config: HttpConfig,
    pub repository: Arc<dyn ModelRepository>,
}

pub type SharedState = Arc<AppState>;

//! What every handler can reach: the transport-neutral service and the REST-only settings.

use std::sync::Arc;

use sdserve_serving::Service;

/// Settings only the REST face has.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    pub max_request_body_bytes: usize,
    /// Compress responses of 500 bytes and more when the client accepts gzip.
    pub gzip_enabled: bool,
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

pub struct AppState {
    pub service: Arc<Service>,
    pub config: HttpConfig,
}

pub type SharedState = Arc<AppState>;

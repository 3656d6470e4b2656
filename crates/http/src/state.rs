//! What every handler can reach: the transport-neutral service and the REST-only settings.

use std::sync::Arc;

use sdserve_serving::Service;
/// MLServer's `cors_settings`, as the settings file gives them.
pub use sdserve_settings::CorsSettings as Cors;

/// Settings only the REST face has.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    pub max_request_body_bytes: usize,
    /// Compress responses of 500 bytes and more when the client accepts gzip.
    pub gzip_enabled: bool,
    /// `cors_settings`: no CORS headers at all when `None`, as in MLServer.
    pub cors: Option<Cors>,
}

pub struct AppState {
    pub service: Arc<Service>,
    pub config: HttpConfig,
}

pub type SharedState = Arc<AppState>;

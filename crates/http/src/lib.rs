//! The REST face of sdserve: MLServer 1.7.1's V2 routes on the inference port and the
//! Prometheus listener on the metrics port. The only crate that imports axum.
//!
//! # Layout
//! - [`routes`]: the route table and the metrics router.
//! - [`handlers`]: one module per API area (health, metadata, infer, repository, docs).
//! - [`convert`]: V2 request ⇄ engine request/outcome.
//! - [`body`]: body size limit and gzip/deflate decoding.
//! - [`binary`]: Triton's binary tensor data extension (binary inputs and outputs).
//! - [`error`]: failures → status codes and `{"error": ...}` bodies.
//! - [`rest_metrics`]: the `rest_server_*` families.
//! - [`state`]: what handlers share; the model repository trait.

pub mod binary;
pub mod body;
pub mod convert;
pub mod error;
pub mod handlers;
pub mod rest_metrics;
pub mod routes;
pub mod state;

pub use error::ApiError;
pub use rest_metrics::RestMetrics;
pub use routes::{metrics_router, router};
pub use state::{AppState, Cors, HttpConfig, ModelRepository, RepositoryError, SharedState};

//! The REST face of sdserve: MLServer 1.7.1's V2 routes on the inference port and the
//! Prometheus listener on the metrics port. The only crate that imports axum.
//!
//! # Layout
//! - [`routes`]: the route table and the metrics router.
//! - [`connections`]: serving a listener within header, keep-alive and connection bounds.
//! - [`handlers`]: one module per API area (health, metadata, infer, repository, docs).
//! - [`openai`]: OpenAI's Images API (generations, edits, models) and its error shape.
//! - [`body`]: body size limit and gzip/deflate decoding.
//! - [`binary`]: Triton's binary tensor data extension (binary inputs and outputs).
//! - [`response`]: a finished request as V2 JSON.
//! - [`error`]: failures → status codes and `{"error": ...}` bodies.
//! - [`rest_metrics`]: the `rest_server_*` families.
//! - [`state`]: what handlers share (the service, REST-only settings).
//!
//! Admission, the contract, validation, streaming, repository operations and metadata are
//! `sdserve_serving`'s, shared with gRPC.

pub mod binary;
pub mod body;
pub mod connections;
pub mod error;
pub mod handlers;
pub mod openai;
pub mod response;
pub mod rest_metrics;
pub mod routes;
pub mod state;

pub use connections::{ConnectionLimits, serve};
pub use error::ApiError;
pub use rest_metrics::RestMetrics;
pub use routes::{metrics_router, router};
pub use state::{AppState, Cors, HttpConfig, SharedState};

//! Serving, independent of transports: what REST (axum) and gRPC (tonic) both do for a call,
//! so each transport only reads its own messages and writes its own answers.
//!
//! # Layout
//! - [`service`]: [`Service`] (engine, server identity, repository) and bearer tokens.
//! - [`infer`]: admit → decode and validate → run, for one inference call.
//! - [`stream`]: the streaming loop (progress events, then the result).
//! - [`response`]: a finished request and the effective settings answers echo.
//! - [`cloud_events`]: MLServer's CloudEvents headers.
//! - [`repository`]: index, load, unload, and the [`ModelRepository`] trait.
//! - [`metadata`]: server and model metadata, readiness.
//! - [`error`]: [`ServeError`] and its [`ErrorKind`], which each transport maps to its codes.

pub mod cloud_events;
pub mod connections;
pub mod error;
pub mod infer;
pub mod metadata;
pub mod repository;
pub mod response;
pub mod service;
pub mod stream;

pub use cloud_events::cloud_events;
pub use error::{ErrorKind, ServeError};
pub use infer::{Accepted, Mode, Pending, Slot, new_id};
pub use metadata::{ReadyModel, model_parameters};
pub use repository::{ModelRepository, RepositoryError};
pub use response::{Generated, effective_parameters};
pub use service::{ServerInfo, Service, authorized};
pub use stream::run_streaming;

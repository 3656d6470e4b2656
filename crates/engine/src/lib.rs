//! The engine: everything between a validated request and a model, with no HTTP and no candle.
//!
//! # Layout
//! - [`engine`]: the facade: admit, validate into a job, queue and await, drain, shut down.
//! - [`admission`]: the in-flight gate checked before a body is read.
//! - [`queue`]: the queue and batcher as plain state (admit, take a batch at time t, expire,
//!   close); [`batch_key`]: which jobs may share a batch.
//! - `worker`: the worker threads; `batch_control`: stop and progress per batch member.
//! - [`progress`]: progress events in scheduler steps.
//! - `lifecycle`: model load, reload and unload; [`models`]: specs, loader trait, registry.
//! - [`observer`]: the model metrics of one request; [`telemetry`]: the engine's families;
//!   [`metrics`]: a small Prometheus registry and text renderer.
//! - [`error`]: why a request failed; [`panics`]: model panics caught and reported once.
//! - `control`, `queued`: one request's cancellation state, and its queue entry.

pub mod admission;
mod batch_control;
pub mod batch_key;
mod control;
pub mod engine;
pub mod error;
mod lifecycle;
pub mod memory;
pub mod metrics;
pub mod models;
pub mod observer;
pub mod panics;
pub mod progress;
pub mod queue;
mod queued;
pub mod telemetry;
mod worker;

pub use admission::Admission;
pub use batch_key::BatchKey;
pub use engine::{Engine, EngineConfig, InferOutcome, Prepared};
pub use error::EngineError;
pub use memory::MemoryBudget;
pub use models::{LoadedModel, ModelLoader, ModelSpec, ModelStatus};
pub use observer::InferObserver;
pub use progress::{Progress, StepProgress};

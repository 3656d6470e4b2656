//! The engine: everything between a decoded request and a model, with no HTTP and no candle.
//!
//! # Layout
//! - [`generator`]: the synchronous `Generator` trait a model implements.
//! - [`request`]: the decoded request, model defaults and limits, validation into a job.
//! - [`models`]: model specs, the loader trait, the registry of versions and load states.
//! - [`engine`]: admission, the bounded queue, worker threads, deadlines, cancellation, drain.
//! - [`error`]: why a request failed.
//! - [`metrics`]: a small Prometheus registry and text renderer.
//! - [`telemetry`]: the engine's metric families.

pub mod engine;
pub mod error;
pub mod generator;
pub mod metrics;
pub mod models;
pub mod request;
pub mod telemetry;

pub use engine::{
    Admission, Engine, EngineConfig, InferObserver, InferOutcome, Prepared, Progress,
};
pub use error::EngineError;
pub use generator::{
    GenerateError, GeneratedImage, GenerationJob, Generator, ImageSpec, Latents, ModelDescription,
    RunToEnd, StepControl, StopReason,
};
pub use models::{LoadedModel, ModelLoader, ModelSpec, ModelStatus};
pub use request::{ExtraError, GenerationDefaults, GenerationRequest, Limits, ValidationError};

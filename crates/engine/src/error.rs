//! Why a request failed, as the engine sees it. The serving layer turns each into one error
//! kind, which every transport maps to its own codes.

use sdserve_generation::{GenerateError, StopReason};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("{}", not_found_message(.name, .version.as_deref()))]
    ModelNotFound {
        name: String,
        version: Option<String>,
    },
    #[error("{}", not_ready_message(.name, .version.as_deref()))]
    ModelNotReady {
        name: String,
        version: Option<String>,
    },
    /// The request breaks a limit of the model.
    #[error("{0}")]
    Invalid(String),
    #[error(
        "server overloaded: {in_flight} requests are running or queued (parallel_workers + max_queue_size = {capacity}); retry later"
    )]
    Overloaded { in_flight: usize, capacity: usize },
    #[error("server is shutting down and accepts no new requests")]
    Draining,
    #[error("request deadline of {timeout_ms} ms exceeded while {phase}")]
    DeadlineExceeded {
        timeout_ms: u64,
        phase: &'static str,
    },
    #[error("client disconnected; generation cancelled")]
    Disconnected,
    #[error("server shut down before the request finished (drain timeout reached)")]
    Shutdown,
    #[error("{stage} failed: {message}")]
    Internal { stage: String, message: String },
}

fn not_found_message(name: &str, version: Option<&str>) -> String {
    match version {
        Some(v) => format!("Model {name} with version {v} not found"),
        None => format!("Model {name} not found"),
    }
}

fn not_ready_message(name: &str, version: Option<&str>) -> String {
    match version {
        Some(v) => format!("Model {name} with version {v} is not ready yet."),
        None => format!("Model {name} is not ready yet."),
    }
}

impl EngineError {
    /// Label for `sdserve_request_failures_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            EngineError::ModelNotFound { .. } => "not_found",
            EngineError::ModelNotReady { .. } => "not_ready",
            EngineError::Invalid(_) => "invalid",
            EngineError::Overloaded { .. } => "overloaded",
            EngineError::Draining => "draining",
            EngineError::DeadlineExceeded { .. } => "deadline",
            EngineError::Disconnected => "disconnected",
            EngineError::Shutdown => "shutdown",
            EngineError::Internal { .. } => "internal",
        }
    }

    pub(crate) fn from_generate(err: GenerateError, timeout_ms: u64) -> Self {
        match err {
            GenerateError::Stopped(StopReason::Deadline) => EngineError::DeadlineExceeded {
                timeout_ms,
                phase: "generating",
            },
            GenerateError::Stopped(StopReason::Disconnected) => EngineError::Disconnected,
            GenerateError::Stopped(StopReason::Shutdown) => EngineError::Shutdown,
            GenerateError::Invalid(m) => EngineError::Invalid(m),
            GenerateError::Internal { stage, message } => EngineError::Internal { stage, message },
        }
    }
}

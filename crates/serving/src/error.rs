//! Why a call failed, in one kind per failure that every transport maps to its own codes
//! (REST: [`ErrorKind::status_code`]; gRPC: its own table), with the message both send.

use sdserve_engine::EngineError;
use sdserve_protocol::{ContractError, DataError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request breaks the contract or a model limit.
    Invalid,
    /// The body is not a V2 request at all.
    Unprocessable,
    /// The request is larger than the server accepts.
    TooLarge,
    /// Missing or wrong bearer token.
    Unauthenticated,
    /// Unknown model or version.
    NotFound,
    /// The model is known but not loaded yet.
    NotReady,
    /// Every slot is taken (workers and queue).
    Overloaded,
    /// The server is draining: no new work.
    Draining,
    /// The server shut down before the request finished.
    Shutdown,
    /// The request's deadline passed.
    DeadlineExceeded,
    /// The client went away.
    Cancelled,
    /// The server failed (inside the model, or while answering).
    Internal,
}

impl ErrorKind {
    /// The V2 REST status, as MLServer answers it (`docs/infer-contract.md`); gRPC streams
    /// report it beside their own code.
    pub fn status_code(self) -> u16 {
        match self {
            ErrorKind::Invalid | ErrorKind::NotReady => 400,
            ErrorKind::Unauthenticated => 401,
            ErrorKind::NotFound => 404,
            ErrorKind::TooLarge => 413,
            ErrorKind::Unprocessable => 422,
            // nginx's "client closed request": nobody reads it, but metrics and logs do.
            ErrorKind::Cancelled => 499,
            ErrorKind::Internal => 500,
            ErrorKind::Overloaded | ErrorKind::Draining | ErrorKind::Shutdown => 503,
            ErrorKind::DeadlineExceeded => 504,
        }
    }

    /// Whether a client should retry soon (REST: `Retry-After`).
    pub fn retry_soon(self) -> bool {
        matches!(self, ErrorKind::Overloaded | ErrorKind::Draining)
    }

    /// The `reason` label of `sdserve_request_failures_total`.
    pub fn reason(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::Unprocessable => "unprocessable",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::NotFound => "not_found",
            ErrorKind::NotReady => "not_ready",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Draining => "draining",
            ErrorKind::Shutdown => "shutdown",
            ErrorKind::DeadlineExceeded => "deadline",
            ErrorKind::Cancelled => "disconnected",
            ErrorKind::Internal => "internal",
        }
    }

    pub fn is_server_error(self) -> bool {
        self.status_code() >= 500
    }
}

/// A failed call: its kind and the message the client gets.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ServeError {
    pub kind: ErrorKind,
    pub message: String,
    /// Where a server-side failure happened ("generation", "vae decode", "response").
    pub stage: Option<String>,
}

impl ServeError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            stage: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }

    /// A failure of the server's own, at `stage`.
    pub fn internal(stage: &str, message: impl Into<String>) -> Self {
        Self {
            stage: Some(stage.to_owned()),
            ..Self::new(ErrorKind::Internal, message)
        }
    }

    pub fn unauthenticated() -> Self {
        Self::new(
            ErrorKind::Unauthenticated,
            "missing or wrong bearer token in the Authorization header",
        )
    }

    /// Logs a server-side failure (5xx) once, with the request and model it concerns; other
    /// kinds are the client's and are only counted.
    pub fn log(&self, request_id: &str, model: &str) {
        let stage = self.stage.as_deref().unwrap_or("serving");
        match self.kind {
            ErrorKind::Internal => tracing::error!(
                request_id = %request_id, model = %model, stage = %stage, status = 500,
                cause = %self.message, "request failed"
            ),
            k if k.is_server_error() => tracing::warn!(
                request_id = %request_id, model = %model, stage = %stage,
                status = k.status_code(), cause = %self.message, "request not served"
            ),
            _ => {}
        }
    }
}

/// The kind of each engine failure.
impl From<&EngineError> for ErrorKind {
    fn from(e: &EngineError) -> Self {
        match e {
            EngineError::ModelNotFound { .. } => ErrorKind::NotFound,
            EngineError::ModelNotReady { .. } => ErrorKind::NotReady,
            EngineError::Invalid(_) => ErrorKind::Invalid,
            EngineError::Overloaded { .. } => ErrorKind::Overloaded,
            EngineError::Draining => ErrorKind::Draining,
            EngineError::DeadlineExceeded { .. } => ErrorKind::DeadlineExceeded,
            EngineError::Disconnected => ErrorKind::Cancelled,
            EngineError::Shutdown => ErrorKind::Shutdown,
            EngineError::Internal { .. } => ErrorKind::Internal,
        }
    }
}

impl From<EngineError> for ServeError {
    fn from(e: EngineError) -> Self {
        let stage = match &e {
            EngineError::Internal { stage, .. } => Some(stage.clone()),
            EngineError::DeadlineExceeded { phase, .. } => Some((*phase).to_owned()),
            _ => None,
        };
        Self {
            stage,
            ..Self::new(ErrorKind::from(&e), e.to_string())
        }
    }
}

impl From<ContractError> for ServeError {
    fn from(e: ContractError) -> Self {
        Self::invalid(e.0)
    }
}

impl From<DataError> for ServeError {
    fn from(e: DataError) -> Self {
        Self::invalid(e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_failures_keep_their_metric_reason() {
        let all = [
            EngineError::ModelNotFound {
                name: "m".into(),
                version: None,
            },
            EngineError::ModelNotReady {
                name: "m".into(),
                version: None,
            },
            EngineError::Invalid("x".into()),
            EngineError::Overloaded {
                in_flight: 1,
                capacity: 1,
            },
            EngineError::Draining,
            EngineError::DeadlineExceeded {
                timeout_ms: 1,
                phase: "generating",
            },
            EngineError::Disconnected,
            EngineError::Shutdown,
            EngineError::Internal {
                stage: "vae".into(),
                message: "x".into(),
            },
        ];
        for e in all {
            assert_eq!(ErrorKind::from(&e).reason(), e.reason(), "{e:?}");
            let s = ServeError::from(e.clone());
            assert_eq!(s.message, e.to_string());
        }
    }

    #[test]
    fn statuses_are_mlservers() {
        let cases = [
            (ErrorKind::Invalid, 400),
            (ErrorKind::NotReady, 400),
            (ErrorKind::NotFound, 404),
            (ErrorKind::Unprocessable, 422),
            (ErrorKind::Overloaded, 503),
            (ErrorKind::DeadlineExceeded, 504),
            (ErrorKind::Internal, 500),
        ];
        for (kind, status) in cases {
            assert_eq!(kind.status_code(), status, "{kind:?}");
        }
        assert!(ErrorKind::Overloaded.retry_soon() && !ErrorKind::Shutdown.retry_soon());
    }
}

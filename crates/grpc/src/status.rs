//! The one place where failures become gRPC statuses: each [`ErrorKind`] has its code, and
//! the status details are the very message REST puts in `{"error": ...}`.
//!
//! | kind | gRPC | REST |
//! |---|---|---|
//! | invalid, not ready, unprocessable | INVALID_ARGUMENT | 400 (422 for a body that is not a V2 request; MLServer: FAILED_PRECONDITION, but here every such message is a malformed request) |
//! | unauthenticated | UNAUTHENTICATED | 401 |
//! | not found | NOT_FOUND | 404 |
//! | too large | RESOURCE_EXHAUSTED | 413 (a message over `grpc_max_message_length`) |
//! | cancelled | CANCELLED | 499 (the client went away) |
//! | overloaded, draining, shutdown | UNAVAILABLE | 503 |
//! | deadline exceeded | DEADLINE_EXCEEDED | 504 (the gRPC deadline or `parameters.timeout`) |
//! | internal | INTERNAL | 500 |

use std::time::{Duration, Instant};

use sdserve_serving::{ErrorKind, ServeError, authorized};
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

pub fn code_for(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::Invalid | ErrorKind::NotReady | ErrorKind::Unprocessable => {
            Code::InvalidArgument
        }
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::TooLarge => Code::ResourceExhausted,
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::Overloaded | ErrorKind::Draining | ErrorKind::Shutdown => Code::Unavailable,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::Internal => Code::Internal,
    }
}

pub fn status(e: &ServeError) -> Status {
    Status::new(code_for(e.kind), e.message.clone())
}

/// The name clients and metrics use for a code (`OK`, `NOT_FOUND`, ...).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The client's deadline from the `grpc-timeout` header (`<at most 8 digits><H|M|S|m|u|n>`).
pub fn grpc_timeout(metadata: &MetadataMap) -> Result<Option<Duration>, Status> {
    let Some(value) = metadata.get("grpc-timeout") else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("");
    parse_timeout(text)
        .map(Some)
        .ok_or_else(|| Status::invalid_argument(format!("malformed grpc-timeout header {text:?}")))
}

/// When the server gives up on a call: the client's deadline counted from the request's
/// arrival, less a small margin (a tenth, at most 50 ms) so that the server's
/// DEADLINE_EXCEEDED, with its message, reaches the client before the client's own timer
/// fires and abandons the call.
pub fn deadline(metadata: &MetadataMap, arrived: Instant) -> Result<Option<Instant>, Status> {
    Ok(grpc_timeout(metadata)?.map(|t| arrived + t - (t / 10).min(Duration::from_millis(50))))
}

fn parse_timeout(text: &str) -> Option<Duration> {
    let unit = text.chars().last()?;
    let digits = &text[..text.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(n * 3600),
        'M' => Duration::from_secs(n * 60),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The bearer-token check REST applies to inference and repository calls, on the
/// `authorization` metadata.
pub fn check_auth(token: Option<&str>, metadata: &MetadataMap) -> Result<(), Status> {
    let given = metadata.get("authorization").and_then(|v| v.to_str().ok());
    if authorized(token, given) {
        Ok(())
    } else {
        Err(status(&ServeError::unauthenticated()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdserve_engine::EngineError;

    fn from_engine(e: EngineError) -> Status {
        status(&ServeError::from(e))
    }

    #[test]
    fn engine_errors_map_to_codes_with_the_rest_message() {
        let s = from_engine(EngineError::ModelNotFound {
            name: "nope".into(),
            version: None,
        });
        assert_eq!(
            (s.code(), s.message()),
            (Code::NotFound, "Model nope not found")
        );
        let s = from_engine(EngineError::ModelNotReady {
            name: "m".into(),
            version: None,
        });
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(from_engine(EngineError::Draining).code(), Code::Unavailable);
        assert_eq!(
            from_engine(EngineError::Overloaded {
                in_flight: 2,
                capacity: 2
            })
            .code(),
            Code::Unavailable
        );
        let s = from_engine(EngineError::DeadlineExceeded {
            timeout_ms: 5,
            phase: "generating",
        });
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::DeadlineExceeded,
                "request deadline of 5 ms exceeded while generating"
            )
        );
        assert_eq!(
            from_engine(EngineError::Disconnected).code(),
            Code::Cancelled
        );
        assert_eq!(
            from_engine(EngineError::Internal {
                stage: "vae".into(),
                message: "x".into()
            })
            .code(),
            Code::Internal
        );
        assert_eq!(
            status(&ServeError::new(ErrorKind::Unprocessable, "x")).code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn timeouts_parse_per_the_grpc_spec() {
        assert_eq!(parse_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        for bad in ["", "m", "123456789m", "12x", "-1S", "1.5S"] {
            assert_eq!(parse_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn deadline_leaves_a_margin() {
        let now = Instant::now();
        let mut md = MetadataMap::new();
        assert_eq!(deadline(&md, now).unwrap(), None);
        md.insert("grpc-timeout", "300m".parse().unwrap());
        assert_eq!(
            deadline(&md, now).unwrap(),
            Some(now + Duration::from_millis(270))
        );
        md.insert("grpc-timeout", "10S".parse().unwrap());
        assert_eq!(
            deadline(&md, now).unwrap(),
            Some(now + Duration::from_millis(9950))
        );
    }

    #[test]
    fn auth_takes_a_bearer_token() {
        let mut md = MetadataMap::new();
        assert!(check_auth(None, &md).is_ok());
        assert_eq!(
            check_auth(Some("s3cret"), &md).unwrap_err().code(),
            Code::Unauthenticated
        );
        md.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(check_auth(Some("s3cret"), &md).is_ok());
        assert!(check_auth(Some("other"), &md).is_err());
    }
}

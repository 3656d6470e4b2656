//! The one place where failures become gRPC statuses.
//!
//! Every failure is first the same [`ApiError`] REST would answer with, so the status details
//! are the very message REST puts in `{"error": ...}`; the HTTP status picks the code:
//!
//! | REST | gRPC | when |
//! |---|---|---|
//! | 400 | INVALID_ARGUMENT | bad request, model not ready (as MLServer) |
//! | 401 | UNAUTHENTICATED | missing or wrong bearer token |
//! | 404 | NOT_FOUND | unknown model or version |
//! | 413 | RESOURCE_EXHAUSTED | request message over `grpc_max_message_length` |
//! | 422 | INVALID_ARGUMENT | a message that is not a V2 request (MLServer: FAILED_PRECONDITION, but here every 422 is a malformed request) |
//! | 499 | CANCELLED | the client went away |
//! | 503 | UNAVAILABLE | queue full, draining, shutting down |
//! | 504 | DEADLINE_EXCEEDED | the gRPC deadline or `parameters.timeout` passed |
//! | 500 | INTERNAL | generation failed |
//! | other | UNKNOWN | |

use std::time::{Duration, Instant};

use sdserve_engine::EngineError;
use sdserve_http::ApiError;
use sdserve_http::handlers::infer::authorized;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

pub fn code_for(http_status: u16) -> Code {
    match http_status {
        400 | 422 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        404 => Code::NotFound,
        413 => Code::ResourceExhausted,
        499 => Code::Cancelled,
        503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        500 => Code::Internal,
        _ => Code::Unknown,
    }
}

pub fn from_api(e: &ApiError) -> Status {
    Status::new(code_for(e.status.as_u16()), e.message.clone())
}

pub fn from_engine(e: EngineError) -> Status {
    from_api(&ApiError::from(e))
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
        Err(from_api(&ApiError::unauthorized()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            from_engine(EngineError::Unprocessable("x".into())).code(),
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

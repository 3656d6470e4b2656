//! The one place where failures become HTTP responses.
//!
//! Every error body is JSON with an `error` string. Where MLServer answers in FastAPI's
//! shape (422 validation, unknown route, wrong method) we add its `detail` too, so clients
//! written against either keep working.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sdserve_engine::EngineError;
use sdserve_protocol::{DecodeError, SchemaError};
use sdserve_serving::{ErrorKind, ServeError};
use serde_json::{Value, json};

/// Status used in metrics when the client left before any response was sent.
pub const CLIENT_CLOSED: u16 = 499;

/// Schema violations reported in one 422 answer.
pub const MAX_SCHEMA_ERRORS: usize = 20;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// FastAPI-compatible `detail`, when MLServer would send one.
    pub detail: Option<Value>,
    pub retry_after: bool,
    pub authenticate: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            detail: None,
            retry_after: false,
            authenticate: false,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// A 422 listing the first [`MAX_SCHEMA_ERRORS`] violations, so that a body with millions of
    /// bad elements cannot make an answer of millions of lines.
    pub fn schema(errors: &[SchemaError]) -> Self {
        let shown = &errors[..errors.len().min(MAX_SCHEMA_ERRORS)];
        let mut message = sdserve_protocol::schema::summarize(shown);
        if errors.len() > shown.len() {
            message.push_str(&format!("; and {} more", errors.len() - shown.len()));
        }
        Self {
            detail: Some(Value::Array(
                shown.iter().map(SchemaError::to_detail).collect(),
            )),
            ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
        }
    }

    pub fn not_found_route() -> Self {
        Self {
            detail: Some(json!("Not Found")),
            ..Self::new(StatusCode::NOT_FOUND, "Not Found")
        }
    }

    pub fn method_not_allowed() -> Self {
        Self {
            detail: Some(json!("Method Not Allowed")),
            ..Self::new(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
        }
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body is larger than the limit of {limit} bytes (max_request_body_bytes)"
            ),
        )
    }

    pub fn body(&self) -> Value {
        let mut body = json!({ "error": self.message });
        if let Some(d) = &self.detail {
            body["detail"] = d.clone();
        }
        body
    }
}

impl ApiError {
    /// What a failure to read a request counts as in the model metrics.
    pub fn kind(&self) -> ErrorKind {
        match self.status {
            StatusCode::PAYLOAD_TOO_LARGE => ErrorKind::TooLarge,
            StatusCode::UNPROCESSABLE_ENTITY => ErrorKind::Unprocessable,
            _ => ErrorKind::Invalid,
        }
    }
}

/// Each kind's status is the contract's; overload and draining add `Retry-After`, a missing
/// token `WWW-Authenticate`.
impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> Self {
        let status =
            StatusCode::from_u16(e.kind.status_code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self {
            retry_after: e.kind.retry_soon(),
            authenticate: e.kind == ErrorKind::Unauthenticated,
            ..Self::new(status, e.message)
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        ServeError::from(e).into()
    }
}

/// A JSON body that is not a V2 request (422, with FastAPI's `detail`), or whose data cannot
/// be read (400).
impl From<DecodeError> for ApiError {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Schema(errors) => ApiError::schema(&errors),
            DecodeError::Data(e) => ApiError::bad_request(e.0),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let response = (self.status, axum::Json(self.body())).into_response();
        with_hints(response, self.retry_after, self.authenticate)
    }
}

/// The headers that tell a client what to do next: `Retry-After` (overload, draining) and
/// `WWW-Authenticate` (a missing or wrong token). Shared with the OpenAI routes' errors.
pub(crate) fn with_hints(
    mut response: Response,
    retry_after: bool,
    authenticate: bool,
) -> Response {
    if retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if authenticate {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_answers_are_bounded() {
        let body = format!("{{\"inputs\":[{}1]}}", "1,".repeat(999));
        let Err(DecodeError::Schema(errors)) =
            sdserve_protocol::InferenceRequest::from_slice(body.as_bytes())
        else {
            panic!("expected schema errors");
        };
        assert_eq!(errors.len(), 1000);
        let e = ApiError::schema(&errors);
        assert_eq!(e.status, 422);
        assert_eq!(
            e.detail.as_ref().and_then(Value::as_array).map(Vec::len),
            Some(MAX_SCHEMA_ERRORS)
        );
        assert!(e.message.ends_with("; and 980 more"), "{}", e.message);
        assert!(e.message.contains("inputs.0"), "{}", e.message);
    }
}

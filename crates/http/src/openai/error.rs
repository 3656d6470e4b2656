//! Failures as OpenAI's clients expect them: `{"error": {"message", "type", "param", "code"}}`
//! with OpenAI's status codes. Where those differ from the V2 routes' (a model still loading is
//! a 503 to retry, not MLServer's 400), OpenAI's win: its SDKs retry by status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sdserve_protocol::openai::{ErrorBody, ErrorDetail, ParamError, in_openai_terms};
use sdserve_serving::{ErrorKind, ServeError};

use crate::error::{ApiError, with_hints};

const INVALID_REQUEST: &str = "invalid_request_error";
const SERVER_ERROR: &str = "server_error";

#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiError {
    pub status: StatusCode,
    pub detail: ErrorDetail,
    pub retry_after: bool,
}

impl OpenAiError {
    fn new(status: u16, kind: &'static str, message: String) -> Self {
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            detail: ErrorDetail {
                message,
                kind,
                param: None,
                code: None,
            },
            retry_after: false,
        }
    }

    fn param(mut self, param: Option<String>) -> Self {
        self.detail.param = param;
        self
    }

    fn code(mut self, code: &'static str) -> Self {
        self.detail.code = Some(code);
        self
    }

    fn retry(mut self) -> Self {
        self.retry_after = true;
        self
    }

    /// An unknown route or method under `/v1`.
    pub fn route(status: StatusCode, message: String) -> Self {
        Self::new(status.as_u16(), INVALID_REQUEST, message)
    }

    /// A request that names no model while several are loaded, or none is.
    pub fn no_model_chosen(message: String, status: u16) -> Self {
        let kind = if status < 500 {
            INVALID_REQUEST
        } else {
            SERVER_ERROR
        };
        let e = Self::new(status, kind, message).param(Some("model".into()));
        if status < 500 {
            e
        } else {
            e.code("model_not_ready").retry()
        }
    }
}

impl From<ParamError> for OpenAiError {
    fn from(e: ParamError) -> Self {
        Self::new(400, INVALID_REQUEST, e.message).param(e.param)
    }
}

/// Each failure kind's status, type and code.
impl From<ServeError> for OpenAiError {
    fn from(e: ServeError) -> Self {
        let m = e.message;
        match e.kind {
            ErrorKind::Invalid | ErrorKind::Unprocessable => {
                let (m, param) = in_openai_terms(&m);
                Self::new(400, INVALID_REQUEST, m).param(param)
            }
            ErrorKind::TooLarge => Self::new(413, INVALID_REQUEST, m).code("request_too_large"),
            ErrorKind::Unauthenticated => {
                Self::new(401, INVALID_REQUEST, m).code("invalid_api_key")
            }
            ErrorKind::NotFound => Self::new(404, INVALID_REQUEST, m)
                .param(Some("model".into()))
                .code("model_not_found"),
            ErrorKind::NotReady => Self::new(503, SERVER_ERROR, m)
                .param(Some("model".into()))
                .code("model_not_ready")
                .retry(),
            ErrorKind::Overloaded => Self::new(503, SERVER_ERROR, m)
                .code("server_overloaded")
                .retry(),
            ErrorKind::Draining | ErrorKind::Shutdown => Self::new(503, SERVER_ERROR, m)
                .code("server_shutting_down")
                .retry(),
            ErrorKind::DeadlineExceeded => Self::new(504, SERVER_ERROR, m).code("timeout"),
            ErrorKind::Cancelled => Self::new(499, INVALID_REQUEST, m).code("client_closed"),
            ErrorKind::Internal => Self::new(500, SERVER_ERROR, m),
        }
    }
}

/// Failures of the REST plumbing shared with the V2 routes (body limit, decompression, token).
impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        if e.authenticate {
            return Self::from(ServeError::unauthenticated());
        }
        if e.status == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::from(ServeError::new(ErrorKind::TooLarge, e.message));
        }
        let kind = if e.status.is_server_error() {
            SERVER_ERROR
        } else {
            INVALID_REQUEST
        };
        Self::new(e.status.as_u16(), kind, e.message)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let authenticate = self.status == StatusCode::UNAUTHORIZED;
        let body = ErrorBody { error: self.detail };
        let response = (self.status, axum::Json(body)).into_response();
        with_hints(response, self.retry_after, authenticate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_get_openai_statuses_and_types() {
        let cases = [
            (ErrorKind::Invalid, 400, INVALID_REQUEST),
            (ErrorKind::NotFound, 404, INVALID_REQUEST),
            (ErrorKind::Unauthenticated, 401, INVALID_REQUEST),
            (ErrorKind::NotReady, 503, SERVER_ERROR),
            (ErrorKind::Overloaded, 503, SERVER_ERROR),
            (ErrorKind::DeadlineExceeded, 504, SERVER_ERROR),
            (ErrorKind::Internal, 500, SERVER_ERROR),
        ];
        for (kind, status, t) in cases {
            let e = OpenAiError::from(ServeError::new(kind, "m"));
            assert_eq!((e.status.as_u16(), e.detail.kind), (status, t), "{kind:?}");
            assert_eq!(
                e.retry_after,
                kind.retry_soon() || kind == ErrorKind::NotReady
            );
        }
        let sized = OpenAiError::from(ServeError::invalid(
            "'height' and 'width' must be multiples of 8 for this model",
        ));
        assert_eq!(sized.detail.param.as_deref(), Some("size"));
    }
}

//! Liveness and readiness: 200 or 400 with an empty body, as MLServer and Triton answer.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::SharedState;

pub async fn live() -> StatusCode {
    StatusCode::OK
}

/// Ready when every registered model is loaded and the server is not draining.
pub async fn ready(State(state): State<SharedState>) -> StatusCode {
    if state.service.engine.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    }
}

pub async fn model_ready(State(state): State<SharedState>, Path(name): Path<String>) -> Response {
    ready_for(&state, &name, None)
}

pub async fn model_version_ready(
    State(state): State<SharedState>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    ready_for(&state, &name, Some(&version))
}

fn ready_for(state: &SharedState, name: &str, version: Option<&str>) -> Response {
    match state.service.model_ready(name, version) {
        Ok(true) => StatusCode::OK.into_response(),
        Ok(false) => StatusCode::BAD_REQUEST.into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

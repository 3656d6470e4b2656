//! The model repository API: index, load, unload.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use sdserve_protocol::RepositoryIndexRequest;

use crate::body;
use crate::error::ApiError;
use crate::handlers::infer::check_auth;
use crate::state::SharedState;

pub async fn index(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_auth(&state, &headers)?;
    let bytes = body::read(&headers, body, state.config.max_request_body_bytes).await?;
    let request = RepositoryIndexRequest::from_slice(&bytes).map_err(|e| ApiError::schema(&e))?;
    let models = state.service.index(request.ready == Some(true)).await?;
    Ok(axum::Json(models).into_response())
}

pub async fn load(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_auth(&state, &headers)?;
    state.service.load_model(&name).await?;
    Ok(StatusCode::OK)
}

pub async fn unload(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_auth(&state, &headers)?;
    state.service.unload_model(&name)?;
    Ok(StatusCode::OK)
}

//! The model repository API: index, load, unload.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use sdserve_engine::ModelStatus;
use sdserve_protocol::{ModelState, RepositoryIndexItem, RepositoryIndexRequest};

use crate::body;
use crate::error::ApiError;
use crate::handlers::infer::check_auth;
use crate::state::{RepositoryError, SharedState};

impl From<RepositoryError> for ApiError {
    fn from(e: RepositoryError) -> Self {
        let status = match e {
            RepositoryError::NotFound(_) => StatusCode::NOT_FOUND,
            RepositoryError::Invalid(_) => StatusCode::BAD_REQUEST,
            RepositoryError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

pub async fn index(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_auth(&state, &headers)?;
    let bytes = body::read(&headers, body, state.config.max_request_body_bytes).await?;
    let request = RepositoryIndexRequest::from_slice(&bytes).map_err(|e| ApiError::schema(&e))?;
    Ok(axum::Json(models(&state, request.ready == Some(true)).await?).into_response())
}

/// Models on disk (re-read every call) and their state in the registry: READY, UNKNOWN
/// while loading, UNAVAILABLE when not loaded — the states MLServer reports (over REST and gRPC).
pub async fn models(
    state: &SharedState,
    only_ready: bool,
) -> Result<Vec<RepositoryIndexItem>, ApiError> {
    let repo = state.repository.clone();
    let on_disk = tokio::task::spawn_blocking(move || repo.list())
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let mut items: BTreeMap<(String, Option<String>), ModelState> = on_disk
        .into_iter()
        .map(|k| (k, ModelState::Unavailable))
        .collect();
    for status in state.engine.models() {
        let spec = status.spec();
        let s = match status {
            ModelStatus::Ready(_) => ModelState::Ready,
            ModelStatus::Loading(_) => ModelState::Unknown,
        };
        items.insert((spec.name.clone(), spec.version.clone()), s);
    }
    Ok(items
        .into_iter()
        .filter(|(_, s)| !only_ready || *s == ModelState::Ready)
        .map(|((name, version), state)| RepositoryIndexItem {
            name,
            version,
            state,
            reason: String::new(),
        })
        .collect())
}

/// A name the repository may be searched for: one plain path component. Checked here so that
/// every such name is a 400, whatever the repository implementation does with the rest.
fn check_plain_name(name: &str) -> Result<(), ApiError> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control);
    if plain {
        return Ok(());
    }
    Err(ApiError::bad_request(format!(
        "model name {name:?} is not a plain name (no '/', '\\', '.', '..' or control characters)"
    )))
}

pub async fn load(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_auth(&state, &headers)?;
    check_plain_name(&name)?;
    load_model(&state, &name).await?;
    Ok(StatusCode::OK)
}

/// Loads (or reloads) every version of a model found under the repository root (over REST
/// and gRPC).
pub async fn load_model(state: &SharedState, name: &str) -> Result<(), ApiError> {
    let repo = state.repository.clone();
    let lookup = name.to_owned();
    let specs = tokio::task::spawn_blocking(move || repo.find(&lookup))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    if specs.is_empty() {
        return Err(RepositoryError::NotFound(name.to_owned()).into());
    }
    for spec in specs {
        let label = spec
            .version
            .clone()
            .map(|v| format!("{name} (version {v})"))
            .unwrap_or_else(|| name.to_owned());
        state.engine.load(spec).await.map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Model {label} failed to load: {e}"),
            )
        })?;
    }
    Ok(())
}

pub async fn unload(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_auth(&state, &headers)?;
    state.engine.unload(&name)?;
    Ok(StatusCode::OK)
}

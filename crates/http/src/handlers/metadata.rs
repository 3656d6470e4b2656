//! Server and model metadata.

use axum::Json;
use axum::extract::{Path, State};
use sdserve_protocol::{MetadataModelResponse, MetadataServerResponse};

use crate::binary;
use crate::error::ApiError;
use crate::state::SharedState;

/// The configured `extensions`, plus the ones this server implements over REST.
pub async fn server(State(state): State<SharedState>) -> Json<MetadataServerResponse> {
    let mut metadata = state.service.server_metadata();
    if !metadata.extensions.iter().any(|e| e == binary::EXTENSION) {
        metadata.extensions.push(binary::EXTENSION.to_owned());
    }
    Json(metadata)
}

pub async fn model(
    State(state): State<SharedState>,
    Path(name): Path<String>,
) -> Result<Json<MetadataModelResponse>, ApiError> {
    Ok(Json(state.service.model_metadata(&name, None)?))
}

pub async fn model_version(
    State(state): State<SharedState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<MetadataModelResponse>, ApiError> {
    Ok(Json(state.service.model_metadata(&name, Some(&version))?))
}

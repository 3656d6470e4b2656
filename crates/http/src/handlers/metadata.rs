//! Server and model metadata.

use axum::Json;
use axum::extract::{Path, State};
use sdserve_engine::ModelStatus;
use sdserve_protocol::diffusers::{input_metadata, output_metadata};
use sdserve_protocol::{MetadataModelResponse, MetadataServerResponse, Parameters};
use serde_json::json;

use crate::binary;
use crate::error::ApiError;
use crate::state::SharedState;

/// The configured `extensions`, plus the ones this server implements.
pub async fn server(State(state): State<SharedState>) -> Json<MetadataServerResponse> {
    let mut extensions = state.config.extensions.clone();
    if !extensions.iter().any(|e| e == binary::EXTENSION) {
        extensions.push(binary::EXTENSION.to_owned());
    }
    Json(MetadataServerResponse {
        name: state.config.server_name.clone(),
        version: state.config.server_version.clone(),
        extensions,
    })
}

pub async fn model(
    State(state): State<SharedState>,
    Path(name): Path<String>,
) -> Result<Json<MetadataModelResponse>, ApiError> {
    describe(&state, &name, None)
}

pub async fn model_version(
    State(state): State<SharedState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<MetadataModelResponse>, ApiError> {
    describe(&state, &name, Some(&version))
}

fn describe(
    state: &SharedState,
    name: &str,
    version: Option<&str>,
) -> Result<Json<MetadataModelResponse>, ApiError> {
    let status = state.engine.model(name, version)?;
    let spec = status.spec();
    Ok(Json(MetadataModelResponse {
        name: spec.name.clone(),
        versions: Some(spec.versions.clone()),
        platform: spec.platform.clone(),
        inputs: Some(input_metadata()),
        outputs: Some(output_metadata()),
        parameters: Some(model_parameters(&status)),
    }))
}

/// A model's metadata `parameters` (over REST and gRPC). MLServer's carry the model's
/// content_type; we add what a client needs to build a valid request.
pub fn model_parameters(status: &ModelStatus) -> Parameters {
    let spec = status.spec();
    let mut parameters = Parameters::new();
    if let Some(ct) = &spec.content_type {
        parameters.insert("content_type".into(), json!(ct));
    }
    if let ModelStatus::Ready(m) = status {
        let d = m.description();
        parameters.insert("default_scheduler".into(), json!(d.default_scheduler));
        parameters.insert("schedulers".into(), json!(d.schedulers));
        parameters.insert("native_height".into(), json!(d.native_height));
        parameters.insert("native_width".into(), json!(d.native_width));
        parameters.insert(
            "default_num_inference_steps".into(),
            json!(spec.defaults.num_inference_steps),
        );
        parameters.insert(
            "max_num_inference_steps".into(),
            json!(spec.limits.max_num_inference_steps),
        );
    }
    parameters
}

//! The Images API routes. As on the V2 routes a request takes its slot before its body is read
//! (so the admission limit also bounds the bodies held in memory); the model, named inside the
//! body, is known only once it is decoded. From there on it is the V2 routes' path: the same
//! queue, limits, deadlines, metrics and token.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use sdserve_protocol::openai::{
    self, ImageData, ImagesRequest, ImagesResponse, ModelList, ModelObject,
};
use sdserve_serving::{Generated, Mode};

use super::error::OpenAiError;
use super::form;
use crate::body;
use crate::handlers::infer::check_auth;
use crate::state::SharedState;

/// Where progress events are, for a request that asks for previews here.
const STREAMING_ROUTE: &str = "the V2 route generate_stream";

/// A generation's JSON holds no files: a prompt and a few numbers. Bounding it well below
/// `max_request_body_bytes` bounds what parsing it can allocate.
pub const MAX_GENERATION_BODY_BYTES: usize = 1 << 20;

pub async fn generations(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(images(&state, &headers, body, Route::Generations).await)
}

pub async fn edits(State(state): State<SharedState>, headers: HeaderMap, body: Body) -> Response {
    respond(images(&state, &headers, body, Route::Edits).await)
}

/// Every ready model.
pub async fn models(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    let listed = check_auth(&state, &headers).map(|()| ModelList {
        object: "list",
        data: state
            .service
            .ready_models()
            .into_iter()
            .map(|m| model_object(&state, m))
            .collect(),
    });
    respond(listed.map(Json).map_err(OpenAiError::from))
}

/// One ready model, or OpenAI's 404.
pub async fn model(
    State(state): State<SharedState>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let id = params.get("model").cloned().unwrap_or_default();
    let found = check_auth(&state, &headers)
        .map_err(OpenAiError::from)
        .and_then(|()| {
            state
                .service
                .ready_models()
                .into_iter()
                .find(|m| m.name == id)
                .map(|m| Json(model_object(&state, m)))
                .ok_or_else(|| {
                    OpenAiError::from(sdserve_serving::ServeError::new(
                        sdserve_serving::ErrorKind::NotFound,
                        format!("The model '{id}' does not exist or is not loaded"),
                    ))
                })
        });
    respond(found)
}

/// A path under `/v1` that is not one of these routes.
pub async fn not_found(method: Method, uri: Uri) -> Response {
    let message = format!("Invalid URL ({method} {})", uri.path());
    OpenAiError::route(StatusCode::NOT_FOUND, message).into_response()
}

/// A method these routes do not take.
pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let message = format!("Method {method} is not allowed on {}", uri.path());
    OpenAiError::route(StatusCode::METHOD_NOT_ALLOWED, message).into_response()
}

fn respond<T: IntoResponse>(r: Result<T, OpenAiError>) -> Response {
    r.map_or_else(IntoResponse::into_response, IntoResponse::into_response)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Generations,
    Edits,
}

async fn images(
    state: &SharedState,
    headers: &HeaderMap,
    body: Body,
    route: Route,
) -> Result<Json<ImagesResponse>, OpenAiError> {
    check_auth(state, headers)?;
    let slot = match state.service.admit_unnamed() {
        Ok(slot) => slot,
        Err(e) => {
            // Read and drop the body, so that the client reads the answer, not a reset.
            body::drain(headers, body).await;
            return Err(e.into());
        }
    };
    let limit = match route {
        Route::Generations => MAX_GENERATION_BODY_BYTES.min(state.config.max_request_body_bytes),
        Route::Edits => state.config.max_request_body_bytes,
    };
    let bytes = body::read(headers, body, limit).await.map_err(|e| {
        // Over the generation's own bound, not `max_request_body_bytes`: say which.
        if limit < state.config.max_request_body_bytes && e.status == StatusCode::PAYLOAD_TOO_LARGE
        {
            OpenAiError::from(sdserve_serving::ServeError::new(
                sdserve_serving::ErrorKind::TooLarge,
                format!("a generation's JSON body may hold at most {limit} bytes"),
            ))
        } else {
            OpenAiError::from(e)
        }
    })?;
    let request: ImagesRequest = match route {
        Route::Generations => openai::decode_generation(&bytes)?,
        Route::Edits => openai::decode_edit(form::fields(headers, bytes).await?)?,
    };
    let model = chosen_model(state, request.model)?;
    let unary = Mode::Unary {
        streaming_route: STREAMING_ROUTE,
    };
    let accepted = slot
        .for_model(&model)
        .accept_decoded(request.decoded, None, unary, None)?;
    let generated = accepted.run(None).await?;
    Ok(Json(images_response(&generated)))
}

/// The model a request names, or the only one loaded when it names none.
fn chosen_model(state: &SharedState, named: Option<String>) -> Result<String, OpenAiError> {
    if let Some(name) = named {
        return Ok(name);
    }
    let ready = state.service.ready_models();
    match ready.as_slice() {
        [only] => Ok(only.name.clone()),
        [] => Err(OpenAiError::no_model_chosen(
            "no model is loaded yet".into(),
            503,
        )),
        several => Err(OpenAiError::no_model_chosen(
            format!(
                "'model' is required when several models are loaded: {}",
                several
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            400,
        )),
    }
}

fn images_response(g: &Generated) -> ImagesResponse {
    let settings = &g.outcome.job.settings;
    let data = g
        .outcome
        .images
        .iter()
        .zip(&g.outcome.job.images)
        .map(|(image, spec)| ImageData {
            b64_json: base64::engine::general_purpose::STANDARD.encode(&image.png),
            seed: spec.seed,
        })
        .collect();
    ImagesResponse {
        created: unix_seconds(SystemTime::now()),
        data,
        output_format: "png",
        size: format!("{}x{}", settings.width, settings.height),
    }
}

fn model_object(state: &SharedState, m: sdserve_serving::ReadyModel) -> ModelObject {
    ModelObject::new(
        m.name,
        unix_seconds(m.loaded_at),
        state.service.info.server_name.clone(),
    )
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

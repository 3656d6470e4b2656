//! Inference: `infer`/`generate` (one JSON response, or Triton's binary form on request) and
//! `infer_stream`/`generate_stream` (server-sent events: one progress event per scheduler step,
//! then the response).
//!
//! Each handler does four things: admit (before the body is read), decode and validate,
//! hand the job to the engine, encode the answer.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use http_body::Frame;
use sdserve_engine::{InferObserver, InferOutcome, Prepared, Progress};
use sdserve_protocol::{InferenceResponse, Parameters};
use serde_json::json;
use tokio::sync::mpsc;

use crate::binary;
use crate::body;
use crate::convert;
use crate::error::ApiError;
use crate::state::SharedState;

/// Model name and version label from either route shape.
fn target(params: &HashMap<String, String>) -> (String, Option<String>) {
    (
        params.get("model_name").cloned().unwrap_or_default(),
        params.get("model_version").cloned(),
    )
}

pub(crate) fn check_auth(state: &SharedState, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if authorized(state.config.auth_token.as_deref(), given) {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

/// Whether an `authorization` value (REST header or gRPC metadata) carries the configured
/// bearer token; anything does when none is configured.
pub fn authorized(token: Option<&str>, authorization: Option<&str>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let given = authorization.and_then(|v| {
        v.strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
    });
    given.is_some_and(|g| constant_time_eq(g.trim().as_bytes(), token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What [`accept`] hands on: the request id, the queued-to-be job, and whether the image goes
/// back as binary data.
struct Accepted {
    id: Option<String>,
    prepared: Prepared,
    binary_output: bool,
}

/// Everything up to the point where the request would be queued. Errors here are plain
/// JSON answers with their status code, for streaming requests too.
async fn accept(
    state: &SharedState,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Body,
    observer: &mut Option<InferObserver>,
    streaming: bool,
) -> Result<Accepted, ApiError> {
    let fail = |observer: &mut Option<InferObserver>, reason: &'static str| {
        if let Some(o) = observer.take() {
            o.fail(reason);
        }
    };
    let admission = match state.engine.admit() {
        Ok(a) => a,
        Err(e) => {
            fail(observer, e.reason());
            body::drain(headers, body).await;
            return Err(ApiError::from(e));
        }
    };
    let bytes = body::read(headers, body, state.config.max_request_body_bytes)
        .await
        .inspect_err(|e| {
            fail(
                observer,
                if e.status == StatusCode::PAYLOAD_TOO_LARGE {
                    "too_large"
                } else {
                    "invalid"
                },
            );
        })?;
    let decoded = binary::header_length(headers)
        .and_then(|n| binary::decode(n, &bytes))
        .inspect_err(|e| {
            fail(
                observer,
                if e.status == StatusCode::UNPROCESSABLE_ENTITY {
                    "unprocessable"
                } else {
                    "invalid"
                },
            );
        })?;
    if streaming && decoded.binary_output {
        fail(observer, "invalid");
        return Err(ApiError::bad_request(
            "binary outputs (binary_data, binary_data_output, raw binary requests) cannot travel in an event stream; use /infer, or ask for JSON",
        ));
    }
    let request = decoded.request;
    let (generation, options) =
        convert::to_generation_request(&request).inspect_err(|_| fail(observer, "invalid"))?;
    if !streaming && options.preview_every.is_some() {
        fail(observer, "invalid");
        return Err(ApiError::bad_request(
            "parameter 'preview_every' needs a streaming route (infer_stream, generate_stream)",
        ));
    }
    let prepared = state
        .engine
        .prepare(admission, name, version, &generation, options.timeout)
        .and_then(|p| p.with_preview_every(options.preview_every))
        .map_err(|e| {
            fail(observer, e.reason());
            ApiError::from(e)
        })?;
    Ok(Accepted {
        id: request.id,
        prepared,
        binary_output: decoded.binary_output,
    })
}

fn response_id(id: Option<String>) -> String {
    id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// MLServer's CloudEvents headers on every infer response (over gRPC, its trailing metadata).
pub fn cloud_events(state: &SharedState, model: &str, id: &str, headers: &mut HeaderMap) {
    let server = &state.config.server_name;
    let source = match &state.config.namespace {
        Some(ns) => format!("io.seldon.serving.deployment.{server}.{ns}"),
        None => format!("io.seldon.serving.deployment.{server}"),
    };
    let mut put = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    put("ce-specversion", "0.3");
    put("ce-source", &source);
    put("ce-type", "io.seldon.serving.inference.response");
    put("ce-modelid", model);
    put("ce-inferenceservicename", server);
    put("ce-endpoint", model);
    put("ce-id", id);
    put("ce-requestid", id);
    if let Some(ns) = &state.config.namespace {
        put("ce-namespace", ns);
    }
}

pub async fn infer(
    State(state): State<SharedState>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(e) = check_auth(&state, &headers) {
        return e.into_response();
    }
    let (name, version) = target(&params);
    let mut observer = Some(
        state
            .engine
            .observer(&name, version.as_deref().unwrap_or("None")),
    );
    let accepted = match accept(
        &state,
        &name,
        version.as_deref(),
        &headers,
        body,
        &mut observer,
        false,
    )
    .await
    {
        Ok(ok) => ok,
        Err(e) => return e.into_response(),
    };
    let mut observer = observer.expect("observer is only taken on failure");
    let result = state
        .engine
        .run(accepted.prepared, &mut observer, None)
        .await;
    observer.finish(result.as_ref().map(|o| o.images.len()));
    match result {
        Ok(outcome) => {
            let id = response_id(accepted.id);
            let mut response = if accepted.binary_output {
                binary_response(&name, id.clone(), &outcome)
            } else {
                json_response(
                    StatusCode::OK,
                    &convert::to_response(&name, id.clone(), &outcome),
                )
            };
            cloud_events(&state, &name, &id, response.headers_mut());
            response
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Triton's binary form: the JSON header, then the PNGs as one serialised BYTES tensor.
fn binary_response(name: &str, id: String, outcome: &InferOutcome) -> Response {
    match binary::encode_response(name, id, outcome) {
        Ok(body) => (
            StatusCode::OK,
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(binary::CONTENT_TYPE),
                ),
                (
                    HeaderName::from_static(binary::HEADER_LENGTH),
                    HeaderValue::from(body.header_length),
                ),
            ],
            body.bytes,
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("response encoding failed: {e}"),
        )
        .into_response(),
    }
}

pub async fn infer_stream(
    State(state): State<SharedState>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(e) = check_auth(&state, &headers) {
        return e.into_response();
    }
    let (name, version) = target(&params);
    let mut observer = Some(
        state
            .engine
            .observer(&name, version.as_deref().unwrap_or("None")),
    );
    let Accepted { id, prepared, .. } = match accept(
        &state,
        &name,
        version.as_deref(),
        &headers,
        body,
        &mut observer,
        true,
    )
    .await
    {
        Ok(ok) => ok,
        Err(e) => return e.into_response(),
    };
    let mut observer = observer.expect("observer is only taken on failure");
    let id = response_id(id);
    let mut steps = convert::StepProgress::new(prepared.job().num_inference_steps);
    let (events, receiver) = mpsc::channel::<Bytes>(16);
    let task_state = state.clone();
    let task_name = name.clone();
    let task_id = id.clone();
    tokio::spawn(async move {
        let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<Progress>();
        // Ends when the generation ends, or when the client goes away (the receiver is
        // dropped), which drops `run` and so cancels the generation.
        let result: Option<Result<InferOutcome, sdserve_engine::EngineError>> = {
            let run = task_state
                .engine
                .run(prepared, &mut observer, Some(progress_tx));
            tokio::pin!(run);
            loop {
                tokio::select! {
                    biased;
                    Some(p) = progress_rx.recv() => {
                        let Some(p) = steps.step(&p) else { continue };
                        if events.send(progress_event(&task_name, &task_id, &p)).await.is_err() { break None; }
                    }
                    r = &mut run => break Some(r),
                    _ = events.closed() => break None,
                }
            }
        };
        // Progress sent just before the end still goes out, in order, before the result.
        while let Ok(p) = progress_rx.try_recv() {
            let Some(p) = steps.step(&p) else { continue };
            if result.is_some()
                && events
                    .send(progress_event(&task_name, &task_id, &p))
                    .await
                    .is_err()
            {
                break;
            }
        }
        let Some(result) = result else {
            observer.finish(Err(&sdserve_engine::EngineError::Disconnected));
            return;
        };
        observer.finish(result.as_ref().map(|o| o.images.len()));
        let final_event = match result {
            Ok(outcome) => {
                let mut response = convert::to_response(&task_name, task_id.clone(), &outcome);
                add_stream_headers(&task_state, &task_name, &task_id, &mut response);
                sse(&serde_json::to_value(&response).unwrap_or_default())
            }
            Err(e) => {
                let e = ApiError::from(e);
                sse(&json!({"error": e.message, "status_code": e.status.as_u16()}))
            }
        };
        let _ = events.send(final_event).await;
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::new(EventStream { receiver }))
        .unwrap_or_else(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        })
}

/// MLServer leaves the CloudEvents headers inside `parameters.headers` in streams.
fn add_stream_headers(
    state: &SharedState,
    model: &str,
    id: &str,
    response: &mut InferenceResponse,
) {
    let mut headers = HeaderMap::new();
    cloud_events(state, model, id, &mut headers);
    let map: Parameters = headers
        .iter()
        .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_owned(), json!(v))))
        .collect();
    response
        .parameters
        .insert("headers".into(), serde_json::Value::Object(map));
}

/// A progress event shaped as an InferenceResponse (empty outputs), so V2 clients that parse
/// every event as a response keep working.
/// Previews travel as a `preview` output shaped like the final `image` output.
fn progress_event(model: &str, id: &str, p: &Progress) -> Bytes {
    let outputs = if p.preview.is_empty() {
        json!([])
    } else {
        let data: Vec<String> = p
            .preview
            .iter()
            .map(|png| base64::engine::general_purpose::STANDARD.encode(png))
            .collect();
        json!([{
            "name": "preview",
            "datatype": "BYTES",
            "shape": [data.len(), 1],
            "parameters": {"content_type": "base64"},
            "data": data
        }])
    };
    sse(&json!({
        "model_name": model,
        "id": id,
        "parameters": {"progress": {"step": p.step, "total": p.total, "elapsed": p.elapsed.as_secs_f64()}},
        "outputs": outputs
    }))
}

fn sse(value: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

struct EventStream {
    receiver: mpsc::Receiver<Bytes>,
}

impl http_body::Body for EventStream {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.receiver
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

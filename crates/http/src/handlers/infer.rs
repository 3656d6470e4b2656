//! Inference: `infer`/`generate` (one JSON response, or Triton's binary form on request) and
//! `infer_stream`/`generate_stream` (server-sent events: one progress event per scheduler step,
//! then the response).
//!
//! What is REST's own happens here: the token from the header, the body (size limit, gzip),
//! JSON or binary framing, and the answer's encoding. Admission, the contract, validation,
//! running and streaming are the transport-neutral service's.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use http_body::Frame;
use sdserve_engine::Progress;
use sdserve_protocol::{InferenceResponse, Parameters};
use sdserve_serving::{Accepted, Generated, Mode, ServeError, cloud_events, run_streaming};
use serde_json::json;
use tokio::sync::mpsc;

use crate::binary;
use crate::body;
use crate::error::ApiError;
use crate::response;
use crate::state::SharedState;

/// Where `preview_every` is accepted, for the message of a unary call that asks for it.
const STREAMING_ROUTE: &str = "a streaming route (infer_stream, generate_stream)";

/// Model name and version label from either route shape.
fn target(params: &HashMap<String, String>) -> (String, Option<String>) {
    (
        params.get("model_name").cloned().unwrap_or_default(),
        params.get("model_version").cloned(),
    )
}

/// The bearer-token check of inference and repository routes.
pub(crate) fn check_auth(state: &SharedState, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    Ok(state.service.authorize(given)?)
}

/// Everything up to the point where the request would be queued; also whether the image goes
/// back as binary data. Errors here are plain JSON answers with their status code, for
/// streaming requests too.
async fn accept(
    state: &SharedState,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Body,
    mode: Mode,
) -> Result<(Accepted, bool), ApiError> {
    let pending = match state.service.admit(name, version) {
        Ok(p) => p,
        Err(e) => {
            body::drain(headers, body).await;
            return Err(e.into());
        }
    };
    let read = body::read(headers, body, state.config.max_request_body_bytes)
        .await
        .and_then(|bytes| binary::header_length(headers).and_then(|n| binary::decode(n, &bytes)));
    let decoded = match read {
        Ok(d) => d,
        Err(e) => {
            pending.reject(e.kind());
            return Err(e);
        }
    };
    if mode == Mode::Streaming && decoded.binary_output {
        let e = ApiError::bad_request(
            "binary outputs (binary_data, binary_data_output, raw binary requests) cannot travel in an event stream; use /infer, or ask for JSON",
        );
        pending.reject(e.kind());
        return Err(e);
    }
    let accepted = pending.accept(decoded.request, mode, None)?;
    Ok((accepted, decoded.binary_output))
}

/// MLServer's CloudEvents headers on every infer response.
fn add_cloud_events(state: &SharedState, generated: &Generated, headers: &mut HeaderMap) {
    for (name, value) in cloud_events(&state.service.info, &generated.model, &generated.id) {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
}

pub async fn infer(
    State(state): State<SharedState>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (name, version) = target(&params);
    infer_once(&state, &name, version.as_deref(), &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn infer_once(
    state: &SharedState,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_auth(state, headers)?;
    let unary = Mode::Unary {
        streaming_route: STREAMING_ROUTE,
    };
    let (accepted, binary_output) = accept(state, name, version, headers, body, unary).await?;
    let generated = accepted.run(None).await?;
    let encoded = if binary_output {
        binary_response(&generated)
    } else {
        json_response(&response::to_response(&generated))
    };
    let mut response = encoded.map_err(|e| {
        e.log(&generated.id, &generated.model);
        ApiError::from(e)
    })?;
    add_cloud_events(state, &generated, response.headers_mut());
    Ok(response)
}

/// Triton's binary form: the JSON header, then the PNGs as one serialised BYTES tensor.
fn binary_response(generated: &Generated) -> Result<Response, ServeError> {
    let body = binary::encode_response(generated)?;
    Ok((
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
        .into_response())
}

fn json_response<T: serde::Serialize>(value: &T) -> Result<Response, ServeError> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| ServeError::internal("response", format!("response encoding failed: {e}")))?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        bytes,
    )
        .into_response())
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
    let accepted = match accept(
        &state,
        &name,
        version.as_deref(),
        &headers,
        body,
        Mode::Streaming,
    )
    .await
    {
        Ok((accepted, _)) => accepted,
        Err(e) => return e.into_response(),
    };
    let (events, receiver) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let (model, id) = (accepted.model.clone(), accepted.id.clone());
        // Ends when the generation ends, or when the client goes away (the receiver is
        // dropped), which cancels the generation.
        let Some(result) =
            run_streaming(accepted, &events, |p| progress_event(&model, &id, p)).await
        else {
            return;
        };
        let final_event = match result {
            Ok(generated) => {
                let mut response = response::to_response(&generated);
                add_stream_headers(&state, &generated, &mut response);
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
    generated: &Generated,
    response: &mut InferenceResponse,
) {
    let map: Parameters = cloud_events(&state.service.info, &generated.model, &generated.id)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), json!(v)))
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

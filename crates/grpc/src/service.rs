//! `inference.GRPCInferenceService`: the REST handlers' flow over gRPC, on the same engine.
//!
//! Inference is admit → decode and validate → queue → encode, exactly as
//! `sdserve_http::handlers::infer` does, with the same model metrics (`version="None"` when
//! `model_version` is empty). The request timeout is the shorter of the gRPC deadline and
//! `parameters.timeout`; a call the client cancels is dropped by the transport, which drops
//! the engine's future and so cancels the generation.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use sdserve_engine::{EngineError, InferObserver, Prepared, Progress};
use sdserve_http::convert::StepProgress;
use sdserve_http::handlers::infer::cloud_events;
use sdserve_http::handlers::metadata::model_parameters;
use sdserve_http::{ApiError, SharedState};
use sdserve_protocol::diffusers::{input_metadata, output_metadata};
use sdserve_protocol::{MetadataTensor, Parameters};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tonic::codegen::http::HeaderMap;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::convert::{
    parameter_out, parameters_out, png_output, to_infer_response, to_inference_request,
};
use crate::metrics::{Arrived, TrailingMetadata};
use crate::pb::inference as pb;
use crate::pb::inference::grpc_inference_service_server::GrpcInferenceService;
use crate::repository;
use crate::status::{check_auth, code_for, code_name, from_api, from_engine};

/// The data plane service; cheap to clone.
#[derive(Clone)]
pub struct Dataplane {
    pub(crate) state: SharedState,
    /// Becomes true when the server stops: open streams stop taking requests.
    pub(crate) stop: watch::Receiver<bool>,
}

impl Dataplane {
    pub fn new(state: SharedState, stop: watch::Receiver<bool>) -> Self {
        Self { state, stop }
    }

    fn auth(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        check_auth(self.state.config.auth_token.as_deref(), metadata)
    }
}

fn version_of(v: &str) -> Option<&str> {
    Some(v).filter(|v| !v.is_empty())
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A request that passed admission and validation.
struct Accepted {
    id: Option<String>,
    raw: bool,
    prepared: Prepared,
}

/// Everything up to the point where the request would be queued; failures are counted on
/// the observer as REST counts them.
fn accept(
    state: &SharedState,
    req: &pb::ModelInferRequest,
    deadline: Option<Duration>,
    observer: &mut Option<InferObserver>,
    streaming: bool,
) -> Result<Accepted, ApiError> {
    let fail = |observer: &mut Option<InferObserver>, reason: &'static str| {
        if let Some(o) = observer.take() {
            o.fail(reason);
        }
    };
    let admission = state.engine.admit().map_err(|e| {
        fail(observer, e.reason());
        ApiError::from(e)
    })?;
    let decoded = to_inference_request(req).map_err(|e| {
        fail(observer, "invalid");
        ApiError::bad_request(e.0)
    })?;
    let (generation, options) = sdserve_http::convert::to_generation_request(&decoded.request)
        .inspect_err(|_| fail(observer, "invalid"))?;
    if !streaming && options.preview_every.is_some() {
        fail(observer, "invalid");
        return Err(ApiError::bad_request(
            "parameter 'preview_every' needs ModelStreamInfer",
        ));
    }
    let timeout = match (options.timeout, deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let prepared = state
        .engine
        .prepare(
            admission,
            &req.model_name,
            version_of(&req.model_version),
            &generation,
            timeout,
        )
        .and_then(|p| p.with_preview_every(options.preview_every))
        .map_err(|e| {
            fail(observer, e.reason());
            ApiError::from(e)
        })?;
    Ok(Accepted {
        id: decoded.request.id,
        raw: decoded.raw,
        prepared,
    })
}

fn tensor_metadata(t: &MetadataTensor) -> pb::model_metadata_response::TensorMetadata {
    pb::model_metadata_response::TensorMetadata {
        name: t.name.clone(),
        datatype: t.datatype.as_str().into(),
        shape: t.shape.clone(),
        parameters: t
            .parameters
            .as_ref()
            .map(parameters_out)
            .unwrap_or_default(),
    }
}

/// A progress message; previews travel as a `preview` output shaped like `image` (raw when the
/// request was).
fn progress_message(
    model: &str,
    version: &str,
    id: &str,
    p: &Progress,
    raw: bool,
) -> pb::ModelStreamInferResponse {
    let parameters: HashMap<String, pb::InferParameter> = [
        ("step", json!(p.step)),
        ("total", json!(p.total)),
        ("elapsed", json!(p.elapsed.as_secs_f64())),
    ]
    .into_iter()
    .filter_map(|(k, v)| parameter_out(&v).map(|p| (k.to_owned(), p)))
    .collect();
    let (preview, raw_preview) = if p.preview.is_empty() {
        (None, None)
    } else {
        let pngs = p
            .preview
            .iter()
            .map(|f| Bytes::copy_from_slice(f))
            .collect();
        // Joining can only fail past 4 GiB per file; such a preview is left out.
        match png_output("preview", pngs, raw) {
            Ok((tensor, raw_contents)) => (Some(tensor), raw_contents),
            Err(_) => (None, None),
        }
    };
    pb::ModelStreamInferResponse {
        error_message: String::new(),
        infer_response: Some(pb::ModelInferResponse {
            model_name: model.into(),
            model_version: version.into(),
            id: id.into(),
            parameters,
            outputs: preview.into_iter().collect(),
            raw_output_contents: raw_preview.into_iter().collect(),
        }),
    }
}

/// A failed request inside a stream: the message in `error_message`, and the REST status and
/// gRPC code in the response parameters so a client can tell failures apart.
fn error_message(
    model: &str,
    version: &str,
    id: &str,
    e: &ApiError,
) -> pb::ModelStreamInferResponse {
    let status = e.status.as_u16();
    let mut parameters = Parameters::new();
    parameters.insert("status_code".into(), json!(status));
    parameters.insert("grpc_code".into(), json!(code_name(code_for(status))));
    pb::ModelStreamInferResponse {
        error_message: e.message.clone(),
        infer_response: Some(pb::ModelInferResponse {
            model_name: model.into(),
            model_version: version.into(),
            id: id.into(),
            parameters: parameters_out(&parameters),
            ..Default::default()
        }),
    }
}

type StreamSender = mpsc::Sender<Result<pb::ModelStreamInferResponse, Status>>;

/// One request of a stream: its progress messages in order, then its result or error.
async fn stream_one(
    state: SharedState,
    req: pb::ModelInferRequest,
    rpc_deadline: Option<Instant>,
    tx: StreamSender,
) {
    let name = req.model_name.clone();
    let version = req.model_version.clone();
    let mut observer = Some(
        state
            .engine
            .observer(&name, version_of(&version).unwrap_or("None")),
    );
    let remaining = rpc_deadline.map(|d| d.saturating_duration_since(Instant::now()));
    let accepted = match accept(&state, &req, remaining, &mut observer, true) {
        Ok(a) => a,
        Err(e) => {
            let id = if req.id.is_empty() {
                new_id()
            } else {
                req.id.clone()
            };
            let _ = tx.send(Ok(error_message(&name, &version, &id, &e))).await;
            return;
        }
    };
    let mut observer = observer.expect("the observer is only taken on failure");
    let id = accepted.id.unwrap_or_else(new_id);
    let raw = accepted.raw;
    let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<Progress>();
    // Scheduler steps, as over REST (the engine counts UNet passes).
    let mut steps = StepProgress::new(accepted.prepared.job().num_inference_steps);
    // Ends with the generation, or when the client goes away (the response stream is
    // dropped), which drops `run` and so cancels the generation.
    let result = {
        let run = state
            .engine
            .run(accepted.prepared, &mut observer, Some(progress_tx));
        tokio::pin!(run);
        loop {
            tokio::select! {
                biased;
                Some(p) = progress_rx.recv() => {
                    let Some(p) = steps.step(&p) else { continue };
                    if tx.send(Ok(progress_message(&name, &version, &id, &p, raw))).await.is_err() {
                        break None;
                    }
                }
                r = &mut run => break Some(r),
                _ = tx.closed() => break None,
            }
        }
    };
    let Some(result) = result else {
        observer.finish(Err(&EngineError::Disconnected));
        return;
    };
    // Progress reported just before the end still goes out, in order, before the result.
    while let Ok(p) = progress_rx.try_recv() {
        let Some(p) = steps.step(&p) else { continue };
        if tx
            .send(Ok(progress_message(&name, &version, &id, &p, raw)))
            .await
            .is_err()
        {
            break;
        }
    }
    observer.finish(result.as_ref().map(|o| o.images.len()));
    let response = result
        .map_err(ApiError::from)
        .and_then(|outcome| to_infer_response(&name, id.clone(), &outcome, accepted.raw));
    let message = match response {
        Ok(r) => pb::ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(r),
        },
        Err(e) => error_message(&name, &version, &id, &e),
    };
    let _ = tx.send(Ok(message)).await;
}

fn rpc_deadline<T>(request: &Request<T>) -> Result<Option<Instant>, Status> {
    let arrived = request
        .extensions()
        .get::<Arrived>()
        .map(|a| a.0)
        .unwrap_or_else(Instant::now);
    crate::status::deadline(request.metadata(), arrived)
}

/// Resolves when the server stops (or is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A failure of the inbound stream itself (a message over the size limit, a broken frame).
fn inbound_status(status: Status) -> Status {
    if status.code() == tonic::Code::OutOfRange
        && status
            .message()
            .starts_with("Error, decoded message length too large")
    {
        return Status::resource_exhausted(format!(
            "{} (grpc_max_message_length)",
            status.message()
        ));
    }
    status
}

#[tonic::async_trait]
impl GrpcInferenceService for Dataplane {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    /// Ready when every registered model is loaded and the server is not draining.
    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.state.engine.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let status = self
            .state
            .engine
            .model(&r.name, version_of(&r.version))
            .map_err(from_engine)?;
        let ready = status.is_ready() && !self.state.engine.is_draining();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        let c = &self.state.config;
        Ok(Response::new(pb::ServerMetadataResponse {
            name: c.server_name.clone(),
            version: c.server_version.clone(),
            extensions: c.extensions.clone(),
        }))
    }

    /// As `GET /v2/models/{name}`, except that the image output carries no `content_type`:
    /// over gRPC the elements are the PNG bytes themselves, not base64.
    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let status = self
            .state
            .engine
            .model(&r.name, version_of(&r.version))
            .map_err(from_engine)?;
        let spec = status.spec();
        let outputs = output_metadata()
            .into_iter()
            .map(|mut t| {
                if let Some(p) = &mut t.parameters {
                    p.remove("content_type");
                }
                tensor_metadata(&t)
            })
            .collect();
        Ok(Response::new(pb::ModelMetadataResponse {
            name: spec.name.clone(),
            versions: spec.versions.clone(),
            platform: spec.platform.clone(),
            inputs: input_metadata().iter().map(tensor_metadata).collect(),
            outputs,
            parameters: parameters_out(&model_parameters(&status)),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        self.auth(request.metadata())?;
        let deadline = rpc_deadline(&request)?.map(|d| d.saturating_duration_since(Instant::now()));
        let req = request.into_inner();
        let name = req.model_name.clone();
        let mut observer = Some(
            self.state
                .engine
                .observer(&name, version_of(&req.model_version).unwrap_or("None")),
        );
        let accepted =
            accept(&self.state, &req, deadline, &mut observer, false).map_err(|e| from_api(&e))?;
        let mut observer = observer.expect("the observer is only taken on failure");
        let result = self
            .state
            .engine
            .run(accepted.prepared, &mut observer, None)
            .await;
        observer.finish(result.as_ref().map(|o| o.images.len()));
        let outcome = result.map_err(from_engine)?;
        let id = accepted.id.unwrap_or_else(new_id);
        // MLServer's CloudEvents headers, sent as trailing metadata as MLServer sends them.
        let mut trailing = HeaderMap::new();
        cloud_events(&self.state, &name, &id, &mut trailing);
        let response =
            to_infer_response(&name, id, &outcome, accepted.raw).map_err(|e| from_api(&e))?;
        let mut response = Response::new(response);
        response.extensions_mut().insert(TrailingMetadata(trailing));
        Ok(response)
    }

    type ModelStreamInferStream = ReceiverStream<Result<pb::ModelStreamInferResponse, Status>>;

    /// Requests of one stream run concurrently (each is admitted and queued like a unary
    /// call); each request's messages keep their order and carry its id.
    async fn model_stream_infer(
        &self,
        request: Request<Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        self.auth(request.metadata())?;
        let rpc_deadline = rpc_deadline(&request)?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let state = self.state.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let mut requests = JoinSet::new();
            loop {
                tokio::select! {
                    message = inbound.message() => match message {
                        Ok(Some(req)) => {
                            requests.spawn(stream_one(state.clone(), req, rpc_deadline, tx.clone()));
                        }
                        Ok(None) => break,
                        Err(status) => {
                            let _ = tx.send(Err(inbound_status(status))).await;
                            break;
                        }
                    },
                    _ = tx.closed() => break,
                    _ = stopped(&mut stop) => break,
                }
                while requests.try_join_next().is_some() {}
            }
            drop(tx);
            // Requests already taken finish (or stop by themselves when the client leaves).
            while requests.join_next().await.is_some() {}
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn repository_index(
        &self,
        request: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        self.auth(request.metadata())?;
        let models = repository::index(&self.state, request.get_ref().ready).await?;
        Ok(Response::new(pb::RepositoryIndexResponse {
            models: models
                .into_iter()
                .map(|m| pb::repository_index_response::ModelIndex {
                    name: m.name,
                    version: m.version.unwrap_or_default(),
                    state: m.state,
                    reason: m.reason,
                })
                .collect(),
        }))
    }

    async fn repository_model_load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        self.auth(request.metadata())?;
        repository::load(&self.state, &request.get_ref().model_name).await?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        self.auth(request.metadata())?;
        repository::unload(&self.state, &request.get_ref().model_name)?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }
}

//! `inference.GRPCInferenceService`: the transport-neutral service over gRPC.
//!
//! Inference is admit → decode and validate → queue → encode, as over REST, with the same
//! model metrics (`version="None"` when `model_version` is empty). The request timeout is the
//! shorter of the gRPC deadline and `parameters.timeout`; a call the client cancels is
//! dropped by the transport, which drops the engine's future and so cancels the generation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sdserve_engine::Progress;
use sdserve_protocol::{MetadataTensor, Parameters};
use sdserve_serving::{Accepted, Mode, ServeError, Service, cloud_events, new_id, run_streaming};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tonic::codegen::http::{HeaderMap, HeaderValue};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::convert::{
    parameter_out, parameters_out, png_output, to_infer_response, to_inference_request,
};
use crate::metrics::{Arrived, TrailingMetadata};
use crate::pb::inference as pb;
use crate::pb::inference::grpc_inference_service_server::GrpcInferenceService;
use crate::repository;
use crate::status::{check_auth, code_for, code_name, status};

/// Where `preview_every` is accepted, for the message of a unary call that asks for it.
const STREAMING_ROUTE: &str = "ModelStreamInfer";

/// The data plane service; cheap to clone.
#[derive(Clone)]
pub struct Dataplane {
    pub(crate) service: Arc<Service>,
    /// Becomes true when the server stops: open streams stop taking requests.
    pub(crate) stop: watch::Receiver<bool>,
}

impl Dataplane {
    pub fn new(service: Arc<Service>, stop: watch::Receiver<bool>) -> Self {
        Self { service, stop }
    }

    fn auth(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        check_auth(self.service.info.auth_token.as_deref(), metadata)
    }
}

fn version_of(v: &str) -> Option<&str> {
    Some(v).filter(|v| !v.is_empty())
}

/// Everything up to the point where the request would be queued; also whether its inputs
/// came as raw contents (then so does the answer).
fn accept(
    service: &Service,
    req: &pb::ModelInferRequest,
    deadline: Option<Duration>,
    mode: Mode,
) -> Result<(Accepted, bool), ServeError> {
    let pending = service.admit(&req.model_name, version_of(&req.model_version))?;
    let decoded = match to_inference_request(req) {
        Ok(d) => d,
        Err(e) => return Err(pending.fail(ServeError::invalid(e.0))),
    };
    let accepted = pending.accept(decoded.request, mode, deadline)?;
    Ok((accepted, decoded.raw))
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
        // Joining can only fail past 4 GiB per file; such a preview is left out.
        match png_output("preview", p.preview.iter().map(Vec::as_slice), raw) {
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
    e: &ServeError,
) -> pb::ModelStreamInferResponse {
    let mut parameters = Parameters::new();
    parameters.insert("status_code".into(), json!(e.kind.status_code()));
    parameters.insert("grpc_code".into(), json!(code_name(code_for(e.kind))));
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
    service: Arc<Service>,
    req: pb::ModelInferRequest,
    rpc_deadline: Option<Instant>,
    tx: StreamSender,
) {
    let name = req.model_name.clone();
    let version = req.model_version.clone();
    let remaining = rpc_deadline.map(|d| d.saturating_duration_since(Instant::now()));
    let (accepted, raw) = match accept(&service, &req, remaining, Mode::Streaming) {
        Ok(a) => a,
        Err(e) => {
            let id = Some(req.id.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(new_id);
            let _ = tx.send(Ok(error_message(&name, &version, &id, &e))).await;
            return;
        }
    };
    let id = accepted.id.clone();
    let event = |p: &Progress| Ok(progress_message(&name, &version, &id, p, raw));
    // Ends with the generation, or when the client goes away (the response stream is
    // dropped), which cancels the generation.
    let Some(result) = run_streaming(accepted, &tx, event).await else {
        return;
    };
    let response = result.and_then(|generated| {
        to_infer_response(&generated, raw).inspect_err(|e| e.log(&generated.id, &generated.model))
    });
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
            ready: self.service.engine.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let ready = self
            .service
            .model_ready(&r.name, version_of(&r.version))
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        let m = self.service.server_metadata();
        Ok(Response::new(pb::ServerMetadataResponse {
            name: m.name,
            version: m.version,
            extensions: m.extensions,
        }))
    }

    /// As `GET /v2/models/{name}`, except that the image output carries no `content_type`:
    /// over gRPC the elements are the PNG bytes themselves, not base64.
    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let m = self
            .service
            .model_metadata(&r.name, version_of(&r.version))
            .map_err(|e| status(&e))?;
        let outputs = m
            .outputs
            .unwrap_or_default()
            .into_iter()
            .map(|mut t| {
                if let Some(p) = &mut t.parameters {
                    p.remove("content_type");
                }
                tensor_metadata(&t)
            })
            .collect();
        Ok(Response::new(pb::ModelMetadataResponse {
            name: m.name,
            versions: m.versions.unwrap_or_default(),
            platform: m.platform,
            inputs: m.inputs.iter().flatten().map(tensor_metadata).collect(),
            outputs,
            parameters: parameters_out(&m.parameters.unwrap_or_default()),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        self.auth(request.metadata())?;
        let deadline = rpc_deadline(&request)?.map(|d| d.saturating_duration_since(Instant::now()));
        let req = request.into_inner();
        let unary = Mode::Unary {
            streaming_route: STREAMING_ROUTE,
        };
        let (accepted, raw) =
            accept(&self.service, &req, deadline, unary).map_err(|e| status(&e))?;
        let generated = accepted.run(None).await.map_err(|e| status(&e))?;
        let response = to_infer_response(&generated, raw).map_err(|e| {
            e.log(&generated.id, &generated.model);
            status(&e)
        })?;
        // MLServer's CloudEvents headers, sent as trailing metadata as MLServer sends them.
        let mut trailing = HeaderMap::new();
        for (name, value) in cloud_events(&self.service.info, &generated.model, &generated.id) {
            if let Ok(v) = HeaderValue::from_str(&value) {
                trailing.insert(name, v);
            }
        }
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
        let service = self.service.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let mut requests = JoinSet::new();
            loop {
                tokio::select! {
                    message = inbound.message() => match message {
                        Ok(Some(req)) => {
                            requests.spawn(stream_one(service.clone(), req, rpc_deadline, tx.clone()));
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
        let models = repository::index(&self.service, request.get_ref().ready).await?;
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        self.auth(request.metadata())?;
        repository::load(&self.service, &request.get_ref().model_name).await?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        self.auth(request.metadata())?;
        repository::unload(&self.service, &request.get_ref().model_name)?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }
}

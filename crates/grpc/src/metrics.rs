//! MLServer's gRPC families (`grpc_server_started_total`, `grpc_server_handled_total`,
//! `grpc_server_handling_seconds`) and the tower service that records them around every call.
//!
//! Unlike MLServer, `grpc_server_handled_total` counts every outcome, errors included, with
//! the code the client received. A call ends when its response body ends (trailers sent),
//! so a stream is timed to its last message; a call the client abandons counts as CANCELLED.
//!
//! The same wrapper stamps each request's arrival ([`Arrived`]), moves a handler's [`TrailingMetadata`] into the trailers, and turns the
//! codec's "message too large" (OUT_OF_RANGE) into RESOURCE_EXHAUSTED, the code gRPC uses for a
//! message over the size limit.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::Frame;
use sdserve_engine::metrics::{DEFAULT_BUCKETS, Family, Registry};
use tonic::Code;
use tonic::codegen::http::{HeaderMap, Request, Response};
use tower::Service;

use crate::status::code_name;

pub const INFERENCE_SERVICE: &str = "inference.GRPCInferenceService";
pub const REPOSITORY_SERVICE: &str = "inference.model_repository.ModelRepositoryService";

const INFERENCE_METHODS: &[&str] = &[
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
];
const REPOSITORY_METHODS: &[&str] = &[
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
];

/// `(grpc_service, grpc_method, grpc_type)` of a request path, for the methods we serve.
pub fn method_labels(path: &str) -> Option<(&'static str, &'static str, &'static str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let (service, methods) = match service {
        INFERENCE_SERVICE => (INFERENCE_SERVICE, INFERENCE_METHODS),
        REPOSITORY_SERVICE => (REPOSITORY_SERVICE, REPOSITORY_METHODS),
        _ => return None,
    };
    let method = *methods.iter().find(|m| **m == method)?;
    let kind = if method == "ModelStreamInfer" {
        "BIDI_STREAM"
    } else {
        "UNARY"
    };
    Some((service, method, kind))
}

pub struct GrpcMetrics {
    started: Arc<Family>,
    handled: Arc<Family>,
    handling: Arc<Family>,
}

impl GrpcMetrics {
    /// Registers the three families (call it only when metrics are enabled).
    pub fn register(r: &Registry) -> Self {
        let labels = &["grpc_type", "grpc_service", "grpc_method"][..];
        Self {
            started: r.counter("grpc_server_started_total", "Total number of RPCs started on the server.", labels),
            handled: r.counter(
                "grpc_server_handled_total",
                "Total number of RPCs completed on the server, regardless of success or failure.",
                &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            ),
            handling: r.histogram(
                "grpc_server_handling_seconds",
                "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
                labels,
                DEFAULT_BUCKETS,
            ),
        }
    }
}

/// One call being measured; dropped unfinished, it counts as CANCELLED.
struct Call {
    metrics: Arc<GrpcMetrics>,
    labels: (&'static str, &'static str, &'static str),
    started: Instant,
    done: bool,
}

impl Call {
    fn start(metrics: &Arc<GrpcMetrics>, path: &str) -> Option<Self> {
        let (service, method, kind) = method_labels(path)?;
        metrics.started.inc(&[kind, service, method]);
        Some(Self {
            metrics: metrics.clone(),
            labels: (service, method, kind),
            started: Instant::now(),
            done: false,
        })
    }

    fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let (service, method, kind) = self.labels;
        self.metrics
            .handled
            .inc(&[kind, service, method, code_name(code)]);
        self.metrics.handling.observe(
            &[kind, service, method],
            self.started.elapsed().as_secs_f64(),
        );
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

/// When the request's headers arrived (deadlines count from here, not from the end of a
/// possibly large message).
#[derive(Debug, Clone, Copy)]
pub struct Arrived(pub Instant);

/// Metadata a handler wants sent in the trailers (tonic sends a unary response's own
/// metadata as headers). Put it in the response extensions.
#[derive(Debug, Clone, Default)]
pub struct TrailingMetadata(pub HeaderMap);

fn status_code(headers: &HeaderMap) -> Option<Code> {
    let v = headers.get("grpc-status")?;
    Some(
        v.to_str()
            .ok()
            .and_then(|s| s.parse::<i32>().ok())
            .map(Code::from_i32)
            .unwrap_or(Code::Unknown),
    )
}

const TOO_LARGE: &str = "Error, decoded message length too large: found ";

/// OUT_OF_RANGE "decoded message length too large" → RESOURCE_EXHAUSTED naming the setting.
fn rewrite_too_large(headers: &mut HeaderMap) {
    if status_code(headers) != Some(Code::OutOfRange) {
        return;
    }
    let Some(status) = tonic::Status::from_header_map(headers) else {
        return;
    };
    let Some(rest) = status.message().strip_prefix(TOO_LARGE) else {
        return;
    };
    let numbers: Vec<&str> = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .collect();
    let message = match numbers.as_slice() {
        [found, limit, ..] => format!(
            "request message of {found} bytes is larger than the limit of {limit} bytes (grpc_max_message_length)"
        ),
        _ => format!(
            "request message is larger than the limit (grpc_max_message_length): {}",
            status.message()
        ),
    };
    headers.remove("grpc-message");
    let _ = tonic::Status::new(Code::ResourceExhausted, message).add_header(headers);
}

/// Wraps the routes: metrics, trailing metadata, the size-limit code.
#[derive(Clone)]
pub struct Instrumented<S> {
    inner: S,
    metrics: Option<Arc<GrpcMetrics>>,
}

impl<S> Instrumented<S> {
    pub fn new(inner: S, metrics: Option<Arc<GrpcMetrics>>) -> Self {
        Self { inner, metrics }
    }
}

impl<S, B> Service<Request<B>> for Instrumented<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        req.extensions_mut().insert(Arrived(Instant::now()));
        let call = self
            .metrics
            .as_ref()
            .and_then(|m| Call::start(m, req.uri().path()));
        let future = self.inner.call(req);
        Box::pin(async move {
            let mut call = call;
            let response = future.await?;
            let (mut parts, body) = response.into_parts();
            rewrite_too_large(&mut parts.headers);
            let trailing = parts.extensions.remove::<TrailingMetadata>();
            // A trailers-only answer (every error) carries its status in the headers.
            if let Some(code) = status_code(&parts.headers)
                && let Some(c) = call.as_mut()
            {
                c.finish(code);
            }
            Ok(Response::from_parts(
                parts,
                TrackedBody {
                    inner: body,
                    call,
                    trailing,
                },
            ))
        })
    }
}

/// The response body, watched for its trailers.
pub struct TrackedBody {
    inner: tonic::body::Body,
    call: Option<Call>,
    trailing: Option<TrailingMetadata>,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                let Poll::Ready(Some(Ok(frame))) = polled else {
                    unreachable!()
                };
                let mut trailers = frame.into_trailers().unwrap_or_default();
                if let Some(TrailingMetadata(extra)) = this.trailing.take() {
                    for (k, v) in extra.iter() {
                        if !trailers.contains_key(k) {
                            trailers.insert(k.clone(), v.clone());
                        }
                    }
                }
                if let Some(c) = this.call.as_mut() {
                    c.finish(status_code(&trailers).unwrap_or(Code::Unknown));
                }
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            Poll::Ready(Some(Err(status))) => {
                if let Some(c) = this.call.as_mut() {
                    c.finish(status.code());
                }
            }
            Poll::Ready(None) => {
                if let Some(c) = this.call.as_mut() {
                    c.finish(Code::Ok);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_methods_get_labels() {
        assert_eq!(
            method_labels("/inference.GRPCInferenceService/ModelInfer"),
            Some((INFERENCE_SERVICE, "ModelInfer", "UNARY"))
        );
        assert_eq!(
            method_labels("/inference.GRPCInferenceService/ModelStreamInfer"),
            Some((INFERENCE_SERVICE, "ModelStreamInfer", "BIDI_STREAM"))
        );
        assert_eq!(
            method_labels("/inference.model_repository.ModelRepositoryService/RepositoryIndex"),
            Some((REPOSITORY_SERVICE, "RepositoryIndex", "UNARY"))
        );
        assert_eq!(
            method_labels("/inference.GRPCInferenceService/ModelConfig"),
            None
        );
        assert_eq!(method_labels("/grpc.health.v1.Health/Check"), None);
    }

    #[test]
    fn too_large_becomes_resource_exhausted() {
        let mut h = HeaderMap::new();
        tonic::Status::out_of_range("Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes")
            .add_header(&mut h)
            .unwrap();
        rewrite_too_large(&mut h);
        let s = tonic::Status::from_header_map(&h).unwrap();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(
            s.message(),
            "request message of 5000000 bytes is larger than the limit of 4194304 bytes (grpc_max_message_length)"
        );
        let mut other = HeaderMap::new();
        tonic::Status::out_of_range("something else")
            .add_header(&mut other)
            .unwrap();
        rewrite_too_large(&mut other);
        assert_eq!(status_code(&other), Some(Code::OutOfRange));
    }

    #[test]
    fn calls_are_counted_with_their_code_and_abandoned_ones_as_cancelled() {
        let r = Registry::new();
        let m = Arc::new(GrpcMetrics::register(&r));
        let mut c = Call::start(&m, "/inference.GRPCInferenceService/ServerLive").unwrap();
        c.finish(Code::Ok);
        c.finish(Code::Internal);
        drop(Call::start(
            &m,
            "/inference.GRPCInferenceService/ModelInfer",
        ));
        let text = r.render();
        let l = |method: &str| {
            format!(
                "grpc_method=\"{method}\",grpc_service=\"inference.GRPCInferenceService\",grpc_type=\"UNARY\""
            )
        };
        assert!(
            text.contains(&format!(
                "grpc_server_started_total{{{}}} 1.0",
                l("ServerLive")
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "grpc_server_handled_total{{grpc_code=\"OK\",{}}} 1.0",
                l("ServerLive")
            )),
            "{text}"
        );
        assert!(!text.contains("grpc_code=\"INTERNAL\""), "{text}");
        assert!(
            text.contains(&format!(
                "grpc_server_handled_total{{grpc_code=\"CANCELLED\",{}}} 1.0",
                l("ModelInfer")
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "grpc_server_handling_seconds_count{{{}}} 1.0",
                l("ModelInfer")
            )),
            "{text}"
        );
    }
}

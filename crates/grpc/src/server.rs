//! The listener: HTTP/2 connections served by hyper, the two services behind one dispatch by
//! service name.
//!
//! hyper serves the connections directly (not tonic's transport server) because that server
//! answers an expired `grpc-timeout` itself, with CANCELLED, before the engine can; here the
//! deadline is the engine's request timeout and expires as DEADLINE_EXCEEDED.
//!
//! Connections are held to the HTTP listener's bounds ([`ConnectionLimits`]): at most
//! `max_connections` are open (the longest-idle one is asked to go away to make room; when all
//! are busy the newcomer's calls get UNAVAILABLE and it is closed), and a connection with no
//! call in flight for `keep_alive_timeout` gets GOAWAY, which gRPC clients answer by
//! reconnecting on their next call. That idle bound also closes a connection whose preface or
//! first headers never complete (hyper hands over no call until they do), so on gRPC it is the
//! header-read bound as well. A call in flight, a progress stream included, is never cut.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use sdserve_serving::Service;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::codec::CompressionEncoding;

use bytes::Bytes;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;

use sdserve_serving::connections::{ConnectionLimits, InFlight, Registry, Slot};

use crate::metrics::{GrpcMetrics, Instrumented, TrackedBody};
use crate::pb::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::pb::inference::model_repository::model_repository_service_server::ModelRepositoryServiceServer;
use crate::repository::Repository;
use crate::service::Dataplane;

/// gRPC's own default limit on a received message.
pub const DEFAULT_MAX_RECEIVE_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct GrpcConfig {
    /// Largest request message (`grpc_max_message_length`; gRPC's 4 MiB when unset).
    pub max_receive_message_bytes: usize,
    /// Largest response message. Not limited by default: generated images quickly outgrow
    /// 4 MiB, and the model's limits on image count and size already bound a response.
    pub max_send_message_bytes: usize,
    /// How long open connections may take to finish after the listener stops.
    pub shutdown_grace: Duration,
    pub connections: ConnectionLimits,
}

impl GrpcConfig {
    /// From the `grpc_max_message_length` setting, which (unlike MLServer) limits only what
    /// the server receives.
    pub fn from_settings(grpc_max_message_length: Option<u64>) -> Self {
        Self {
            max_receive_message_bytes: grpc_max_message_length
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
                .unwrap_or(DEFAULT_MAX_RECEIVE_BYTES),
            max_send_message_bytes: usize::MAX,
            shutdown_grace: Duration::from_secs(5),
            connections: ConnectionLimits::default(),
        }
    }
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self::from_settings(None)
    }
}

/// Both services behind one dispatch, wrapped for metrics.
pub fn routes(
    service: Arc<Service>,
    config: &GrpcConfig,
    metrics: Option<Arc<GrpcMetrics>>,
    stop: watch::Receiver<bool>,
) -> Instrumented<Services> {
    let dataplane = GrpcInferenceServiceServer::new(Dataplane::new(service.clone(), stop))
        .max_decoding_message_size(config.max_receive_message_bytes)
        .max_encoding_message_size(config.max_send_message_bytes)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate);
    let repository = ModelRepositoryServiceServer::new(Repository::new(service))
        .max_decoding_message_size(config.max_receive_message_bytes)
        .max_encoding_message_size(config.max_send_message_bytes)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate);
    Instrumented::new(
        Services {
            dataplane,
            repository,
        },
        metrics,
    )
}

/// The two services, each called for the paths of its own name (`/<service>/<method>`); any
/// other path is UNIMPLEMENTED, as gRPC servers answer it.
#[derive(Clone)]
pub struct Services {
    dataplane: GrpcInferenceServiceServer<Dataplane>,
    repository: ModelRepositoryServiceServer<Repository>,
}

/// Whether `path` is a method of service `name`.
fn belongs_to(path: &str, name: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|p| p.strip_prefix(name))
        .is_some_and(|rest| rest.starts_with('/'))
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<tonic::body::Body>, Infallible>> + Send>>;

impl<B> tower::Service<Request<B>> for Services
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Both generated servers are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> ResponseFuture {
        let path = req.uri().path();
        type Dataplane_ = GrpcInferenceServiceServer<Dataplane>;
        type Repository_ = ModelRepositoryServiceServer<Repository>;
        if belongs_to(path, <Dataplane_ as NamedService>::NAME) {
            Box::pin(self.dataplane.call(req))
        } else if belongs_to(path, <Repository_ as NamedService>::NAME) {
            Box::pin(self.repository.call(req))
        } else {
            Box::pin(async { Ok(tonic::Status::unimplemented("").into_http()) })
        }
    }
}

/// Serves gRPC on `listener` until `shutdown` completes; then stops accepting, lets open
/// streams finish the requests they hold (they take no new ones), and waits up to
/// `shutdown_grace` for connections to close before dropping them.
pub async fn serve(
    listener: TcpListener,
    service: Arc<Service>,
    config: GrpcConfig,
    metrics: Option<Arc<GrpcMetrics>>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let service = routes(service, &config, metrics, stop_rx);
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder.max_concurrent_streams(1024);
    let (conn_stop_tx, conn_stop_rx) = watch::channel(false);
    let registry = Registry::default();
    let limits = config.connections;
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let Some(slot) = registry.admit(limits.max_connections) else {
                        connections.spawn(refuse(builder.clone(), stream));
                        continue;
                    };
                    let connection = Connection {
                        builder: builder.clone(),
                        service: service.clone(),
                        slot,
                        stop: conn_stop_rx.clone(),
                        keep_alive: limits.keep_alive_timeout,
                    };
                    connections.spawn(connection.run(stream, peer));
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!("gRPC server could not accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = &mut shutdown => break,
        }
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let _ = conn_stop_tx.send(true);
    let closed = tokio::time::timeout(config.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if closed.is_err() {
        tracing::warn!(
            "{} gRPC connection(s) still open {:.0} s after shutdown; closing them",
            connections.len(),
            config.shutdown_grace.as_secs_f64()
        );
        connections.shutdown().await;
    }
}

/// One accepted connection and what may end it.
struct Connection {
    builder: hyper::server::conn::http2::Builder<TokioExecutor>,
    service: Instrumented<Services>,
    slot: Slot,
    /// Set at shutdown.
    stop: watch::Receiver<bool>,
    keep_alive: Duration,
}

impl Connection {
    async fn run(mut self, stream: tokio::net::TcpStream, peer: std::net::SocketAddr) {
        let activity = self.slot.activity.clone();
        let service = self.service.clone();
        let counted = tower::service_fn(move |req: Request<hyper::body::Incoming>| {
            let in_flight = activity.begin();
            let mut service = service.clone();
            async move {
                let response = tower::Service::call(&mut service, req).await?;
                Ok::<_, Infallible>(response.map(|body| CountedBody {
                    inner: body,
                    _in_flight: in_flight,
                }))
            }
        });
        let connection = self
            .builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(counted));
        tokio::pin!(connection);
        let idle = self.slot.activity.clone();
        let result = tokio::select! {
            r = connection.as_mut() => r,
            _ = async { let _ = self.stop.wait_for(|s| *s).await; } => {
                // GOAWAY: calls in progress finish, no new ones start.
                connection.as_mut().graceful_shutdown();
                connection.await
            }
            _ = async {
                tokio::select! {
                    _ = idle.idle_for(self.keep_alive) => {}
                    _ = idle.idle_once_set(&mut self.slot.close) => {}
                }
            } => {
                // Idle, or asked to make room: GOAWAY; a connection whose preface never came
                // does not answer it and is dropped after a second.
                connection.as_mut().graceful_shutdown();
                tokio::time::timeout(Duration::from_secs(1), connection)
                    .await
                    .unwrap_or(Ok(()))
            }
        };
        if let Err(e) = result {
            tracing::debug!("gRPC connection from {peer}: {e}");
        }
    }
}

/// Every slot is busy with calls: each call the newcomer makes gets UNAVAILABLE (gRPC clients
/// retry it), and the connection is closed after a second.
async fn refuse(
    builder: hyper::server::conn::http2::Builder<TokioExecutor>,
    stream: tokio::net::TcpStream,
) {
    let busy = tower::service_fn(|_: Request<hyper::body::Incoming>| async {
        Ok::<_, Infallible>(
            tonic::Status::unavailable("too many open connections; retry shortly")
                .into_http::<tonic::body::Body>(),
        )
    });
    let connection = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(busy));
    tokio::pin!(connection);
    if tokio::time::timeout(Duration::from_secs(1), connection.as_mut())
        .await
        .is_err()
    {
        connection.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
    }
}

/// A response body that counts as a call in flight until it is sent or dropped.
struct CountedBody {
    inner: TrackedBody,
    _in_flight: InFlight,
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
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
    fn paths_go_to_the_service_they_name() {
        let dataplane = "inference.GRPCInferenceService";
        assert!(belongs_to(
            "/inference.GRPCInferenceService/ModelInfer",
            dataplane
        ));
        assert!(!belongs_to(
            "/inference.GRPCInferenceServiceX/ModelInfer",
            dataplane
        ));
        assert!(!belongs_to(
            "inference.GRPCInferenceService/ModelInfer",
            dataplane
        ));
        assert!(!belongs_to(
            "/inference.model_repository.ModelRepositoryService/RepositoryIndex",
            dataplane
        ));
    }
}

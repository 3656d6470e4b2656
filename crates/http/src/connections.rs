//! Serving connections on a listener with bounds no client can exceed: a request's headers
//! must arrive within `header_read_timeout`; a connection with no request in flight is closed
//! after `keep_alive_timeout` (MLServer's uvicorn: 5 s); at most `max_connections` are open, and
//! when all are taken the longest-idle one makes room (a flood of idle or half-sent connections
//! cannot lock clients out), or, if every one is busy, the newcomer gets a 503 and is closed.
//! A request in flight is never cut: a long generation or event stream keeps its connection.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

pub use sdserve_serving::connections::ConnectionLimits;
use sdserve_serving::connections::{Registry, Slot};

/// Serves `router` on `listener` within `limits` until `shutdown` completes; then stops
/// accepting, closes idle connections and lets requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let registry = Registry::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let Some(slot) = registry.admit(limits.max_connections) else {
                        connections.spawn(refuse(stream));
                        continue;
                    };
                    let connection = Connection {
                        builder: builder.clone(),
                        router: router.clone(),
                        slot,
                        stop: stop_rx.clone(),
                        keep_alive: limits.keep_alive_timeout,
                    };
                    connections.spawn(connection.run(stream));
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!("could not accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = &mut shutdown => break,
        }
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
}

/// Every slot is busy with a request: a plain 503 and close, without reading the request.
async fn refuse(mut stream: TcpStream) {
    let body = r#"{"error":"too many open connections; retry shortly"}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        stream.write_all(response.as_bytes()),
    )
    .await;
    let _ = stream.shutdown().await;
}

/// One accepted connection and what may end it.
struct Connection {
    builder: auto::Builder<TokioExecutor>,
    router: Router,
    /// Its place among the open connections (freed when the connection ends).
    slot: Slot,
    /// Set at shutdown.
    stop: watch::Receiver<bool>,
    keep_alive: Duration,
}

impl Connection {
    async fn run(mut self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let activity = self.slot.activity.clone();
        let router = self.router.clone();
        let service = tower::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let in_flight = activity.begin();
            let router = router.clone();
            async move {
                let response = router
                    .oneshot(request.map(Body::new))
                    .await
                    .unwrap_or_else(|e| match e {});
                // The request counts until its body is sent or dropped.
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(body.map_frame(move |frame| {
                        let _ = &in_flight;
                        frame
                    }))
                }))
            }
        });
        let connection = self.builder.serve_connection_with_upgrades(
            TokioIo::new(stream),
            TowerToHyperService::new(service),
        );
        tokio::pin!(connection);
        let idle = self.slot.activity.clone();
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("HTTP connection: {e}");
                }
            }
            // Idle (no request in flight, headers not complete): dropping the connection closes it.
            _ = self.slot.activity.idle_for(self.keep_alive) => {}
            _ = idle.idle_once_set(&mut self.slot.close) => {}
            _ = async { let _ = self.stop.wait_for(|s| *s).await; } => {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
        }
    }
}

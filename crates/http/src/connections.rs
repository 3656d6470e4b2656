//! Serving connections on a listener with bounds no client can exceed: a request's headers
//! must arrive within `header_read_timeout`; a connection with no request in flight is closed
//! after `keep_alive_timeout` (MLServer's uvicorn: 5 s); at most `max_connections` are open, and
//! when all are taken the longest-idle one makes room (a flood of idle or half-sent connections
//! cannot lock clients out), or, if every one is busy, the newcomer gets a 503 and is closed.
//! A request in flight is never cut: a long generation or event stream keeps its connection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
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
use tokio::time::Instant;
use tower::ServiceExt;

/// The bounds of one listener.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
            max_connections: 2048,
        }
    }
}

/// Requests in flight on one connection, and when that count last changed.
#[derive(Clone)]
struct Activity(watch::Sender<(usize, Instant)>);

impl Activity {
    fn new() -> Self {
        Self(watch::Sender::new((0, Instant::now())))
    }

    fn begin(&self) -> InFlight {
        self.0.send_modify(|(n, at)| {
            *n += 1;
            *at = Instant::now();
        });
        InFlight(self.clone())
    }

    /// Since when the connection has had no request in flight; `None` while it has one.
    fn idle_since(&self) -> Option<Instant> {
        let (n, at) = *self.0.borrow();
        (n == 0).then_some(at)
    }

    /// Completes once the connection has had no request in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        let mut changes = self.0.subscribe();
        loop {
            let (n, at) = *changes.borrow_and_update();
            if n > 0 {
                let _ = changes.changed().await;
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(at + timeout) => return,
                _ = changes.changed() => {}
            }
        }
    }
}

/// One request in flight, until its response body is done or dropped.
struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.0.send_modify(|(n, at)| {
            *n = n.saturating_sub(1);
            *at = Instant::now();
        });
    }
}

/// The open connections: their activity and a way to close each.
#[derive(Default)]
struct Registry {
    next_id: u64,
    open: HashMap<u64, (Activity, watch::Sender<bool>)>,
}

impl Registry {
    /// Room for one more: immediately, or by closing the longest-idle connection.
    fn make_room(&mut self, max: usize) -> bool {
        if self.open.len() < max {
            return true;
        }
        let oldest = self
            .open
            .values()
            .filter_map(|(activity, close)| activity.idle_since().map(|at| (at, close)))
            .min_by_key(|(at, _)| *at);
        match oldest {
            Some((_, close)) => {
                let _ = close.send(true);
                true
            }
            None => false,
        }
    }
}

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
    let registry = Arc::new(Mutex::new(Registry::default()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let room = registry
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .make_room(limits.max_connections);
                    if !room {
                        connections.spawn(refuse(stream));
                        continue;
                    }
                    let (id, activity, close) = register(&registry);
                    let connection = Connection {
                        builder: builder.clone(),
                        router: router.clone(),
                        activity,
                        close,
                        stop: stop_rx.clone(),
                        keep_alive: limits.keep_alive_timeout,
                    };
                    let registry = registry.clone();
                    connections.spawn(async move {
                        connection.run(stream).await;
                        registry.lock().unwrap_or_else(|e| e.into_inner()).open.remove(&id);
                    });
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

fn register(registry: &Mutex<Registry>) -> (u64, Activity, watch::Receiver<bool>) {
    let mut r = registry.lock().unwrap_or_else(|e| e.into_inner());
    let id = r.next_id;
    r.next_id += 1;
    let activity = Activity::new();
    let (close_tx, close_rx) = watch::channel(false);
    r.open.insert(id, (activity.clone(), close_tx));
    (id, activity, close_rx)
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
    activity: Activity,
    /// Set when the connection must make room for a newer one.
    close: watch::Receiver<bool>,
    /// Set at shutdown.
    stop: watch::Receiver<bool>,
    keep_alive: Duration,
}

impl Connection {
    async fn run(mut self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let activity = self.activity.clone();
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
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("HTTP connection: {e}");
                }
            }
            // Idle (no request in flight, headers not complete): dropping the connection closes it.
            _ = self.activity.idle_for(self.keep_alive) => {}
            _ = until_idle_and_set(&self.activity, &mut self.close) => {}
            _ = async { let _ = self.stop.wait_for(|s| *s).await; } => {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
        }
    }
}

/// Completes when `flag` is set and the connection has no request in flight (an eviction never
/// cuts a request: a connection that became busy meanwhile waits for it to finish).
async fn until_idle_and_set(activity: &Activity, flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|s| *s).await;
    activity.idle_for(Duration::ZERO).await;
}

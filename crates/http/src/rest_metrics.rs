//! The document's `rest_server_*` families: labelled by route template, health routes and
//! unmatched paths skipped, duration measured until the last byte of the body is written.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use sdserve_engine::metrics::{DEFAULT_BUCKETS, Family, Registry};

use crate::error::CLIENT_CLOSED;

pub struct RestMetrics {
    requests: Arc<Family>,
    duration: Arc<Family>,
    in_progress: Arc<Family>,
}

impl RestMetrics {
    /// `prefix` is `metrics_rest_server_prefix` (default `rest_server`).
    pub fn register(registry: &Registry, prefix: &str) -> Self {
        let labels = &["method", "path", "status_code"][..];
        Self {
            requests: registry.counter(
                &format!("{prefix}_requests_total"),
                "Total HTTP requests",
                labels,
            ),
            duration: registry.histogram(
                &format!("{prefix}_request_duration_seconds"),
                "HTTP request duration, in seconds",
                labels,
                DEFAULT_BUCKETS,
            ),
            in_progress: registry.gauge(
                &format!("{prefix}_requests_in_progress"),
                "Total HTTP requests currently in progress",
                &["method"],
            ),
        }
    }
}

/// Records one request when dropped: with the response status once one exists, else 499.
struct Observation {
    metrics: Arc<RestMetrics>,
    method: String,
    path: String,
    started: Instant,
    status: Option<u16>,
}

impl Drop for Observation {
    fn drop(&mut self) {
        let status = self.status.unwrap_or(CLIENT_CLOSED).to_string();
        let labels = [self.method.as_str(), self.path.as_str(), status.as_str()];
        self.metrics.requests.inc(&labels);
        self.metrics
            .duration
            .observe(&labels, self.started.elapsed().as_secs_f64());
        self.metrics.in_progress.add(&[&self.method], -1.0);
        tracing::debug!(target: "sdserve_http::access", "{} {} {} {:.3}s", self.method, self.path, status, self.started.elapsed().as_secs_f64());
    }
}

pub async fn track(State(metrics): State<Arc<RestMetrics>>, req: Request, next: Next) -> Response {
    let path = match req.extensions().get::<MatchedPath>() {
        Some(p) if !p.as_str().starts_with("/v2/health/") => p.as_str().to_owned(),
        _ => return next.run(req).await,
    };
    let method = req.method().as_str().to_owned();
    metrics.in_progress.add(&[&method], 1.0);
    let mut observation = Observation {
        metrics,
        method,
        path,
        started: Instant::now(),
        status: None,
    };
    let response = next.run(req).await;
    observation.status = Some(response.status().as_u16());
    response.map(|body| {
        Body::new(ObservedBody {
            inner: body,
            _observation: observation,
        })
    })
}

/// Keeps the observation alive until the body has been written (or abandoned).
struct ObservedBody {
    inner: Body,
    _observation: Observation,
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

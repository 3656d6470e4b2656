//! Every route of MLServer 1.7.1's REST table, and the metrics listener's one route.

use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::middleware::{from_fn_with_state, map_response};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use sdserve_engine::metrics::{CONTENT_TYPE, Registry};
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{DefaultPredicate, Predicate, SizeAbove};

use crate::error::ApiError;
use crate::handlers::{docs, health, infer, metadata, repository};
use crate::rest_metrics::{RestMetrics, track};
use crate::state::SharedState;

const MODEL: &str = "/v2/models/{model_name}";
const VERSION: &str = "/v2/models/{model_name}/versions/{model_version}";

/// The inference port's router. `rest_metrics` is `None` when metrics are disabled.
pub fn router(state: SharedState, rest_metrics: Option<Arc<RestMetrics>>) -> Router {
    let gzip = state.config.gzip_enabled;
    let mut r = Router::new()
        .route("/v2", get(metadata::server))
        .route("/v2/health/live", get(health::live))
        .route("/v2/health/ready", get(health::ready))
        .route(MODEL, get(metadata::model))
        .route(VERSION, get(metadata::model_version))
        .route(&format!("{MODEL}/ready"), get(health::model_ready))
        .route(&format!("{VERSION}/ready"), get(health::model_version_ready))
        .route("/v2/docs", get(docs::docs))
        .route("/v2/docs/dataplane.json", get(docs::openapi))
        .route("/openapi.json", get(docs::openapi))
        .route(&format!("{MODEL}/docs"), get(docs::model_docs))
        .route(&format!("{VERSION}/docs"), get(docs::model_version_docs))
        .route(&format!("{MODEL}/docs/dataplane.json"), get(docs::model_openapi))
        .route(&format!("{VERSION}/docs/dataplane.json"), get(docs::model_version_openapi))
        .route("/v2/repository/index", post(repository::index))
        .route("/v2/repository/models/{model_name}/load", post(repository::load))
        .route("/v2/repository/models/{model_name}/unload", post(repository::unload));
    for base in [MODEL, VERSION] {
        for action in ["infer", "generate"] {
            r = r.route(&format!("{base}/{action}"), post(infer::infer));
        }
        for action in ["infer_stream", "generate_stream"] {
            r = r.route(&format!("{base}/{action}"), post(infer::infer_stream));
        }
    }
    let mut r = r.fallback(|| async { ApiError::not_found_route() }).with_state(state).layer(map_response(json_405));
    if gzip {
        // Starlette's GZipMiddleware threshold; event streams are never compressed.
        r = r.layer(CompressionLayer::new().compress_when(SizeAbove::new(500).and(DefaultPredicate::new())));
    }
    if let Some(m) = rest_metrics {
        r = r.layer(from_fn_with_state(m, track));
    }
    r
}

/// axum answers a wrong method with an empty 405; give it a JSON body, keep `allow`.
async fn json_405(response: Response) -> Response {
    if response.status() != StatusCode::METHOD_NOT_ALLOWED {
        return response;
    }
    let (parts, _) = response.into_parts();
    let mut fresh = ApiError::method_not_allowed().into_response();
    if let Some(allow) = parts.headers.get(axum::http::header::ALLOW) {
        fresh.headers_mut().insert(axum::http::header::ALLOW, allow.clone());
    }
    fresh
}

/// The metrics port: Prometheus text on `endpoint`, 404 elsewhere.
pub fn metrics_router(registry: Arc<Registry>, endpoint: &str) -> Router {
    Router::new()
        .route(
            endpoint,
            get(move || {
                let registry = registry.clone();
                async move { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], registry.render()) }
            }),
        )
        .fallback(|| async { ApiError::not_found_route() })
}

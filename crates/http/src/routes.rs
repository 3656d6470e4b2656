//! Every route of MLServer 1.7.1's REST table, OpenAI's Images API, and the metrics listener's
//! one route.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{from_fn_with_state, map_response};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, get, post};
use sdserve_engine::metrics::{CONTENT_TYPE, Registry};
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{DefaultPredicate, Predicate, SizeAbove};
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};

use crate::error::ApiError;
use crate::handlers::{docs, health, infer, metadata, repository};
use crate::openai::handlers as openai;
use crate::rest_metrics::{RestMetrics, track};
use crate::state::{Cors, SharedState};

const MODEL: &str = "/v2/models/{model_name}";
const VERSION: &str = "/v2/models/{model_name}/versions/{model_version}";

/// The inference port's router. `rest_metrics` is `None` when metrics are disabled.
pub fn router(state: SharedState, rest_metrics: Option<Arc<RestMetrics>>) -> Router {
    let gzip = state.config.gzip_enabled;
    let cors = state.config.cors.clone();
    let mut r = Router::new()
        .route("/v2", get(metadata::server))
        .route("/v2/health/live", get(health::live))
        .route("/v2/health/ready", get(health::ready))
        .route(MODEL, get(metadata::model))
        .route(VERSION, get(metadata::model_version))
        .route(&format!("{MODEL}/ready"), get(health::model_ready))
        .route(
            &format!("{VERSION}/ready"),
            get(health::model_version_ready),
        )
        .route("/v2/docs", get(docs::docs))
        .route("/v2/docs/dataplane.json", get(docs::openapi))
        .route("/openapi.json", get(docs::openapi))
        .route(&format!("{MODEL}/docs"), get(docs::model_docs))
        .route(&format!("{VERSION}/docs"), get(docs::model_version_docs))
        .route(
            &format!("{MODEL}/docs/dataplane.json"),
            get(docs::model_openapi),
        )
        .route(
            &format!("{VERSION}/docs/dataplane.json"),
            get(docs::model_version_openapi),
        )
        .route("/v2/repository/index", post(repository::index))
        .route(
            "/v2/repository/models/{model_name}/load",
            post(repository::load),
        )
        .route(
            "/v2/repository/models/{model_name}/unload",
            post(repository::unload),
        );
    // OpenAI's Images API, answering unknown routes and methods in OpenAI's error shape.
    let openai_routes: [(&str, MethodRouter<SharedState>); 4] = [
        ("/v1/images/generations", post(openai::generations)),
        ("/v1/images/edits", post(openai::edits)),
        ("/v1/models", get(openai::models)),
        ("/v1/models/{model}", get(openai::model)),
    ];
    for (path, method) in openai_routes {
        r = r.route(path, method.fallback(openai::method_not_allowed));
    }
    for rest in ["/v1", "/v1/", "/v1/{*rest}"] {
        r = r.route(rest, any(openai::not_found));
    }
    for base in [MODEL, VERSION] {
        for action in ["infer", "generate"] {
            r = r.route(&format!("{base}/{action}"), post(infer::infer));
        }
        for action in ["infer_stream", "generate_stream"] {
            r = r.route(&format!("{base}/{action}"), post(infer::infer_stream));
        }
    }
    let mut r = r
        .fallback(|| async { ApiError::not_found_route() })
        .with_state(state)
        .layer(map_response(json_405));
    if gzip {
        // Starlette's GZipMiddleware threshold; event streams are never compressed.
        r = r.layer(
            CompressionLayer::new().compress_when(SizeAbove::new(500).and(DefaultPredicate::new())),
        );
    }
    if let Some(cors) = &cors {
        r = r.layer(cors_layer(cors));
    }
    if let Some(m) = rest_metrics {
        r = r.layer(from_fn_with_state(m, track));
    }
    r
}

/// Starlette's CORSMiddleware semantics: `*` allows any origin (echoed back when credentials
/// are allowed, since browsers refuse `*` with credentials).
fn cors_layer(c: &Cors) -> CorsLayer {
    let any_origin = c.allow_origins.iter().any(|o| o == "*");
    let listed: Vec<HeaderValue> = c
        .allow_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    let regex = c
        .allow_origin_regex
        .as_deref()
        .and_then(|r| regex::Regex::new(&format!("^(?:{r})$")).ok());
    let origin = if any_origin && !c.allow_credentials {
        AllowOrigin::any()
    } else {
        AllowOrigin::predicate(move |origin: &HeaderValue, _| {
            any_origin
                || listed.contains(origin)
                || regex
                    .as_ref()
                    .is_some_and(|re| origin.to_str().is_ok_and(|o| re.is_match(o)))
        })
    };
    let methods: Vec<Method> = c
        .allow_methods
        .iter()
        .filter_map(|m| m.parse().ok())
        .collect();
    let any_method = c.allow_methods.iter().any(|m| m == "*");
    let headers: Vec<HeaderName> = c
        .allow_headers
        .iter()
        .filter_map(|h| h.parse().ok())
        .collect();
    let any_header = c.allow_headers.iter().any(|h| h == "*");
    let expose: Vec<HeaderName> = c
        .expose_headers
        .iter()
        .filter_map(|h| h.parse().ok())
        .collect();
    let mut layer = CorsLayer::new()
        .allow_origin(origin)
        .allow_credentials(c.allow_credentials)
        .max_age(Duration::from_secs(c.max_age))
        .expose_headers(expose);
    layer = if any_method {
        layer.allow_methods(if c.allow_credentials {
            AllowMethods::mirror_request()
        } else {
            AllowMethods::any()
        })
    } else {
        layer.allow_methods(methods)
    };
    if any_header {
        layer.allow_headers(if c.allow_credentials {
            AllowHeaders::mirror_request()
        } else {
            AllowHeaders::any()
        })
    } else {
        layer.allow_headers(headers)
    }
}

/// axum answers a wrong method with an empty 405; give it a JSON body, keep `allow`. (The
/// OpenAI routes answer their own, with a body.)
async fn json_405(response: Response) -> Response {
    if response.status() != StatusCode::METHOD_NOT_ALLOWED
        || response
            .headers()
            .contains_key(axum::http::header::CONTENT_TYPE)
    {
        return response;
    }
    let (parts, _) = response.into_parts();
    let mut fresh = ApiError::method_not_allowed().into_response();
    if let Some(allow) = parts.headers.get(axum::http::header::ALLOW) {
        fresh
            .headers_mut()
            .insert(axum::http::header::ALLOW, allow.clone());
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
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                        registry.render(),
                    )
                }
            }),
        )
        .fallback(|| async { ApiError::not_found_route() })
}

//! The axum application: routes, middleware (request ids, tracing, metrics, auth, body limit,
//! timeout, compression, CORS), and serving with graceful shutdown.

pub mod api;
pub(crate) mod conn;
pub(crate) mod error;
mod idle;
pub(crate) mod redact;

use crate::config::Config;
use crate::infer::Infer;
use crate::metrics as m;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use error::ApiError;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

pub struct AppState {
    pub infer: Infer,
    pub config: Config,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub(crate) fn router(state: Arc<AppState>) -> Router {
    let c = &state.config;
    let protected = Router::new()
        .route("/rank", post(api::rank))
        .route("/encode", post(api::encode))
        .route("/candidates", post(api::upsert).delete(api::delete))
        .route("/candidates/{id}", get(api::get_candidate))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    // Probes get their own trace layer: a 503 from /health/ready while the pool loads is
    // expected, not an error worth an ERROR line every few seconds.
    let probes = Router::new()
        .route("/health/live", get(api::live))
        .route("/health/ready", get(api::ready))
        .layer(trace_layer().on_failure(DefaultOnFailure::new().level(Level::DEBUG)));
    let api = Router::new()
        .merge(protected)
        .route("/info", get(api::info))
        .route("/metrics", get(api::metrics))
        .route("/openapi.yaml", get(api::openapi))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(trace_layer());
    Router::new()
        .merge(probes)
        .merge(api)
        .layer(RequestBodyLimitLayer::new(c.body_limit_bytes))
        // The engine answers 503 at the deadline itself; this is the backstop for anything else.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_millis(c.request_timeout_ms + 1000),
        ))
        // Outside the limit and timeout layers, so their plain-text errors get our JSON shape.
        .layer(middleware::from_fn(json_errors))
        .layer(CompressionLayer::new())
        .layer(cors(&c.cors_origins))
        .layer(middleware::from_fn(record_metrics))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}

type SpanFn = fn(&Request) -> tracing::Span;

/// Request spans carry the method, URI and request id (set by the outer request-id layer).
fn trace_layer() -> TraceLayer<tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>, SpanFn> {
    TraceLayer::new_for_http().make_span_with(|req: &Request| {
        let id = req.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
        tracing::info_span!("request", method = %req.method(), uri = %req.uri(), request_id = %id)
    })
}

fn cors(origins: &[String]) -> CorsLayer {
    if origins.is_empty() {
        return CorsLayer::new();
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION, HeaderName::from_static("x-api-key")])
}

/// With an API key configured, the routes of `protected` in `router` (/rank, /encode,
/// /candidates, /candidates/{id}) need `Authorization: Bearer KEY` or `x-api-key: KEY`;
/// probes, /info, /metrics and /openapi.yaml stay open.
async fn require_api_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(key) = state.config.api_key.as_deref().filter(|k| !k.is_empty()) else {
        return next.run(req).await;
    };
    let h = req.headers();
    let bearer = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer_token);
    let plain = h.get("x-api-key").and_then(|v| v.to_str().ok());
    if [bearer, plain].into_iter().flatten().any(|given| constant_time_eq(given.as_bytes(), key.as_bytes())) {
        next.run(req).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

/// The token of a `Bearer` credential; the scheme is case-insensitive (RFC 7235 §2.1) and one
/// or more spaces separate it from the token.
fn bearer_token(v: &str) -> Option<&str> {
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim_start_matches(' ')).filter(|t| !t.is_empty())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Error responses produced by layers (body limit, timeout) are plain text; give them the
/// same JSON shape as ours.
async fn json_errors(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !status.is_client_error() && !status.is_server_error() || is_json {
        return res;
    }
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge.into_response(),
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::REQUEST_TIMEOUT => ApiError::Timeout.into_response(),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed.into_response(),
        StatusCode::NOT_FOUND => ApiError::NotFound.into_response(),
        other => ApiError::Internal(format!("unexpected status {other}")).into_response(),
    }
}

async fn record_metrics(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let start = Instant::now();
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    metrics::counter!(m::REQUESTS, "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!(m::REQUEST_SECONDS, "route" => route).record(start.elapsed().as_secs_f64());
    res
}

/// Resolves on SIGTERM or Ctrl-C; axum then stops accepting and drains in-flight requests.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown signal received, draining in-flight requests");
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for v in ["Bearer k1", "bearer k1", "BEARER k1", "bEaReR   k1"] {
            assert_eq!(bearer_token(v), Some("k1"), "{v}");
        }
        for v in ["Basic k1", "Bearerk1", "Bearer", "Bearer ", "k1"] {
            assert_eq!(bearer_token(v), None, "{v}");
        }
    }
}

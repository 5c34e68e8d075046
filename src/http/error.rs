//! One error type for every failure a client can see, rendered as
//! `{"error": "...", "error_type": "..."}` with its status.

use axum::extract::rejection::JsonRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed JSON: {0}")]
    BadJson(String),
    #[error("{0}")]
    Validation(String),
    #[error("request body is larger than the server's limit (body_limit_bytes, see /info)")]
    TooLarge,
    #[error("expected `Content-Type: application/json`")]
    UnsupportedMediaType,
    #[error("missing or wrong API key")]
    Unauthorized,
    #[error("no route for this path")]
    NotFound,
    #[error("no candidate with id {0:?} in the pool")]
    NoSuchCandidate(String),
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    #[error("server is busy: the request queue is full, retry shortly")]
    Overloaded,
    #[error("the server is at its connection limit (max_connections): only the health probes are answered on this connection; retry shortly")]
    ConnectionLimit,
    #[error("not ready: {0}")]
    NotReady(String),
    #[error("the request exceeded its time budget")]
    Timeout,
    #[error("{0}; the write was not applied, retry shortly")]
    StoreUnavailable(String),
    #[error("{0}")]
    Behind(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadJson(_) => StatusCode::BAD_REQUEST,
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound | ApiError::NoSuchCandidate(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotReady(_) | ApiError::Timeout | ApiError::ConnectionLimit | ApiError::StoreUnavailable(_) | ApiError::Behind(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::BadJson(_) => "invalid_json",
            ApiError::Validation(_) => "validation",
            ApiError::TooLarge => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound | ApiError::NoSuchCandidate(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Overloaded | ApiError::ConnectionLimit => "overloaded",
            ApiError::NotReady(_) => "not_ready",
            ApiError::Timeout => "timeout",
            ApiError::StoreUnavailable(_) => "store_unavailable",
            ApiError::Behind(_) => "behind",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Failures of the process (a store, a model directory) may name the host's paths.
        let message = match &self {
            ApiError::NotReady(_) | ApiError::Internal(_) => super::redact::paths(&self.to_string()),
            _ => self.to_string(),
        };
        let mut res = (self.status(), Json(json!({"error": message, "error_type": self.error_type()}))).into_response();
        if matches!(self, ApiError::Overloaded | ApiError::ConnectionLimit | ApiError::StoreUnavailable(_) | ApiError::Behind(_)) {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, ApiError::Unauthorized) {
            res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}

/// axum's JSON extractor failures, in our shape: syntax → 400, wrong types or missing fields
/// → 422, body over the limit → 413, missing content type → 415.
impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::JsonDataError(e) => ApiError::Validation(e.body_text()),
            JsonRejection::JsonSyntaxError(e) => ApiError::BadJson(e.body_text()),
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge,
            other => ApiError::BadJson(other.body_text()),
        }
    }
}

impl From<crate::infer::InferError> for ApiError {
    fn from(e: crate::infer::InferError) -> Self {
        use crate::infer::InferError as E;
        match e {
            E::Validation(m) => ApiError::Validation(m),
            E::NotReady(m) => ApiError::NotReady(m),
            E::Overloaded => ApiError::Overloaded,
            E::Timeout => ApiError::Timeout,
            E::Failed(m) => ApiError::Internal(m),
            E::StoreUnavailable(m) => ApiError::StoreUnavailable(m),
            E::Behind(m) => ApiError::Behind(m),
        }
    }
}

//! Request and response bodies (openapi.yaml's schemas) and the handlers: JSON in, a call on
//! the inference handle, JSON out. Validation beyond the JSON shape happens in `infer`.

use super::error::ApiError;
use super::AppState;
use crate::infer::{RankQuery, Ranking, Vectors};
use crate::pool::store::Candidate;
use crate::infer::TextKind;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Instant;

/// `Json` whose rejections come out as `ApiError`.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

#[derive(Deserialize)]
#[serde(untagged)]
pub enum ContextInput {
    Text(String),
    Turns(Vec<String>),
}

/// Optional fields may be left out but not sent as null, as openapi.yaml says.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankRequest {
    pub context: ContextInput,
    #[serde(default, deserialize_with = "present")]
    pub top_k: Option<i64>,
    #[serde(default, deserialize_with = "present")]
    pub candidates: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    pub ids: Option<Vec<String>>,
    #[serde(default)]
    pub return_text: bool,
    /// Rank the pool approximately (see `approx_preselect`).
    #[serde(default)]
    pub approximate: bool,
    /// Only pool candidates whose meta passes this (see `pool::filter`).
    #[serde(default, deserialize_with = "present")]
    pub filter: Option<serde_json::Value>,
    #[serde(default)]
    pub return_meta: bool,
    /// Per result, the context vectors (and their context tokens) its score came from.
    #[serde(default)]
    pub explain: bool,
    /// Rank once this replica has applied the store's changes up to this seq.
    #[serde(default, deserialize_with = "present")]
    pub min_seq: Option<u64>,
}

#[derive(Serialize)]
pub struct RankResult {
    pub id: String,
    pub score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explain: Option<Vec<crate::infer::CodeRead>>,
}

#[derive(Serialize)]
pub struct RankResponse {
    pub results: Vec<RankResult>,
    pub took_ms: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncodeRequest {
    pub texts: Vec<String>,
    pub kind: TextKind,
}

#[derive(Serialize)]
pub struct EncodeResponse {
    pub kind: TextKind,
    /// Vectors per text: m for contexts, absent for candidates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub m: Option<usize>,
    pub dim: usize,
    /// `[texts][m][dim]` for contexts, `[texts][dim]` for candidates.
    pub embeddings: serde_json::Value,
    pub took_ms: f64,
}

pub async fn rank(State(state): State<Arc<AppState>>, ApiJson(req): ApiJson<RankRequest>) -> Result<Json<RankResponse>, ApiError> {
    let started = Instant::now();
    let context = match req.context {
        ContextInput::Text(t) => vec![t],
        ContextInput::Turns(t) => t,
    };
    let query = RankQuery {
        context,
        top_k: req.top_k,
        candidates: req.candidates,
        ids: req.ids,
        approximate: req.approximate,
        filter: req.filter,
        return_text: req.return_text,
        return_meta: req.return_meta,
        explain: req.explain,
        min_seq: req.min_seq,
    };
    let Ranking(hits) = state.infer.rank(query).await?;
    let results = hits.into_iter().map(|h| RankResult { id: h.id, score: h.score, text: h.text, meta: h.meta, explain: h.explain }).collect();
    Ok(Json(RankResponse { results, took_ms: started.elapsed().as_secs_f64() * 1e3 }))
}

pub async fn encode(State(state): State<Arc<AppState>>, ApiJson(req): ApiJson<EncodeRequest>) -> Result<Json<EncodeResponse>, ApiError> {
    let started = Instant::now();
    let Vectors { shape, data } = state.infer.encode(req.texts, req.kind).await?;
    let dim = *shape.last().unwrap_or(&0);
    let rows: Vec<serde_json::Value> = data.chunks(dim.max(1)).map(|r| serde_json::json!(r)).collect();
    let (m, embeddings) = if req.kind == TextKind::Context {
        let m = shape[1];
        (Some(m), serde_json::Value::Array(rows.chunks(m).map(|c| serde_json::Value::Array(c.to_vec())).collect()))
    } else {
        (None, serde_json::Value::Array(rows))
    };
    Ok(Json(EncodeResponse { kind: req.kind, m, dim, embeddings, took_ms: started.elapsed().as_secs_f64() * 1e3 }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpsertRequest {
    pub candidates: Vec<CandidateBody>,
}

/// A candidate as the API takes and returns it (openapi.yaml's `Candidate`); the pool's
/// record (`pool::store::Candidate`) is converted from and to it here.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandidateBody {
    pub id: String,
    pub text: String,
    /// Left out or an object; not null (as openapi.yaml says).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "not_null")]
    pub meta: Option<serde_json::Value>,
}

fn not_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Err(serde::de::Error::custom("meta may be left out but not null")),
        v => Ok(Some(v)),
    }
}

impl From<CandidateBody> for Candidate {
    fn from(b: CandidateBody) -> Candidate {
        Candidate { id: b.id, text: b.text, meta: b.meta }
    }
}

impl From<Candidate> for CandidateBody {
    fn from(c: Candidate) -> CandidateBody {
        CandidateBody { id: c.id, text: c.text, meta: c.meta }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteRequest {
    pub ids: Vec<String>,
}

#[derive(Serialize)]
pub struct WriteResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upserted: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_found: Option<Vec<String>>,
    pub pool_size: usize,
    /// The store's sequence number of this write: `min_seq` reads it back on any replica.
    pub seq: u64,
    pub took_ms: f64,
}

pub async fn upsert(State(state): State<Arc<AppState>>, ApiJson(req): ApiJson<UpsertRequest>) -> Result<Json<WriteResponse>, ApiError> {
    let started = Instant::now();
    let n = req.candidates.len();
    let w = state.infer.upsert(req.candidates.into_iter().map(Candidate::from).collect()).await?;
    let took_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(Json(WriteResponse { upserted: Some(n), deleted: None, not_found: None, pool_size: w.pool_size, seq: w.seq, took_ms }))
}

pub async fn delete(State(state): State<Arc<AppState>>, ApiJson(req): ApiJson<DeleteRequest>) -> Result<Json<WriteResponse>, ApiError> {
    let started = Instant::now();
    let n = req.ids.len();
    let w = state.infer.delete(req.ids).await?;
    let took_ms = started.elapsed().as_secs_f64() * 1e3;
    let deleted = Some(n - w.missing.len());
    Ok(Json(WriteResponse { upserted: None, deleted, not_found: Some(w.missing), pool_size: w.pool_size, seq: w.seq, took_ms }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetQuery {
    pub min_seq: Option<u64>,
}

pub async fn get_candidate(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: Result<Query<GetQuery>, QueryRejection>,
) -> Result<Json<CandidateBody>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::Validation(e.body_text()))?;
    state.infer.get(id.clone(), q.min_seq).await?.map(|c| Json(c.into())).ok_or_else(|| ApiError::NoSuchCandidate(id))
}

pub async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "alive"}))
}

pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let s = state.infer.status();
    let (encoded, total) = s.progress();
    let (code, status) = if s.is_ready() {
        (StatusCode::OK, "ready")
    } else if s.failure().is_some() {
        (StatusCode::SERVICE_UNAVAILABLE, "failed")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading")
    };
    let mut body = serde_json::json!({"status": status, "encoded": encoded, "total": total});
    if let Some(f) = s.failure() {
        body["error"] = super::redact::paths(&f).into();
    } else if let Some(p) = s.phase().filter(|_| !s.is_ready()) {
        body["phase"] = p.into();
    }
    (code, Json(body)).into_response()
}

pub async fn info(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let s = state.infer.status();
    let mut v = serde_json::to_value(s.info()).unwrap_or_default();
    if let Some(dir) = v["model_dir"].as_str() {
        v["model_dir"] = super::redact::paths(dir).into();
    }
    v["meta_index"] = serde_json::to_value(s.index()).unwrap_or_default();
    v["version"] = env!("CARGO_PKG_VERSION").into();
    v["pool_size"] = if s.is_ready() { s.pool_size() } else { s.progress().1 }.into();
    v["ready"] = s.is_ready().into();
    v["cache_reused"] = s.cache_reused().into();
    v["fp16_candidates"] = state.config.fp16_candidates.into();
    v["pool_digest"] = s.pool_digest().into();
    if let Some(sc) = s.scoring() {
        v["scoring"] = sc.clone();
    }
    if let Some(h) = s.store_health() {
        v["store"] = serde_json::json!({
            "kind": h.kind,
            "connected": h.connected,
            "lag_seconds": h.lag_seconds,
            "applied_seq": s.applied_seq(),
        });
    }
    v["limits"] = serde_json::json!({
        "max_top_k": state.config.max_top_k,
        "max_inline_candidates": state.config.max_inline_candidates,
        "max_encode_texts": state.config.max_encode_texts,
        "max_text_chars": state.config.max_text_chars,
        "approx_preselect": state.config.approx_preselect,
        "max_request_tokens": state.config.max_request_tokens,
        "body_limit_bytes": state.config.body_limit_bytes,
        "max_meta_keys": state.config.max_meta_keys,
        "max_meta_depth": state.config.max_meta_depth,
        "max_meta_bytes": state.config.max_meta_bytes,
        "max_meta_string_chars": state.config.max_meta_string_chars,
        "max_response_bytes": state.config.max_response_bytes,
    });
    Json(v)
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

pub async fn openapi() -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/yaml")], include_str!("../../openapi.yaml"))
}

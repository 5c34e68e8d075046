//! Request and response bodies, their validation, and the thin handlers that turn them into
//! engine work.

use super::error::ApiError;
use super::AppState;
use crate::infer::{EngineError, Output, SubmitError, Target, Work};
use crate::metrics as m;
use crate::text::TextKind;
use axum::extract::{FromRequest, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
}

#[derive(Serialize)]
pub struct RankResult {
    pub id: String,
    pub score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
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

fn check_text(what: &str, t: &str, max_chars: usize) -> Result<(), ApiError> {
    if t.trim().is_empty() {
        return Err(ApiError::Validation(format!("{what} is empty")));
    }
    let n = t.chars().count();
    if n > max_chars {
        return Err(ApiError::Validation(format!("{what} has {n} characters; the limit is {max_chars}")));
    }
    Ok(())
}

/// A list of 1..=max_items texts, each valid.
pub fn check_texts(what: &str, texts: &[String], max_items: usize, max_chars: usize) -> Result<(), ApiError> {
    if texts.is_empty() || texts.len() > max_items {
        return Err(ApiError::Validation(format!("{what} must hold between 1 and {max_items} texts, got {}", texts.len())));
    }
    for (i, t) in texts.iter().enumerate() {
        check_text(&format!("{what}[{i}]"), t, max_chars)?;
    }
    Ok(())
}

/// Cheap bounds, before tokenizing, on the tokens a text costs once truncated to `max`: every
/// whitespace-separated word with an ASCII letter or digit yields at least one token (no
/// normaliser removes those; other scripts' letters or marks might be stripped), and no token
/// is shorter than one character; 2 for [CLS] and [SEP].
fn token_bounds(text: &str, max: usize) -> (usize, usize) {
    let words = text.split_whitespace().filter(|w| w.bytes().any(|b| b.is_ascii_alphanumeric())).count();
    ((words + 2).min(max), (text.chars().count() + 2).min(max))
}

/// The per-request budget (`max_request_tokens`): a request whose texts cost more is refused
/// at admission, before it reaches the model. `at_least` when `cost` is a lower bound.
fn within_budget(state: &AppState, cost: usize, at_least: bool) -> Result<(), ApiError> {
    let budget = state.config.max_request_tokens;
    if cost <= budget {
        return Ok(());
    }
    Err(ApiError::Validation(format!(
        "this request costs {}{cost} tokens (context and candidates after truncation); the per-request budget is {budget} (max_request_tokens): send fewer or shorter texts",
        if at_least { "at least " } else { "" }
    )))
}

fn lengths(state: &AppState) -> (usize, usize) {
    let info = state.engine.status.info.get().expect("model info set before the server starts");
    (info.max_context_tokens, info.max_candidate_tokens)
}

fn cost(enc: &[tokenizers::Encoding]) -> usize {
    enc.iter().map(|e| e.get_ids().len()).sum()
}

fn ensure_ready(state: &AppState) -> Result<(), ApiError> {
    let s = &state.engine.status;
    if s.is_ready() {
        return Ok(());
    }
    Err(ApiError::NotReady(match s.failure() {
        Some(f) => format!("pool encoding failed: {f}"),
        None => format!(
            "encoding the candidate pool, {} of {} done",
            s.encoded.load(Ordering::Acquire),
            s.total.load(Ordering::Acquire)
        ),
    }))
}

/// Tokenizing a long text takes real CPU time: keep it off the async workers.
async fn tokenize(state: &AppState, texts: Vec<String>, kind: TextKind) -> Result<Vec<tokenizers::Encoding>, ApiError> {
    let t0 = Instant::now();
    let text = state.text.clone();
    let enc = tokio::task::spawn_blocking(move || text.tokenize(&texts, kind))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Validation(format!("cannot tokenize: {e}")))?;
    metrics::histogram!(m::STAGE_SECONDS, "stage" => "tokenize").record(t0.elapsed().as_secs_f64());
    Ok(enc)
}

async fn run(state: &AppState, work: Work, started: Instant) -> Result<Output, ApiError> {
    let budget = Duration::from_millis(state.config.request_timeout_ms);
    let deadline = started + budget;
    let rx = state.engine.submit(work, deadline).map_err(|e| match e {
        SubmitError::Overloaded => {
            metrics::counter!(m::REJECTED).increment(1);
            ApiError::Overloaded
        }
        SubmitError::Stopped => ApiError::NotReady("the inference thread has stopped".into()),
    })?;
    match tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), rx).await {
        Err(_) => Err(ApiError::Timeout),
        Ok(Err(_)) => Err(ApiError::Internal("the inference thread dropped the request".into())),
        Ok(Ok(Err(EngineError::Timeout))) => Err(ApiError::Timeout),
        Ok(Ok(Err(EngineError::Overloaded))) => {
            metrics::counter!(m::REJECTED).increment(1);
            Err(ApiError::Overloaded)
        }
        Ok(Ok(Err(EngineError::Failed(e)))) => Err(ApiError::Internal(e)),
        Ok(Ok(Ok(out))) => Ok(out),
    }
}

pub async fn rank(State(state): State<Arc<AppState>>, ApiJson(req): ApiJson<RankRequest>) -> Result<Json<RankResponse>, ApiError> {
    let started = Instant::now();
    ensure_ready(&state)?;
    let c = &state.config;
    let pool = state.engine.status.pool.get().expect("pool set before ready").clone();
    let turns = match req.context {
        ContextInput::Text(t) => vec![t],
        ContextInput::Turns(t) => t,
    };
    if turns.is_empty() {
        return Err(ApiError::Validation("context has no turns".into()));
    }
    for (i, t) in turns.iter().enumerate() {
        check_text(&format!("context turn {i}"), t, c.max_text_chars)?;
    }
    let top_k = req.top_k.unwrap_or(c.default_top_k);
    if !(1..=c.max_top_k).contains(&top_k) {
        return Err(ApiError::Validation(format!("top_k must be between 1 and {}, got {top_k}", c.max_top_k)));
    }
    if req.candidates.is_some() && req.ids.is_some() {
        return Err(ApiError::Validation("give either candidates or ids, not both".into()));
    }
    if req.approximate && (req.candidates.is_some() || req.ids.is_some()) {
        return Err(ApiError::Validation("approximate ranks the pool; it cannot be combined with candidates or ids".into()));
    }
    let joined = state.text.join_turns(&turns);
    let (max_ctx, max_cand) = lengths(&state);
    let target = match (&req.candidates, &req.ids) {
        (Some(cands), _) => {
            check_texts("candidates", cands, c.max_inline_candidates, c.max_text_chars)?;
            let least = token_bounds(&joined, max_ctx).0 + cands.iter().map(|t| token_bounds(t, max_cand).0).sum::<usize>();
            within_budget(&state, least, true)?;
            Target::Inline(tokenize(&state, cands.clone(), TextKind::Candidate).await?)
        }
        (None, Some(ids)) => Target::Subset(pool_rows(&pool, ids, c.max_inline_candidates)?),
        (None, None) if req.approximate => Target::Approximate(c.approx_preselect as i64),
        (None, None) => Target::Pool,
    };
    let context = tokenize(&state, vec![joined], TextKind::Context).await?.remove(0);
    if let Target::Inline(cands) = &target {
        within_budget(&state, context.get_ids().len() + cost(cands), false)?;
    }
    let ranked = match run(&state, Work::Rank { context, target, top_k }, started).await? {
        Output::Ranked(r) => r,
        Output::Vectors { .. } => return Err(ApiError::Internal("unexpected engine output".into())),
    };
    let results = ranked
        .into_iter()
        .map(|(row, score)| {
            let row = row as usize;
            let (id, text) = match &req.candidates {
                Some(c) => (row.to_string(), c[row].clone()),
                None => (pool.ids[row].clone(), pool.texts[row].clone()),
            };
            RankResult { id, score, text: req.return_text.then_some(text) }
        })
        .collect();
    Ok(Json(RankResponse { results, took_ms: started.elapsed().as_secs_f64() * 1e3 }))
}

/// Pool rows of the requested ids; every unknown id is reported.
fn pool_rows(pool: &crate::pool::Pool, ids: &[String], max: usize) -> Result<Vec<i64>, ApiError> {
    if ids.is_empty() || ids.len() > max {
        return Err(ApiError::Validation(format!("ids must hold between 1 and {max} ids, got {}", ids.len())));
    }
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    if let Some(dup) = ids.iter().find(|id| !seen.insert(id.as_str())) {
        return Err(ApiError::Validation(format!("id {dup:?} is given more than once")));
    }
    let mut rows = Vec::with_capacity(ids.len());
    let mut unknown = Vec::new();
    for id in ids {
        match pool.position(id) {
            Some(r) => rows.push(r as i64),
            None => unknown.push(id.as_str()),
        }
    }
    if !unknown.is_empty() {
        let shown: Vec<&str> = unknown.iter().take(10).copied().collect();
        return Err(ApiError::Validation(format!("{} ids are not in the pool: {shown:?}", unknown.len())));
    }
    Ok(rows)
}

pub async fn encode(State(state): State<Arc<AppState>>, ApiJson(req): ApiJson<EncodeRequest>) -> Result<Json<EncodeResponse>, ApiError> {
    let started = Instant::now();
    ensure_ready(&state)?;
    let c = &state.config;
    check_texts("texts", &req.texts, c.max_encode_texts, c.max_text_chars)?;
    let (max_ctx, max_cand) = lengths(&state);
    let max = if req.kind == TextKind::Context { max_ctx } else { max_cand };
    within_budget(&state, req.texts.iter().map(|t| token_bounds(t, max).0).sum(), true)?;
    let enc = tokenize(&state, req.texts, req.kind).await?;
    within_budget(&state, cost(&enc), false)?;
    let (shape, data) = match run(&state, Work::Encode { texts: enc, kind: req.kind }, started).await? {
        Output::Vectors { shape, data } => (shape, data),
        Output::Ranked(_) => return Err(ApiError::Internal("unexpected engine output".into())),
    };
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

pub async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "alive"}))
}

pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let s = &state.engine.status;
    let (encoded, total) = (s.encoded.load(Ordering::Acquire), s.total.load(Ordering::Acquire));
    let (code, status) = if s.is_ready() {
        (StatusCode::OK, "ready")
    } else if s.failure().is_some() {
        (StatusCode::SERVICE_UNAVAILABLE, "failed")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading")
    };
    let mut body = serde_json::json!({"status": status, "encoded": encoded, "total": total});
    if let Some(f) = s.failure() {
        body["error"] = f.into();
    }
    (code, Json(body)).into_response()
}

pub async fn info(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let s = &state.engine.status;
    let mut v = serde_json::to_value(s.info.get()).unwrap_or_default();
    v["version"] = env!("CARGO_PKG_VERSION").into();
    v["pool_size"] = s.total.load(Ordering::Acquire).into();
    v["ready"] = s.is_ready().into();
    v["cache_reused"] = s.cache_reused.load(Ordering::Acquire).into();
    v["fp16_candidates"] = state.config.fp16_candidates.into();
    v["limits"] = serde_json::json!({
        "max_top_k": state.config.max_top_k,
        "max_inline_candidates": state.config.max_inline_candidates,
        "max_encode_texts": state.config.max_encode_texts,
        "max_text_chars": state.config.max_text_chars,
        "approx_preselect": state.config.approx_preselect,
        "max_request_tokens": state.config.max_request_tokens,
        "body_limit_bytes": state.config.body_limit_bytes,
    });
    Json(v)
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

pub async fn openapi() -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/yaml")], include_str!("../../openapi.yaml"))
}

//! Inference: the typed handle the HTTP layer calls (`Infer::rank`, `Infer::encode`,
//! `Infer::status`) and the one thread that owns the model and the pool's vectors.
//!
//! `Infer` validates and prices a request (`admission.rs`), tokenizes it off the async
//! workers, queues it (`queue.rs`) and waits for the inference thread (`worker.rs`), which
//! batches queued jobs (`batch.rs`), encodes large ones a chunk at a time (`chunked.rs`) and
//! answers each on its own channel. `Ranker` is the same model and tokenizer without threads,
//! for eval, training and the CLI.

pub mod admission;
mod writes;
mod batch;
mod chunked;
mod precision;
mod queue;
pub mod ranker;
mod startup;
pub mod status;
mod worker;

use crate::config::Config;
use crate::metrics as m;
pub use crate::text::TextKind;
use crate::text::Tokenizer;
use admission::{check_ids, check_texts, check_turns, cost, least_tokens, within_budget};
use crate::pool::filter::Filter;
use anyhow::Result;
use queue::{JobError, Output, Queue, SubmitError, Target, Want, Work};
use status::Status;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenizers::Encoding;
pub use worker::Inference;

/// How long a `min_seq` beyond every seq a shared-store replica has heard of may wait for
/// the notification of its commit: notifications arrive within milliseconds, and a missed
/// one is caught by the follower's 250 ms poll.
const NOT_HEARD_GRACE: Duration = Duration::from_secs(2);

/// Why a request got no answer; the HTTP layer maps each to a status code.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("{0}")]
    Validation(String),
    #[error("{0}")]
    NotReady(String),
    #[error("the inference queue is full")]
    Overloaded,
    #[error("the request's time budget ran out while it waited for the model")]
    Timeout,
    #[error("inference failed: {0}")]
    Failed(String),
    /// Writes cannot be made durable now (the shared store's database is unreachable).
    #[error("{0}")]
    StoreUnavailable(String),
    /// `min_seq` was not reached within the request's time budget.
    #[error("{0}")]
    Behind(String),
}

/// A ranking request: the context's turns (oldest first) and what to rank against it.
pub struct RankQuery {
    pub context: Vec<String>,
    pub top_k: Option<i64>,
    /// Texts to rank instead of the pool (ids are their positions).
    pub candidates: Option<Vec<String>>,
    /// Pool ids to rank instead of the whole pool.
    pub ids: Option<Vec<String>>,
    /// Rank the pool approximately (`approx_preselect`).
    pub approximate: bool,
    /// Rank only pool candidates whose meta passes this (`pool::filter`).
    pub filter: Option<serde_json::Value>,
    pub return_text: bool,
    pub return_meta: bool,
    /// Rank only once this replica has applied the store's changes up to this `seq` (a
    /// write's answer says its `seq`): read your writes on any replica.
    pub min_seq: Option<u64>,
}

pub struct Hit {
    pub id: String,
    pub score: f32,
    /// With `return_text`.
    pub text: Option<String>,
    /// With `return_meta`, for pool candidates that have meta.
    pub meta: Option<serde_json::Value>,
}

/// Best first.
pub struct Ranking(pub Vec<Hit>);

/// Row-major vectors: `[texts, m, d]` for contexts, `[texts, d]` for candidates.
pub struct Vectors {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The handle: cheap to clone, one per HTTP worker if need be.
#[derive(Clone)]
pub struct Infer {
    queue: Queue,
    status: Arc<Status>,
    tokenizer: Arc<Tokenizer>,
    config: Arc<Config>,
}

/// Starts the inference thread (the model is loaded when this returns; the pool is encoded
/// or read from the cache after) and returns the handle and the thread's owner.
pub fn start(config: &Config, store: Box<dyn crate::pool::store::Durable>) -> Result<(Infer, Inference)> {
    let settings = crate::model::format::PolySettings::load(config.model_dir())?;
    config.validate_for(&settings)?;
    let tokenizer = Arc::new(Tokenizer::load(config.model_dir(), &settings)?);
    let status = Arc::new(Status::default());
    let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_capacity);
    let inference = worker::spawn(config, rx, status.clone(), store)?;
    let handle = Infer { queue: Queue(tx), status, tokenizer, config: Arc::new(config.clone()) };
    Ok((handle, inference))
}

impl Infer {
    pub fn status(&self) -> &Status {
        &self.status
    }

    pub async fn rank(&self, q: RankQuery) -> Result<Ranking, InferError> {
        let started = Instant::now();
        self.ensure_ready()?;
        let c = &self.config;
        check_turns(&q.context, c.max_text_chars)?;
        if let Some(min_seq) = q.min_seq {
            self.wait_applied(min_seq, started).await?;
        }
        let top_k = q.top_k.unwrap_or(c.default_top_k);
        if !(1..=c.max_top_k).contains(&top_k) {
            return Err(InferError::Validation(format!("top_k must be between 1 and {}, got {top_k}", c.max_top_k)));
        }
        if q.candidates.is_some() && q.ids.is_some() {
            return Err(InferError::Validation("give either candidates or ids, not both".into()));
        }
        if q.approximate && (q.candidates.is_some() || q.ids.is_some()) {
            return Err(InferError::Validation("approximate ranks the pool; it cannot be combined with candidates or ids".into()));
        }
        let filter = match &q.filter {
            Some(_) if q.candidates.is_some() => {
                return Err(InferError::Validation("filter selects pool candidates by meta; it cannot be combined with inline candidates".into()))
            }
            Some(_) if q.approximate => return Err(InferError::Validation("filter cannot be combined with approximate".into())),
            Some(f) => Some(Filter::parse(f).map_err(InferError::Validation)?),
            None => None,
        };
        let joined = self.tokenizer.join_turns(&q.context);
        let (max_ctx, max_cand) = self.lengths();
        let target = match (&q.candidates, &q.ids) {
            (Some(cands), _) => {
                check_texts("candidates", cands, c.max_inline_candidates, c.max_text_chars)?;
                let least = least_tokens(&joined, max_ctx) + cands.iter().map(|t| least_tokens(t, max_cand)).sum::<usize>();
                within_budget(c.max_request_tokens, least, true)?;
                Target::Inline(self.tokenize(cands.clone(), TextKind::Candidate).await?)
            }
            (None, Some(ids)) => {
                check_ids("ids", ids, c.max_inline_candidates)?;
                Target::Ids(ids.clone(), filter)
            }
            (None, None) if q.approximate => Target::Approximate(c.approx_preselect as i64),
            (None, None) => Target::Pool(filter),
        };
        let context = self.tokenize(vec![joined], TextKind::Context).await?.remove(0);
        if let Target::Inline(cands) = &target {
            within_budget(c.max_request_tokens, context.get_ids().len() + cost(cands), false)?;
        }
        let want = Want { text: q.return_text, meta: q.return_meta, budget: c.max_response_bytes };
        let hits = match self.run(Work::Rank { context, target, top_k, want }, started).await? {
            Output::Hits(hits) => hits.into_iter().map(|h| Hit { id: h.id, score: h.score, text: h.text, meta: h.meta }).collect(),
            // Inline candidates: ids are positions in the request.
            Output::Ranked(ranked) => {
                let texts = q.candidates.unwrap_or_default();
                ranked
                    .into_iter()
                    .map(|(row, score)| Hit {
                        id: row.to_string(),
                        score,
                        text: q.return_text.then(|| texts[row as usize].clone()),
                        meta: None,
                    })
                    .collect()
            }
            _ => return Err(InferError::Failed("a rank job was answered with something else".into())),
        };
        Ok(Ranking(hits))
    }

    pub async fn encode(&self, texts: Vec<String>, kind: TextKind) -> Result<Vectors, InferError> {
        let started = Instant::now();
        self.ensure_ready()?;
        let c = &self.config;
        check_texts("texts", &texts, c.max_encode_texts, c.max_text_chars)?;
        let (max_ctx, max_cand) = self.lengths();
        let max = if kind == TextKind::Context { max_ctx } else { max_cand };
        within_budget(c.max_request_tokens, texts.iter().map(|t| least_tokens(t, max)).sum(), true)?;
        let enc = self.tokenize(texts, kind).await?;
        within_budget(c.max_request_tokens, cost(&enc), false)?;
        match self.run(Work::Encode { texts: enc, kind }, started).await? {
            Output::Vectors { shape, data } => Ok(Vectors { shape, data }),
            _ => Err(InferError::Failed("an encode job was answered with something else".into())),
        }
    }

    pub(super) fn ensure_ready(&self) -> Result<(), InferError> {
        let s = &self.status;
        if s.is_ready() {
            return Ok(());
        }
        Err(InferError::NotReady(match s.failure() {
            Some(f) => format!("pool encoding failed: {f}"),
            None => {
                let (encoded, total) = s.progress();
                format!("encoding the candidate pool, {encoded} of {total} done")
            }
        }))
    }

    /// Waits until this replica has applied the store's changes up to `min_seq`, within the
    /// request's time budget. A `min_seq` that names no committed write (beyond the highest
    /// seq this replica has heard of, still after `NOT_HEARD_GRACE`) is answered at once: no
    /// write of this seq exists, so waiting could only end in the same 503.
    pub(super) async fn wait_applied(&self, min_seq: u64, started: Instant) -> Result<(), InferError> {
        let deadline = started + Duration::from_millis(self.config.request_timeout_ms);
        let mut rx = self.status.applied();
        let heard = || self.status.store_health().map_or(0, |h| h.head_seq);
        // The local store hears of a write when it is applied; a shared one within a
        // notification (or a 250 ms poll) of its commit.
        let grace = match self.status.store_health() {
            Some(h) if h.kind == "local" => Duration::ZERO,
            _ => NOT_HEARD_GRACE,
        };
        let first = deadline.min(Instant::now() + grace);
        let mut reached = tokio::time::timeout_at(first.into(), rx.wait_for(|&s| s >= min_seq)).await.is_ok_and(|r| r.is_ok());
        if !reached && heard() >= min_seq {
            reached = tokio::time::timeout_at(deadline.into(), rx.wait_for(|&s| s >= min_seq)).await.is_ok_and(|r| r.is_ok());
        }
        if reached {
            return Ok(());
        }
        let at = *rx.borrow();
        let latest = heard();
        let msg = format!("no write with seq {min_seq} is known to this replica (the latest it knows of is {latest}, applied up to {at}); min_seq should come from a write's answer");
        // The local store knows every write there is: a seq beyond them is the request's
        // fault (422). A shared store's replica may not have heard of it yet (cut off, or a
        // notification late): 503, retry.
        if latest < min_seq && grace.is_zero() {
            return Err(InferError::Validation(msg));
        }
        Err(InferError::Behind(if latest < min_seq {
            msg
        } else {
            format!(
                "this replica has applied the store's changes up to seq {at}, not yet min_seq {min_seq}, within the request's time budget ({} ms); retry shortly",
                self.config.request_timeout_ms
            )
        }))
    }

    pub(super) fn lengths(&self) -> (usize, usize) {
        let info = self.status.info().expect("model info set before start returns");
        (info.max_context_tokens, info.max_candidate_tokens)
    }

    /// Tokenizing a long text takes real CPU time: keep it off the async workers.
    pub(super) async fn tokenize(&self, texts: Vec<String>, kind: TextKind) -> Result<Vec<Encoding>, InferError> {
        let t0 = Instant::now();
        let tokenizer = self.tokenizer.clone();
        let enc = tokio::task::spawn_blocking(move || tokenizer.tokenize(&texts, kind))
            .await
            .map_err(|e| InferError::Failed(e.to_string()))?
            .map_err(|e| InferError::Validation(format!("cannot tokenize: {e}")))?;
        metrics::histogram!(m::STAGE_SECONDS, "stage" => "tokenize").record(t0.elapsed().as_secs_f64());
        Ok(enc)
    }

    /// Queues the work and waits for its answer until the request's deadline.
    pub(super) async fn run(&self, work: Work, started: Instant) -> Result<Output, InferError> {
        let deadline = started + Duration::from_millis(self.config.request_timeout_ms);
        let rx = self.queue.submit(work, deadline).map_err(|e| match e {
            SubmitError::Full => {
                metrics::counter!(m::REJECTED).increment(1);
                InferError::Overloaded
            }
            SubmitError::Stopped => InferError::NotReady("the inference thread has stopped".into()),
        })?;
        match tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), rx).await {
            Err(_) => Err(InferError::Timeout),
            Ok(Err(_)) => Err(InferError::Failed("the inference thread dropped the request".into())),
            Ok(Ok(Err(JobError::Timeout))) => Err(InferError::Timeout),
            Ok(Ok(Err(JobError::Overloaded))) => {
                metrics::counter!(m::REJECTED).increment(1);
                Err(InferError::Overloaded)
            }
            Ok(Ok(Err(JobError::Invalid(e)))) => Err(InferError::Validation(e)),
            Ok(Ok(Err(JobError::StoreUnavailable(e)))) => Err(InferError::StoreUnavailable(e)),
            Ok(Ok(Err(JobError::Failed(e)))) => Err(InferError::Failed(e)),
            Ok(Ok(Ok(out))) => Ok(out),
        }
    }
}

//! The handle: `start` runs the inference thread and returns this; its methods check
//! readiness and admission (`admission.rs`), tokenize off the async workers, queue a typed
//! job and wait for that job's own answer type.

use super::admission::{against, check_candidates, check_ids, check_texts, check_turns, cost, least_tokens, within_budget, Against};
use super::messages::{Hit, InferError, JobError, RankQuery, Ranking, Vectors, Written, NOT_HEARD_GRACE};
use super::queue::{Job, Queue, ReadJob, SubmitError, Ticket, UpsertWork, WriteJob};
use super::read::{EncodeWork, Inline, RankWork, Target, Want};
use super::status::Status;
use super::worker::{self, Inference};
use crate::config::Config;
use crate::metrics as m;
use crate::pool::store::Candidate;
use crate::text::{TextKind, Tokenizer};

/// `explain` answers at most this many results (each carries 3 codes × 5 tokens).
pub const MAX_EXPLAINED: i64 = 100;
use anyhow::Result;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenizers::Encoding;

/// The handle: cheap to clone, one per HTTP worker if need be.
#[derive(Clone)]
pub struct Infer {
    queue: Queue,
    status: Arc<Status>,
    tokenizer: Arc<Tokenizer>,
    config: Arc<Config>,
}

/// Starts the inference thread (the model is loaded when this returns; the pool is opened
/// after) and returns the handle and the thread's owner. The store is the one the server
/// chose (`serve.rs`). Settings and tokenizer are read once, here, for both.
pub fn start(config: &Config, store: Box<dyn crate::pool::store::Durable>) -> Result<(Infer, Inference)> {
    let settings = crate::model::format::PolySettings::load(config.model_dir())?;
    config.validate_for(&settings)?;
    let tokenizer = Arc::new(Tokenizer::load(config.model_dir(), &settings)?);
    let status = Arc::new(Status::default());
    let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_capacity);
    let inference = worker::spawn(config, settings, tokenizer.clone(), rx, status.clone(), store)?;
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
        let against = against(q.candidates, q.ids, q.approximate, q.filter.as_ref())?;
        let joined = self.tokenizer.join_turns(&q.context);
        let (max_ctx, max_cand) = self.lengths();
        let target = match against {
            Against::Inline(texts) => {
                check_texts("candidates", &texts, c.max_inline_candidates, c.max_text_chars)?;
                let least = least_tokens(&joined, max_ctx) + texts.iter().map(|t| least_tokens(t, max_cand)).sum::<usize>();
                within_budget(c.max_request_tokens, least, true)?;
                let encodings = self.tokenize(texts.clone(), TextKind::Candidate).await?;
                Target::Inline(Inline { texts, encodings })
            }
            Against::Ids(ids, filter) => {
                check_ids("ids", &ids, c.max_inline_candidates)?;
                Target::Ids(ids, filter)
            }
            Against::Approximate => Target::Approximate(c.approx_preselect as i64),
            Against::Pool(filter) => Target::Pool(filter),
        };
        let context = self.tokenize(vec![joined], TextKind::Context).await?.remove(0);
        if let Some(inline) = target.inline() {
            within_budget(c.max_request_tokens, context.get_ids().len() + cost(&inline.encodings), false)?;
        }
        if q.explain && top_k > MAX_EXPLAINED {
            return Err(InferError::Validation(format!("explain answers at most top_k {MAX_EXPLAINED} results, got top_k {top_k}")));
        }
        let want = Want { text: q.return_text, meta: q.return_meta, explain: q.explain, budget: c.max_response_bytes };
        let work = RankWork { context, target, top_k, want };
        let hits: Vec<Hit> = self.run(|t| Job::Read(ReadJob::Rank(t)), work, started).await?;
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
        self.run(|t| Job::Read(ReadJob::Encode(t)), EncodeWork { texts: enc, kind }, started).await
    }

    /// Inserts or replaces candidates; returns once they are durable and rankable here.
    pub async fn upsert(&self, candidates: Vec<Candidate>) -> Result<Written, InferError> {
        let started = Instant::now();
        self.ensure_ready()?;
        let c = &self.config;
        check_candidates(&candidates, c.max_encode_texts, c.max_text_chars, &c.meta_limits())?;
        let (_, max_cand) = self.lengths();
        within_budget(c.max_request_tokens, candidates.iter().map(|x| least_tokens(&x.text, max_cand)).sum(), true)?;
        let texts = self.tokenize(candidates.iter().map(|x| x.text.clone()).collect(), TextKind::Candidate).await?;
        within_budget(c.max_request_tokens, cost(&texts), false)?;
        self.run(|t| Job::Write(WriteJob::Upsert(t)), UpsertWork { candidates, texts }, started).await
    }

    /// Removes candidates; ids not in the pool are reported, not an error.
    pub async fn delete(&self, ids: Vec<String>) -> Result<Written, InferError> {
        let started = Instant::now();
        self.ensure_ready()?;
        check_ids("ids", &ids, self.config.max_inline_candidates)?;
        self.run(|t| Job::Write(WriteJob::Delete(t)), ids, started).await
    }

    pub async fn get(&self, id: String, min_seq: Option<u64>) -> Result<Option<Candidate>, InferError> {
        let started = Instant::now();
        self.ensure_ready()?;
        if let Some(min_seq) = min_seq {
            self.wait_applied(min_seq, started).await?;
        }
        self.run(|t| Job::Read(ReadJob::Get(t)), id, started).await
    }

    fn ensure_ready(&self) -> Result<(), InferError> {
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
    async fn wait_applied(&self, min_seq: u64, started: Instant) -> Result<(), InferError> {
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

    fn lengths(&self) -> (usize, usize) {
        let info = self.status.info().expect("model info set before start returns");
        (info.max_context_tokens, info.max_candidate_tokens)
    }

    /// Tokenizing a long text takes real CPU time: keep it off the async workers.
    async fn tokenize(&self, texts: Vec<String>, kind: TextKind) -> Result<Vec<Encoding>, InferError> {
        let t0 = Instant::now();
        let tokenizer = self.tokenizer.clone();
        let enc = tokio::task::spawn_blocking(move || tokenizer.tokenize(&texts, kind))
            .await
            .map_err(|e| InferError::Failed(e.to_string()))?
            .map_err(|e| InferError::Validation(format!("cannot tokenize: {e}")))?;
        metrics::histogram!(m::STAGE_SECONDS, "stage" => "tokenize").record(t0.elapsed().as_secs_f64());
        Ok(enc)
    }

    /// Queues the work as the job `wrap` makes of it and waits for its answer until the
    /// request's deadline.
    async fn run<W, T>(&self, wrap: fn(Ticket<W, T>) -> Job, work: W, started: Instant) -> Result<T, InferError> {
        let deadline = started + Duration::from_millis(self.config.request_timeout_ms);
        let rx = self.queue.submit(wrap, work, deadline).map_err(|e| match e {
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

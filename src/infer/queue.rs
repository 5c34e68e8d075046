//! The queue between the handle and the inference thread: jobs, their replies, and the
//! batcher that merges waiting jobs by count and token budget.

use crate::pool::filter::Filter;
use crate::pool::store::Candidate;
use crate::text::TextKind;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};
use tokenizers::Encoding;
use tokio::sync::oneshot;

/// What the candidates of a rank job are.
pub(crate) enum Target {
    /// The pool, or the part of it whose meta passes the filter.
    Pool(Option<Filter>),
    /// Pool candidates by id (resolved on the inference thread: the pool changes), and of
    /// those the ones that pass the filter.
    Ids(Vec<String>, Option<Filter>),
    /// Texts sent with the request, tokenized.
    Inline(Vec<Encoding>),
    /// The pool, approximately: only the `preselect` rows that score best against the mean of
    /// the context's vectors are scored exactly.
    Approximate(i64),
}

/// What a pool hit carries besides id and score, and the most bytes of ids, texts and meta
/// the answer may carry (`max_response_bytes`).
#[derive(Clone, Copy)]
pub(crate) struct Want {
    pub(crate) text: bool,
    pub(crate) meta: bool,
    pub(crate) budget: usize,
}

pub(crate) enum Work {
    Rank { context: Encoding, target: Target, top_k: i64, want: Want },
    Encode { texts: Vec<Encoding>, kind: TextKind },
    /// Encode the texts, log the batch durably, then apply it.
    Upsert { candidates: Vec<Candidate>, texts: Vec<Encoding> },
    Delete { ids: Vec<String> },
    Get { id: String },
}

pub(crate) enum Output {
    /// Inline candidates: `(position, score)` best first.
    Ranked(Vec<(i64, f32)>),
    /// Pool candidates, best first, resolved while the pool was as ranked.
    Hits(Vec<PoolHit>),
    /// Row-major vectors with their shape: `[B, d]` or `[B, m, d]`.
    Vectors { shape: Vec<usize>, data: Vec<f32> },
    /// A write is durable and applied: the ids a delete did not find, the pool's size, and
    /// the store's sequence number of the write.
    Written { missing: Vec<String>, pool_size: usize, seq: u64 },
    Found(Option<Candidate>),
}

pub(crate) struct PoolHit {
    pub(crate) id: String,
    pub(crate) score: f32,
    pub(crate) text: Option<String>,
    pub(crate) meta: Option<serde_json::Value>,
}

/// Why the inference thread did not answer a job with an output.
#[derive(Debug)]
pub(crate) enum JobError {
    /// Its deadline passed while it waited.
    Timeout,
    /// Too much large work already waits for this one to finish inside its deadline.
    Overloaded,
    /// The request does not fit the pool as it is (unknown ids).
    Invalid(String),
    /// The store cannot take writes now (a shared store's database is unreachable).
    StoreUnavailable(String),
    Failed(String),
}

pub(crate) type Reply = Result<Output, JobError>;

pub(crate) struct Job {
    pub(crate) work: Work,
    pub(crate) deadline: Instant,
    pub(crate) enqueued: Instant,
    pub(crate) reply: oneshot::Sender<Reply>,
}

impl Job {
    /// Still wanted: within its deadline and its client still waiting.
    pub(crate) fn alive(&self, now: Instant) -> bool {
        self.deadline > now && !self.reply.is_closed()
    }

    /// Tokens this job adds to a batch, for the token budget.
    fn tokens(&self) -> usize {
        let len = |e: &Encoding| e.get_ids().len();
        match &self.work {
            Work::Rank { context, target, .. } => {
                len(context) + if let Target::Inline(c) = target { c.iter().map(len).sum() } else { 0 }
            }
            Work::Encode { texts, .. } | Work::Upsert { texts, .. } => texts.iter().map(len).sum(),
            Work::Delete { .. } | Work::Get { .. } => 0,
        }
    }
}

pub(crate) enum SubmitError {
    Full,
    Stopped,
}

/// The sending side: bounded, so a full queue is an immediate answer (429), not a wait.
#[derive(Clone)]
pub(crate) struct Queue(pub(crate) SyncSender<Job>);

impl Queue {
    pub(crate) fn submit(&self, work: Work, deadline: Instant) -> Result<oneshot::Receiver<Reply>, SubmitError> {
        let (reply, rx) = oneshot::channel();
        let job = Job { work, deadline, enqueued: Instant::now(), reply };
        match self.0.try_send(job) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(SubmitError::Full),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }
}

/// How the batcher forms batches.
#[derive(Clone, Copy)]
pub(crate) struct BatchLimits {
    pub(crate) max_batch_size: usize,
    pub(crate) max_batch_tokens: usize,
    pub(crate) max_wait: Duration,
}

/// Adds waiting jobs to `first` until the batch is full by count or tokens, or the wait
/// window closes. A job that would break the token budget starts the next batch (`carry`).
pub(crate) fn collect(first: Job, rx: &Receiver<Job>, limits: BatchLimits, carry: &mut Option<Job>) -> Vec<Job> {
    let mut tokens = first.tokens();
    let mut batch = vec![first];
    let window_end = Instant::now() + limits.max_wait;
    while batch.len() < limits.max_batch_size {
        let wait = window_end.saturating_duration_since(Instant::now());
        let next = match rx.try_recv() {
            Ok(j) => j,
            Err(_) if wait.is_zero() => break,
            Err(_) => match rx.recv_timeout(wait) {
                Ok(j) => j,
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            },
        };
        let t = next.tokens();
        if tokens + t > limits.max_batch_tokens {
            *carry = Some(next);
            break;
        }
        tokens += t;
        batch.push(next);
    }
    batch
}

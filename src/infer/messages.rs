//! What crosses the handle: queries in, answers and errors out (`InferError` for the HTTP
//! layer, `JobError` from the inference thread). Imports nothing else of `infer`.

use std::time::Duration;

/// How long a `min_seq` beyond every seq a shared-store replica has heard of may wait for
/// the notification of its commit: notifications arrive within milliseconds, and a missed
/// one is caught by the follower's 250 ms poll.
pub(crate) const NOT_HEARD_GRACE: Duration = Duration::from_secs(2);

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
    /// Say, per hit, which context vectors and tokens its score came from.
    pub explain: bool,
    /// Rank only once this replica has applied the store's changes up to this `seq` (a
    /// write's answer says its `seq`): read your writes on any replica.
    pub min_seq: Option<u64>,
}

/// One ranked candidate: a pool candidate (resolved while the pool was as ranked) or an
/// inline one (its id is its position in the request).
pub struct Hit {
    pub id: String,
    pub score: f32,
    /// With `return_text`.
    pub text: Option<String>,
    /// With `return_meta`, for pool candidates that have meta.
    pub meta: Option<serde_json::Value>,
    /// With `explain`: the context vectors this candidate attended to most.
    pub explain: Option<Vec<CodeRead>>,
}

/// One of the context's m vectors, as a hit used it (`explain`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CodeRead {
    /// Which vector: code i (token i for `n_first` models; 0 for a bi-encoder's one).
    pub code: i64,
    /// The candidate's attention weight on it.
    pub weight: f32,
    /// The context tokens it read most, heaviest first.
    pub tokens: Vec<TokenRead>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenRead {
    /// The token as the model's tokenizer wrote it (`##ing`, `[CLS]`, `hel@@`, …).
    pub token: String,
    /// Its position in the tokenized (and truncated) context.
    pub position: usize,
    pub weight: f32,
}

/// Best first.
pub struct Ranking(pub Vec<Hit>);

/// Row-major vectors: `[texts, m, d]` for contexts, `[texts, d]` for candidates.
pub struct Vectors {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// What a write did.
pub struct Written {
    /// Ids a delete did not find.
    pub missing: Vec<String>,
    pub pool_size: usize,
    /// The store's sequence number of the write: `min_seq` for reading it back anywhere.
    pub seq: u64,
}

/// Why the inference thread did not answer a job with its output.
#[derive(Debug)]
pub(crate) enum JobError {
    /// Its deadline passed while it waited.
    Timeout,
    /// Too much large work already waits for this one to finish inside its deadline.
    Overloaded,
    /// The request does not fit the pool as it is (unknown ids, too large an answer).
    Invalid(String),
    /// The store cannot take writes now (a shared store's database is unreachable).
    StoreUnavailable(String),
    Failed(String),
}

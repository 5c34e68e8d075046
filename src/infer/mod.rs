//! The batching engine: one inference thread owns the model and the encoded pool. Requests
//! arrive over a bounded channel (full → the caller answers 429); the thread merges waiting
//! requests into one batch by a token budget, runs each kind of work once per batch, and
//! answers every request on its own oneshot.
//!
//! No request may hold the thread for long: requests whose texts to encode exceed one chunk
//! are encoded a chunk at a time (`chunked.rs`), between batches of other work, and dropped
//! between chunks once their deadline passed or their client went away.

pub mod ranker;
mod batch;
mod chunked;

use crate::pool::cache::PoolCache;
use crate::config::Config;
use crate::metrics as m;
use crate::pool::Pool;
use crate::infer::ranker::Ranker;
use crate::text::TextKind;
use anyhow::{Context, Result};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};
use tokenizers::Encoding;
use tokio::sync::oneshot;

/// What the candidates of a rank request are.
pub enum Target {
    /// The whole cached pool.
    Pool,
    /// Rows of the pool, by position.
    Subset(Vec<i64>),
    /// Texts sent with the request, tokenized.
    Inline(Vec<Encoding>),
    /// The pool, approximately: only the `preselect` rows that score best against the mean of
    /// the context's vectors (a bi-encoder pass, 2·d·N FLOPs instead of 2·m·d·N) are scored
    /// exactly.
    Approximate(i64),
}

pub enum Work {
    Rank { context: Encoding, target: Target, top_k: i64 },
    Encode { texts: Vec<Encoding>, kind: TextKind },
}

pub enum Output {
    /// `(row, score)` best first; rows index the target's candidates.
    Ranked(Vec<(i64, f32)>),
    /// Row-major vectors with their shape: `[B, d]` or `[B, m, d]`.
    Vectors { shape: Vec<usize>, data: Vec<f32> },
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the request's time budget ran out while it waited for the model")]
    Timeout,
    /// Too much large work already waits for this one to finish inside its deadline.
    #[error("too much large work is waiting")]
    Overloaded,
    #[error("inference failed: {0}")]
    Failed(String),
}

/// The outcome of a job's part of a batch: answered, or its texts go on in chunks.
enum Step {
    Done(Result<Output, EngineError>),
    Chunked(chunked::Chunked),
}

pub struct Job {
    work: Work,
    deadline: Instant,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Output, EngineError>>,
}

impl Job {
    /// Still wanted: within its deadline and its client still waiting.
    fn alive(&self, now: Instant) -> bool {
        self.deadline > now && !self.reply.is_closed()
    }

    /// Tokens this job adds to a batch, for the token budget.
    fn tokens(&self) -> usize {
        let len = |e: &Encoding| e.get_ids().len();
        match &self.work {
            Work::Rank { context, target, .. } => {
                len(context) + if let Target::Inline(c) = target { c.iter().map(len).sum() } else { 0 }
            }
            Work::Encode { texts, .. } => texts.iter().map(len).sum(),
        }
    }
}

/// Model facts the HTTP layer reports, fixed once the model is loaded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub model_dir: String,
    pub mode: crate::model::format::Mode,
    pub n_codes: i64,
    pub dim: i64,
    pub device: String,
    pub trained: bool,
    pub description: String,
    pub max_context_tokens: usize,
    pub max_candidate_tokens: usize,
}

/// Startup progress and the pool text, shared with the HTTP layer.
#[derive(Default)]
pub struct Status {
    ready: AtomicBool,
    pub encoded: AtomicUsize,
    pub total: AtomicUsize,
    pub cache_reused: AtomicBool,
    failure: Mutex<Option<String>>,
    pub info: OnceLock<ModelInfo>,
    pub pool: OnceLock<Arc<Pool>>,
    /// Set at shutdown: the inference thread stops at its next chunk boundary.
    stopping: AtomicBool,
}

impl Status {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap().clone()
    }
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Job>,
    pub status: Arc<Status>,
}

pub enum SubmitError {
    Overloaded,
    Stopped,
}

impl EngineHandle {
    /// Queues work; the future resolves when the inference thread answers.
    pub fn submit(
        &self,
        work: Work,
        deadline: Instant,
    ) -> Result<oneshot::Receiver<Result<Output, EngineError>>, SubmitError> {
        let (reply, rx) = oneshot::channel();
        let job = Job { work, deadline, enqueued: Instant::now(), reply };
        match self.tx.try_send(job) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(SubmitError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }
}

/// The running inference thread. `shutdown` stops it between two chunks of work and joins it:
/// the process must not exit while libtorch runs on it (that ends in a crash, not an exit
/// code).
pub struct Inference {
    thread: Option<std::thread::JoinHandle<()>>,
    status: Arc<Status>,
}

impl Inference {
    pub fn shutdown(self) {
        drop(self)
    }
}

/// Also on early error paths (`?` after `start`): never leave the thread running.
impl Drop for Inference {
    fn drop(&mut self) {
        self.status.stopping.store(true, Ordering::Release);
        if self.thread.take().is_some_and(|t| t.join().is_err()) {
            tracing::error!("the inference thread panicked");
        }
    }
}

/// Starts the inference thread, which loads the model (a bad model directory fails the start:
/// this waits for the load), then encodes or loads the pool and starts answering.
///
/// Every libtorch call happens on that one thread. Measured on 2 cores: once a second thread
/// has used libtorch (each thread gets its own OpenMP team), the inference thread's GEMM at
/// N = 100k took 44 ms instead of 36 ms and a context encoding 9 ms instead of 5 ms.
pub fn start(
    config: &Config,
    settings: &crate::model::format::PolySettings,
) -> Result<(EngineHandle, Inference)> {
    let device = config.device()?;
    let pool = Arc::new(Pool::load(&config.candidates)?);
    let cache = PoolCache::new(&config.cache_dir, config.model_dir(), settings, &config.candidates)?;
    let status = Arc::new(Status::default());
    status.pool.set(pool.clone()).ok();
    status.total.store(pool.len(), Ordering::Release);
    let (tx, rx) = sync_channel(config.queue_capacity);
    let (loaded_tx, loaded_rx) = std::sync::mpsc::channel::<Result<()>>();
    let (config, thread_status) = (config.clone(), status.clone());
    let thread = std::thread::Builder::new().name("inference".into()).spawn(move || {
        let threads = if config.threads == 0 { num_cpus() } else { config.threads };
        tch::set_num_threads(threads as i32);
        let ranker = match Ranker::load(config.model_dir(), device) {
            Ok(r) => r,
            Err(e) => {
                let _ = loaded_tx.send(Err(anyhow::Error::new(e).context(format!("loading model {}", config.model_dir().display()))));
                return;
            }
        };
        let s = &ranker.model.settings;
        thread_status
            .info
            .set(ModelInfo {
                model_dir: config.model_dir().display().to_string(),
                mode: s.mode,
                n_codes: s.context_vectors(),
                dim: ranker.model.dim(),
                device: config.device.clone(),
                trained: s.trained,
                description: s.description.clone(),
                max_context_tokens: s.max_context_tokens,
                max_candidate_tokens: s.max_candidate_tokens,
            })
            .ok();
        let _ = loaded_tx.send(Ok(()));
        Engine { ranker, config, status: thread_status, pool_vectors: Tensor::new(), chunk_rate: Default::default() }.run(rx, &pool, &cache)
    })?;
    loaded_rx.recv().context("the inference thread ended during the model load")??;
    Ok((EngineHandle { tx, status: status.clone() }, Inference { thread: Some(thread), status }))
}

pub fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

struct Engine {
    ranker: Ranker,
    config: Config,
    status: Arc<Status>,
    /// `[N, d]` on the model's device.
    pool_vectors: Tensor,
    /// Measured tokens per second of chunked encoding (0 until the first chunk).
    chunk_rate: std::cell::Cell<f64>,
}

impl Engine {
    fn run(mut self, rx: Receiver<Job>, pool: &Pool, cache: &PoolCache) {
        let _guard = tch::no_grad_guard();
        match self.load_pool(pool, cache) {
            Ok(v) => {
                let v = if self.config.fp16_candidates { v.to_kind(Kind::Half) } else { v };
                self.pool_vectors = v.to_device(self.ranker.model.device);
                metrics::gauge!(m::POOL_SIZE).set(pool.len() as f64);
                self.status.ready.store(true, Ordering::Release);
                tracing::info!(candidates = pool.len(), "ready");
                cache.clean(self.config.cache_keep);
            }
            Err(_) if self.status.stopping() => return,
            Err(e) => {
                tracing::error!("pool encoding failed: {e:#}");
                *self.status.failure.lock().unwrap() = Some(format!("{e:#}"));
                return;
            }
        }
        let mut carry: Option<Job> = None;
        let mut pending: VecDeque<chunked::Chunked> = VecDeque::new();
        self.serve(&rx, &mut carry, &mut pending);
        // Stopping: whoever still waits gets an answer rather than a dropped channel.
        for c in pending {
            c.answer(Err(EngineError::Failed("the server is shutting down".into())));
        }
        if let Some(j) = carry {
            let _ = j.reply.send(Err(EngineError::Failed("the server is shutting down".into())));
        }
    }

    fn serve(&self, rx: &Receiver<Job>, carry: &mut Option<Job>, pending: &mut VecDeque<chunked::Chunked>) {
        while !self.status.stopping() {
            let first = match carry.take() {
                Some(j) => Some(j),
                // Idle: block, but wake now and then to notice a shutdown.
                None if pending.is_empty() => match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(j) => Some(j),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return, // the server has shut down
                },
                // Chunked work waits: take only what is already queued.
                None => match rx.try_recv() {
                    Ok(j) => Some(j),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => return,
                },
            };
            if let Some(first) = first {
                let batch = self.collect(first, rx, carry);
                self.process(batch, pending);
            }
            self.advance_one(pending);
        }
    }

    /// Adds waiting jobs to `first` until the batch is full by count or tokens, or the wait
    /// window closes. A job that would break the token budget starts the next batch.
    fn collect(&self, first: Job, rx: &Receiver<Job>, carry: &mut Option<Job>) -> Vec<Job> {
        let c = &self.config;
        let mut tokens = first.tokens();
        let mut batch = vec![first];
        let window_end = Instant::now() + Duration::from_millis(c.max_wait_ms);
        while batch.len() < c.max_batch_size {
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
            if tokens + t > c.max_batch_tokens {
                *carry = Some(next);
                break;
            }
            tokens += t;
            batch.push(next);
        }
        batch
    }

    fn process(&self, batch: Vec<Job>, pending: &mut VecDeque<chunked::Chunked>) {
        let now = Instant::now();
        metrics::histogram!(m::BATCH_SIZE).record(batch.len() as f64);
        let (live, dead): (Vec<Job>, Vec<Job>) = batch.into_iter().partition(|j| j.alive(now));
        for j in dead {
            let _ = j.reply.send(Err(EngineError::Timeout));
        }
        for j in &live {
            metrics::histogram!(m::STAGE_SECONDS, "stage" => "queue").record((now - j.enqueued).as_secs_f64());
        }
        let works: Vec<&Work> = live.iter().map(|j| &j.work).collect();
        let steps = guarded(|| self.run_batch(&works), live.len());
        for (j, step) in live.into_iter().zip(steps) {
            match step {
                Step::Done(out) => {
                    let _ = j.reply.send(out);
                }
                // Large work that cannot finish inside its deadline behind what already waits
                // is refused (429, retry later) rather than queued to time out.
                Step::Chunked(state) if !self.can_finish(pending, &state, j.deadline) => {
                    let _ = j.reply.send(Err(EngineError::Overloaded));
                }
                Step::Chunked(state) => pending.push_back(state.with_job(j)),
            }
        }
    }

    /// Whether `new`, queued behind `pending` (first in, first finished), would be done by
    /// `deadline` at the encoding rate measured so far (unknown at first: then yes).
    fn can_finish(&self, pending: &VecDeque<chunked::Chunked>, new: &chunked::Chunked, deadline: Instant) -> bool {
        let rate = self.chunk_rate.get();
        if rate <= 0.0 {
            return true;
        }
        let tokens = pending.iter().map(|c| c.remaining_tokens()).sum::<usize>() + new.remaining_tokens();
        Instant::now() + Duration::from_secs_f64(tokens as f64 / rate) <= deadline
    }

    /// One chunk of the oldest chunked job still wanted (first in, first finished: jobs
    /// complete in turn instead of all slowing down together); jobs past their deadline or
    /// whose client left are dropped here, between chunks, so they free the thread at once.
    fn advance_one(&self, pending: &mut VecDeque<chunked::Chunked>) {
        while let Some(mut c) = pending.pop_front() {
            if !c.alive(Instant::now()) {
                c.answer(Err(EngineError::Timeout));
                continue;
            }
            let start = Instant::now();
            let (bs, before) = (self.config.encode_batch_size, c.remaining_tokens());
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.advance(&self.ranker, bs)));
            let secs = start.elapsed().as_secs_f64();
            metrics::histogram!(m::STAGE_SECONDS, "stage" => "inference").record(secs);
            // Tokens per second of chunked encoding, smoothed: what admission plans with.
            let rate = (before - c.remaining_tokens()) as f64 / secs.max(1e-6);
            let old = self.chunk_rate.get();
            self.chunk_rate.set(if old > 0.0 { 0.8 * old + 0.2 * rate } else { rate });
            match step {
                Ok(None) => pending.push_front(c),
                Ok(Some(out)) => c.answer(Ok(out)),
                Err(p) => c.answer(Err(EngineError::Failed(panic_message(p)))),
            }
            return;
        }
    }

    /// The pool's vectors from the cache when it is whole and matches, else encoded now (in
    /// chunks, with progress in the log) and cached.
    fn load_pool(&self, pool: &Pool, cache: &PoolCache) -> Result<Tensor> {
        let d = self.ranker.model.dim() as usize;
        let t0 = Instant::now();
        match cache.load(pool.len(), d) {
            Ok(v) => {
                self.status.cache_reused.store(true, Ordering::Release);
                self.status.encoded.store(pool.len(), Ordering::Release);
                metrics::gauge!(m::CACHE_REUSED).set(1.0);
                tracing::info!(path = %cache.path.display(), candidates = pool.len(), ms = t0.elapsed().as_millis() as u64, "pool cache reused");
                return Ok(v);
            }
            Err(e) if cache.path.exists() => tracing::warn!("pool cache not usable, re-encoding: {e:#}"),
            Err(_) => tracing::info!(path = %cache.path.display(), "no pool cache yet, encoding"),
        }
        metrics::gauge!(m::CACHE_REUSED).set(0.0);
        let chunk = (self.config.encode_batch_size * 8).max(1);
        let mut parts = Vec::new();
        let mut last_log = Instant::now();
        for start in (0..pool.len()).step_by(chunk) {
            anyhow::ensure!(!self.status.stopping(), "stopped while encoding the pool");
            let texts = &pool.texts[start..(start + chunk).min(pool.len())];
            let enc = self.ranker.tokenize(texts, TextKind::Candidate).map_err(anyhow::Error::msg)?;
            parts.push(self.ranker.candidate_vectors(&enc, self.config.encode_batch_size));
            let done = start + texts.len();
            self.status.encoded.store(done, Ordering::Release);
            metrics::counter!(m::POOL_ENCODED).increment(texts.len() as u64);
            if last_log.elapsed() >= Duration::from_secs(2) || done == pool.len() {
                let rate = done as f64 / t0.elapsed().as_secs_f64().max(1e-9);
                let eta = (pool.len() - done) as f64 / rate.max(1e-9);
                tracing::info!(done, total = pool.len(), rate = format!("{rate:.0}/s"), eta = format!("{eta:.0}s"), "encoding pool");
                last_log = Instant::now();
            }
        }
        let v = Tensor::cat(&parts, 0);
        tracing::info!(candidates = pool.len(), secs = format!("{:.1}", t0.elapsed().as_secs_f64()), "pool encoded");
        match cache.store(&v) {
            Ok(()) => tracing::info!(path = %cache.path.display(), "pool cache written"),
            // A read-only cache directory costs the next start time, not this one's service.
            Err(e) => tracing::warn!("pool cache not written: {e:#}"),
        }
        Ok(v)
    }
}

/// Runs `f`, turning a panic (tch turns libtorch exceptions into panics) into a failed
/// answer for each of the `n` jobs: one bad batch must not take the thread.
fn guarded(f: impl FnOnce() -> Vec<Step>, n: usize) -> Vec<Step> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = panic_message(p);
        tracing::error!("batch failed: {msg}");
        (0..n).map(|_| Step::Done(Err(EngineError::Failed(msg.clone())))).collect()
    })
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic in libtorch".into())
}

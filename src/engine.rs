//! The batching engine: one inference thread owns the model and the encoded pool. Requests
//! arrive over a bounded channel (full → the caller answers 429); the thread merges waiting
//! requests into one batch by a token budget, runs each kind of work once per batch, and
//! answers every request on its own oneshot.

use crate::cache::PoolCache;
use crate::config::Config;
use crate::metrics as m;
use crate::model::scoring::{top_k, ContextCodes};
use crate::pool::Pool;
use crate::ranker::Ranker;
use crate::tokenizer::TextKind;
use anyhow::{Context, Result};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
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
    #[error("inference failed: {0}")]
    Failed(String),
}

pub struct Job {
    work: Work,
    deadline: Instant,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Output, EngineError>>,
}

impl Job {
    /// Padded tokens this job adds to a batch, for the token budget.
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
    pub mode: crate::model::settings::Mode,
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
}

impl Status {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
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

/// Starts the inference thread, which loads the model (a bad model directory fails the start:
/// this waits for the load), then encodes or loads the pool and starts answering.
///
/// Every libtorch call happens on that one thread. Measured on 2 cores: once a second thread
/// has used libtorch (each thread gets its own OpenMP team), the inference thread's GEMM at
/// N = 100k took 44 ms instead of 36 ms and a context encoding 9 ms instead of 5 ms.
pub fn start(
    config: &Config,
    settings: &crate::model::settings::PolySettings,
) -> Result<(EngineHandle, std::thread::JoinHandle<()>)> {
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
        Engine { ranker, config, status: thread_status, pool_vectors: Tensor::new() }.run(rx, &pool, &cache)
    })?;
    loaded_rx.recv().context("the inference thread ended during the model load")??;
    Ok((EngineHandle { tx, status }, thread))
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
            }
            Err(e) => {
                tracing::error!("pool encoding failed: {e:#}");
                *self.status.failure.lock().unwrap() = Some(format!("{e:#}"));
                return;
            }
        }
        let mut carry: Option<Job> = None;
        loop {
            let first = match carry.take() {
                Some(j) => j,
                None => match rx.recv() {
                    Ok(j) => j,
                    Err(_) => return, // every sender dropped: the server has shut down
                },
            };
            let batch = self.collect(first, &rx, &mut carry);
            self.process(batch);
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

    fn process(&self, batch: Vec<Job>) {
        let now = Instant::now();
        metrics::histogram!(m::BATCH_SIZE).record(batch.len() as f64);
        let (live, expired): (Vec<Job>, Vec<Job>) = batch.into_iter().partition(|j| j.deadline > now);
        for j in expired {
            let _ = j.reply.send(Err(EngineError::Timeout));
        }
        for j in &live {
            metrics::histogram!(m::STAGE_SECONDS, "stage" => "queue").record((now - j.enqueued).as_secs_f64());
        }
        let works: Vec<&Work> = live.iter().map(|j| &j.work).collect();
        // tch turns libtorch exceptions into panics; one bad batch must not take the thread.
        let outputs = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_batch(&works)))
            .unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic in libtorch".into());
                tracing::error!("batch failed: {msg}");
                live.iter().map(|_| Err(EngineError::Failed(msg.clone()))).collect()
            });
        for (j, out) in live.into_iter().zip(outputs) {
            let _ = j.reply.send(out);
        }
    }

    /// One batch: every context in one forward pass, every pool ranking in one scoring call.
    fn run_batch(&self, works: &[&Work]) -> Vec<Result<Output, EngineError>> {
        let mut out: Vec<Option<Result<Output, EngineError>>> = works.iter().map(|_| None).collect();
        let start = Instant::now();
        let bs = self.config.max_batch_size.max(1);

        // Contexts: rank requests and context encodes share one encoder pass.
        let mut ctx_encodings: Vec<Encoding> = Vec::new();
        let mut ctx_owner: Vec<(usize, usize)> = Vec::new(); // (work index, row count)
        for (i, w) in works.iter().enumerate() {
            match w {
                Work::Rank { context, .. } => {
                    ctx_encodings.push(context.clone());
                    ctx_owner.push((i, 1));
                }
                Work::Encode { texts, kind: TextKind::Context } => {
                    ctx_encodings.extend(texts.iter().cloned());
                    ctx_owner.push((i, texts.len()));
                }
                Work::Encode { .. } => {}
            }
        }
        let codes = (!ctx_encodings.is_empty()).then(|| self.ranker.context_codes(&ctx_encodings, ctx_encodings.len()));

        // Candidate encodes: one pass for all of them.
        let cand_texts: Vec<Encoding> = works
            .iter()
            .filter_map(|w| match w {
                Work::Encode { texts, kind: TextKind::Candidate } => Some(texts.iter().cloned()),
                _ => None,
            })
            .flatten()
            .collect();
        let cand_vectors = (!cand_texts.is_empty()).then(|| self.ranker.candidate_vectors(&cand_texts, bs * 8));
        metrics::histogram!(m::STAGE_SECONDS, "stage" => "inference").record(start.elapsed().as_secs_f64());

        let score_start = Instant::now();
        if let Some(codes) = &codes {
            let mut row = 0i64;
            let mut pool_rows: Vec<(usize, i64, i64)> = Vec::new(); // (work, codes row, k)
            for &(i, n) in &ctx_owner {
                match works[i] {
                    Work::Rank { target: Target::Pool, top_k, .. } => pool_rows.push((i, row, *top_k)),
                    Work::Rank { target: Target::Subset(rows), top_k, .. } => {
                        out[i] = Some(Ok(Output::Ranked(self.rank_pool_rows(&codes.select(row), rows, *top_k))));
                    }
                    Work::Rank { target: Target::Approximate(preselect), top_k, .. } => {
                        let c = codes.select(row);
                        let rows = self.preselect(&c, *preselect);
                        out[i] = Some(Ok(Output::Ranked(self.rank_pool_rows(&c, &rows, *top_k))));
                    }
                    Work::Rank { target: Target::Inline(texts), top_k, .. } => {
                        let cands = self.ranker.candidate_vectors(texts, bs * 8);
                        out[i] = Some(Ok(Output::Ranked(self.rank_rows(&codes.select(row), &cands, *top_k))));
                    }
                    Work::Encode { .. } => {
                        let y = codes.y.narrow(0, row, n as i64);
                        out[i] = Some(Ok(vectors(&y)));
                    }
                }
                row += n as i64;
            }
            if !pool_rows.is_empty() {
                // All pool rankings of the batch in one kernel call: [B, m, d] × [N, d].
                let rows = Tensor::from_slice(&pool_rows.iter().map(|p| p.1).collect::<Vec<_>>()).to_device(codes.y.device());
                let sub = ContextCodes { y: codes.y.index_select(0, &rows), mask: codes.mask.index_select(0, &rows) };
                let scores = self.ranker.model.score(&sub, &self.pool_vectors);
                for (b, &(i, _, k)) in pool_rows.iter().enumerate() {
                    out[i] = Some(Ok(Output::Ranked(top_k(&scores.get(b as i64), k))));
                }
            }
        }
        if let Some(v) = cand_vectors {
            let mut row = 0i64;
            for (i, w) in works.iter().enumerate() {
                if let Work::Encode { texts, kind: TextKind::Candidate } = w {
                    out[i] = Some(Ok(vectors(&v.narrow(0, row, texts.len() as i64))));
                    row += texts.len() as i64;
                }
            }
        }
        metrics::histogram!(m::STAGE_SECONDS, "stage" => "score").record(score_start.elapsed().as_secs_f64());
        out.into_iter().map(|o| o.unwrap_or_else(|| Err(EngineError::Failed("work was not handled".into())))).collect()
    }

    fn rank_rows(&self, codes: &ContextCodes, cands: &Tensor, k: i64) -> Vec<(i64, f32)> {
        top_k(&self.ranker.model.score(codes, cands).squeeze_dim(0), k)
    }

    /// Exact ranking of some pool rows; results carry pool row numbers.
    fn rank_pool_rows(&self, codes: &ContextCodes, rows: &[i64], k: i64) -> Vec<(i64, f32)> {
        let idx = Tensor::from_slice(rows).to_device(self.pool_vectors.device());
        let cands = self.pool_vectors.index_select(0, &idx);
        let ranked = self.rank_rows(codes, &cands, k);
        ranked.into_iter().map(|(j, s)| (rows[j as usize], s)).collect()
    }

    /// The `preselect` pool rows with the best dot product against the masked mean of one
    /// context's vectors.
    fn preselect(&self, codes: &ContextCodes, preselect: i64) -> Vec<i64> {
        let kind = codes.y.kind();
        let mask = codes.mask.to_kind(kind).unsqueeze(-1); // [1, m, 1]
        let mean = (&codes.y * &mask).sum_dim_intlist(1, false, kind) / mask.sum(kind).clamp_min(1.0); // [1, d]
        let pool = &self.pool_vectors;
        let pre = pool.matmul(&mean.to_kind(pool.kind()).transpose(0, 1)).squeeze_dim(-1); // [N]
        let (_, idx) = pre.topk(preselect.min(pool.size()[0]), -1, true, false);
        Vec::try_from(idx.to_device(tch::Device::Cpu)).unwrap_or_default()
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

fn vectors(t: &Tensor) -> Output {
    let t = t.to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous();
    let shape = t.size().iter().map(|&s| s as usize).collect();
    let data = Vec::<f32>::try_from(t.view([-1])).unwrap_or_default();
    Output::Vectors { shape, data }
}

//! The inference thread: it owns the model and the pool's vectors, takes batches off the
//! queue, and answers every job on its own oneshot.
//!
//! No job may hold the thread for long: one whose texts exceed a chunk is encoded a chunk at
//! a time (`chunked.rs`), between batches of other work, and dropped between chunks once its
//! deadline passed or its client went away.

use super::chunked::{Chunked, Finished, Then};
use super::queue::{collect, BatchLimits, Job, JobError, Output, Reply, Work};
use super::ranker::Ranker;
use super::status::{ModelInfo, Status};
use crate::config::{num_cpus, Config};
use crate::metrics as m;
use crate::pool::live::LivePool;
use crate::pool::store::{flat, Change, Durable, Event, Op, StoreError};
use crate::text::TextKind;
use anyhow::{Context, Result};
use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// The outcome of a job's part of a batch: answered, or its texts go on in chunks.
pub(super) enum Step {
    Done(Reply),
    Chunked(Chunked),
    /// A write sent to the store: answered once it is durable and applied.
    Submitted(u64),
}

/// The running inference thread. Dropping it stops the thread between two chunks of work and
/// joins it: the process must not exit while libtorch runs on it (that ends in a crash, not
/// an exit code). Also on early error paths (`?` after `start`).
pub struct Inference {
    thread: Option<std::thread::JoinHandle<()>>,
    status: Arc<Status>,
}

impl Inference {
    pub(crate) fn shutdown(self) {
        drop(self)
    }
}

impl Drop for Inference {
    fn drop(&mut self) {
        self.status.stop();
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
pub(super) fn spawn(config: &Config, rx: Receiver<Job>, status: Arc<Status>, store: Box<dyn Durable>) -> Result<Inference> {
    let device = config.device()?;
    // Seed files are read on the inference thread; a missing one fails the start here.
    for f in &config.candidates {
        std::fs::File::open(f).with_context(|| format!("reading candidates {}", f.display()))?;
    }
    let (loaded_tx, loaded_rx) = std::sync::mpsc::channel::<Result<()>>();
    let (config, thread_status) = (config.clone(), status.clone());
    let thread = std::thread::Builder::new().name("inference".into()).spawn(move || {
        let threads = if config.threads == 0 { num_cpus() } else { config.threads };
        tch::set_num_threads(threads as i32);
        let ranker = match Ranker::load_in(config.model_dir(), device, config.dtype.kind()) {
            Ok(r) => r,
            Err(e) => {
                let _ = loaded_tx.send(Err(anyhow::Error::new(e).context(format!("loading model {}", config.model_dir().display()))));
                return;
            }
        };
        let s = &ranker.model.settings;
        thread_status.set_info(ModelInfo {
            model_dir: config.model_dir().display().to_string(),
            mode: s.mode,
            n_codes: s.context_vectors(),
            dim: ranker.model.dim(),
            device: config.device.clone(),
            dtype: config.dtype,
            trained: s.trained,
            description: s.description.clone(),
            max_context_tokens: s.max_context_tokens,
            max_candidate_tokens: s.max_candidate_tokens,
        });
        let _ = loaded_tx.send(Ok(()));
        let limits = BatchLimits {
            max_batch_size: config.max_batch_size,
            max_batch_tokens: config.max_batch_tokens,
            max_wait: Duration::from_millis(config.max_wait_ms),
        };
        let empty = Tensor::zeros([0, ranker.model.dim()], (Kind::Float, device));
        let pool = LivePool::new(Vec::new(), empty, config.meta_limits(), config.max_meta_index_bytes);
        let worker = Worker {
            ranker,
            config,
            limits,
            status: thread_status,
            pool,
            store: Some(store),
            waiting: HashMap::new(),
            next_ticket: 0,
            applied: 0,
            chunk_rate: Default::default(),
        };
        worker.run(rx)
    })?;
    loaded_rx.recv().context("the inference thread ended during the model load")??;
    Ok(Inference { thread: Some(thread), status })
}

pub(super) struct Worker {
    pub(super) ranker: Ranker,
    pub(super) config: Config,
    limits: BatchLimits,
    pub(super) status: Arc<Status>,
    /// The candidates and their vectors (on the model's device).
    pub(super) pool: LivePool,
    /// Where writes are kept (taken out only while it opens the pool).
    store: Option<Box<dyn Durable>>,
    /// Writes sent to the store, by ticket: their clients wait for them to be applied.
    waiting: HashMap<u64, tokio::sync::oneshot::Sender<Reply>>,
    next_ticket: u64,
    /// The store's `seq` the pool is at.
    applied: u64,
    /// Measured tokens per second of chunked encoding (0 until the first chunk).
    chunk_rate: std::cell::Cell<f64>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Job>) {
        let _guard = tch::no_grad_guard();
        let mut store = self.store.take().expect("the store, given at spawn");
        let opened = self.open_pool(store.as_mut());
        self.store = Some(store);
        match opened {
            Ok((pool, seq, cache)) => {
                self.pool = pool;
                self.applied = seq;
                self.status.set_applied(seq);
                self.publish_pool();
                if let Some(store) = self.store.as_ref() {
                    self.status.set_store_health(store.health());
                }
                self.status.set_ready();
                tracing::info!(candidates = self.pool.len(), "ready");
                if let Some(cache) = cache {
                    cache.clean(self.config.cache_keep);
                }
                self.settle_precision();
            }
            Err(_) if self.status.stopping() => return,
            Err(e) => {
                tracing::error!("pool encoding failed: {e:#}");
                self.status.set_failure(format!("{e:#}"));
                return;
            }
        }
        let mut carry: Option<Job> = None;
        let mut pending: VecDeque<Chunked> = VecDeque::new();
        self.serve(&rx, &mut carry, &mut pending);
        // Stopping: whoever still waits gets an answer rather than a dropped channel.
        for c in pending {
            c.answer(Err(JobError::Failed("the server is shutting down".into())));
        }
        if let Some(j) = carry {
            let _ = j.reply.send(Err(JobError::Failed("the server is shutting down".into())));
        }
        for (_, reply) in self.waiting.drain() {
            let _ = reply.send(Err(JobError::Failed("the server is shutting down before the write was applied".into())));
        }
        if let Some(store) = self.store.as_mut() {
            store.finish();
        }
    }

    fn serve(&mut self, rx: &Receiver<Job>, carry: &mut Option<Job>, pending: &mut VecDeque<Chunked>) {
        while !self.status.stopping() {
            let first = match carry.take() {
                Some(j) => Some(j),
                // Idle: block, but wake often enough to apply the store's changes promptly
                // (a shared store's writes from other replicas) and to notice a shutdown.
                None if pending.is_empty() => match rx.recv_timeout(IDLE_WAKE) {
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
                let batch = collect(first, rx, self.limits, carry);
                self.process(batch, pending);
            }
            self.advance_one(pending);
            self.sync_store();
        }
    }

    fn process(&mut self, batch: Vec<Job>, pending: &mut VecDeque<Chunked>) {
        let now = Instant::now();
        metrics::histogram!(m::BATCH_SIZE).record(batch.len() as f64);
        let (live, dead): (Vec<Job>, Vec<Job>) = batch.into_iter().partition(|j| j.alive(now));
        for j in dead {
            let _ = j.reply.send(Err(JobError::Timeout));
        }
        for j in &live {
            metrics::histogram!(m::STAGE_SECONDS, "stage" => "queue").record((now - j.enqueued).as_secs_f64());
        }
        // Reads first, all against the pool as it is; then the writes, in arrival order, each
        // whole: no ranking sees half of one.
        let (reads, writes): (Vec<Job>, Vec<Job>) =
            live.into_iter().partition(|j| matches!(j.work, Work::Rank { .. } | Work::Encode { .. }));
        let works: Vec<&Work> = reads.iter().map(|j| &j.work).collect();
        let mut steps = guarded(|| self.run_batch(&works), reads.len());
        let mut jobs = reads;
        for j in writes {
            steps.push(self.write(&j.work));
            jobs.push(j);
        }
        for (j, step) in jobs.into_iter().zip(steps) {
            match step {
                Step::Done(out) => {
                    let _ = j.reply.send(out);
                }
                // Large work that cannot finish inside its deadline behind what already waits
                // is refused (429, retry later) rather than queued to time out.
                Step::Chunked(state) if !self.can_finish(pending, &state, j.deadline) => {
                    let _ = j.reply.send(Err(JobError::Overloaded));
                }
                Step::Chunked(state) => pending.push_back(state.with_job(j)),
                Step::Submitted(ticket) => {
                    self.waiting.insert(ticket, j.reply);
                }
            }
        }
    }

    /// Whether `new`, queued behind `pending` (first in, first finished), would be done by
    /// `deadline` at the encoding rate measured so far (unknown at first: then yes).
    fn can_finish(&self, pending: &VecDeque<Chunked>, new: &Chunked, deadline: Instant) -> bool {
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
    fn advance_one(&mut self, pending: &mut VecDeque<Chunked>) {
        while let Some(mut c) = pending.pop_front() {
            if !c.alive(Instant::now()) {
                c.answer(Err(JobError::Timeout));
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
                Ok(Some(Finished::Output(out))) => c.answer(Ok(out)),
                Ok(Some(Finished::Upsert(cands, vectors))) => {
                    let ticket = self.submit(Op::Upsert(cands, flat(&vectors)));
                    if let Some(job) = c.take_job() {
                        self.waiting.insert(ticket, job.reply);
                    }
                }
                Err(p) => c.answer(Err(JobError::Failed(panic_message(p)))),
            }
            return;
        }
    }
}

impl Worker {
    /// A write or a lookup. Upserts are encoded as chunked work first (between batches, like
    /// any large job) and applied when their last chunk is done.
    fn write(&mut self, work: &Work) -> Step {
        match work {
            Work::Upsert { candidates, texts } => Step::Chunked(Chunked::new(TextKind::Candidate, texts.clone(), Then::Upsert(candidates.clone()))),
            Work::Delete { ids } => Step::Submitted(self.submit(Op::Delete(ids.clone()))),
            Work::Get { id } => Step::Done(Ok(Output::Found(self.pool.row(id).map(|r| self.pool.candidate(r).clone())))),
            Work::Rank { .. } | Work::Encode { .. } => Step::Done(Err(JobError::Failed("a read reached the write path".into()))),
        }
    }

    /// Sends a write to the store; the returned ticket comes back with its outcome.
    fn submit(&mut self, op: Op) -> u64 {
        self.next_ticket += 1;
        self.store.as_mut().expect("the store").submit(op, self.next_ticket);
        self.next_ticket
    }

    /// Applies what the store has, in its order — own writes (answering their clients) and,
    /// with a shared store, other replicas' — between batches: a ranking sees a change
    /// wholly or not at all.
    fn sync_store(&mut self) {
        let store = self.store.as_mut().expect("the store");
        let events = store.poll();
        self.status.set_store_health(store.health());
        if events.is_empty() {
            return;
        }
        // Answered only once the pool's size, digest, index and applied seq are published: a
        // client that reads /info after its write's answer sees the write.
        let mut answers = Vec::new();
        for event in events {
            match event {
                Event::Failed { ticket, error } => answers.push((ticket, Err(store_error(error)))),
                Event::Apply(Change { seq, op, ticket }) => {
                    // Applying a change twice is harmless, but the pool never goes back.
                    if seq <= self.applied {
                        if let Some(t) = ticket {
                            answers.push((t, Ok(Output::Written { missing: Vec::new(), pool_size: self.pool.len(), seq })));
                        }
                        continue;
                    }
                    let out = match self.with_vectors(seq, op) {
                        Ok(op) => {
                            let (kind, n) = match &op {
                                Op::Upsert(c, _) => ("upsert", c.len()),
                                Op::Delete(ids) => ("delete", ids.len()),
                            };
                            let missing = op.apply(&mut self.pool);
                            metrics::counter!(m::WRITES, "op" => kind).increment((n - missing.len()) as u64);
                            Ok(Output::Written { missing, pool_size: self.pool.len(), seq })
                        }
                        Err(e) => {
                            tracing::error!(seq, "a change could not be applied: {e}");
                            Err(JobError::Failed(e))
                        }
                    };
                    self.applied = seq;
                    if let Some(t) = ticket {
                        answers.push((t, out));
                    }
                }
            }
        }
        self.store.as_mut().expect("the store").applied(&self.pool);
        self.publish_pool();
        self.status.set_applied(self.applied);
        for (ticket, out) in answers {
            self.answer(ticket, out);
        }
    }

    /// An upsert that came without this model's vectors (written by a replica running other
    /// weights) gets them here, and the store keeps them for peers running this model.
    fn with_vectors(&mut self, seq: u64, op: Op) -> Result<Op, String> {
        match op {
            Op::Upsert(cands, v) if v.is_empty() && !cands.is_empty() => {
                let texts: Vec<String> = cands.iter().map(|c| c.text.clone()).collect();
                let ranker = &self.ranker;
                let bs = self.config.encode_batch_size;
                let encoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let enc = ranker.tokenize(&texts, TextKind::Candidate)?;
                    Ok::<_, String>(flat(&ranker.candidate_vectors(&enc, bs)))
                }))
                .map_err(panic_message)??;
                let ids = cands.iter().map(|c| c.id.clone()).collect();
                self.store.as_mut().expect("the store").keep_vectors(seq, ids, encoded.clone());
                Ok(Op::Upsert(cands, encoded))
            }
            op => Ok(op),
        }
    }

    fn answer(&mut self, ticket: u64, out: Reply) {
        if let Some(reply) = self.waiting.remove(&ticket) {
            let _ = reply.send(out);
        }
    }

    /// The pool's size and digest where /info and the metrics read them.
    fn publish_pool(&self) {
        metrics::gauge!(m::POOL_SIZE).set(self.pool.len() as f64);
        self.status.set_pool_size(self.pool.len());
        self.status.set_pool_digest(self.pool.digest());
        self.status.set_index(self.pool.index_stats());
    }
}

/// How long the idle inference thread sleeps between looks at the store: a bound on how late
/// another replica's write is applied here (it costs a wake-up, not a query: the store's
/// own thread follows the database). Measured: an idle server used 0.01 s of CPU in 10 s.
const IDLE_WAKE: Duration = Duration::from_millis(20);

fn store_error(e: StoreError) -> JobError {
    match e {
        StoreError::Unavailable(m) => JobError::StoreUnavailable(format!("the shared store is unavailable ({m})")),
        StoreError::Failed(m) => JobError::Failed(format!("the write was not stored: {m}")),
    }
}

/// Runs `f`, turning a panic (tch turns libtorch exceptions into panics) into a failed
/// answer for each of the `n` jobs: one bad batch must not take the thread.
fn guarded(f: impl FnOnce() -> Vec<Step>, n: usize) -> Vec<Step> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = panic_message(p);
        tracing::error!("batch failed: {msg}");
        (0..n).map(|_| Step::Done(Err(JobError::Failed(msg.clone())))).collect()
    })
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic in libtorch".into())
}

//! The inference thread: the only thread that calls libtorch while serving. It owns the
//! model and the pool; its loop takes a batch off the queue, hands the reads to `read::run`
//! and the writes to the store (`writer.rs`), advances one chunk of large work
//! (`chunked.rs`) and applies what the store has — then again.

use super::chunked::{Backlog, Chunked, Encoded, Then};
use super::guard::caught;
use super::messages::{Hit, JobError, Vectors};
use super::queue::{collect, BatchLimits, Job, ReadJob, Ticket, WriteJob};
use super::ranker::Ranker;
use super::read::{self, EncodeWork, Outcome, RankWork};
use super::status::Status;
use super::writer::Writer;
use super::startup;
use crate::config::{num_cpus, Config};
use crate::metrics as m;
use crate::pool::live::LivePool;
use crate::pool::store::{flat, Durable, Op};
use crate::text::Tokenizer;
use anyhow::{Context, Result};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the idle inference thread sleeps between looks at the store: a bound on how late
/// another replica's write is applied here (it costs a wake-up, not a query: the store's
/// own thread follows the database). Measured: an idle server used 0.01 s of CPU in 10 s.
const IDLE_WAKE: Duration = Duration::from_millis(20);

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
/// this waits for the load), then opens the pool and starts answering.
///
/// Every libtorch call happens on that one thread. Measured on 2 cores: once a second thread
/// has used libtorch (each thread gets its own OpenMP team), the inference thread's GEMM at
/// N = 100k took 44 ms instead of 36 ms and a context encoding 9 ms instead of 5 ms.
pub(super) fn spawn(config: &Config, settings: crate::model::format::PolySettings, tokenizer: Arc<Tokenizer>, rx: Receiver<Job>, status: Arc<Status>, store: Box<dyn Durable>) -> Result<Inference> {
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
        let ranker = match Ranker::load_with(config.model_dir(), settings, tokenizer, device, config.dtype.kind()) {
            Ok(r) => r,
            Err(e) => {
                let _ = loaded_tx.send(Err(anyhow::Error::new(e).context(format!("loading model {}", config.model_dir().display()))));
                return;
            }
        };
        thread_status.set_info(super::status::ModelInfo::of(&ranker, &config));
        let _ = loaded_tx.send(Ok(()));
        run(ranker, config, thread_status, store, rx)
    })?;
    loaded_rx.recv().context("the inference thread ended during the model load")??;
    Ok(Inference { thread: Some(thread), status })
}

/// The thread's life: open the pool, serve until stopped, answer whoever still waits.
fn run(ranker: Ranker, config: Config, status: Arc<Status>, mut store: Box<dyn Durable>, rx: Receiver<Job>) {
    let _guard = tch::no_grad_guard();
    let opened = match startup::open_pool(&ranker, &config, &status, store.as_mut()) {
        Ok(o) => o,
        Err(_) if status.stopping() => return,
        Err(e) => {
            tracing::error!("pool encoding failed: {e:#}");
            status.set_failure(format!("{e:#}"));
            return;
        }
    };
    status.set_applied(opened.seq);
    publish(&status, &opened.pool);
    status.set_store_health(store.health());
    status.set_ready();
    tracing::info!(candidates = opened.pool.len(), "ready");
    if let Some(cache) = opened.cache {
        cache.clean(config.cache_keep);
    }
    let pool = startup::settle_precision(&ranker, &config, &status, opened.pool);
    let limits = BatchLimits {
        max_batch_size: config.max_batch_size,
        max_batch_tokens: config.max_batch_tokens,
        max_wait: Duration::from_millis(config.max_wait_ms),
    };
    let mut worker = Worker { ranker, config, status, pool, writer: Writer::new(store, opened.seq), backlog: Backlog::default(), limits };
    let carry = worker.serve(&rx);
    // Stopping: whoever still waits gets an answer rather than a dropped channel.
    const STOPPING: &str = "the server is shutting down";
    worker.backlog.fail_all(STOPPING);
    if let Some(j) = carry {
        j.fail(JobError::Failed(STOPPING.into()));
    }
    worker.writer.finish();
}

struct Worker {
    ranker: Ranker,
    config: Config,
    status: Arc<Status>,
    /// The candidates and their vectors (on the model's device).
    pool: LivePool,
    writer: Writer,
    backlog: Backlog,
    limits: BatchLimits,
}

impl Worker {
    /// Until stopped; returns a job taken off the queue but not yet run.
    fn serve(&mut self, rx: &Receiver<Job>) -> Option<Job> {
        let mut carry: Option<Job> = None;
        while !self.status.stopping() {
            let first = match carry.take() {
                Some(j) => Some(j),
                // Idle: block, but wake often enough to apply the store's changes promptly
                // (a shared store's writes from other replicas) and to notice a shutdown.
                None if self.backlog.is_empty() => match rx.recv_timeout(IDLE_WAKE) {
                    Ok(j) => Some(j),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break, // the server has shut down
                },
                // Chunked work waits: take only what is already queued.
                None => match rx.try_recv() {
                    Ok(j) => Some(j),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                },
            };
            if let Some(first) = first {
                let batch = collect(first, rx, self.limits, &mut carry);
                self.process(batch);
            }
            if let Some(Encoded(ticket, vectors)) = self.backlog.advance_one(&self.ranker, self.config.encode_batch_size) {
                let op = Op::Upsert(ticket.work.candidates, flat(&vectors));
                self.writer.submit(op, ticket.reply);
            }
            self.sync_store();
        }
        carry
    }

    /// Reads first, all against the pool as it is; then the writes, in arrival order, each
    /// whole: no ranking sees half of one.
    fn process(&mut self, batch: Vec<Job>) {
        let now = Instant::now();
        metrics::histogram!(m::BATCH_SIZE).record(batch.len() as f64);
        let (mut ranks, mut encodes, mut writes) = (Vec::new(), Vec::new(), Vec::new());
        for job in batch {
            if !job.alive(now) {
                job.fail(JobError::Timeout);
                continue;
            }
            metrics::histogram!(m::STAGE_SECONDS, "stage" => "queue").record((now - job.enqueued()).as_secs_f64());
            match job {
                Job::Read(ReadJob::Rank(t)) => ranks.push(t),
                Job::Read(ReadJob::Encode(t)) => encodes.push(t),
                Job::Read(ReadJob::Get(t)) => {
                    let found = read::get(&self.pool, &t.work);
                    t.answer(Ok(found));
                }
                Job::Write(w) => writes.push(w),
            }
        }
        if !ranks.is_empty() || !encodes.is_empty() {
            self.reads(ranks, encodes);
        }
        for w in writes {
            match w {
                // Encoded as chunked work first (between batches, like any large job), sent
                // to the store when its last chunk is done.
                WriteJob::Upsert(t) => {
                    let deadline = t.deadline;
                    self.backlog.admit(Chunked::new(Then::Upsert(t)), deadline);
                }
                WriteJob::Delete(t) => self.writer.submit(Op::Delete(t.work), t.reply),
            }
        }
    }

    fn reads(&mut self, ranks: Vec<Ticket<RankWork, Vec<Hit>>>, encodes: Vec<Ticket<EncodeWork, Vectors>>) {
        let rank_work: Vec<&RankWork> = ranks.iter().map(|t| &t.work).collect();
        let encode_work: Vec<&EncodeWork> = encodes.iter().map(|t| &t.work).collect();
        let encode_batch = self.config.max_batch_size.max(1) * 8;
        // One bad batch must not take the thread: a panic (tch turns libtorch exceptions into
        // panics) fails each of its reads.
        let answers = caught(|| read::run(&self.ranker, &self.pool, &rank_work, &encode_work, encode_batch)).unwrap_or_else(|msg| {
            tracing::error!("batch failed: {msg}");
            read::Answers::failed(ranks.len(), encodes.len(), &msg)
        });
        for (t, out) in ranks.into_iter().zip(answers.ranks) {
            match out {
                Outcome::Done(r) => t.answer(r),
                Outcome::Later(codes) => {
                    let deadline = t.deadline;
                    self.backlog.admit(Chunked::new(Then::Rank(t, codes)), deadline);
                }
            }
        }
        for (t, out) in encodes.into_iter().zip(answers.encodes) {
            match out {
                Outcome::Done(r) => t.answer(r),
                Outcome::Later(()) => {
                    let deadline = t.deadline;
                    self.backlog.admit(Chunked::new(Then::Vectors(t)), deadline);
                }
            }
        }
    }

    /// Applies the store's changes; answers their writers once the pool is published.
    fn sync_store(&mut self) {
        let synced = self.writer.sync(&mut self.pool, &self.ranker, self.config.encode_batch_size);
        self.status.set_store_health(self.writer.store().health());
        if let Some(synced) = synced {
            publish(&self.status, &self.pool);
            self.status.set_applied(self.writer.applied());
            synced.answer();
        }
    }
}

/// The pool's size, digest and index where /info and the metrics read them.
fn publish(status: &Status, pool: &LivePool) {
    metrics::gauge!(m::POOL_SIZE).set(pool.len() as f64);
    status.set_pool_size(pool.len());
    status.set_pool_digest(pool.digest());
    status.set_index(pool.index_stats());
}

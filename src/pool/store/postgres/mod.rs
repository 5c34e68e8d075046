//! `PgStore`: the live pool shared by every replica through PostgreSQL (`store_url`).
//!
//! Each replica keeps the whole pool in memory, as with the local store, and follows the
//! database's order of changes (`seq`, one counter row updated by every write transaction, so
//! changes become visible strictly in `seq` order — see `migrations/`). A write is encoded by
//! the replica that takes it, committed in one transaction (candidates, this model's vectors,
//! the change record, a NOTIFY), and answered once this replica has applied it. Every replica
//! applies every change — its own and the others' — in `seq` order, between ranking batches.
//!
//! Threads: the inference thread calls `Durable` (never waits on the network once open); a
//! small tokio runtime of the store's own runs two tasks, each on its own connection: the
//! writer (commits, one at a time) and the follower (LISTEN, then reads changes after the
//! last one delivered; a poll every `POLL` catches a missed notification). Either reconnects
//! with backoff; the follower catches up from the last `seq` it delivered.

mod sql;

use super::{Durable, Encoder, Event, Op, StoreError, StoreHealth};
use crate::pool::live::LivePool;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often the follower looks for changes when no notification came (a notification can be
/// missed across a reconnect): bounds the lag at 100 writes/s well under a second.
const POLL: Duration = Duration::from_millis(250);
/// Longest wait for one statement before the connection is taken as lost.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

pub struct PgStore {
    config: tokio_postgres::Config,
    /// host:port/db, without credentials: what the logs and /info may show.
    target: String,
    runtime: tokio::runtime::Runtime,
    writes: Option<mpsc::UnboundedSender<Cmd>>,
    events_tx: std_mpsc::Sender<Event>,
    events: std_mpsc::Receiver<Event>,
    health: Arc<Health>,
    /// This process among the replicas: its writes' `origin` is `instance:ticket`.
    instance: String,
}

/// What the writer task is asked to do.
enum Cmd {
    Write { op: Op, ticket: u64 },
    /// Vectors this replica encoded for a change written by a replica with other weights.
    Vectors { seq: u64, ids: Vec<String>, vectors: Vec<f32> },
}

#[derive(Default)]
struct Health {
    /// The highest seq seen in a notification or a read of the changes.
    heard: AtomicU64,
    connected: AtomicBool,
    caught_up: AtomicBool,
    last_caught_up: Mutex<Option<Instant>>,
}

impl Health {
    fn caught_up_now(&self) {
        *self.last_caught_up.lock().unwrap() = Some(Instant::now());
        self.caught_up.store(true, Ordering::Release);
        self.connected.store(true, Ordering::Release);
    }
    fn heard(&self, seq: u64) {
        self.heard.fetch_max(seq, Ordering::AcqRel);
    }
    fn lost(&self) {
        self.connected.store(false, Ordering::Release);
        self.caught_up.store(false, Ordering::Release);
    }
}

/// host:port/dbname of a connection string, never its password.
pub fn describe(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(h, p)| match h {
            Host::Tcp(h) => format!("{h}:{p}"),
            Host::Unix(path) => format!("{}:{p}", path.display()),
        })
        .collect();
    format!("{}/{}", hosts.join(","), config.get_dbname().unwrap_or("(default database)"))
}

impl PgStore {
    /// Parses the URL (a bad one is an error here, at start) and starts the store's runtime;
    /// connecting happens in `open`, on the inference thread, with progress in readiness.
    pub fn new(url: &str) -> Result<PgStore> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| anyhow::anyhow!("store_url is not a valid PostgreSQL connection string: {e}"))?;
        anyhow::ensure!(!config.get_hosts().is_empty(), "store_url names no host");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("store")
            .enable_all()
            .build()
            .context("starting the store's runtime")?;
        let (events_tx, events) = std_mpsc::channel();
        let target = describe(&config);
        let instance = format!("{:016x}", rand::random::<u64>());
        Ok(PgStore { config, target, runtime, writes: None, events_tx, events, health: Default::default(), instance })
    }
}

/// A database error with the server's own message (tokio-postgres shows "db error" alone).
pub(super) fn describe_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {}", d.severity(), d.message()),
        None => match std::error::Error::source(e) {
            Some(s) => format!("{e}: {s}"),
            None => e.to_string(),
        },
    }
}

/// Whether a database error means "cannot reach it now" (retry later) rather than "this
/// statement is wrong": I/O errors carry no SQLSTATE; class 08 is a connection exception,
/// 57 an operator intervention (shutdown, recovery).
fn unreachable(e: &tokio_postgres::Error) -> bool {
    e.is_closed() || e.code().is_none_or(|c| c.code().starts_with("08") || c.code().starts_with("57"))
}

async fn connect(config: &tokio_postgres::Config) -> Result<(tokio_postgres::Client, tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>), tokio_postgres::Error> {
    config.connect(tokio_postgres::NoTls).await
}

/// A client whose connection is driven on the current runtime.
async fn connect_driven(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = connect(config).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

impl Durable for PgStore {
    fn open(&mut self, files: &[PathBuf], key: &str, enc: &mut dyn Encoder) -> Result<(LivePool, u64)> {
        let (config, target) = (self.config.clone(), self.target.clone());
        let (pool, seq, client) = self.runtime.block_on(async {
            // Unreachable: wait for it (readiness says so); refused (password, database
            // name): that will not change by waiting, stop here.
            let mut attempt = 0u32;
            let mut client = loop {
                attempt += 1;
                match tokio::time::timeout(STATEMENT_TIMEOUT, connect_driven(&config)).await {
                    Ok(Ok(c)) => break c,
                    Ok(Err(e)) if !unreachable(&e) => anyhow::bail!("the store at {target} refused the connection: {}", describe_error(&e)),
                    Ok(Err(e)) => enc.phase(&format!("connecting to the store at {target} (attempt {attempt}): {}", describe_error(&e))),
                    Err(_) => enc.phase(&format!("connecting to the store at {target} (attempt {attempt}): timed out")),
                }
                anyhow::ensure!(!enc.stopping(), "stopped while connecting to the store");
                tokio::time::sleep(Duration::from_millis(500)).await;
            };
            sql::migrate(&mut client).await.with_context(|| format!("migrating the store's schema at {target}"))?;
            let opened = sql::open_locked(&mut client, files, key, enc).await?;
            Ok((opened.0, opened.1, client))
        })?;
        self.health.caught_up_now();
        self.health.heard(seq);
        tracing::info!(store = %self.target, candidates = pool.len(), seq, "shared store open");
        // The writer keeps the opening connection; the follower opens its own.
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (wrote_tx, wrote_rx) = mpsc::unbounded_channel();
        let (key, instance) = (key.to_string(), self.instance.clone());
        self.runtime.spawn(writer(self.config.clone(), key.clone(), instance.clone(), client, cmd_rx, wrote_tx, self.events_tx.clone()));
        self.runtime.spawn(follower(self.config.clone(), key, instance, seq, wrote_rx, self.events_tx.clone(), self.health.clone()));
        self.writes = Some(cmd_tx);
        Ok((pool, seq))
    }

    fn submit(&mut self, op: Op, ticket: u64) {
        let sent = self.writes.as_ref().is_some_and(|w| w.send(Cmd::Write { op, ticket }).is_ok());
        if !sent {
            let _ = self.events_tx.send(Event::Failed { ticket, error: StoreError::Failed("the store is not open".into()) });
        }
    }

    fn poll(&mut self) -> Vec<Event> {
        self.events.try_iter().collect()
    }

    fn keep_vectors(&mut self, seq: u64, ids: Vec<String>, vectors: Vec<f32>) {
        if let Some(w) = &self.writes {
            let _ = w.send(Cmd::Vectors { seq, ids, vectors });
        }
    }

    fn health(&self) -> StoreHealth {
        let h = &self.health;
        let connected = h.connected.load(Ordering::Acquire);
        let lag_seconds = if connected && h.caught_up.load(Ordering::Acquire) {
            0.0
        } else {
            h.last_caught_up.lock().unwrap().map_or(0.0, |t| t.elapsed().as_secs_f64())
        };
        StoreHealth { kind: "postgres", connected, lag_seconds, head_seq: h.heard.load(Ordering::Acquire) }
    }

    fn finish(&mut self) {
        self.writes = None;
    }
}

/// Commits writes one at a time on its own connection; reconnects when it is lost. A write
/// that cannot be committed is answered at once (503 while the database is unreachable);
/// a committed one reaches this replica like any other change, through the follower (which
/// is woken at once), and is answered when applied.
async fn writer(
    config: tokio_postgres::Config,
    key: String,
    instance: String,
    client: tokio_postgres::Client,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    wrote: mpsc::UnboundedSender<()>,
    events: std_mpsc::Sender<Event>,
) {
    let mut client = Some(client);
    while let Some(cmd) = cmds.recv().await {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = match tokio::time::timeout(STATEMENT_TIMEOUT, connect_driven(&config)).await {
                Ok(Ok(c)) => Some(c),
                Ok(Err(e)) => {
                    refuse(cmd, &events, format!("cannot connect to the database: {}", describe_error(&e)));
                    continue;
                }
                Err(_) => {
                    refuse(cmd, &events, "connecting to the database timed out".into());
                    continue;
                }
            };
        }
        let c = client.as_mut().expect("connected above");
        match cmd {
            Cmd::Write { op, ticket } => match tokio::time::timeout(STATEMENT_TIMEOUT, sql::commit(c, &key, &op, &format!("{instance}:{ticket}"), None)).await {
                Ok(Ok(_)) => {
                    let _ = wrote.send(());
                }
                Ok(Err(e)) if unreachable(&e) => {
                    client = None;
                    let _ = events.send(Event::Failed { ticket, error: StoreError::Unavailable(format!("the database connection failed: {}", describe_error(&e))) });
                }
                Ok(Err(e)) => {
                    let _ = events.send(Event::Failed { ticket, error: StoreError::Failed(describe_error(&e)) });
                }
                Err(_) => {
                    // Whether it committed is unknown: not acknowledged. If it did, every
                    // replica applies it, this one too.
                    client = None;
                    let _ = events.send(Event::Failed { ticket, error: StoreError::Unavailable("the commit timed out".into()) });
                }
            },
            Cmd::Vectors { seq, ids, vectors } => {
                let seqs = vec![seq; ids.len()];
                match tokio::time::timeout(STATEMENT_TIMEOUT, sql::keep_vectors(c, &key, Some(seq), &ids, &seqs, &vectors)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(seq, "vectors for another model's write not kept: {}", describe_error(&e)),
                    Err(_) => tracing::warn!(seq, "vectors for another model's write not kept: timed out"),
                }
            }
        }
    }
}

fn refuse(cmd: Cmd, events: &std_mpsc::Sender<Event>, why: String) {
    if let Cmd::Write { ticket, .. } = cmd {
        let _ = events.send(Event::Failed { ticket, error: StoreError::Unavailable(why) });
    }
}

/// Delivers every change after `from`, in `seq` order, once: woken by NOTIFY (and by this
/// replica's own commits), with a poll every `POLL` in case a notification was missed.
async fn follower(
    config: tokio_postgres::Config,
    key: String,
    instance: String,
    from: u64,
    mut wrote: mpsc::UnboundedReceiver<()>,
    events: std_mpsc::Sender<Event>,
    health: Arc<Health>,
) {
    let mut delivered = from;
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = tokio::time::timeout(STATEMENT_TIMEOUT, connect(&config)).await;
        let (client, mut conn) = match connected {
            Ok(Ok(pair)) => pair,
            _ => {
                health.lost();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let (wake_tx, mut wake) = mpsc::unbounded_channel::<()>();
        let heard = health.clone();
        let driver = tokio::spawn(async move {
            use futures_util::StreamExt;
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(m) = messages.next().await {
                match m {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        if let Ok(seq) = n.payload().parse::<u64>() {
                            heard.heard(seq);
                        }
                        let _ = wake_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        if client.batch_execute("LISTEN polyrank_changes").await.is_err() {
            driver.abort();
            health.lost();
            tokio::time::sleep(backoff).await;
            continue;
        }
        backoff = Duration::from_millis(100);
        tracing::info!(from = delivered, "following the shared store");
        loop {
            match tokio::time::timeout(STATEMENT_TIMEOUT, sql::changes_after(&client, &key, delivered, &instance)).await {
                Ok(Ok((changes, whole))) => {
                    for c in changes {
                        delivered = c.seq;
                        health.heard(c.seq);
                        if events.send(Event::Apply(c)).is_err() {
                            return;
                        }
                    }
                    if !whole {
                        continue;
                    }
                    health.caught_up_now();
                }
                Ok(Err(e)) => {
                    tracing::warn!("lost the store's change feed, reconnecting: {}", describe_error(&e));
                    break;
                }
                Err(_) => {
                    tracing::warn!("the store's change feed timed out, reconnecting");
                    break;
                }
            }
            tokio::select! {
                _ = wake.recv() => {}
                w = wrote.recv() => if w.is_none() { return },
                _ = tokio::time::sleep(POLL) => {}
            }
            // Several wake-ups are one look.
            while wake.try_recv().is_ok() {}
        }
        health.lost();
        driver.abort();
    }
}

//! `FileStore`: the live pool kept in this replica's own files (`store_dir`): a snapshot and
//! a write-ahead log (`file.rs`). A write is durable when `submit` returns, and comes back
//! from the next `poll` at once; the log is folded into a new snapshot once it is large.
//!
//! Opening: the snapshot and log replayed; on a first start the pool files seed it; when
//! the model changed, every candidate is encoded again; when the pool files changed, their
//! new or changed candidates are upserted. Whatever changed is written as a new snapshot
//! before the pool serves.

use super::file::Files;
use super::{changed_in_files, from_files, seed_hash, Change, Durable, Encoder, Event, Op, Snapshot, SnapshotHeader, StoreError, StoreHealth};
use crate::metrics as m;
use crate::pool::live::LivePool;
use crate::pool::Pool;
use anyhow::Result;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use tch::Tensor;

pub struct FileStore {
    dir: PathBuf,
    /// Opened (and the directory locked) by `open`, on the inference thread: a store in use
    /// by another process fails the start there, reported by readiness like any damage.
    files: Option<Files>,
    /// The last sequence number written.
    seq: u64,
    vectors_key: String,
    seed_hash: String,
    compact_bytes: u64,
    /// Written, not yet handed to the pool.
    ready: VecDeque<Event>,
}

impl FileStore {
    /// The store in `dir`; `open` takes the directory's lock (one process per `store_dir`).
    pub fn open_dir(dir: &Path, compact_bytes: u64) -> Result<FileStore> {
        Ok(FileStore {
            dir: dir.to_path_buf(),
            files: None,
            seq: 0,
            vectors_key: String::new(),
            seed_hash: String::new(),
            compact_bytes,
            ready: VecDeque::new(),
        })
    }

    /// Only called once `open` has succeeded (the worker never writes before).
    fn files_mut(&mut self) -> &mut Files {
        self.files.as_mut().expect("the store is open")
    }

    fn log_bytes(&self) -> u64 {
        self.files.as_ref().map_or(0, |f| f.log_bytes())
    }

    fn snapshot_of(&self, pool: &LivePool) -> Snapshot {
        Snapshot {
            header: SnapshotHeader {
                version: 1,
                vectors_key: self.vectors_key.clone(),
                seed_hash: self.seed_hash.clone(),
                last_seq: self.seq,
                n: pool.len(),
                d: pool.dim() as usize,
            },
            candidates: pool.candidates().to_vec(),
            vectors: pool.vectors_f32(),
        }
    }
}

impl Durable for FileStore {
    fn open(&mut self, files: &[PathBuf], key: &str, enc: &mut dyn Encoder) -> Result<(LivePool, u64)> {
        self.vectors_key = key.to_string();
        self.seed_hash = seed_hash(files)?;
        let (snapshot, logs) = self.files.insert(Files::open(&self.dir)?).recover()?;
        let header = snapshot.as_ref().map(|s| s.header.clone());
        let (mut pool, last_seq, mut changed) = match snapshot {
            None => {
                let seed = Pool::load(files)?;
                let v = enc.seed(&seed)?;
                tracing::info!(candidates = seed.len(), "seeding the store from the pool files");
                (enc.pool(from_files(seed), v), 0, true)
            }
            Some(s) => {
                let h = &s.header;
                anyhow::ensure!(h.d as i64 == enc.dim() || h.vectors_key != key, "the store's snapshot holds {}-d vectors for this model", h.d);
                let v = Tensor::from_slice(&s.vectors).view([h.n as i64, h.d as i64]);
                // Moved, not cloned: 100k candidates' texts and meta.
                (enc.pool(s.candidates, v), h.last_seq, false)
            }
        };
        let mut seq = last_seq;
        let mut replayed = 0usize;
        for (s, op) in logs {
            if s <= last_seq {
                continue;
            }
            op.apply(&mut pool);
            seq = s;
            replayed += 1;
        }
        if replayed > 0 {
            tracing::info!(writes = replayed, candidates = pool.len(), "store log replayed");
        }
        if header.as_ref().is_some_and(|h| h.vectors_key != key) {
            tracing::warn!("the model changed since the store was written: encoding every candidate again");
            let cands = pool.candidates().to_vec();
            let texts: Vec<String> = cands.iter().map(|c| c.text.clone()).collect();
            let v = enc.encode(&texts)?;
            pool = enc.pool(cands, v);
            changed = true;
        }
        if header.as_ref().is_some_and(|h| h.seed_hash != self.seed_hash) {
            let (upserts, v) = changed_in_files(files, &pool, enc)?;
            pool.upsert(upserts, &v);
            changed = true;
        }
        self.seq = seq;
        // A replayed log stays a log (the next compaction folds it in): a restart does not
        // rewrite the whole snapshot. A re-encoded or re-seeded pool is written at once.
        if changed {
            let snap = self.snapshot_of(&pool);
            self.files_mut().reset(&snap)?;
            compacted();
            tracing::info!(candidates = pool.len(), log_writes = replayed, "store open");
            return Ok((pool, seq));
        }
        metrics::gauge!(m::STORE_LOG_BYTES).set(self.log_bytes() as f64);
        tracing::info!(candidates = pool.len(), log_writes = replayed, "store open");
        Ok((pool, seq))
    }

    fn submit(&mut self, op: Op, ticket: u64) {
        let next = self.seq + 1;
        match self.files_mut().append(next, &op) {
            Ok(()) => {
                self.seq += 1;
                metrics::gauge!(m::STORE_LOG_BYTES).set(self.log_bytes() as f64);
                self.ready.push_back(Event::Apply(Change { seq: self.seq, op, ticket: Some(ticket) }));
            }
            Err(e) => self.ready.push_back(Event::Failed { ticket, error: StoreError::Failed(format!("{e:#}")) }),
        }
    }

    fn poll(&mut self) -> Vec<Event> {
        self.ready.drain(..).collect()
    }

    fn applied(&mut self, pool: &LivePool) {
        if self.log_bytes() < self.compact_bytes {
            return;
        }
        // The copy of the pool is taken here, between batches, so it is consistent.
        let snap = self.snapshot_of(pool);
        if let Err(e) = self.files_mut().compact(snap, Box::new(compacted)) {
            tracing::warn!("store compaction not started: {e:#}");
        }
        metrics::gauge!(m::STORE_LOG_BYTES).set(self.log_bytes() as f64);
    }

    fn health(&self) -> StoreHealth {
        StoreHealth { kind: "local", connected: true, lag_seconds: 0.0, head_seq: self.seq }
    }

    fn finish(&mut self) {
        if let Some(f) = self.files.as_mut() {
            f.finish();
        }
    }
}

fn compacted() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    metrics::gauge!(m::STORE_LAST_COMPACTION).set(now);
    metrics::counter!(m::STORE_COMPACTIONS).increment(1);
}

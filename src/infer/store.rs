//! The inference thread's side of the durable store: it logs each write before applying it,
//! and compacts the log into a snapshot on a background thread once the log is large.

use crate::metrics as m;
use crate::pool::live::LivePool;
use crate::pool::store::{write_snapshot, Op, Snapshot, SnapshotHeader, Wal, OLD_WAL_FILE, WAL_FILE};
use anyhow::Result;
use std::path::PathBuf;
use std::thread::JoinHandle;

pub(super) struct Store {
    dir: PathBuf,
    wal: Wal,
    /// The last sequence number written.
    seq: u64,
    vectors_key: String,
    seed_hash: String,
    compact_bytes: u64,
    compaction: Option<JoinHandle<Result<()>>>,
}

impl Store {
    pub(super) fn new(dir: PathBuf, vectors_key: String, seed_hash: String, seq: u64, compact_bytes: u64) -> Result<Store> {
        let wal = Wal::open(&dir)?;
        metrics::gauge!(m::STORE_LOG_BYTES).set(wal.bytes as f64);
        Ok(Store { dir, wal, seq, vectors_key, seed_hash, compact_bytes, compaction: None })
    }

    /// Logs `op` durably, then applies it to `pool`; returns the ids a delete did not find.
    pub(super) fn write(&mut self, pool: &mut LivePool, op: Op) -> Result<Vec<String>> {
        self.wal.append(self.seq + 1, &op)?;
        self.seq += 1;
        metrics::gauge!(m::STORE_LOG_BYTES).set(self.wal.bytes as f64);
        let missing = match op {
            Op::Upsert(cands, v) => {
                metrics::counter!(m::WRITES, "op" => "upsert").increment(cands.len() as u64);
                let k = cands.len() as i64;
                pool.upsert(cands, &tch::Tensor::from_slice(&v).view([k, -1]));
                Vec::new()
            }
            Op::Delete(ids) => {
                let missing = pool.delete(&ids);
                metrics::counter!(m::WRITES, "op" => "delete").increment((ids.len() - missing.len()) as u64);
                missing
            }
        };
        metrics::gauge!(m::POOL_SIZE).set(pool.len() as f64);
        if self.wal.bytes >= self.compact_bytes {
            if let Err(e) = self.compact(pool) {
                tracing::warn!("store compaction not started: {e:#}");
            }
        }
        Ok(missing)
    }

    fn snapshot_of(&self, pool: &LivePool) -> Snapshot {
        Snapshot {
            header: SnapshotHeader {
                version: 1,
                vectors_key: self.vectors_key.clone(),
                seed_hash: self.seed_hash.clone(),
                last_seq: self.seq,
                n: pool.len(),
                d: pool.vectors().size()[1] as usize,
            },
            candidates: pool.candidates().to_vec(),
            vectors: pool.vectors_f32(),
        }
    }

    /// At startup: the pool as it is becomes the snapshot, and the logs it covers go.
    pub(super) fn snapshot_now(&mut self, pool: &LivePool) -> Result<()> {
        write_snapshot(&self.dir, &self.snapshot_of(pool))?;
        for f in [OLD_WAL_FILE, WAL_FILE] {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
        self.wal = Wal::open(&self.dir)?;
        metrics::gauge!(m::STORE_LOG_BYTES).set(0.0);
        compacted();
        Ok(())
    }

    /// Rotates the log and writes the snapshot on another thread (the copy of the pool is
    /// taken here, between batches, so it is consistent). One compaction at a time.
    fn compact(&mut self, pool: &LivePool) -> Result<()> {
        if self.compaction.as_ref().is_some_and(|c| !c.is_finished()) {
            return Ok(());
        }
        if let Some(done) = self.compaction.take() {
            if let Ok(Err(e)) = done.join() {
                tracing::warn!("the last store compaction failed: {e:#}");
            }
        }
        // A wal.old left by a failed compaction is covered by this snapshot as well.
        if !self.dir.join(OLD_WAL_FILE).exists() {
            self.wal.rotate(&self.dir)?;
        }
        let snap = self.snapshot_of(pool);
        let dir = self.dir.clone();
        metrics::gauge!(m::STORE_LOG_BYTES).set(self.wal.bytes as f64);
        self.compaction = Some(std::thread::Builder::new().name("compaction".into()).spawn(move || {
            let t0 = std::time::Instant::now();
            write_snapshot(&dir, &snap)?;
            std::fs::remove_file(dir.join(OLD_WAL_FILE))?;
            compacted();
            tracing::info!(candidates = snap.header.n, secs = format!("{:.2}", t0.elapsed().as_secs_f64()), "store compacted");
            Ok(())
        })?);
        Ok(())
    }

    /// Waits for a running compaction (shutdown).
    pub(super) fn finish(&mut self) {
        if let Some(c) = self.compaction.take() {
            if let Ok(Err(e)) = c.join() {
                tracing::warn!("store compaction failed: {e:#}");
            }
        }
    }
}

fn compacted() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    metrics::gauge!(m::STORE_LAST_COMPACTION).set(now);
    metrics::counter!(m::STORE_COMPACTIONS).increment(1);
}

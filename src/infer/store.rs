//! The inference thread's side of the durable store: it logs each write before applying it,
//! and asks for a compaction once the log is large. Which store (`pool::store::Durable`) is
//! decided at startup; today each replica keeps its own files (`FileStore`).

use crate::metrics as m;
use crate::pool::live::LivePool;
use crate::pool::store::{Durable, Op, Snapshot, SnapshotHeader};
use anyhow::Result;

pub(super) struct Store {
    durable: Box<dyn Durable>,
    /// The last sequence number written.
    seq: u64,
    vectors_key: String,
    seed_hash: String,
    compact_bytes: u64,
}

impl Store {
    pub(super) fn new(durable: Box<dyn Durable>, vectors_key: String, seed_hash: String, seq: u64, compact_bytes: u64) -> Store {
        metrics::gauge!(m::STORE_LOG_BYTES).set(durable.log_bytes() as f64);
        Store { durable, seq, vectors_key, seed_hash, compact_bytes }
    }

    /// Logs `op` durably, then applies it to `pool`; returns the ids a delete did not find.
    pub(super) fn write(&mut self, pool: &mut LivePool, op: Op) -> Result<Vec<String>> {
        self.durable.append(self.seq + 1, &op)?;
        self.seq += 1;
        metrics::gauge!(m::STORE_LOG_BYTES).set(self.durable.log_bytes() as f64);
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
        if self.durable.log_bytes() >= self.compact_bytes {
            // The copy of the pool is taken here, between batches, so it is consistent.
            let snap = self.snapshot_of(pool);
            if let Err(e) = self.durable.compact(snap, Box::new(compacted)) {
                tracing::warn!("store compaction not started: {e:#}");
            }
            metrics::gauge!(m::STORE_LOG_BYTES).set(self.durable.log_bytes() as f64);
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
        self.durable.reset(&self.snapshot_of(pool))?;
        metrics::gauge!(m::STORE_LOG_BYTES).set(0.0);
        compacted();
        Ok(())
    }

    /// Waits for a running compaction (shutdown).
    pub(super) fn finish(&mut self) {
        self.durable.finish();
    }
}

fn compacted() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    metrics::gauge!(m::STORE_LAST_COMPACTION).set(now);
    metrics::counter!(m::STORE_COMPACTIONS).increment(1);
}

//! The pool at startup, on the inference thread: the store's snapshot and logs replayed;
//! on a first start the pool files seed it (vectors from the pool cache, or encoded); when
//! the model changed, every candidate is encoded again; when the pool files changed, their
//! new or changed candidates are upserted. Whatever changed is written as a new snapshot
//! before the pool serves.

use super::store::Store;
use super::worker::Worker;
use crate::metrics as m;
use crate::pool::cache::PoolCache;
use crate::pool::live::LivePool;
use crate::pool::store::{seed_hash, vectors_key, Candidate, Durable, FileStore, Op};
use crate::pool::Pool;
use crate::text::TextKind;
use anyhow::Result;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

impl Worker {
    /// The pool, its store, and the pool cache when seeding used it (to be cleaned).
    pub(super) fn open_pool(&self, files: &[PathBuf]) -> Result<(LivePool, Store, Option<PoolCache>)> {
        let mut durable = FileStore::open(&self.config.store_dir)?;
        let key = vectors_key(self.config.model_dir(), &self.ranker.model.settings)?;
        let seed_hash = seed_hash(files)?;
        let (snapshot, logs) = durable.recover()?;
        let d = self.ranker.model.dim();
        let (limits, index_bytes) = (self.config.meta_limits(), self.config.max_meta_index_bytes);
        let mut cache = None;
        let (mut pool, last_seq, mut changed) = match &snapshot {
            None => {
                let seed = Pool::load(files)?;
                self.status.set_total(seed.len());
                let c = PoolCache::new(&self.config.cache_dir, self.config.model_dir(), &self.ranker.model.settings, files)?;
                let v = self.load_pool(&seed, &c)?;
                cache = Some(c);
                tracing::info!(candidates = seed.len(), "seeding the store from the pool files");
                (LivePool::new(from_files(seed), v, limits, index_bytes), 0, true)
            }
            Some(s) => {
                let h = &s.header;
                anyhow::ensure!(h.d as i64 == d || h.vectors_key != key, "the store's snapshot holds {}-d vectors for this model", h.d);
                let v = Tensor::from_slice(&s.vectors).view([h.n as i64, h.d as i64]);
                (LivePool::new(s.candidates.clone(), v, limits, index_bytes), h.last_seq, false)
            }
        };
        let mut seq = last_seq;
        let mut replayed = 0usize;
        for (s, op) in logs {
            if s <= last_seq {
                continue;
            }
            match op {
                Op::Upsert(cands, v) => {
                    let k = cands.len() as i64;
                    pool.upsert(cands, &Tensor::from_slice(&v).view([k, -1]));
                }
                Op::Delete(ids) => {
                    pool.delete(&ids);
                }
            }
            seq = s;
            replayed += 1;
        }
        if replayed > 0 {
            tracing::info!(writes = replayed, candidates = pool.len(), "store log replayed");
        }
        if snapshot.as_ref().is_some_and(|s| s.header.vectors_key != key) {
            tracing::warn!("the model changed since the store was written: encoding every candidate again");
            let cands = pool.candidates().to_vec();
            let texts: Vec<String> = cands.iter().map(|c| c.text.clone()).collect();
            self.status.set_total(texts.len());
            pool = LivePool::new(cands, self.encode_all(&texts)?, limits, index_bytes);
            changed = true;
        }
        if snapshot.as_ref().is_some_and(|s| s.header.seed_hash != seed_hash) {
            let upserts: Vec<Candidate> = from_files(Pool::load(files)?)
                .into_iter()
                .filter(|c| pool.row(&c.id).is_none_or(|r| pool.candidate(r) != c))
                .collect();
            tracing::info!(upserts = upserts.len(), "the pool files changed: upserting their new and changed candidates");
            let texts: Vec<String> = upserts.iter().map(|c| c.text.clone()).collect();
            self.status.set_total(texts.len());
            let v = self.encode_all(&texts)?;
            pool.upsert(upserts, &v);
            changed = true;
        }
        let mut store = Store::new(Box::new(durable), key, seed_hash, seq, self.config.store_compact_bytes);
        // A replayed log stays a log (the next compaction folds it in): a restart does not
        // rewrite the whole snapshot. A re-encoded or re-seeded pool is written at once.
        if changed {
            store.snapshot_now(&pool)?;
        }
        warn_over_limits(&pool, &limits);
        let kind = if self.config.fp16_candidates { Kind::Half } else { Kind::Float };
        tracing::info!(candidates = pool.len(), log_writes = replayed, "store open");
        Ok((pool.to(self.ranker.model.device, kind), store, cache))
    }

    /// The seed pool's vectors: from the pool cache when it is whole and matches, else
    /// encoded and cached (a second store, e.g. another replica's, then starts from it).
    fn load_pool(&self, pool: &Pool, cache: &PoolCache) -> Result<Tensor> {
        let t0 = Instant::now();
        match cache.load(pool.len(), self.ranker.model.dim() as usize) {
            Ok(v) => {
                self.status.set_cache_reused();
                self.status.set_encoded(pool.len());
                metrics::gauge!(m::CACHE_REUSED).set(1.0);
                tracing::info!(path = %cache.path.display(), candidates = pool.len(), ms = t0.elapsed().as_millis() as u64, "pool cache reused");
                return Ok(v);
            }
            Err(e) if cache.path.exists() => tracing::warn!("pool cache not usable, re-encoding: {e:#}"),
            Err(_) => tracing::info!(path = %cache.path.display(), "no pool cache yet, encoding"),
        }
        metrics::gauge!(m::CACHE_REUSED).set(0.0);
        let v = self.encode_all(&pool.texts)?;
        match cache.store(&v) {
            Ok(()) => tracing::info!(path = %cache.path.display(), "pool cache written"),
            // A read-only cache directory costs the next start time, not this one's service.
            Err(e) => tracing::warn!("pool cache not written: {e:#}"),
        }
        Ok(v)
    }

    /// Candidate vectors `[n, d]` (fp32, CPU) of many texts, in chunks, with progress in the
    /// log and in `Status`; stops when the server shuts down.
    fn encode_all(&self, texts: &[String]) -> Result<Tensor> {
        let t0 = Instant::now();
        let chunk = (self.config.encode_batch_size * 8).max(1);
        let mut parts = vec![Tensor::zeros([0, self.ranker.model.dim()], (Kind::Float, tch::Device::Cpu))];
        let mut last_log = Instant::now();
        for start in (0..texts.len()).step_by(chunk) {
            anyhow::ensure!(!self.status.stopping(), "stopped while encoding the pool");
            let part = &texts[start..(start + chunk).min(texts.len())];
            let enc = self.ranker.tokenize(part, TextKind::Candidate).map_err(anyhow::Error::msg)?;
            parts.push(self.ranker.candidate_vectors(&enc, self.config.encode_batch_size).to_device(tch::Device::Cpu).to_kind(Kind::Float));
            let done = start + part.len();
            self.status.set_encoded(done);
            metrics::counter!(m::POOL_ENCODED).increment(part.len() as u64);
            if last_log.elapsed() >= Duration::from_secs(2) || done == texts.len() {
                let rate = done as f64 / t0.elapsed().as_secs_f64().max(1e-9);
                let eta = (texts.len() - done) as f64 / rate.max(1e-9);
                tracing::info!(done, total = texts.len(), rate = format!("{rate:.0}/s"), eta = format!("{eta:.0}s"), "encoding pool");
                last_log = Instant::now();
            }
        }
        tracing::info!(candidates = texts.len(), secs = format!("{:.1}", t0.elapsed().as_secs_f64()), "pool encoded");
        Ok(Tensor::cat(&parts, 0))
    }
}

/// Meta over today's limits (written by an older version, or in the pool files) is kept and
/// served; it is only left out of the index (filters check it directly). Said once, at start.
fn warn_over_limits(pool: &LivePool, limits: &crate::pool::meta::MetaLimits) {
    let over: Vec<(&str, String)> = pool
        .candidates()
        .iter()
        .filter_map(|c| c.meta.as_ref().and_then(|m| crate::pool::meta::violation("meta", m, limits)).map(|e| (c.id.as_str(), e)))
        .collect();
    if let Some((id, why)) = over.first() {
        tracing::warn!(
            candidates = over.len(),
            first = %id,
            "candidates whose meta is over the meta limits were kept (first: {why}); their meta is not indexed and filters check them one by one. New writes over the limits are refused."
        );
    }
    let stats = pool.index_stats();
    tracing::info!(bytes = stats.bytes, fields = stats.fields, unindexed = stats.unindexed, "meta index built");
}

fn from_files(p: Pool) -> Vec<Candidate> {
    p.ids.into_iter().zip(p.texts).zip(p.meta).map(|((id, text), meta)| Candidate { id, text, meta }).collect()
}

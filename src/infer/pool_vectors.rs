//! The pool's vectors at startup: from the cache when it is whole and matches, else encoded
//! on the inference thread (in chunks, with progress in the log and in `Status`) and cached.

use super::worker::Worker;
use crate::metrics as m;
use crate::pool::cache::PoolCache;
use crate::pool::Pool;
use crate::text::TextKind;
use anyhow::Result;
use std::time::{Duration, Instant};
use tch::Tensor;

impl Worker {
    pub(super) fn load_pool(&self, pool: &Pool, cache: &PoolCache) -> Result<Tensor> {
        let d = self.ranker.model.dim() as usize;
        let t0 = Instant::now();
        match cache.load(pool.len(), d) {
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
        let chunk = (self.config.encode_batch_size * 8).max(1);
        let mut parts = Vec::new();
        let mut last_log = Instant::now();
        for start in (0..pool.len()).step_by(chunk) {
            anyhow::ensure!(!self.status.stopping(), "stopped while encoding the pool");
            let texts = &pool.texts[start..(start + chunk).min(pool.len())];
            let enc = self.ranker.tokenize(texts, TextKind::Candidate).map_err(anyhow::Error::msg)?;
            parts.push(self.ranker.candidate_vectors(&enc, self.config.encode_batch_size));
            let done = start + texts.len();
            self.status.set_encoded(done);
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

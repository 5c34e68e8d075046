//! The pool at startup, on the inference thread: the store opens it (`Durable::open`) and
//! asks this side for vectors — the seed files' from the pool cache when it matches, else
//! encoded — with progress in `Status` and the log.

use super::worker::Worker;
use crate::metrics as m;
use crate::pool::cache::PoolCache;
use crate::model::rows::Precision;
use crate::pool::live::LivePool;
use crate::pool::store::{vectors_key, Candidate, Durable, Encoder};
use crate::pool::Pool;
use crate::text::TextKind;
use anyhow::Result;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

impl Worker {
    /// The pool, the `seq` it is at, and the pool cache when seeding used it (to be cleaned).
    pub(super) fn open_pool(&self, store: &mut dyn Durable) -> Result<(LivePool, u64, Option<PoolCache>)> {
        let files = self.config.candidates.clone();
        let key = vectors_key(self.config.model_dir(), &self.ranker.model.settings, self.config.dtype)?;
        let mut opening = Opening { worker: self, cache: None };
        let (pool, seq) = store.open(&files, &key, &mut opening)?;
        let cache = opening.cache;
        warn_over_limits(&pool, &self.config.meta_limits());
        let kind = if self.config.fp16_candidates { Kind::Half } else { Kind::Float };
        let pool = pool.to(self.ranker.model.device, Precision::Float32, kind);
        Ok((pool, seq, cache))
    }

    /// Sets the scoring precision (`precision::choose`) and converts the pool to it. Runs once
    /// the server is ready, before the first batch: at 100k candidates measuring and
    /// converting took ~0.9 s on 2 cores, which now delays the first requests rather than
    /// readiness (a 100k store must be ready within 3 s). Until then /info has no `scoring`.
    pub(super) fn settle_precision(&mut self) {
        let t0 = Instant::now();
        let choice = super::precision::choose(&self.ranker, &self.pool, self.config.scoring_precision);
        let chosen_ms = t0.elapsed().as_millis() as u64;
        let kind = if self.config.fp16_candidates { Kind::Half } else { Kind::Float };
        if choice.precision != Precision::Float32 {
            let empty = Tensor::zeros([0, self.pool.dim()], (Kind::Float, self.ranker.model.device));
            let fp32 = std::mem::replace(&mut self.pool, LivePool::new(Vec::new(), empty, self.config.meta_limits(), 0));
            self.pool = fp32.to(self.ranker.model.device, choice.precision, kind);
        }
        tracing::info!(
            precision = choice.precision.name(),
            bytes_per_candidate = self.pool.bytes_per_candidate(),
            measure_ms = chosen_ms,
            convert_ms = t0.elapsed().as_millis() as u64 - chosen_ms,
            "scoring precision: {}",
            choice.reason
        );
        let measured: serde_json::Map<String, serde_json::Value> =
            choice.measured_ms.iter().map(|(p, ms)| (p.name().to_string(), ((ms * 1000.0).round() / 1000.0).into())).collect();
        let mut info = serde_json::json!({
            "precision": choice.precision,
            "requested": choice.requested,
            "reason": choice.reason,
            "bytes_per_candidate": self.pool.bytes_per_candidate(),
        });
        if !measured.is_empty() {
            info["measured_ms"] = measured.into();
            info["sample_rows"] = choice.sample_rows.into();
        }
        self.status.set_scoring(info);
    }

    /// Candidate vectors `[n, d]` (fp32, CPU) of many texts, in chunks, with progress in the
    /// log and in `Status`; stops when the server shuts down.
    pub(super) fn encode_all(&self, texts: &[String]) -> Result<Tensor> {
        let t0 = Instant::now();
        self.status.set_total(texts.len());
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

/// The worker's side of `Durable::open`.
struct Opening<'a> {
    worker: &'a Worker,
    cache: Option<PoolCache>,
}

impl Encoder for Opening<'_> {
    /// The seed pool's vectors: from the pool cache when it is whole and matches, else
    /// encoded and cached (a second store, e.g. another replica's, then starts from it).
    fn seed(&mut self, pool: &Pool) -> Result<Tensor> {
        let w = self.worker;
        let cache = PoolCache::new(&w.config.cache_dir, w.config.model_dir(), &w.ranker.model.settings, &w.config.candidates, w.config.dtype)?;
        w.status.set_total(pool.len());
        let t0 = Instant::now();
        let v = match cache.load(pool.len(), w.ranker.model.dim() as usize) {
            Ok(v) => {
                w.status.set_cache_reused();
                w.status.set_encoded(pool.len());
                metrics::gauge!(m::CACHE_REUSED).set(1.0);
                tracing::info!(path = %cache.path.display(), candidates = pool.len(), ms = t0.elapsed().as_millis() as u64, "pool cache reused");
                v
            }
            Err(e) => {
                if cache.path.exists() {
                    tracing::warn!("pool cache not usable, re-encoding: {e:#}");
                } else {
                    tracing::info!(path = %cache.path.display(), "no pool cache yet, encoding");
                }
                metrics::gauge!(m::CACHE_REUSED).set(0.0);
                let v = w.encode_all(&pool.texts)?;
                match cache.store(&v) {
                    Ok(()) => tracing::info!(path = %cache.path.display(), "pool cache written"),
                    // A read-only cache directory costs the next start time, not this one's service.
                    Err(e) => tracing::warn!("pool cache not written: {e:#}"),
                }
                v
            }
        };
        self.cache = Some(cache);
        Ok(v)
    }

    fn encode(&mut self, texts: &[String]) -> Result<Tensor> {
        self.worker.encode_all(texts)
    }

    fn phase(&mut self, what: &str) {
        tracing::info!("{what}");
        self.worker.status.set_phase(what);
    }

    fn dim(&self) -> i64 {
        self.worker.ranker.model.dim()
    }

    fn stopping(&self) -> bool {
        self.worker.status.stopping()
    }

    fn pool(&self, candidates: Vec<Candidate>, vectors: Tensor) -> LivePool {
        let c = &self.worker.config;
        LivePool::new(candidates, vectors, c.meta_limits(), c.max_meta_index_bytes)
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

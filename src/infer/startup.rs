//! The inference thread's start: the pool opened through the store (`pool::open`, with this
//! side encoding what it asks for, progress in `Status` and the log), then, once ready, the
//! scoring precision settled (`precision::choose`) and the pool converted to it.

use super::precision;
use super::ranker::Ranker;
use super::status::Status;
use crate::config::Config;
use crate::metrics as m;
use crate::model::rows::Precision;
use crate::pool::cache::PoolCache;
use crate::pool::live::LivePool;
use crate::pool::open::{Bounds, Caches, Opened, Source};
use crate::pool::store::{vectors_key, Durable};
use crate::text::TextKind;
use anyhow::Result;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

pub(super) fn bounds(config: &Config) -> Bounds {
    Bounds { meta: config.meta_limits(), index_bytes: config.max_meta_index_bytes }
}

/// The pool as the store has it (fp32 scoring until `settle_precision`), on the model's
/// device.
pub(super) fn open_pool(ranker: &Ranker, config: &Config, status: &Status, store: &mut dyn Durable) -> Result<Opened> {
    let settings = &ranker.model.settings;
    let key = vectors_key(config.model_dir(), settings, config.dtype)?;
    let caches = || {
        let cache = PoolCache::new(&config.cache_dir, config.model_dir(), settings, &config.candidates, config.dtype)?;
        let baked = baked_cache_dir().map(|dir| cache.in_dir(&dir));
        Ok(Caches { cache, baked })
    };
    let mut src = Encoding { ranker, config, status };
    let opened = crate::pool::open::open(store, &config.candidates, &key, &caches, &bounds(config), &mut src)?;
    let kind = if config.fp16_candidates { Kind::Half } else { Kind::Float };
    Ok(Opened { pool: opened.pool.to(ranker.model.device, Precision::Float32, kind), ..opened })
}

/// Pool caches made when the install was built, read-only: `<prefix>/share/polyrank/pool-cache`
/// for a binary in `<prefix>/bin` (the image: `/usr/local/share/polyrank/pool-cache`). A
/// volume mounted over `cache_dir` hides what the image put there; seeding reads this.
fn baked_cache_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.parent()?.join("share/polyrank/pool-cache");
    dir.is_dir().then_some(dir)
}

/// Sets the scoring precision (`precision::choose`) and converts the pool to it. Runs once
/// the server is ready, before the first batch: at 100k candidates measuring and converting
/// took ~0.9 s on 2 cores, which delays the first requests rather than readiness (a 100k
/// store must be ready within 3 s). Until then /info has no `scoring`.
pub(super) fn settle_precision(ranker: &Ranker, config: &Config, status: &Status, pool: LivePool) -> LivePool {
    let t0 = Instant::now();
    let choice = precision::choose(ranker, &pool, config.scoring_precision);
    let chosen_ms = t0.elapsed().as_millis() as u64;
    let kind = if config.fp16_candidates { Kind::Half } else { Kind::Float };
    let pool = if choice.precision != Precision::Float32 { pool.to(ranker.model.device, choice.precision, kind) } else { pool };
    tracing::info!(
        precision = choice.precision.name(),
        bytes_per_candidate = pool.bytes_per_candidate(),
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
        "bytes_per_candidate": pool.bytes_per_candidate(),
    });
    if !measured.is_empty() {
        info["measured_ms"] = measured.into();
        info["sample_rows"] = choice.sample_rows.into();
    }
    status.set_scoring(info);
    pool
}

/// This side of `pool::open`: the ranker encodes, `Status` shows how far.
struct Encoding<'a> {
    ranker: &'a Ranker,
    config: &'a Config,
    status: &'a Status,
}

impl Source for Encoding<'_> {
    /// In chunks, with progress in the log and in `Status`; stops when the server shuts down.
    fn encode(&mut self, texts: &[String]) -> Result<Tensor> {
        let (ranker, status) = (self.ranker, self.status);
        let t0 = Instant::now();
        status.set_total(texts.len());
        let chunk = (self.config.encode_batch_size * 8).max(1);
        let mut parts = vec![Tensor::zeros([0, ranker.model.dim()], (Kind::Float, tch::Device::Cpu))];
        let mut last_log = Instant::now();
        for start in (0..texts.len()).step_by(chunk) {
            anyhow::ensure!(!status.stopping(), "stopped while encoding the pool");
            let part = &texts[start..(start + chunk).min(texts.len())];
            let enc = ranker.tokenize(part, TextKind::Candidate).map_err(anyhow::Error::msg)?;
            parts.push(ranker.candidate_vectors(&enc, self.config.encode_batch_size).to_device(tch::Device::Cpu).to_kind(Kind::Float));
            let done = start + part.len();
            status.set_encoded(done);
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

    fn dim(&self) -> i64 {
        self.ranker.model.dim()
    }

    fn stopping(&self) -> bool {
        self.status.stopping()
    }

    fn phase(&mut self, what: &str) {
        self.status.set_phase(what);
    }

    fn seeding(&mut self, n: usize) {
        self.status.set_total(n);
    }

    fn cache_reused(&mut self, n: usize) {
        self.status.set_cache_reused();
        self.status.set_encoded(n);
    }
}

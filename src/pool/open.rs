//! Opening the live pool at start: the store recovers it (`Durable::open`: snapshot and log,
//! or the shared database), seeds it from the pool files on a first start, and asks for the
//! vectors it lacks. Seed vectors come from the pool cache when one matches: `cache_dir`'s
//! file, else the one baked into the install (read where it is, then written to `cache_dir`
//! for the next store seeded), else they are encoded and cached.

use super::cache::PoolCache;
use super::live::LivePool;
use super::meta::MetaLimits;
use super::store::{Candidate, Durable, Encoder};
use super::Pool;
use anyhow::Result;
use std::path::PathBuf;
use std::time::Instant;
use tch::Tensor;

/// What opening needs from the model's owner: vectors for texts, and a place to say how far
/// the start is.
pub trait Source {
    /// Candidate vectors `[n, d]` (fp32, CPU) of `texts`, in order; fails when the server
    /// stops meanwhile.
    fn encode(&mut self, texts: &[String]) -> Result<Tensor>;
    fn dim(&self) -> i64;
    fn stopping(&self) -> bool;
    /// What the start waits for now (for /health/ready and the log).
    fn phase(&mut self, what: &str);
    /// The seed pool has `n` candidates (progress: 0 of n).
    fn seeding(&mut self, n: usize);
    /// The seed pool's `n` vectors were read from a pool cache.
    fn cache_reused(&mut self, n: usize);
}

/// Where the seed pool's vectors may be cached. Made only when a store is seeded: its key
/// hashes the model's weights and the pool files (~0.3 s at a 100k restart, which reads no
/// cache).
pub struct Caches {
    /// This model's and pool files' cache file in `cache_dir`.
    pub cache: PoolCache,
    /// The same file as the install baked it, read-only (`share/polyrank/pool-cache`).
    pub baked: Option<PoolCache>,
}

pub struct Opened {
    pub pool: LivePool,
    /// The store's seq the pool is at.
    pub seq: u64,
    /// The cache file in use, when seeding read or wrote it (to be cleaned once ready).
    pub cache: Option<PoolCache>,
}

/// The pool bounds every `LivePool` is built with.
#[derive(Clone)]
pub struct Bounds {
    pub meta: MetaLimits,
    pub index_bytes: usize,
}

pub fn open(
    store: &mut dyn Durable,
    files: &[PathBuf],
    vectors_key: &str,
    caches: &dyn Fn() -> Result<Caches>,
    bounds: &Bounds,
    src: &mut dyn Source,
) -> Result<Opened> {
    let mut seeding = Seeding { src, caches, used: None, bounds: bounds.clone() };
    let (pool, seq) = store.open(files, vectors_key, &mut seeding)?;
    warn_over_limits(&pool, &bounds.meta);
    Ok(Opened { pool, seq, cache: seeding.used })
}

/// The owner's `Source` with the pool cache around it: the stores' `Encoder`.
struct Seeding<'a> {
    src: &'a mut dyn Source,
    caches: &'a dyn Fn() -> Result<Caches>,
    used: Option<PoolCache>,
    bounds: Bounds,
}

impl Encoder for Seeding<'_> {
    fn seed(&mut self, pool: &Pool) -> Result<Tensor> {
        let Caches { cache, baked } = (self.caches)()?;
        self.src.seeding(pool.len());
        let (n, d) = (pool.len(), self.src.dim() as usize);
        let t0 = Instant::now();
        // A read-only cache directory costs the next start time, not this one's service.
        let keep = |v: &Tensor| match cache.store(v) {
            Ok(()) => tracing::info!(path = %cache.path.display(), "pool cache written"),
            Err(e) => tracing::warn!("pool cache not written: {e:#}"),
        };
        let found = match cache.load(n, d) {
            Ok(v) => Some(v),
            Err(e) => {
                if cache.path.exists() {
                    tracing::warn!("pool cache not usable: {e:#}");
                }
                let from_install = baked.and_then(|b| b.load(n, d).ok().map(|v| (b.path, v)));
                from_install.map(|(path, v)| {
                    tracing::info!(path = %path.display(), "pool cache read from the install");
                    // The next store seeded here (a new volume, another replica) finds it too.
                    keep(&v);
                    v
                })
            }
        };
        let v = match found {
            Some(v) => {
                self.src.cache_reused(n);
                metrics::gauge!(crate::metrics::CACHE_REUSED).set(1.0);
                tracing::info!(path = %cache.path.display(), candidates = n, ms = t0.elapsed().as_millis() as u64, "pool cache reused");
                v
            }
            None => {
                if !cache.path.exists() {
                    tracing::info!(path = %cache.path.display(), "no pool cache yet, encoding");
                }
                metrics::gauge!(crate::metrics::CACHE_REUSED).set(0.0);
                let v = self.src.encode(&pool.texts)?;
                keep(&v);
                v
            }
        };
        self.used = Some(cache);
        Ok(v)
    }

    fn encode(&mut self, texts: &[String]) -> Result<Tensor> {
        self.src.encode(texts)
    }

    fn phase(&mut self, what: &str) {
        tracing::info!("{what}");
        self.src.phase(what);
    }

    fn dim(&self) -> i64 {
        self.src.dim()
    }

    fn stopping(&self) -> bool {
        self.src.stopping()
    }

    fn pool(&self, candidates: Vec<Candidate>, vectors: Tensor) -> LivePool {
        LivePool::new(candidates, vectors, self.bounds.meta.clone(), self.bounds.index_bytes)
    }
}

/// Meta over today's limits (written by an older version, or in the pool files) is kept and
/// served; it is only left out of the index (filters check it directly). Said once, at start.
fn warn_over_limits(pool: &LivePool, limits: &MetaLimits) {
    let over: Vec<(&str, String)> = pool
        .candidates()
        .iter()
        .filter_map(|c| c.meta.as_ref().and_then(|m| super::meta::violation("meta", m, limits)).map(|e| (c.id.as_str(), e)))
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

//! What the rest of the process may know about the inference thread: startup progress,
//! readiness or the failure that ended it, the model's facts and the pool's size.

use crate::metrics as m;
use crate::model::format::Mode;
use crate::pool::filter::IndexStats;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use crate::pool::store::StoreHealth;
use std::sync::{Mutex, OnceLock};

/// Model facts reported by /info, fixed once the model is loaded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub model_dir: String,
    pub mode: Mode,
    pub n_codes: i64,
    pub dim: i64,
    /// The encoder family: config.json's `model_type` (`bert`, `roberta`, …, `parlai_transformer`).
    pub encoder: String,
    pub device: String,
    pub dtype: crate::config::Dtype,
    pub trained: bool,
    pub description: String,
    pub max_context_tokens: usize,
    pub max_candidate_tokens: usize,
}

impl ModelInfo {
    pub(super) fn of(ranker: &super::ranker::Ranker, config: &crate::config::Config) -> ModelInfo {
        let s = &ranker.model.settings;
        ModelInfo {
            model_dir: config.model_dir().display().to_string(),
            mode: s.mode,
            n_codes: s.context_vectors(),
            dim: ranker.model.dim(),
            encoder: ranker.model.config.family(),
            device: config.device.clone(),
            dtype: config.dtype,
            trained: s.trained,
            description: s.description.clone(),
            max_context_tokens: s.max_context_tokens,
            max_candidate_tokens: s.max_candidate_tokens,
        }
    }
}

/// Written by the inference thread, read by anyone holding the handle.
#[derive(Default)]
pub struct Status {
    ready: AtomicBool,
    encoded: AtomicUsize,
    total: AtomicUsize,
    cache_reused: AtomicBool,
    failure: Mutex<Option<String>>,
    info: OnceLock<ModelInfo>,
    pool_size: AtomicUsize,
    index: Mutex<IndexStats>,
    /// Set at shutdown: the inference thread stops at its next chunk boundary.
    stopping: AtomicBool,
    /// What the start waits for now (another replica seeding, the database), if anything.
    phase: Mutex<Option<String>>,
    /// The store's `seq` the pool is at; `min_seq` requests wait on it.
    applied: tokio::sync::watch::Sender<u64>,
    /// Order-independent digest of the pool's ids, texts and meta (`LivePool::digest`).
    pool_digest: Mutex<String>,
    store: Mutex<Option<StoreHealth>>,
    /// The scoring precision that runs and why (`precision::Choice`), as /info shows it.
    scoring: OnceLock<serde_json::Value>,
}

impl Status {
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
    pub(crate) fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap().clone()
    }
    /// Pool candidates encoded so far, and the pool's size.
    pub fn progress(&self) -> (usize, usize) {
        (self.encoded.load(Ordering::Acquire), self.total.load(Ordering::Acquire))
    }
    pub(crate) fn cache_reused(&self) -> bool {
        self.cache_reused.load(Ordering::Acquire)
    }
    /// Set before the server starts: the model loads before `start` returns.
    pub fn info(&self) -> Option<&ModelInfo> {
        self.info.get()
    }
    /// Candidates in the pool now (0 until ready).
    pub fn pool_size(&self) -> usize {
        self.pool_size.load(Ordering::Acquire)
    }

    pub fn phase(&self) -> Option<String> {
        self.phase.lock().unwrap().clone()
    }
    /// The store's `seq` the pool is at.
    pub fn applied_seq(&self) -> u64 {
        *self.applied.borrow()
    }
    pub(super) fn applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }
    pub fn pool_digest(&self) -> String {
        self.pool_digest.lock().unwrap().clone()
    }
    pub fn store_health(&self) -> Option<StoreHealth> {
        self.store.lock().unwrap().clone()
    }

    pub fn scoring(&self) -> Option<&serde_json::Value> {
        self.scoring.get()
    }
    pub(super) fn set_scoring(&self, v: serde_json::Value) {
        self.scoring.set(v).ok();
    }

    pub(super) fn set_phase(&self, what: &str) {
        *self.phase.lock().unwrap() = Some(what.to_string());
    }
    pub(super) fn set_applied(&self, seq: u64) {
        self.applied.send_replace(seq);
    }
    pub(super) fn set_pool_digest(&self, d: String) {
        *self.pool_digest.lock().unwrap() = d;
    }
    /// Also the store's gauges: refreshed on every turn of the inference loop.
    pub(super) fn set_store_health(&self, h: StoreHealth) {
        metrics::gauge!(crate::metrics::STORE_CONNECTED).set(if h.connected { 1.0 } else { 0.0 });
        metrics::gauge!(crate::metrics::STORE_LAG_SECONDS).set(h.lag_seconds);
        *self.store.lock().unwrap() = Some(h);
    }

    /// The meta index's size, as of the last write.
    pub fn index(&self) -> IndexStats {
        *self.index.lock().unwrap()
    }

    pub(super) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
    pub(super) fn stop(&self) {
        self.stopping.store(true, Ordering::Release)
    }
    /// How many candidates startup encodes (progress's denominator).
    pub(super) fn set_total(&self, n: usize) {
        self.total.store(n, Ordering::Release);
    }
    pub(super) fn set_pool_size(&self, n: usize) {
        self.pool_size.store(n, Ordering::Release);
    }
    pub(super) fn set_index(&self, s: IndexStats) {
        metrics::gauge!(m::META_INDEX_BYTES).set(s.bytes as f64);
        metrics::gauge!(m::META_UNINDEXED).set(s.unindexed as f64);
        *self.index.lock().unwrap() = s;
    }
    pub(super) fn set_info(&self, info: ModelInfo) {
        self.info.set(info).ok();
    }
    pub(super) fn set_encoded(&self, n: usize) {
        self.encoded.store(n, Ordering::Release)
    }
    pub(super) fn set_cache_reused(&self) {
        self.cache_reused.store(true, Ordering::Release)
    }
    pub(super) fn set_ready(&self) {
        *self.phase.lock().unwrap() = None;
        self.ready.store(true, Ordering::Release)
    }
    pub(super) fn set_failure(&self, f: String) {
        *self.failure.lock().unwrap() = Some(f);
    }
}

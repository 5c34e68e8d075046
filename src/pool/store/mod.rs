//! The live pool's durable store: what a write must survive. `Durable` is the one interface
//! the inference thread uses; `FileStore` keeps it in local files (each replica its own),
//! `PgStore` in PostgreSQL, shared by every replica (`store_url`).

mod file;
mod local;
pub mod postgres;

pub use file::{write_snapshot, Files};
pub use local::FileStore;
pub use postgres::PgStore;
use super::live::LivePool;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One candidate as the pool holds it and the stores record it (the write-ahead log, the
/// snapshot, PostgreSQL's rows): a storage record, not the API's body (`http::api` converts
/// at the edge), so an API change is not a change of the files' format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub id: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Value>,
}

/// One logged write.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Candidates and their vectors, row-major `[k, d]`.
    Upsert(Vec<Candidate>, Vec<f32>),
    Delete(Vec<String>),
}

/// What a snapshot says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub version: u32,
    /// What the vectors were computed with (`fingerprint::encoder_fingerprint`).
    pub vectors_key: String,
    /// Content hash of the pool files that seeded the store last.
    pub seed_hash: String,
    /// The last log sequence number the snapshot includes.
    pub last_seq: u64,
    pub n: usize,
    pub d: usize,
}

pub struct Snapshot {
    pub header: SnapshotHeader,
    pub candidates: Vec<Candidate>,
    /// Row-major `[n, d]`.
    pub vectors: Vec<f32>,
}

/// One change to apply to the pool, in the store's order (`seq` only grows).
#[derive(Debug)]
pub struct Change {
    pub seq: u64,
    /// An upsert's vectors are empty when the store holds none for this model (a replica
    /// running other weights wrote it): the pool's owner encodes them.
    pub op: Op,
    /// This replica's own write: the ticket it was submitted with (its client waits).
    pub ticket: Option<u64>,
}

/// What the store has for the pool's owner.
#[derive(Debug)]
pub enum Event {
    Apply(Change),
    /// A write that was not made durable: nothing was applied anywhere.
    Failed { ticket: u64, error: StoreError },
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached now (a shared store's database is down): retry later.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    #[error("the write was not stored: {0}")]
    Failed(String),
}

/// What /info and the metrics say about the store.
#[derive(Debug, Clone, Serialize)]
pub struct StoreHealth {
    /// `local` (files in store_dir) or `postgres` (shared by replicas).
    pub kind: &'static str,
    pub connected: bool,
    /// How far behind the store this replica may be: 0 while it is caught up, else the
    /// seconds since it last was.
    pub lag_seconds: f64,
    /// The highest seq this replica knows was committed (applied or not yet): a `min_seq`
    /// beyond it names no write that exists yet.
    pub head_seq: u64,
}

/// What opening the store needs from the model's owner: vectors for texts.
pub trait Encoder {
    /// Vectors `[n, d]` (fp32, CPU) of the seed files' candidates: from the pool cache when it
    /// matches, else encoded (and cached).
    fn seed(&mut self, pool: &super::Pool) -> Result<tch::Tensor>;
    /// Vectors `[n, d]` (fp32, CPU) of candidate texts.
    fn encode(&mut self, texts: &[String]) -> Result<tch::Tensor>;
    /// What the start is waiting for, for /health/ready (e.g. another replica seeding).
    fn phase(&mut self, what: &str);
    /// The vectors' width: a stored pool of another width is not this model's.
    fn dim(&self) -> i64;
    /// The server is shutting down: stop waiting.
    fn stopping(&self) -> bool;
    /// A pool of these candidates and vectors (`[n, d]`, fp32, CPU), with the server's
    /// bounds on its meta index.
    fn pool(&self, candidates: Vec<Candidate>, vectors: tch::Tensor) -> LivePool;
}

/// Where the pool's writes are kept. Chosen once, where the server is assembled
/// (`serve.rs`): `FileStore` (this replica's files) or `PgStore` (shared by replicas).
///
/// Every change reaches the pool through `poll`, in `seq` order, own writes and (for a
/// shared store) other replicas' alike; applying a change twice is harmless.
pub trait Durable: Send {
    /// The pool as stored (seeded from `files` on a first start; the vectors this model
    /// lacks encoded), and the `seq` it is at. `vectors_key` names this model's vectors.
    fn open(&mut self, files: &[PathBuf], vectors_key: &str, enc: &mut dyn Encoder) -> Result<(LivePool, u64)>;
    /// Sends a write on its way; its outcome comes back from `poll` with `ticket`.
    fn submit(&mut self, op: Op, ticket: u64);
    /// Changes to apply, in order, and failed writes.
    fn poll(&mut self) -> Vec<Event>;
    /// Vectors this replica encoded for a change that came without them (kept for peers
    /// running the same model; a local store has no use for them).
    fn keep_vectors(&mut self, _seq: u64, _ids: Vec<String>, _vectors: Vec<f32>) {}
    /// Called after changes were applied (a local store compacts its log here).
    fn applied(&mut self, _pool: &LivePool) {}
    fn health(&self) -> StoreHealth;
    /// Waits for background work (shutdown).
    fn finish(&mut self);
}

impl Op {
    /// Applies the change to `pool`; returns the ids a delete did not find. The one way a
    /// change reaches the pool: replay at startup and live writes alike.
    pub fn apply(self, pool: &mut LivePool) -> Vec<String> {
        match self {
            Op::Upsert(cands, v) => {
                let k = cands.len() as i64;
                pool.upsert(cands, &tch::Tensor::from_slice(&v).view([k, -1]));
                Vec::new()
            }
            Op::Delete(ids) => pool.delete(&ids),
        }
    }
}

/// Row-major fp32 values of a `[k, d]` tensor, on the CPU: what the stores keep.
pub fn flat(v: &tch::Tensor) -> Vec<f32> {
    Vec::try_from(v.to_device(tch::Device::Cpu).to_kind(tch::Kind::Float).contiguous().view([-1])).unwrap_or_default()
}

/// When the seed files changed since they last seeded a store: their candidates whose id is
/// new to `pool` or whose text or meta differ, and their vectors (`[k, d]`). Both stores
/// upsert these at start.
pub fn changed_in_files(files: &[PathBuf], pool: &LivePool, enc: &mut dyn Encoder) -> Result<(Vec<Candidate>, tch::Tensor)> {
    let upserts: Vec<Candidate> =
        from_files(super::Pool::load(files)?).into_iter().filter(|c| pool.row(&c.id).is_none_or(|r| pool.candidate(r) != c)).collect();
    tracing::info!(upserts = upserts.len(), "the pool files changed: upserting their new and changed candidates");
    let texts: Vec<String> = upserts.iter().map(|c| c.text.clone()).collect();
    let v = enc.encode(&texts)?;
    Ok((upserts, v))
}

/// The seed files' candidates as stored records.
pub fn from_files(p: super::Pool) -> Vec<Candidate> {
    p.ids.into_iter().zip(p.texts).zip(p.meta).map(|((id, text), meta)| Candidate { id, text, meta }).collect()
}

/// Content hash of the pool files, in order: what a store was last seeded from.
pub fn seed_hash(files: &[PathBuf]) -> Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for f in files {
        crate::fingerprint::hash_file(&mut h, f)?;
    }
    Ok(hex::encode(h.finalize()))
}

/// What the store's vectors are keyed by: the candidate side of the model, by content.
pub fn vectors_key(model_dir: &Path, settings: &crate::model::format::PolySettings, dtype: crate::config::Dtype) -> Result<String> {
    // Vectors encoded in bf16 differ from fp32 ones: a store written under one is re-encoded
    // under the other, as for a model change (float32 keeps the key it always had).
    let extra = [b"candidate vectors".as_slice(), dtype.key_bytes()].concat();
    crate::fingerprint::encoder_fingerprint(model_dir, settings, &extra)
}


//! The live pool's durable store: what a write must survive. `Durable` is the one interface
//! the inference thread uses; `FileStore` keeps it in local files (each replica its own).
//! A store shared by replicas (an existing database or log) would implement the same trait.

mod file;

pub use file::{write_snapshot, FileStore};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One candidate as stored and as the API takes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    pub id: String,
    pub text: String,
    /// Left out or an object; not null (as openapi.yaml says).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    pub meta: Option<serde_json::Value>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Err(serde::de::Error::custom("meta may be left out but not null")),
        v => Ok(Some(v)),
    }
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

/// Where the pool's writes are kept, in order, with a snapshot now and then.
pub trait Durable: Send {
    /// What was stored: the last snapshot, and the writes since (sequence numbers at or below
    /// the snapshot's `last_seq` may appear; they are already in it). Damage is an error.
    fn recover(&mut self) -> Result<(Option<Snapshot>, Vec<(u64, Op)>)>;
    /// Makes one write durable before returning.
    fn append(&mut self, seq: u64, op: &Op) -> Result<()>;
    /// Bytes written since the last snapshot (compaction's trigger).
    fn log_bytes(&self) -> u64;
    /// Folds the log into `snap` (may finish in the background, then calls `done`).
    fn compact(&mut self, snap: Snapshot, done: Box<dyn FnOnce() + Send>) -> Result<()>;
    /// Replaces everything with `snap`, now.
    fn reset(&mut self, snap: &Snapshot) -> Result<()>;
    /// Waits for background work (shutdown).
    fn finish(&mut self);
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
pub fn vectors_key(model_dir: &Path, settings: &crate::model::format::PolySettings) -> Result<String> {
    crate::fingerprint::encoder_fingerprint(model_dir, settings, b"candidate vectors")
}


//! The pool in memory, as the inference thread owns it: candidates, their vectors as one
//! dense `[n, d]` matrix (the scoring kernel's input), an id → row map and the meta index.
//! Writes are applied whole between batches, so a ranking sees a write entirely or not at
//! all; deletes move the last row into the hole, so the matrix never holds dead rows.

use super::filter::{Filter, IndexStats, MetaIndex};
use super::meta::MetaLimits;
use super::store::Candidate;
use crate::model::rows::{CandidateRows, Precision};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

pub struct LivePool {
    candidates: Vec<Candidate>,
    row_of: HashMap<String, usize>,
    /// `[capacity, d]` in the scoring precision; rows `0..n` are live. Spare rows make
    /// appends amortised O(k·d).
    storage: CandidateRows,
    /// What written rows are kept as: the scoring precision, and the matrix kind for float32.
    precision: Precision,
    dense_kind: Kind,
    index: MetaIndex,
    /// Sum of every candidate's `candidate_hash`, mod 2^128: the same pool gives the same
    /// digest whatever the order of its rows or of the writes that built it.
    digest: u128,
}

/// A candidate's share of the pool digest: the first 16 bytes of
/// SHA-256(id ‖ 0 ‖ text ‖ 0 ‖ meta as compact JSON with keys sorted, or nothing), big-endian.
pub fn candidate_hash(c: &Candidate) -> u128 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(c.id.as_bytes());
    h.update([0u8]);
    h.update(c.text.as_bytes());
    h.update([0u8]);
    if let Some(m) = &c.meta {
        h.update(canonical_json(m).as_bytes());
    }
    u128::from_be_bytes(h.finalize()[..16].try_into().expect("16 bytes"))
}

/// Compact JSON with every object's keys sorted (whatever serde_json's map keeps).
fn canonical_json(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let fields: Vec<String> =
                keys.into_iter().map(|k| format!("{}:{}", Value::String(k.clone()), canonical_json(&m[k]))).collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(a) => format!("[{}]", a.iter().map(canonical_json).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

impl LivePool {
    /// `vectors`: `[n, d]` fp32, kept as they are until `to` sets the scoring precision;
    /// `limits` and `index_bytes` bound the meta index (`filter::MetaIndex`).
    pub fn new(candidates: Vec<Candidate>, vectors: Tensor, limits: MetaLimits, index_bytes: usize) -> Self {
        let mut index = MetaIndex::new(limits, index_bytes);
        let mut row_of = HashMap::with_capacity(candidates.len());
        let mut digest = 0u128;
        for (r, c) in candidates.iter().enumerate() {
            row_of.insert(c.id.clone(), r);
            index.add(&c.id, c.meta.as_ref());
            digest = digest.wrapping_add(candidate_hash(c));
        }
        let dense_kind = vectors.kind();
        LivePool { candidates, row_of, storage: CandidateRows::dense(vectors), precision: Precision::Float32, dense_kind, index, digest }
    }

    pub fn len(&self) -> usize {
        self.candidates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.candidates.is_empty()
    }

    /// The meta index's size and how many candidates it leaves to direct checks.
    pub fn index_stats(&self) -> IndexStats {
        self.index.stats()
    }

    /// The live rows, `[n, d]` (views, no copy).
    pub fn vectors(&self) -> CandidateRows {
        self.storage.narrow(0, self.len() as i64)
    }

    pub fn dim(&self) -> i64 {
        self.storage.dim()
    }

    /// The precision rows are kept and scored in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Resident bytes per candidate of the vectors (not counting texts, meta and the index).
    pub fn bytes_per_candidate(&self) -> usize {
        self.storage.bytes_per_row()
    }

    pub fn row(&self, id: &str) -> Option<usize> {
        self.row_of.get(id).copied()
    }

    pub fn candidate(&self, row: usize) -> &Candidate {
        &self.candidates[row]
    }

    pub fn candidates(&self) -> &[Candidate] {
        &self.candidates
    }

    /// The pool's digest as 32 hex digits (see `candidate_hash`).
    pub fn digest(&self) -> String {
        format!("{:032x}", self.digest)
    }

    /// Inserts or replaces candidates (ids unique within the batch) with their `[k, d]`
    /// vectors.
    pub fn upsert(&mut self, batch: Vec<Candidate>, vectors: &Tensor) {
        let vectors = CandidateRows::encode(&vectors.to_device(self.storage.device()), self.precision, self.dense_kind);
        let mut new_rows = Vec::new();
        for (i, c) in batch.into_iter().enumerate() {
            match self.row_of.get(&c.id).copied() {
                Some(r) => {
                    self.storage.copy_in(r as i64, &vectors.narrow(i as i64, 1));
                    self.index.remove(&c.id, self.candidates[r].meta.as_ref());
                    self.index.add(&c.id, c.meta.as_ref());
                    self.digest = self.digest.wrapping_sub(candidate_hash(&self.candidates[r])).wrapping_add(candidate_hash(&c));
                    self.candidates[r] = c;
                }
                None => new_rows.push((i as i64, c)),
            }
        }
        if new_rows.is_empty() {
            return;
        }
        let (n, k) = (self.len() as i64, new_rows.len() as i64);
        self.reserve((n + k) as usize);
        let idx = Tensor::from_slice(&new_rows.iter().map(|(i, _)| *i).collect::<Vec<_>>()).to_device(vectors.device());
        self.storage.copy_in(n, &vectors.select(&idx));
        for (_, c) in new_rows {
            self.digest = self.digest.wrapping_add(candidate_hash(&c));
            self.row_of.insert(c.id.clone(), self.candidates.len());
            self.index.add(&c.id, c.meta.as_ref());
            self.candidates.push(c);
        }
    }

    /// Removes the ids that are present; returns those that were not.
    pub fn delete(&mut self, ids: &[String]) -> Vec<String> {
        let mut missing = Vec::new();
        for id in ids {
            let Some(r) = self.row_of.remove(id) else {
                missing.push(id.clone());
                continue;
            };
            let last = self.len() - 1;
            if r != last {
                self.storage.copy_row(last as i64, r as i64);
                self.candidates.swap(r, last);
                self.row_of.insert(self.candidates[r].id.clone(), r);
            }
            let gone = self.candidates.pop().expect("a row to remove");
            self.index.remove(&gone.id, gone.meta.as_ref());
            self.digest = self.digest.wrapping_sub(candidate_hash(&gone));
        }
        if missing.len() < ids.len() {
            // As in the index: tables and vectors keep their peak size unless asked.
            if self.row_of.capacity() > 1024 && self.row_of.len() * 4 < self.row_of.capacity() {
                self.row_of.shrink_to_fit();
            }
            if self.candidates.capacity() > 1024 && self.candidates.len() * 4 < self.candidates.capacity() {
                self.candidates.shrink_to_fit();
            }
            give_back_freed_memory();
        }
        missing
    }

    /// Rows whose meta passes `filter`, ascending; every row for an empty filter.
    pub fn filter_rows(&self, filter: &Filter) -> Vec<i64> {
        if filter.is_empty() {
            return (0..self.len() as i64).collect();
        }
        let mut rows: Vec<i64> = self
            .index
            .candidates(filter)
            .into_iter()
            .filter_map(|id| self.row_of.get(id).copied())
            .filter(|&r| filter.matches(self.candidates[r].meta.as_ref()))
            .map(|r| r as i64)
            .collect();
        rows.sort_unstable();
        rows
    }

    /// Room for `rows` rows: the matrix doubles when it runs out.
    fn reserve(&mut self, rows: usize) {
        let cap = self.storage.len();
        if rows as i64 <= cap {
            return;
        }
        let new_cap = (rows as i64).max(cap * 2).max(1024);
        let grown = CandidateRows::zeros_like(&self.storage, new_cap);
        grown.copy_in(0, &self.vectors());
        self.storage = grown;
    }

    /// The same pool on `device`, its rows kept in `precision` (`dense_kind`: the matrix's
    /// kind for float32, fp16 halves it). Startup builds the pool in fp32 on the CPU.
    pub fn to(mut self, device: Device, precision: Precision, dense_kind: Kind) -> Self {
        let exact = self.vectors().exact().to_device(device);
        self.storage = CandidateRows::encode(&exact, precision, dense_kind);
        self.precision = precision;
        self.dense_kind = dense_kind;
        self
    }

    /// The live vectors as fp32 `[n, d]` (rebuilt from a low-precision copy).
    pub fn exact_vectors(&self) -> Tensor {
        self.vectors().exact()
    }

    /// The live vectors as fp32 on the CPU, row-major, for the snapshot.
    pub fn vectors_f32(&self) -> Vec<f32> {
        super::store::flat(&self.exact_vectors())
    }
}

/// Returns the heap pages that deletes freed to the system. glibc keeps freed small chunks in
/// its arenas (the inference thread has its own) and gives back only the top of a heap, so
/// after a delete the process kept its peak size: deleting 1,020 candidates that had grown
/// it by 139 MB gave back 7 MB (tests/hardening.rs); with this, all but 3 MB. `malloc_trim`
/// also releases free pages inside the heaps (glibc ≥ 2.8).
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

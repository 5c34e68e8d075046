//! The live pool through the handle: upserts, deletes and lookups. Writes go through the
//! same queue as rankings; the inference thread logs each durably before applying it.

use super::admission::{check_candidates, check_ids, cost, least_tokens, within_budget};
use super::queue::{Output, Work};
use super::{Infer, InferError, TextKind};
use crate::pool::store::Candidate;
use std::time::Instant;

/// What a write did.
pub struct Written {
    /// Ids a delete did not find.
    pub missing: Vec<String>,
    pub pool_size: usize,
    /// The store's sequence number of the write: `min_seq` for reading it back anywhere.
    pub seq: u64,
}

impl Infer {
    /// Inserts or replaces candidates; returns once they are durable and rankable here.
    pub async fn upsert(&self, candidates: Vec<Candidate>) -> Result<Written, InferError> {
        let started = Instant::now();
        self.ensure_ready()?;
        let c = &self.config;
        check_candidates(&candidates, c.max_encode_texts, c.max_text_chars, &c.meta_limits())?;
        let (_, max_cand) = self.lengths();
        within_budget(c.max_request_tokens, candidates.iter().map(|x| least_tokens(&x.text, max_cand)).sum(), true)?;
        let texts = self.tokenize(candidates.iter().map(|x| x.text.clone()).collect(), TextKind::Candidate).await?;
        within_budget(c.max_request_tokens, cost(&texts), false)?;
        written(self.run(Work::Upsert { candidates, texts }, started).await?)
    }

    /// Removes candidates; ids not in the pool are reported, not an error.
    pub async fn delete(&self, ids: Vec<String>) -> Result<Written, InferError> {
        let started = Instant::now();
        self.ensure_ready()?;
        check_ids("ids", &ids, self.config.max_inline_candidates)?;
        written(self.run(Work::Delete { ids }, started).await?)
    }

    pub async fn get(&self, id: String, min_seq: Option<u64>) -> Result<Option<Candidate>, InferError> {
        let started = Instant::now();
        self.ensure_ready()?;
        if let Some(min_seq) = min_seq {
            self.wait_applied(min_seq, started).await?;
        }
        match self.run(Work::Get { id }, started).await? {
            Output::Found(c) => Ok(c),
            _ => Err(InferError::Failed("a lookup was answered with something else".into())),
        }
    }
}

fn written(out: Output) -> Result<Written, InferError> {
    match out {
        Output::Written { missing, pool_size, seq } => Ok(Written { missing, pool_size, seq }),
        _ => Err(InferError::Failed("a write was answered with something else".into())),
    }
}

//! Work too large for one batch: its texts are encoded a chunk (about `CHUNK_TOKENS` tokens)
//! at a time, one chunk per turn of the inference loop, so other requests' batches run in
//! between, and the job is dropped between chunks once nobody waits for it.

use super::batch::vectors;
use super::queue::{Job, JobError, Output};
use super::ranker::Ranker;
use crate::model::scoring::ContextVectors;
use crate::pool::store::Candidate;
use crate::text::TextKind;
use std::time::Instant;
use tch::Tensor;
use tokenizers::Encoding;

/// Tokens per chunk: one chunk of 256-token texts takes about 0.2 s on 2 cores, which bounds
/// both how long other requests wait and how late a cancelled job frees the thread.
pub(super) const CHUNK_TOKENS: usize = 512;

/// What to do with the vectors once every chunk is encoded.
pub(super) enum Then {
    /// Rank them against these context vectors.
    Rank { codes: ContextVectors, top_k: i64 },
    /// Return them (/encode).
    Vectors,
    /// Hand them to the worker with the candidates, to be stored and applied.
    Upsert(Vec<Candidate>),
}

/// What a finished chunked job yields.
pub(super) enum Finished {
    Output(Output),
    Upsert(Vec<Candidate>, Tensor),
}

pub(super) struct Chunked {
    kind: TextKind,
    texts: Vec<Encoding>,
    /// First text not yet encoded.
    next: usize,
    /// Encoded chunks, rows in text order (the ranker groups each chunk by length itself
    /// and returns its rows in input order).
    parts: Vec<Tensor>,
    then: Then,
    job: Option<Job>,
}

impl Chunked {
    pub(super) fn new(kind: TextKind, texts: Vec<Encoding>, then: Then) -> Self {
        Chunked { kind, texts, next: 0, parts: Vec::new(), then, job: None }
    }

    pub(super) fn with_job(mut self, job: Job) -> Self {
        self.job = Some(job);
        self
    }

    /// Tokens still to encode.
    pub(super) fn remaining_tokens(&self) -> usize {
        self.texts[self.next..].iter().map(|e| e.get_ids().len()).sum()
    }

    pub(super) fn alive(&self, now: Instant) -> bool {
        self.job.as_ref().is_some_and(|j| j.alive(now))
    }

    /// The waiting job, to be answered elsewhere (an upsert, once the store applied it).
    pub(super) fn take_job(&mut self) -> Option<Job> {
        self.job.take()
    }

    pub(super) fn answer(mut self, out: Result<Output, JobError>) {
        if let Some(j) = self.job.take() {
            let _ = j.reply.send(out);
        }
    }

    /// Encodes the next chunk; the job's output once the last one is done.
    pub(super) fn advance(&mut self, ranker: &Ranker, batch_size: usize) -> Option<Finished> {
        let mut end = self.next;
        let mut tokens = 0;
        while end < self.texts.len() && (end == self.next || tokens + self.texts[end].get_ids().len() <= CHUNK_TOKENS) {
            tokens += self.texts[end].get_ids().len();
            end += 1;
        }
        let chunk = &self.texts[self.next..end];
        self.parts.push(match self.kind {
            TextKind::Candidate => ranker.candidate_vectors(chunk, batch_size),
            TextKind::Context => ranker.context_codes(chunk, batch_size).y,
        });
        self.next = end;
        if self.next < self.texts.len() {
            return None;
        }
        let v = Tensor::cat(&self.parts, 0);
        Some(match &mut self.then {
            Then::Rank { codes, top_k } => Finished::Output(Output::Ranked(ranker.model.rank(codes, &v, &[*top_k]).swap_remove(0))),
            Then::Vectors => Finished::Output(vectors(&v)),
            Then::Upsert(cands) => Finished::Upsert(std::mem::take(cands), v),
        })
    }
}

//! Work too large for one batch: its texts are encoded a chunk (about `CHUNK_TOKENS` tokens)
//! at a time, one chunk per turn of the inference loop, so other requests' batches run in
//! between, and the job is dropped between chunks once nobody waits for it. `Backlog` holds
//! such work in arrival order and decides whether new work can still finish in time.

use super::guard::guarded;
use super::messages::{Hit, JobError, Vectors, Written};
use super::queue::{Ticket, UpsertWork};
use super::ranker::Ranker;
use super::read::{explain, inline_hits, vectors, EncodeWork, RankWork, CHUNK_TOKENS};
use crate::metrics as m;
use crate::model::scoring::ContextVectors;
use crate::text::TextKind;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tch::Tensor;
use tokenizers::Encoding;

/// The job a chunked encoding serves, and what is done with its vectors.
pub(crate) enum Then {
    /// Rank the request's inline candidates against these context vectors.
    Rank(Ticket<RankWork, Vec<Hit>>, ContextVectors),
    /// Return them (/encode).
    Vectors(Ticket<EncodeWork, Vectors>),
    /// Hand them back with the candidates, to be stored and applied.
    Upsert(Ticket<UpsertWork, Written>),
}

/// An upsert whose vectors are encoded: the worker sends it to the store.
pub(crate) struct Encoded(pub(crate) Ticket<UpsertWork, Written>, pub(crate) Tensor);

pub(crate) struct Chunked {
    /// First text not yet encoded.
    next: usize,
    /// Encoded chunks, rows in text order (the ranker groups each chunk by length itself
    /// and returns its rows in input order).
    parts: Vec<Tensor>,
    then: Then,
}

impl Chunked {
    pub(crate) fn new(then: Then) -> Self {
        Chunked { next: 0, parts: Vec::new(), then }
    }

    fn kind(&self) -> TextKind {
        match &self.then {
            Then::Vectors(t) => t.work.kind,
            Then::Rank(..) | Then::Upsert(_) => TextKind::Candidate,
        }
    }

    fn texts(&self) -> &[Encoding] {
        match &self.then {
            Then::Rank(t, _) => t.work.target.inline().map_or(&[], |i| &i.encodings),
            Then::Vectors(t) => &t.work.texts,
            Then::Upsert(t) => &t.work.texts,
        }
    }

    /// Tokens still to encode.
    fn remaining_tokens(&self) -> usize {
        self.texts()[self.next..].iter().map(|e| e.get_ids().len()).sum()
    }

    fn alive(&self, now: Instant) -> bool {
        match &self.then {
            Then::Rank(t, _) => t.alive(now),
            Then::Vectors(t) => t.alive(now),
            Then::Upsert(t) => t.alive(now),
        }
    }

    fn fail(self, e: JobError) {
        match self.then {
            Then::Rank(t, _) => t.answer(Err(e)),
            Then::Vectors(t) => t.answer(Err(e)),
            Then::Upsert(t) => t.answer(Err(e)),
        }
    }

    /// Encodes the next chunk; all the vectors, in text order, once the last one is done.
    fn encode_next(&mut self, ranker: &Ranker, batch_size: usize) -> Option<Tensor> {
        let kind = self.kind();
        let texts = self.texts();
        let mut end = self.next;
        let mut tokens = 0;
        while end < texts.len() && (end == self.next || tokens + texts[end].get_ids().len() <= CHUNK_TOKENS) {
            tokens += texts[end].get_ids().len();
            end += 1;
        }
        let chunk = &texts[self.next..end];
        let last = end == texts.len();
        let part = match kind {
            TextKind::Candidate => ranker.candidate_vectors(chunk, batch_size),
            TextKind::Context => ranker.context_codes(chunk, batch_size).y,
        };
        self.parts.push(part);
        self.next = end;
        last.then(|| Tensor::cat(&self.parts, 0))
    }

    /// With every vector encoded: a rank or an encode is answered here; an upsert comes back
    /// with its vectors, for the store.
    fn finish(self, v: Tensor, ranker: &Ranker) -> Option<Encoded> {
        match self.then {
            Then::Rank(t, codes) => {
                let ranked = guarded(|| ranker.model.rank(&codes, &v, &[t.work.top_k]).swap_remove(0));
                let inline = t.work.target.inline().expect("a chunked rank has inline candidates");
                let mut hits = ranked.map(|r| inline_hits(r, inline, t.work.want));
                if let (true, Ok(hits)) = (t.work.want.explain, hits.as_mut()) {
                    let rows: Vec<i64> = hits.iter().map(|h| h.id.parse::<i64>().expect("an inline hit's id is its position")).collect();
                    let picked = v.index_select(0, &Tensor::from_slice(&rows).to_device(v.device()));
                    if let Err(e) = guarded(|| explain(ranker, &t.work.context, hits, &picked)) {
                        tracing::warn!("explaining a chunked ranking failed: {e:?}");
                    }
                }
                t.answer(hits);
                None
            }
            Then::Vectors(t) => {
                t.answer(Ok(vectors(&v)));
                None
            }
            Then::Upsert(t) => Some(Encoded(t, v)),
        }
    }
}

/// Chunked work in arrival order (first in, first finished: jobs complete in turn instead of
/// all slowing down together), and the measured encoding rate that admission plans with.
#[derive(Default)]
pub(crate) struct Backlog {
    pending: VecDeque<Chunked>,
    /// Tokens per second of chunked encoding, smoothed (0 until the first chunk).
    rate: f64,
}

impl Backlog {
    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Queues `c` behind the rest, or refuses it (429, retry later) when it cannot finish
    /// inside `deadline` at the rate measured so far (unknown at first: then it is queued),
    /// rather than queue it to time out.
    pub(crate) fn admit(&mut self, c: Chunked, deadline: Instant) {
        if self.rate > 0.0 {
            let tokens = self.pending.iter().map(Chunked::remaining_tokens).sum::<usize>() + c.remaining_tokens();
            if Instant::now() + Duration::from_secs_f64(tokens as f64 / self.rate) > deadline {
                return c.fail(JobError::Overloaded);
            }
        }
        self.pending.push_back(c);
    }

    /// One chunk of the oldest job still wanted; jobs past their deadline or whose client
    /// left are dropped here, between chunks, so they free the thread at once. Returns an
    /// upsert whose encoding this chunk finished.
    pub(crate) fn advance_one(&mut self, ranker: &Ranker, batch_size: usize) -> Option<Encoded> {
        while let Some(c) = self.pending.pop_front() {
            if !c.alive(Instant::now()) {
                c.fail(JobError::Timeout);
                continue;
            }
            let start = Instant::now();
            let before = c.remaining_tokens();
            let mut c = c;
            let step = guarded(|| c.encode_next(ranker, batch_size));
            let secs = start.elapsed().as_secs_f64().max(1e-6);
            metrics::histogram!(m::STAGE_SECONDS, "stage" => "inference").record(secs);
            self.observe(before - c.remaining_tokens(), secs);
            return match step {
                Ok(None) => {
                    self.pending.push_front(c);
                    None
                }
                Ok(Some(v)) => c.finish(v, ranker),
                Err(e) => {
                    c.fail(e);
                    None
                }
            };
        }
        None
    }

    fn observe(&mut self, tokens: usize, secs: f64) {
        let rate = tokens as f64 / secs;
        self.rate = if self.rate > 0.0 { 0.8 * self.rate + 0.2 * rate } else { rate };
    }

    /// Stopping: whoever still waits gets an answer rather than a dropped channel.
    pub(crate) fn fail_all(&mut self, msg: &str) {
        for c in self.pending.drain(..) {
            c.fail(JobError::Failed(msg.to_string()));
        }
    }
}

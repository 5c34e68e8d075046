//! The inference thread's write side: it sends writes to the store (`Durable::submit`),
//! applies what the store hands back in its order (`Durable::poll`: own writes and, with a
//! shared store, other replicas') with `Op::apply`, and answers each write once it is
//! applied. Runs between batches, so a ranking sees a change wholly or not at all. No
//! threads of its own and no queue: a test drives it with a store, a ranker and a pool.

use super::guard::caught;
use super::messages::{JobError, Written};
use super::ranker::Ranker;
use crate::metrics as m;
use crate::pool::live::LivePool;
use crate::pool::store::{flat, Change, Durable, Event, Op, StoreError};
use crate::text::TextKind;
use std::collections::HashMap;
use tokio::sync::oneshot;

pub(crate) type WriteReply = oneshot::Sender<Result<Written, JobError>>;

pub(crate) struct Writer {
    store: Box<dyn Durable>,
    /// Writes sent to the store, by ticket: their clients wait for them to be applied.
    waiting: HashMap<u64, WriteReply>,
    next_ticket: u64,
    /// The store's `seq` the pool is at.
    applied: u64,
}

/// What a sync did, for the owner to publish (size, digest, index, applied seq) before the
/// waiting clients are answered: a client that reads /info after its write's answer sees it.
pub(crate) struct Synced {
    answers: Vec<(WriteReply, Result<Written, JobError>)>,
}

impl Synced {
    pub(crate) fn answer(self) {
        for (reply, out) in self.answers {
            let _ = reply.send(out);
        }
    }
}

impl Writer {
    /// The store as opened, with the pool at `applied`.
    pub(crate) fn new(store: Box<dyn Durable>, applied: u64) -> Writer {
        Writer { store, waiting: HashMap::new(), next_ticket: 0, applied }
    }

    pub(crate) fn applied(&self) -> u64 {
        self.applied
    }

    pub(crate) fn store(&self) -> &dyn Durable {
        self.store.as_ref()
    }

    /// Sends a write to the store; `reply` is answered once it is applied (or failed).
    pub(crate) fn submit(&mut self, op: Op, reply: WriteReply) {
        self.next_ticket += 1;
        self.waiting.insert(self.next_ticket, reply);
        self.store.submit(op, self.next_ticket);
    }

    /// Applies what the store has, in its order. `None` when it had nothing.
    pub(crate) fn sync(&mut self, pool: &mut LivePool, ranker: &Ranker, encode_batch: usize) -> Option<Synced> {
        let events = self.store.poll();
        if events.is_empty() {
            return None;
        }
        let mut answers = Vec::new();
        for event in events {
            let (ticket, out) = match event {
                Event::Failed { ticket, error } => (Some(ticket), Err(store_error(error))),
                // Applying a change twice is harmless, but the pool never goes back.
                Event::Apply(Change { seq, ticket, .. }) if seq <= self.applied => {
                    (ticket, Ok(Written { missing: Vec::new(), pool_size: pool.len(), seq }))
                }
                Event::Apply(Change { seq, op, ticket }) => {
                    let out = match self.with_vectors(seq, op, ranker, encode_batch) {
                        Ok(op) => {
                            let (kind, n) = match &op {
                                Op::Upsert(c, _) => ("upsert", c.len()),
                                Op::Delete(ids) => ("delete", ids.len()),
                            };
                            let missing = op.apply(pool);
                            metrics::counter!(m::WRITES, "op" => kind).increment((n - missing.len()) as u64);
                            Ok(Written { missing, pool_size: pool.len(), seq })
                        }
                        Err(e) => {
                            tracing::error!(seq, "a change could not be applied: {e}");
                            Err(JobError::Failed(e))
                        }
                    };
                    self.applied = seq;
                    (ticket, out)
                }
            };
            if let Some(reply) = ticket.and_then(|t| self.waiting.remove(&t)) {
                answers.push((reply, out));
            }
        }
        self.store.applied(pool);
        Some(Synced { answers })
    }

    /// An upsert that came without this model's vectors (written by a replica running other
    /// weights) gets them here, and the store keeps them for peers running this model.
    fn with_vectors(&mut self, seq: u64, op: Op, ranker: &Ranker, encode_batch: usize) -> Result<Op, String> {
        match op {
            Op::Upsert(cands, v) if v.is_empty() && !cands.is_empty() => {
                let texts: Vec<String> = cands.iter().map(|c| c.text.clone()).collect();
                let encoded = caught(|| {
                    let enc = ranker.tokenize(&texts, TextKind::Candidate)?;
                    Ok::<_, String>(flat(&ranker.candidate_vectors(&enc, encode_batch)))
                })
                ??;
                let ids = cands.iter().map(|c| c.id.clone()).collect();
                self.store.keep_vectors(seq, ids, encoded.clone());
                Ok(Op::Upsert(cands, encoded))
            }
            op => Ok(op),
        }
    }

    /// Stopping: waiting clients get an answer, and the store finishes its background work.
    pub(crate) fn finish(&mut self) {
        for (_, reply) in self.waiting.drain() {
            let _ = reply.send(Err(JobError::Failed("the server is shutting down before the write was applied".into())));
        }
        self.store.finish();
    }
}

fn store_error(e: StoreError) -> JobError {
    match e {
        StoreError::Unavailable(m) => JobError::StoreUnavailable(format!("the shared store is unavailable ({m})")),
        StoreError::Failed(m) => JobError::Failed(format!("the write was not stored: {m}")),
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    //! Writes through a real file store and a tiny model, with no server and no queue: each
    //! is answered once applied, in the store's order, and a reopened store has them all.
    use super::*;
    use crate::pool::open::{open, Bounds, Caches, Source};
    use crate::pool::store::{Candidate, FileStore};
    use std::path::Path;
    use tch::Tensor;

    struct Enc<'a>(&'a Ranker);

    impl Source for Enc<'_> {
        fn encode(&mut self, texts: &[String]) -> anyhow::Result<Tensor> {
            let enc = self.0.tokenize(texts, TextKind::Candidate).map_err(anyhow::Error::msg)?;
            Ok(self.0.candidate_vectors(&enc, 8))
        }
        fn dim(&self) -> i64 {
            self.0.model.dim()
        }
        fn stopping(&self) -> bool {
            false
        }
        fn phase(&mut self, _: &str) {}
        fn seeding(&mut self, _: usize) {}
        fn cache_reused(&mut self, _: usize) {}
    }

    fn opened(dir: &Path, r: &Ranker) -> (LivePool, Writer) {
        let files = vec![dir.join("pool.txt")];
        let mut store: Box<dyn Durable> = Box::new(FileStore::open_dir(&dir.join("store"), 1 << 20).unwrap());
        let cache = crate::pool::cache::PoolCache::new(&dir.join("cache"), &dir.join("model"), &r.model.settings, &files, crate::config::Dtype::Float32).unwrap();
        let bounds = Bounds { meta: crate::pool::meta::MetaLimits { keys: 8, depth: 2, bytes: 1024, string_chars: 64 }, index_bytes: 1 << 20 };
        let caches = || Ok(Caches { cache: cache.in_dir(&dir.join("cache")), baked: None });
        let o = open(store.as_mut(), &files, "tiny", &caches, &bounds, &mut Enc(r)).unwrap();
        (o.pool, Writer::new(store, o.seq))
    }

    #[test]
    fn writes_are_answered_once_applied_in_order_and_a_reopened_store_has_them() {
        let _g = tch::no_grad_guard();
        let dir = tempfile::tempdir().unwrap();
        crate::testkit::write_tiny_model(&dir.path().join("model"), &crate::testkit::tiny_settings(4), 3).unwrap();
        let r = Ranker::load(&dir.path().join("model"), tch::Device::Cpu).unwrap();
        std::fs::write(dir.path().join("pool.txt"), "i like pizza\ncats are good\nthe rain today\n").unwrap();
        let (mut pool, mut w) = opened(dir.path(), &r);
        assert_eq!((pool.len(), w.applied()), (3, 0));
        assert!(w.sync(&mut pool, &r, 8).is_none(), "nothing submitted, nothing to apply");
        let first = pool.candidates()[0].id.clone();

        let new = vec![Candidate { id: "n1".into(), text: "i love books".into(), meta: None }];
        let v = r.candidate_vectors(&r.tokenize(&["i love books".to_string()], TextKind::Candidate).unwrap(), 8);
        let (up_tx, mut up_rx) = oneshot::channel();
        let (del_tx, mut del_rx) = oneshot::channel();
        w.submit(Op::Upsert(new, flat(&v)), up_tx);
        w.submit(Op::Delete(vec![first.clone(), "missing".into()]), del_tx);
        // Not answered before it is applied.
        assert!(up_rx.try_recv().is_err());
        let synced = w.sync(&mut pool, &r, 8).expect("the store had the writes");
        assert!(up_rx.try_recv().is_err(), "answered only after the owner published the pool");
        synced.answer();
        let up = up_rx.try_recv().unwrap().unwrap();
        let del = del_rx.try_recv().unwrap().unwrap();
        assert_eq!((up.seq, up.pool_size), (1, 4));
        assert_eq!((del.seq, del.pool_size, del.missing), (2, 3, vec!["missing".to_string()]));
        assert_eq!(w.applied(), 2);
        assert!(pool.row(&first).is_none());
        let row = pool.row("n1").expect("the upsert is in the pool");
        let stored = pool.exact_vectors().get(row as i64);
        assert!((stored - v.get(0)).abs().max().double_value(&[]) < 1e-6);
        let digest = pool.digest();
        w.finish();
        drop(w);

        // Recovery replays the log with the same `Op::apply`.
        let (again, w2) = opened(dir.path(), &r);
        assert_eq!((again.digest(), w2.applied()), (digest, 2));
    }
}

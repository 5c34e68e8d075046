//! The queue between the handle and the inference thread: typed jobs (each carries the
//! sender of its own answer type), the bounded channel, and the batcher that merges waiting
//! jobs by count and token budget.

use super::messages::{Hit, JobError, Vectors, Written};
use super::read::{EncodeWork, RankWork};
use crate::pool::store::Candidate;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};
use tokenizers::Encoding;
use tokio::sync::oneshot;

/// One piece of work, when it must be done by, and where its answer (of type `T`) goes.
pub(crate) struct Ticket<W, T> {
    pub(crate) work: W,
    pub(crate) deadline: Instant,
    pub(crate) enqueued: Instant,
    pub(crate) reply: oneshot::Sender<Result<T, JobError>>,
}

impl<W, T> Ticket<W, T> {
    /// Still wanted: within its deadline and its client still waiting.
    pub(crate) fn alive(&self, now: Instant) -> bool {
        self.deadline > now && !self.reply.is_closed()
    }

    pub(crate) fn answer(self, out: Result<T, JobError>) {
        let _ = self.reply.send(out);
    }
}

/// Upsert: encode the texts, make the batch durable, then apply it.
pub(crate) struct UpsertWork {
    pub(crate) candidates: Vec<Candidate>,
    pub(crate) texts: Vec<Encoding>,
}

/// Reads see the pool as it is; they are batched together.
pub(crate) enum ReadJob {
    Rank(Ticket<RankWork, Vec<Hit>>),
    Encode(Ticket<EncodeWork, Vectors>),
    Get(Ticket<String, Option<Candidate>>),
}

/// Writes go through the store and are answered once applied.
pub(crate) enum WriteJob {
    Upsert(Ticket<UpsertWork, Written>),
    Delete(Ticket<Vec<String>, Written>),
}

pub(crate) enum Job {
    Read(ReadJob),
    Write(WriteJob),
}

/// `f(ticket)` for whichever ticket the job holds.
macro_rules! each_ticket {
    ($job:expr, $t:ident => $e:expr) => {
        match $job {
            Job::Read(ReadJob::Rank($t)) => $e,
            Job::Read(ReadJob::Encode($t)) => $e,
            Job::Read(ReadJob::Get($t)) => $e,
            Job::Write(WriteJob::Upsert($t)) => $e,
            Job::Write(WriteJob::Delete($t)) => $e,
        }
    };
}

impl Job {
    pub(crate) fn alive(&self, now: Instant) -> bool {
        each_ticket!(self, t => t.alive(now))
    }

    pub(crate) fn enqueued(&self) -> Instant {
        each_ticket!(self, t => t.enqueued)
    }

    /// Answers with an error, whatever the job's answer type.
    pub(crate) fn fail(self, e: JobError) {
        each_ticket!(self, t => t.answer(Err(e)))
    }

    /// Tokens this job adds to a batch, for the token budget.
    fn tokens(&self) -> usize {
        let sum = |texts: &[Encoding]| texts.iter().map(|e| e.get_ids().len()).sum::<usize>();
        match self {
            Job::Read(ReadJob::Rank(t)) => t.work.context.get_ids().len() + t.work.target.inline().map_or(0, |i| sum(&i.encodings)),
            Job::Read(ReadJob::Encode(t)) => sum(&t.work.texts),
            Job::Write(WriteJob::Upsert(t)) => sum(&t.work.texts),
            Job::Read(ReadJob::Get(_)) | Job::Write(WriteJob::Delete(_)) => 0,
        }
    }
}

pub(crate) enum SubmitError {
    Full,
    Stopped,
}

/// The sending side: bounded, so a full queue is an immediate answer (429), not a wait.
#[derive(Clone)]
pub(crate) struct Queue(pub(crate) SyncSender<Job>);

impl Queue {
    /// Queues `work` as the job `wrap` makes of its ticket; the receiver gets its answer.
    pub(crate) fn submit<W, T>(
        &self,
        wrap: fn(Ticket<W, T>) -> Job,
        work: W,
        deadline: Instant,
    ) -> Result<oneshot::Receiver<Result<T, JobError>>, SubmitError> {
        let (reply, rx) = oneshot::channel();
        let job = wrap(Ticket { work, deadline, enqueued: Instant::now(), reply });
        match self.0.try_send(job) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(SubmitError::Full),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }
}

/// How the batcher forms batches.
#[derive(Clone, Copy)]
pub(crate) struct BatchLimits {
    pub(crate) max_batch_size: usize,
    pub(crate) max_batch_tokens: usize,
    pub(crate) max_wait: Duration,
}

/// Adds waiting jobs to `first` until the batch is full by count or tokens, or the wait
/// window closes. A job that would break the token budget starts the next batch (`carry`).
pub(crate) fn collect(first: Job, rx: &Receiver<Job>, limits: BatchLimits, carry: &mut Option<Job>) -> Vec<Job> {
    let mut tokens = first.tokens();
    let mut batch = vec![first];
    let window_end = Instant::now() + limits.max_wait;
    while batch.len() < limits.max_batch_size {
        let wait = window_end.saturating_duration_since(Instant::now());
        let next = match rx.try_recv() {
            Ok(j) => j,
            Err(_) if wait.is_zero() => break,
            Err(_) => match rx.recv_timeout(wait) {
                Ok(j) => j,
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            },
        };
        let t = next.tokens();
        if tokens + t > limits.max_batch_tokens {
            *carry = Some(next);
            break;
        }
        tokens += t;
        batch.push(next);
    }
    batch
}

#[cfg(test)]
mod tests {
    //! Batch forming, with no model and no thread: jobs on a channel, `collect` takes them.
    use super::*;
    use crate::text::TextKind;

    fn encode_job(tokens: usize) -> (Job, oneshot::Receiver<Result<Vectors, JobError>>) {
        let ids = vec![1u32; tokens];
        let e = Encoding::new(ids, vec![0; tokens], vec![String::new(); tokens], vec![None; tokens], vec![(0, 0); tokens], vec![0; tokens], vec![1; tokens], vec![], Default::default());
        let (reply, rx) = oneshot::channel();
        let far = Instant::now() + Duration::from_secs(60);
        (Job::Read(ReadJob::Encode(Ticket { work: EncodeWork { texts: vec![e], kind: TextKind::Candidate }, deadline: far, enqueued: Instant::now(), reply })), rx)
    }

    #[test]
    fn batches_stop_at_the_count_or_the_token_budget_and_carry_the_next_job() {
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        let mut receivers = Vec::new();
        for tokens in [10, 20, 30, 40, 50] {
            let (job, r) = encode_job(tokens);
            tx.send(job).unwrap();
            receivers.push(r);
        }
        let limits = BatchLimits { max_batch_size: 3, max_batch_tokens: 55, max_wait: Duration::ZERO };
        let mut carry = None;
        let first = rx.recv().unwrap();
        // 10 + 20 fit; 30 would make 60 > 55: it starts the next batch.
        let batch = collect(first, &rx, limits, &mut carry);
        assert_eq!(batch.iter().map(Job::tokens).collect::<Vec<_>>(), vec![10, 20]);
        let next = carry.take().expect("the job over the budget is carried");
        assert_eq!(next.tokens(), 30);
        // 30 + 40 > 55 again: one job alone.
        let batch = collect(next, &rx, limits, &mut carry);
        assert_eq!(batch.len(), 1);
        let next = carry.take().unwrap();
        let batch = collect(next, &rx, BatchLimits { max_batch_size: 2, max_batch_tokens: 1000, max_wait: Duration::ZERO }, &mut carry);
        assert_eq!(batch.iter().map(Job::tokens).collect::<Vec<_>>(), vec![40, 50]);
        assert!(carry.is_none());
        // A failed job is answered with its error, whatever its answer type.
        for j in batch {
            j.fail(JobError::Timeout);
        }
        assert!(matches!(receivers[4].try_recv(), Ok(Err(JobError::Timeout))));
    }

    #[test]
    fn a_full_queue_refuses_at_once() {
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        let q = Queue(tx);
        let far = Instant::now() + Duration::from_secs(60);
        assert!(q.submit(|t| Job::Read(ReadJob::Get(t)), "a".to_string(), far).is_ok());
        assert!(matches!(q.submit(|t| Job::Read(ReadJob::Get(t)), "b".to_string(), far), Err(SubmitError::Full)));
    }
}

//! Reads of one batch, as one function of the model and the pool: every context in one
//! encoder pass, every small candidate-side text (inline candidates of all requests,
//! /encode candidates) in one deduplicated pass, every whole-pool ranking in one scoring
//! call. Work whose texts exceed a chunk comes back as `Outcome::Later`, to be encoded a
//! chunk at a time (`chunked.rs`). No threads, no queue: a test calls `run` directly.

use super::ranker::Ranker;
use super::messages::{CodeRead, Hit, JobError, TokenRead, Vectors};
use crate::metrics as m;
use crate::model::scoring::ContextVectors;
use crate::pool::filter::Filter;
use crate::pool::live::LivePool;
use crate::text::TextKind;
use std::collections::HashMap;
use std::time::Instant;
use tch::{Kind, Tensor};
use tokenizers::Encoding;


/// Tokens per chunk: one chunk of 256-token texts takes about 0.2 s on 2 cores, which bounds
/// both how long other requests wait and how late a cancelled job frees the thread. Work
/// with more tokens than this leaves the batch as chunked work.
pub(crate) const CHUNK_TOKENS: usize = 512;

/// What the candidates of a rank job are. Which request fields may go together is decided
/// once, where the handle builds this (`admission::target`).
pub(crate) enum Target {
    /// The pool, or the part of it whose meta passes the filter.
    Pool(Option<Filter>),
    /// Pool candidates by id (resolved here: the pool changes), and of those the ones that
    /// pass the filter.
    Ids(Vec<String>, Option<Filter>),
    /// Texts sent with the request; their ids are their positions.
    Inline(Inline),
    /// The pool, approximately: only the `preselect` rows that score best against the mean of
    /// the context's vectors are scored exactly.
    Approximate(i64),
}

pub(crate) struct Inline {
    pub(crate) texts: Vec<String>,
    pub(crate) encodings: Vec<Encoding>,
}

impl Target {
    pub(crate) fn inline(&self) -> Option<&Inline> {
        match self {
            Target::Inline(i) => Some(i),
            _ => None,
        }
    }
}

/// What a hit carries besides id and score, and the most bytes of ids, texts and meta the
/// answer may carry (`max_response_bytes`).
#[derive(Clone, Copy)]
pub(crate) struct Want {
    pub(crate) text: bool,
    pub(crate) meta: bool,
    pub(crate) explain: bool,
    pub(crate) budget: usize,
}

/// An explanation's size: the context vectors a hit used most, and the tokens each read most.
pub(crate) const EXPLAIN_CODES: usize = 3;
pub(crate) const EXPLAIN_TOKENS: usize = 5;

/// Fills `hits[i].explain` from the model's attention, `vectors[i]` being hit i's candidate
/// vector (fp32). One more context encoder pass, only for requests that ask.
pub(crate) fn explain(ranker: &Ranker, context: &Encoding, hits: &mut [Hit], vectors: &Tensor) {
    if hits.is_empty() {
        return;
    }
    let batch = crate::text::to_batch(&[context], ranker.model.device);
    let tokens = context.get_tokens();
    let uses = ranker.model.explain(&batch, &vectors.to_device(ranker.model.device), EXPLAIN_CODES, EXPLAIN_TOKENS);
    for (hit, uses) in hits.iter_mut().zip(uses) {
        hit.explain = Some(
            uses.into_iter()
                .map(|u| CodeRead {
                    code: u.code,
                    // Softmax weights; a rounding step past 1 would break the documented range.
                    weight: u.weight.clamp(0.0, 1.0),
                    tokens: u.tokens.into_iter().map(|(p, w)| TokenRead { token: tokens[p].clone(), position: p, weight: w.clamp(0.0, 1.0) }).collect(),
                })
                .collect(),
        );
    }
}

pub(crate) struct RankWork {
    pub(crate) context: Encoding,
    pub(crate) target: Target,
    pub(crate) top_k: i64,
    pub(crate) want: Want,
}

pub(crate) struct EncodeWork {
    pub(crate) texts: Vec<Encoding>,
    pub(crate) kind: TextKind,
}

/// A read's answer, or what it needs to go on in chunks (`L`).
pub(crate) enum Outcome<T, L = ()> {
    Done(Result<T, JobError>),
    /// Too large for the batch: a rank's inline candidates go on with its context's vectors
    /// (`ContextVectors`); an encode's texts as they are (`()`).
    Later(L),
}

pub(crate) struct Answers {
    pub(crate) ranks: Vec<Outcome<Vec<Hit>, ContextVectors>>,
    pub(crate) encodes: Vec<Outcome<Vectors>>,
}

impl Answers {
    /// Every read of the batch failed alike (libtorch raised).
    pub(crate) fn failed(ranks: usize, encodes: usize, msg: &str) -> Answers {
        Answers {
            ranks: (0..ranks).map(|_| Outcome::Done(Err(JobError::Failed(msg.to_string())))).collect(),
            encodes: (0..encodes).map(|_| Outcome::Done(Err(JobError::Failed(msg.to_string())))).collect(),
        }
    }
}

fn tokens(texts: &[Encoding]) -> usize {
    texts.iter().map(|e| e.get_ids().len()).sum()
}

fn small(texts: &[Encoding]) -> bool {
    tokens(texts) <= CHUNK_TOKENS
}

/// Texts that tokenize alike get one row: the same ids give the same vector.
#[derive(Default)]
struct Distinct {
    rows: HashMap<Vec<u32>, i64>,
    texts: Vec<Encoding>,
}

impl Distinct {
    fn add(&mut self, texts: &[Encoding]) -> Vec<i64> {
        texts
            .iter()
            .map(|e| {
                *self.rows.entry(e.get_ids().to_vec()).or_insert_with(|| {
                    self.texts.push(e.clone());
                    self.texts.len() as i64 - 1
                })
            })
            .collect()
    }
}

/// The batch's two encoder passes: contexts, and distinct candidate-side texts.
#[derive(Default)]
struct Passes {
    contexts: Vec<Encoding>,
    candidates: Distinct,
}

impl Passes {
    /// Rows `(first, n)` of these contexts in the context pass.
    fn add_contexts(&mut self, texts: &[Encoding]) -> (i64, i64) {
        let first = self.contexts.len() as i64;
        self.contexts.extend(texts.iter().cloned());
        (first, texts.len() as i64)
    }
}

/// Answers the batch's reads, in their order, against `pool` as it is now.
pub(crate) fn run(ranker: &Ranker, pool: &LivePool, ranks: &[&RankWork], encodes: &[&EncodeWork], encode_batch: usize) -> Answers {
    let start = Instant::now();
    let mut passes = Passes::default();
    let rank_ctx: Vec<i64> = ranks.iter().map(|r| passes.add_contexts(std::slice::from_ref(&r.context)).0).collect();
    let rank_inline: Vec<Option<Vec<i64>>> = ranks
        .iter()
        .map(|r| r.target.inline().filter(|i| small(&i.encodings)).map(|i| passes.candidates.add(&i.encodings)))
        .collect();
    enum Rows {
        Contexts(i64, i64),
        Candidates(Vec<i64>),
        Later,
    }
    let enc_rows: Vec<Rows> = encodes
        .iter()
        .map(|e| match e.kind {
            _ if !small(&e.texts) => Rows::Later,
            TextKind::Context => {
                let (first, n) = passes.add_contexts(&e.texts);
                Rows::Contexts(first, n)
            }
            TextKind::Candidate => Rows::Candidates(passes.candidates.add(&e.texts)),
        })
        .collect();
    let codes = (!passes.contexts.is_empty()).then(|| ranker.context_codes(&passes.contexts, passes.contexts.len()));
    let cand = (!passes.candidates.texts.is_empty()).then(|| ranker.candidate_vectors(&passes.candidates.texts, encode_batch));
    metrics::histogram!(m::STAGE_SECONDS, "stage" => "inference").record(start.elapsed().as_secs_f64());

    let score_start = Instant::now();
    let pick = |rows: &[i64]| {
        let v = cand.as_ref().expect("a candidate pass ran for these rows");
        v.index_select(0, &Tensor::from_slice(rows).to_device(v.device()))
    };
    let encodes_out = enc_rows
        .iter()
        .map(|rows| match rows {
            Rows::Later => Outcome::Later(()),
            Rows::Contexts(first, n) => {
                Outcome::Done(Ok(vectors(&codes.as_ref().expect("a context pass ran").y.narrow(0, *first, *n))))
            }
            Rows::Candidates(rows) => Outcome::Done(Ok(vectors(&pick(rows)))),
        })
        .collect();

    let model = &ranker.model;
    let vectors_now = pool.vectors();
    let mut ranks_out: Vec<Option<Outcome<Vec<Hit>, ContextVectors>>> = ranks.iter().map(|_| None).collect();
    let mut whole_pool: Vec<usize> = Vec::new();
    if let Some(codes) = &codes {
        for (i, r) in ranks.iter().enumerate() {
            let c = codes.select(rank_ctx[i]);
            let (k, want) = (r.top_k, r.want);
            ranks_out[i] = Some(match &r.target {
                Target::Pool(None) => {
                    whole_pool.push(i);
                    continue;
                }
                // Only the matching rows are scored.
                Target::Pool(Some(filter)) => {
                    Outcome::Done(pool_hits(pool, model.rank_rows(&c, &vectors_now, &pool.filter_rows(filter), k), want))
                }
                Target::Ids(ids, filter) => Outcome::Done(
                    id_rows(pool, ids, filter.as_ref()).and_then(|rows| pool_hits(pool, model.rank_rows(&c, &vectors_now, &rows, k), want)),
                ),
                Target::Approximate(preselect) => Outcome::Done(pool_hits(pool, model.rank_approximate(&c, &vectors_now, *preselect, k), want)),
                Target::Inline(inline) => match &rank_inline[i] {
                    Some(rows) => Outcome::Done(Ok(inline_hits(model.rank(&c, &pick(rows), &[k]).swap_remove(0), inline, want))),
                    None => Outcome::Later(ContextVectors { y: c.y.copy(), mask: c.mask.copy() }),
                },
            });
        }
        if !whole_pool.is_empty() {
            // All whole-pool rankings of the batch in one kernel call: [B, m, d] × [N, d].
            let rows = Tensor::from_slice(&whole_pool.iter().map(|&i| rank_ctx[i]).collect::<Vec<_>>()).to_device(codes.y.device());
            let sub = ContextVectors { y: codes.y.index_select(0, &rows), mask: codes.mask.index_select(0, &rows) };
            let ks: Vec<i64> = whole_pool.iter().map(|&i| ranks[i].top_k).collect();
            for (ranked, &i) in model.rank_pool(&sub, &vectors_now, &ks).into_iter().zip(&whole_pool) {
                ranks_out[i] = Some(Outcome::Done(pool_hits(pool, ranked, ranks[i].want)));
            }
        }
    }
    for (r, out) in ranks.iter().zip(ranks_out.iter_mut()) {
        if let (true, Some(Outcome::Done(Ok(hits)))) = (r.want.explain, out.as_mut()) {
            let vectors = match &r.target {
                Target::Inline(inline) => {
                    let encodings: Vec<Encoding> = hits.iter().map(|h| inline.encodings[h.id.parse::<usize>().expect("an inline hit's id is its position")].clone()).collect();
                    ranker.candidate_vectors(&encodings, encode_batch)
                }
                _ => {
                    let rows: Vec<i64> = hits.iter().map(|h| pool.row(&h.id).expect("a hit of this pool") as i64).collect();
                    vectors_now.select(&Tensor::from_slice(&rows).to_device(vectors_now.device())).exact()
                }
            };
            explain(ranker, &r.context, hits, &vectors);
        }
    }
    metrics::histogram!(m::STAGE_SECONDS, "stage" => "score").record(score_start.elapsed().as_secs_f64());
    let ranks = ranks_out.into_iter().map(|o| o.expect("every rank has a context row and an outcome")).collect();
    Answers { ranks, encodes: encodes_out }
}

/// A lookup by id, in the pool as it is.
pub(crate) fn get(pool: &LivePool, id: &str) -> Option<crate::pool::store::Candidate> {
    pool.row(id).map(|r| pool.candidate(r).clone())
}

/// Pool rows to ids (and texts, meta), now, while the pool is as it was ranked. What the
/// answer carries is counted as it is copied: past `want.budget` bytes
/// (`max_response_bytes`) the request is refused before the rest is copied (a `top_k: 1000,
/// return_meta: true` answer was 38.6 MB and took 3.5 s before meta was bounded).
fn pool_hits(pool: &LivePool, ranked: Vec<(i64, f32)>, want: Want) -> Result<Vec<Hit>, JobError> {
    let mut bytes = 0usize;
    let mut hits = Vec::with_capacity(ranked.len());
    for (row, score) in ranked {
        let c = pool.candidate(row as usize);
        let text = want.text.then(|| c.text.clone());
        let meta = if want.meta { c.meta.clone() } else { None };
        bytes += c.id.len() + text.as_ref().map_or(0, String::len) + meta.as_ref().map_or(0, json_len);
        if bytes > want.budget {
            return Err(JobError::Invalid(format!(
                "the answer would carry more than {} bytes of ids, texts and meta (max_response_bytes): ask for a smaller top_k{}",
                want.budget,
                if want.text || want.meta { ", or without return_text / return_meta" } else { "" }
            )));
        }
        hits.push(Hit { id: c.id.clone(), score, text, meta, explain: None });
    }
    Ok(hits)
}

/// Inline candidates' hits: ids are positions in the request.
pub(crate) fn inline_hits(ranked: Vec<(i64, f32)>, inline: &Inline, want: Want) -> Vec<Hit> {
    ranked
        .into_iter()
        .map(|(row, score)| Hit { id: row.to_string(), score, text: want.text.then(|| inline.texts[row as usize].clone()), meta: None, explain: None })
        .collect()
}

/// Rows of the requested ids (every unknown id reported), kept if they pass the filter.
fn id_rows(pool: &LivePool, ids: &[String], filter: Option<&Filter>) -> Result<Vec<i64>, JobError> {
    let mut rows = Vec::with_capacity(ids.len());
    let mut unknown = Vec::new();
    for id in ids {
        match pool.row(id) {
            Some(r) => rows.push(r),
            None => unknown.push(id.as_str()),
        }
    }
    if !unknown.is_empty() {
        let shown: Vec<&str> = unknown.iter().take(10).copied().collect();
        return Err(JobError::Invalid(format!("{} ids are not in the pool: {shown:?}", unknown.len())));
    }
    Ok(rows
        .into_iter()
        .filter(|&r| filter.is_none_or(|f| f.matches(pool.candidate(r).meta.as_ref())))
        .map(|r| r as i64)
        .collect())
}

/// Bytes of a value as compact JSON, without building the string.
fn json_len(v: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// A tensor as row-major fp32 values with its shape.
pub(crate) fn vectors(t: &Tensor) -> Vectors {
    let t = t.to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous();
    let shape = t.size().iter().map(|&s| s as usize).collect();
    let data = Vec::<f32>::try_from(t.view([-1])).unwrap_or_default();
    Vectors { shape, data }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    //! The batch's reads against a tiny random-weight model and an in-memory pool: no server,
    //! no queue, no thread. Each read of a mixed batch must answer as it does alone, and as
    //! the brute-force ranking does.
    use super::*;
    use crate::pool::store::Candidate;
    use serde_json::json;

    fn ranker(dir: &std::path::Path) -> Ranker {
        crate::testkit::write_tiny_model(dir, &crate::testkit::tiny_settings(4), 7).unwrap();
        Ranker::load(dir, tch::Device::Cpu).unwrap()
    }

    const WORDS: &[&str] = &["pizza", "cats", "dogs", "rain", "sun", "music", "guitar", "books", "travel", "paris"];

    fn pool(r: &Ranker, n: usize) -> LivePool {
        let cands: Vec<Candidate> = (0..n)
            .map(|i| Candidate {
                id: format!("c{i}"),
                // Distinct for i < 100: tied scores would leave the order to chance.
                text: format!("i like {} and {} with {}", WORDS[i % 10], WORDS[(i / 10) % 10], WORDS[(i * 3 + 1) % 10]),
                meta: Some(json!({"even": i % 2 == 0})),
            })
            .collect();
        let texts: Vec<String> = cands.iter().map(|c| c.text.clone()).collect();
        let v = r.candidate_vectors(&r.tokenize(&texts, TextKind::Candidate).unwrap(), 16);
        LivePool::new(cands, v, crate::pool::meta::MetaLimits { keys: 8, depth: 2, bytes: 1024, string_chars: 64 }, 1 << 20)
    }

    fn want() -> Want {
        Want { text: true, meta: true, explain: false, budget: 1 << 20 }
    }

    fn rank(r: &Ranker, context: &str, target: Target, top_k: i64) -> RankWork {
        let context = r.tokenize(&[context.to_string()], TextKind::Context).unwrap().remove(0);
        RankWork { context, target, top_k, want: want() }
    }

    fn inline(r: &Ranker, texts: &[&str]) -> Target {
        let texts: Vec<String> = texts.iter().map(|t| t.to_string()).collect();
        let encodings = r.tokenize(&texts, TextKind::Candidate).unwrap();
        Target::Inline(Inline { texts, encodings })
    }

    fn hits(o: &Outcome<Vec<Hit>, ContextVectors>) -> Vec<(String, f32)> {
        match o {
            Outcome::Done(Ok(h)) => h.iter().map(|h| (h.id.clone(), h.score)).collect(),
            Outcome::Done(Err(e)) => panic!("a read failed: {e:?}"),
            Outcome::Later(_) => panic!("a small read was sent to chunks"),
        }
    }

    fn same(a: &[(String, f32)], b: &[(String, f32)]) {
        assert_eq!(a.iter().map(|h| &h.0).collect::<Vec<_>>(), b.iter().map(|h| &h.0).collect::<Vec<_>>());
        for (x, y) in a.iter().zip(b) {
            assert!((x.1 - y.1).abs() <= 1e-5 * x.1.abs().max(1.0), "{} scored {} and {}", x.0, x.1, y.1);
        }
    }

    #[test]
    fn each_read_of_a_mixed_batch_answers_as_it_does_alone_and_as_brute_force() {
        let _g = tch::no_grad_guard();
        let dir = tempfile::tempdir().unwrap();
        let r = ranker(dir.path());
        let p = pool(&r, 60);
        let even = Filter::parse(&json!({"even": true})).unwrap();
        let works = vec![
            rank(&r, "what is your favourite food", Target::Pool(None), 5),
            rank(&r, "do you like the rain", Target::Pool(None), 7),
            rank(&r, "hello how are you", Target::Pool(Some(even)), 4),
            rank(&r, "i love books", Target::Ids(vec!["c3".into(), "c10".into(), "c11".into()], None), 3),
            rank(&r, "i love books", inline(&r, &["i like pizza", "cats are good", "i like pizza"]), 3),
            rank(&r, "travel to paris", Target::Approximate(60), 5),
        ];
        let enc = |texts: &[&str], kind| EncodeWork {
            texts: r.tokenize(&texts.iter().map(|t| t.to_string()).collect::<Vec<_>>(), kind).unwrap(),
            kind,
        };
        let encodes = vec![enc(&["i like pizza", "the sun"], TextKind::Candidate), enc(&["how are you today"], TextKind::Context)];
        let refs: Vec<&RankWork> = works.iter().collect();
        let erefs: Vec<&EncodeWork> = encodes.iter().collect();
        let batch = run(&r, &p, &refs, &erefs, 8);
        assert_eq!((batch.ranks.len(), batch.encodes.len()), (works.len(), encodes.len()));
        for (i, w) in works.iter().enumerate() {
            let alone = run(&r, &p, &[w], &[], 8);
            same(&hits(&batch.ranks[i]), &hits(&alone.ranks[0]));
        }
        // The whole pool, filtered or not, as the model ranks every row.
        let exact = p.exact_vectors();
        let brute = |w: &RankWork, rows: &[usize]| -> Vec<(String, f32)> {
            let codes = r.context_codes(std::slice::from_ref(&w.context), 1);
            let sub = exact.index_select(0, &Tensor::from_slice(&rows.iter().map(|&x| x as i64).collect::<Vec<_>>()));
            r.model.rank(&codes, &sub, &[w.top_k]).swap_remove(0).into_iter().map(|(i, s)| (format!("c{}", rows[i as usize]), s)).collect()
        };
        let all: Vec<usize> = (0..60).collect();
        same(&hits(&batch.ranks[0]), &brute(&works[0], &all));
        same(&hits(&batch.ranks[1]), &brute(&works[1], &all));
        same(&hits(&batch.ranks[2]), &brute(&works[2], &all.iter().copied().filter(|i| i % 2 == 0).collect::<Vec<_>>()));
        same(&hits(&batch.ranks[3]), &brute(&works[3], &[3, 10, 11]));
        // Preselecting every row is the exact ranking.
        same(&hits(&batch.ranks[5]), &brute(&works[5], &all));
        // Inline candidates: ids are positions; the same text twice scores the same.
        let h = hits(&batch.ranks[4]);
        let score = |id: &str| h.iter().find(|x| x.0 == id).map(|x| x.1);
        assert_eq!(score("0"), score("2"));
        // Encodes: the candidate side matches the pool's own vectors for the same text.
        match (&batch.encodes[0], &batch.encodes[1]) {
            (Outcome::Done(Ok(c)), Outcome::Done(Ok(x))) => {
                assert_eq!(c.shape, vec![2, 32]);
                assert_eq!(x.shape, vec![1, 4, 32]);
                let again = vectors(&r.candidate_vectors(&encodes[0].texts, 1));
                for (a, b) in c.data.iter().zip(&again.data) {
                    assert!((a - b).abs() < 1e-5);
                }
            }
            _ => panic!("small encodes are answered in the batch"),
        }
    }

    #[test]
    fn unknown_ids_and_oversized_answers_are_refused_and_large_work_goes_to_chunks() {
        let _g = tch::no_grad_guard();
        let dir = tempfile::tempdir().unwrap();
        let r = ranker(dir.path());
        let p = pool(&r, 20);
        let unknown = rank(&r, "hello", Target::Ids(vec!["c1".into(), "nope".into()], None), 2);
        let mut big_answer = rank(&r, "hello", Target::Pool(None), 20);
        big_answer.want.budget = 10;
        let long: Vec<&str> = std::iter::repeat_n("i like pizza and cats and dogs and music and the rain", 60).collect();
        let chunked = rank(&r, "hello", inline(&r, &long), 3);
        let big_encode = EncodeWork { texts: r.tokenize(&long.iter().map(|t| t.to_string()).collect::<Vec<_>>(), TextKind::Candidate).unwrap(), kind: TextKind::Candidate };
        let out = run(&r, &p, &[&unknown, &big_answer, &chunked], &[&big_encode], 8);
        assert!(matches!(&out.ranks[0], Outcome::Done(Err(JobError::Invalid(m))) if m.contains("nope")));
        assert!(matches!(&out.ranks[1], Outcome::Done(Err(JobError::Invalid(m))) if m.contains("max_response_bytes")));
        match &out.ranks[2] {
            Outcome::Later(codes) => assert_eq!(codes.y.size(), vec![1, 4, 32]),
            _ => panic!("inline candidates over a chunk go on in chunks"),
        }
        assert!(matches!(out.encodes[0], Outcome::Later(())));
    }
}

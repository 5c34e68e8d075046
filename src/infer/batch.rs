//! One batch of work on the inference thread: every context in one encoder pass, every small
//! candidate-side encode (inline candidates of all requests, /encode candidates) in one
//! deduplicated pass, every pool ranking in one scoring call. Work whose texts exceed a chunk
//! leaves the batch as chunked work.

use super::chunked::{Chunked, Then, CHUNK_TOKENS};
use super::queue::{JobError, Output, PoolHit, Reply, Target, Want, Work};
use crate::pool::filter::Filter;
use super::worker::{Step, Worker};
use crate::metrics as m;
use crate::model::scoring::ContextVectors;
use crate::text::TextKind;
use std::collections::HashMap;
use std::time::Instant;
use tch::{Kind, Tensor};
use tokenizers::Encoding;

fn tokens(texts: &[Encoding]) -> usize {
    texts.iter().map(|e| e.get_ids().len()).sum()
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

impl Worker {
    pub(super) fn run_batch(&self, works: &[&Work]) -> Vec<Step> {
        let mut out: Vec<Option<Step>> = works.iter().map(|_| None).collect();
        let start = Instant::now();
        let bs = self.config.max_batch_size.max(1);
        let small = |texts: &[Encoding]| tokens(texts) <= CHUNK_TOKENS;

        // Contexts: rank requests and small context encodes share one encoder pass.
        let mut ctx_encodings: Vec<Encoding> = Vec::new();
        let mut ctx_row: Vec<Option<(i64, i64)>> = vec![None; works.len()]; // (first row, rows)
        // Candidate-side texts of small jobs, deduplicated across the batch.
        let mut distinct = Distinct::default();
        let mut cand_rows: Vec<Option<Vec<i64>>> = vec![None; works.len()];
        for (i, w) in works.iter().enumerate() {
            match w {
                Work::Rank { context, target, .. } => {
                    ctx_row[i] = Some((ctx_encodings.len() as i64, 1));
                    ctx_encodings.push(context.clone());
                    if let Target::Inline(texts) = target {
                        if small(texts) {
                            cand_rows[i] = Some(distinct.add(texts));
                        }
                    }
                }
                Work::Encode { texts, kind: TextKind::Context } if small(texts) => {
                    ctx_row[i] = Some((ctx_encodings.len() as i64, texts.len() as i64));
                    ctx_encodings.extend(texts.iter().cloned());
                }
                Work::Encode { texts, kind: TextKind::Candidate } if small(texts) => cand_rows[i] = Some(distinct.add(texts)),
                Work::Encode { texts, kind } => out[i] = Some(Step::Chunked(Chunked::new(*kind, texts.clone(), Then::Vectors))),
                Work::Upsert { .. } | Work::Delete { .. } | Work::Get { .. } => {
                    out[i] = Some(Step::Done(Err(JobError::Failed("a write reached the read path".into()))))
                }
            }
        }
        let codes = (!ctx_encodings.is_empty()).then(|| self.ranker.context_codes(&ctx_encodings, ctx_encodings.len()));
        let cand_vectors = (!distinct.texts.is_empty()).then(|| self.ranker.candidate_vectors(&distinct.texts, bs * 8));
        metrics::histogram!(m::STAGE_SECONDS, "stage" => "inference").record(start.elapsed().as_secs_f64());

        let score_start = Instant::now();
        let model = &self.ranker.model;
        let pool = self.pool.vectors();
        let mut pool_rows: Vec<(usize, i64, i64)> = Vec::new(); // (work, codes row, k)
        for (i, w) in works.iter().enumerate() {
            if out[i].is_some() {
                continue;
            }
            let rows = |v: &Tensor| v.index_select(0, &Tensor::from_slice(cand_rows[i].as_ref().expect("rows")).to_device(v.device()));
            let step = match (w, &codes, ctx_row[i]) {
                (Work::Encode { kind: TextKind::Candidate, .. }, _, _) => Step::Done(Ok(vectors(&rows(cand_vectors.as_ref().expect("candidate pass"))))),
                (Work::Encode { .. }, Some(codes), Some((row, n))) => Step::Done(Ok(vectors(&codes.y.narrow(0, row, n)))),
                (Work::Rank { target, top_k, want, .. }, Some(codes), Some((row, _))) => {
                    let c = codes.select(row);
                    match target {
                        Target::Pool(None) => {
                            pool_rows.push((i, row, *top_k));
                            continue;
                        }
                        // Only the matching rows are scored.
                        Target::Pool(Some(filter)) => {
                            let rows = self.pool.filter_rows(filter);
                            Step::Done(self.hits(model.rank_rows(&c, &pool, &rows, *top_k), *want))
                        }
                        Target::Ids(ids, filter) => match self.id_rows(ids, filter.as_ref()) {
                            Ok(rows) => Step::Done(self.hits(model.rank_rows(&c, &pool, &rows, *top_k), *want)),
                            Err(e) => Step::Done(Err(e)),
                        },
                        Target::Approximate(preselect) => {
                            Step::Done(self.hits(model.rank_approximate(&c, &pool, *preselect, *top_k), *want))
                        }
                        Target::Inline(_) if cand_rows[i].is_some() => {
                            let cands = rows(cand_vectors.as_ref().expect("candidate pass"));
                            Step::Done(Ok(Output::Ranked(model.rank(&c, &cands, &[*top_k]).swap_remove(0))))
                        }
                        Target::Inline(texts) => {
                            let codes = ContextVectors { y: c.y.copy(), mask: c.mask.copy() };
                            Step::Chunked(Chunked::new(TextKind::Candidate, texts.clone(), Then::Rank { codes, top_k: *top_k }))
                        }
                    }
                }
                _ => Step::Done(Err(JobError::Failed("work was not handled".into()))),
            };
            out[i] = Some(step);
        }
        if let (false, Some(codes)) = (pool_rows.is_empty(), &codes) {
            // All pool rankings of the batch in one kernel call: [B, m, d] × [N, d].
            let rows = Tensor::from_slice(&pool_rows.iter().map(|p| p.1).collect::<Vec<_>>()).to_device(codes.y.device());
            let sub = ContextVectors { y: codes.y.index_select(0, &rows), mask: codes.mask.index_select(0, &rows) };
            let ks: Vec<i64> = pool_rows.iter().map(|p| p.2).collect();
            for (ranked, &(i, _, _)) in model.rank_pool(&sub, &pool, &ks).into_iter().zip(&pool_rows) {
                let Work::Rank { want, .. } = works[i] else { unreachable!("pool rows come from rank work") };
                out[i] = Some(Step::Done(self.hits(ranked, *want)));
            }
        }
        metrics::histogram!(m::STAGE_SECONDS, "stage" => "score").record(score_start.elapsed().as_secs_f64());
        out.into_iter().map(|o| o.unwrap_or_else(|| Step::Done(Err(JobError::Failed("work was not handled".into()))))).collect()
    }

    /// Pool rows to ids (and texts, meta), now, while the pool is as it was ranked. What the
    /// answer carries is counted as it is copied: past `want.budget` bytes
    /// (`max_response_bytes`) the request is refused before the rest is copied (a `top_k: 1000,
    /// return_meta: true` answer was 38.6 MB and took 3.5 s before meta was bounded).
    fn hits(&self, ranked: Vec<(i64, f32)>, want: Want) -> Reply {
        let mut bytes = 0usize;
        let mut hits = Vec::with_capacity(ranked.len());
        for (row, score) in ranked {
            let c = self.pool.candidate(row as usize);
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
            hits.push(PoolHit { id: c.id.clone(), score, text, meta });
        }
        Ok(Output::Hits(hits))
    }

    /// Rows of the requested ids (every unknown id reported), kept if they pass the filter.
    fn id_rows(&self, ids: &[String], filter: Option<&Filter>) -> Result<Vec<i64>, JobError> {
        let mut rows = Vec::with_capacity(ids.len());
        let mut unknown = Vec::new();
        for id in ids {
            match self.pool.row(id) {
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
            .filter(|&r| filter.is_none_or(|f| f.matches(self.pool.candidate(r).meta.as_ref())))
            .map(|r| r as i64)
            .collect())
    }
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

pub(super) fn vectors(t: &Tensor) -> Output {
    let t = t.to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous();
    let shape = t.size().iter().map(|&s| s as usize).collect();
    let data = Vec::<f32>::try_from(t.view([-1])).unwrap_or_default();
    Output::Vectors { shape, data }
}

//! Why a candidate scored: which of the context's m vectors it attended to, and which context
//! tokens each of those vectors read. Both are the model's own attention weights (the head's
//! two `attend`s), recomputed for one context and its hits; nothing here runs unless a
//! request asks (`/rank` with `"explain": true`).

use super::format::{Mode, PolyType, Pooling};
use super::{Batch, PolyEncoder};
use tch::{Kind, Tensor};

/// One of the context's vectors as a candidate used it.
#[derive(Debug, Clone, PartialEq)]
pub struct CodeUse {
    /// Which of the m vectors (code i, or token i for `n_first`).
    pub code: i64,
    /// The candidate's attention weight on it (its share of the score's context vector).
    pub weight: f32,
    /// The context tokens this vector read most: (token position, weight), heaviest first.
    pub tokens: Vec<(usize, f32)>,
}

/// The best `k` entries of a 1-d fp32 tensor, heaviest first, zero weights left out.
fn top(weights: &Tensor, k: usize) -> Vec<(i64, f32)> {
    let n = weights.size()[0];
    let (vals, idx) = weights.topk((k as i64).min(n), -1, true, true);
    let vals = Vec::<f32>::try_from(vals).unwrap_or_default();
    let idx = Vec::<i64>::try_from(idx).unwrap_or_default();
    idx.into_iter().zip(vals).filter(|(_, w)| *w > 0.0).collect()
}

impl PolyEncoder {
    /// `batch`: one context; `candidates: [k, d]` the vectors of its hits. For each hit, its
    /// `codes` heaviest context vectors and each one's `tokens` heaviest context tokens.
    pub fn explain(&self, batch: &Batch, candidates: &Tensor, codes: usize, tokens: usize) -> Vec<Vec<CodeUse>> {
        let s = &self.settings;
        let h = self.context_tokens(batch); // [1, n, d]
        let (_, n, _) = h.size3().expect("[1, n, d]");
        let token_mask = batch.mask.to_kind(Kind::Bool);
        let ctx = self.head.context_codes(&h, &batch.mask);
        let m = ctx.y.size()[1];
        // [m, n]: how much each context vector drew on each token.
        let reads = match (s.mode, s.poly_type) {
            (Mode::Poly, PolyType::Codes) => {
                let q = self.head.codes.as_ref().expect("codes").to_kind(h.kind()).unsqueeze(0);
                self.head.code_attention.weights(&q, &h, &token_mask).squeeze_dim(0)
            }
            // Vector i is token i's output.
            (Mode::Poly, PolyType::NFirst) => Tensor::eye_m(m, n, (Kind::Float, h.device())),
            (Mode::Bi, _) => {
                let real = batch.mask.to_kind(Kind::Float);
                match s.context_pooling {
                    Pooling::First => real.zeros_like().index_fill(1, &Tensor::from_slice(&[0i64]).to_device(h.device()), 1.0),
                    // Mean (and max, whose per-dimension winners have no single weight): each
                    // real token alike.
                    Pooling::Mean | Pooling::Max => &real / real.sum(Kind::Float),
                }
            }
        }
        .to_kind(Kind::Float);
        // [k, m]: each candidate's attention over the context vectors.
        let attends = self
            .head
            .candidate_attention
            .weights(&candidates.to_kind(ctx.y.kind()).unsqueeze(0), &ctx.y, &ctx.mask)
            .squeeze_dim(0)
            .to_kind(Kind::Float);
        (0..candidates.size()[0])
            .map(|c| {
                top(&attends.get(c), codes)
                    .into_iter()
                    .map(|(code, weight)| CodeUse {
                        code,
                        weight,
                        tokens: top(&reads.get(code), tokens).into_iter().map(|(t, w)| (t as usize, w)).collect(),
                    })
                    .collect()
            })
            .collect()
    }
}

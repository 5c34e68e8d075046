//! ParlAI's three `attend` variants, used both by the codes reading the context and by a
//! candidate reading the codes.

use super::format::{AttentionKind, AttentionSpec};
use tch::{nn, nn::Module, Kind, Tensor};

/// A logit that softmax turns into an exact zero but that stays finite in half precision.
pub(crate) fn masked_logit(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        _ => -1e9,
    }
}

/// A full multi-head attention block with its own projections (ParlAI names: q_lin, k_lin,
/// v_lin, out_lin); scores scaled by 1/√(d/heads).
#[derive(Debug)]
pub struct MultiHead {
    pub q_lin: nn::Linear,
    pub k_lin: nn::Linear,
    pub v_lin: nn::Linear,
    pub out_lin: nn::Linear,
    pub heads: i64,
}

impl MultiHead {
    pub(crate) fn new(p: nn::Path, d: i64, heads: i64) -> Self {
        MultiHead {
            q_lin: nn::linear(&p / "q_lin", d, d, Default::default()),
            k_lin: nn::linear(&p / "k_lin", d, d, Default::default()),
            v_lin: nn::linear(&p / "v_lin", d, d, Default::default()),
            out_lin: nn::linear(&p / "out_lin", d, d, Default::default()),
            heads,
        }
    }

    /// `[B, n, d]` → `[B, heads, n, d/heads]`
    pub fn split(&self, t: &Tensor) -> Tensor {
        let (b, n, d) = t.size3().expect("[B, n, d]");
        t.view([b, n, self.heads, d / self.heads]).transpose(1, 2)
    }

    /// `[B, heads, n, dh]` → `[B, n, d]`
    pub(crate) fn merge(&self, t: &Tensor) -> Tensor {
        let (b, h, n, dh) = t.size4().expect("[B, h, n, dh]");
        t.transpose(1, 2).contiguous().view([b, n, h * dh])
    }

    pub fn scale(&self, d: i64) -> f64 {
        1.0 / ((d / self.heads) as f64).sqrt()
    }
}

#[derive(Debug)]
pub enum Attention {
    Basic,
    Sqrt,
    Multihead(MultiHead),
}

impl Attention {
    pub fn new(p: nn::Path, spec: AttentionSpec, d: i64) -> Self {
        match spec.kind {
            AttentionKind::Basic => Attention::Basic,
            AttentionKind::Sqrt => Attention::Sqrt,
            AttentionKind::Multihead => Attention::Multihead(MultiHead::new(p, d, spec.heads)),
        }
    }

    /// The attention weights `forward` applies, `[B, nq, nk]` (multihead: the mean over heads),
    /// for explaining a score (`/rank` with `explain`); fp32.
    pub(crate) fn weights(&self, q: &Tensor, kv: &Tensor, key_mask: &Tensor) -> Tensor {
        let d = q.size()[2];
        let blocked = key_mask.logical_not().unsqueeze(1);
        match self {
            Attention::Basic | Attention::Sqrt => {
                let mut logits = q.matmul(&kv.transpose(1, 2));
                if matches!(self, Attention::Sqrt) {
                    logits = logits / (d as f64).sqrt();
                }
                logits.masked_fill(&blocked, masked_logit(logits.kind())).softmax(-1, Kind::Float)
            }
            Attention::Multihead(mh) => {
                let qh = mh.split(&mh.q_lin.forward(q));
                let kh = mh.split(&mh.k_lin.forward(kv));
                let logits = qh.matmul(&kh.transpose(-1, -2)) * mh.scale(d);
                let logits = logits.masked_fill(&blocked.unsqueeze(1), masked_logit(logits.kind()));
                logits.softmax(-1, Kind::Float).mean_dim(1, false, Kind::Float)
            }
        }
    }

    /// `q: [B, nq, d]`, `kv: [B, nk, d]` (keys and values are the same tensor in both uses),
    /// `key_mask: [B, nk]` bool, true where a key may be attended. Returns `[B, nq, d]`.
    pub(crate) fn forward(&self, q: &Tensor, kv: &Tensor, key_mask: &Tensor) -> Tensor {
        let d = q.size()[2];
        match self {
            Attention::Basic | Attention::Sqrt => {
                let mut logits = q.matmul(&kv.transpose(1, 2));
                if matches!(self, Attention::Sqrt) {
                    logits = logits / (d as f64).sqrt();
                }
                let logits = logits
                    .masked_fill(&key_mask.logical_not().unsqueeze(1), masked_logit(logits.kind()));
                logits.softmax(-1, logits.kind()).matmul(kv)
            }
            Attention::Multihead(mh) => {
                let qh = mh.split(&mh.q_lin.forward(q));
                let kh = mh.split(&mh.k_lin.forward(kv));
                let vh = mh.split(&mh.v_lin.forward(kv));
                let logits = qh.matmul(&kh.transpose(-1, -2)) * mh.scale(d);
                let logits = logits.masked_fill(
                    &key_mask.logical_not().unsqueeze(1).unsqueeze(1),
                    masked_logit(logits.kind()),
                );
                let out = logits.softmax(-1, logits.kind()).matmul(&vh);
                mh.out_lin.forward(&mh.merge(&out))
            }
        }
    }
}

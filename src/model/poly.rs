//! The Poly-encoder head: m context vectors read from the context's token outputs, and the
//! pooling that turns a candidate's token outputs into one vector.

use super::attention::Attention;
use super::scoring::ContextVectors;
use super::format::{AttentionKind, AttentionSpec, Mode, PolySettings, PolyType, Pooling};
use tch::{nn, Kind, Tensor};

#[derive(Debug)]
pub struct PolyHead {
    /// `[m, d]` learned codes (`codes` type only); ParlAI initialises them uniform on [0, 1).
    pub codes: Option<Tensor>,
    pub code_attention: Attention,
    pub candidate_attention: Attention,
    pub settings: PolySettings,
}

impl PolyHead {
    /// Declares the head's variables under `p` (names: `codes`, `code_attention.q_lin.weight`, …).
    pub fn new(p: &nn::Path, s: &PolySettings, d: i64) -> Self {
        let poly = s.mode == Mode::Poly;
        let codes = (poly && s.poly_type == PolyType::Codes)
            .then(|| p.var("codes", &[s.n_codes, d], nn::Init::Uniform { lo: 0.0, up: 1.0 }));
        let basic = AttentionSpec { kind: AttentionKind::Basic, heads: 1 };
        let code_spec = if codes.is_some() { s.codes_attention } else { basic };
        // A bi-encoder's single context vector gets softmax weight 1 whatever the attention,
        // so its score is the plain dot product.
        let cand_spec = if poly { s.candidate_attention } else { basic };
        PolyHead {
            codes,
            code_attention: Attention::new(p / "code_attention", code_spec, d),
            candidate_attention: Attention::new(p / "candidate_attention", cand_spec, d),
            settings: s.clone(),
        }
    }

    /// `h: [B, n, d]` token outputs, `mask: [B, n]` (1 = token) → the vectors candidates attend to.
    pub fn context_codes(&self, h: &Tensor, mask: &Tensor) -> ContextVectors {
        let s = &self.settings;
        let (b, n, d) = h.size3().expect("[B, n, d]");
        let token_mask = mask.to_kind(Kind::Bool);
        match (s.mode, s.poly_type) {
            (Mode::Bi, _) => {
                let y = pool(h, mask, s.context_pooling, s.normalize).unsqueeze(1);
                let mask = Tensor::ones([b, 1], (Kind::Bool, h.device()));
                ContextVectors { y, mask }
            }
            (Mode::Poly, PolyType::Codes) => {
                let codes = self.codes.as_ref().expect("codes variable");
                let q = codes.to_kind(h.kind()).unsqueeze(0).expand([b, s.n_codes, d], true);
                let y = self.code_attention.forward(&q, h, &token_mask);
                let mask = Tensor::ones([b, s.n_codes], (Kind::Bool, h.device()));
                ContextVectors { y, mask }
            }
            (Mode::Poly, PolyType::NFirst) => {
                let m = s.n_codes;
                let keep = m.min(n);
                let mut ymask = token_mask.narrow(1, 0, keep);
                // Padding positions are masked anyway; zeroing them makes a padded batch
                // return exactly what the same context alone returns.
                let mut y = h.narrow(1, 0, keep) * ymask.to_kind(h.kind()).unsqueeze(-1);
                if keep < m {
                    // Short contexts: zero vectors, masked out of the candidate's attention.
                    y = Tensor::cat(&[y, Tensor::zeros([b, m - keep, d], (h.kind(), h.device()))], 1);
                    ymask = Tensor::cat(&[ymask, Tensor::zeros([b, m - keep], (Kind::Bool, h.device()))], 1);
                }
                ContextVectors { y, mask: ymask }
            }
        }
    }
}

/// ParlAI's `TransformerResponseWrapper`: a bi-encoder whose two sides share one transformer
/// reads candidates through this Linear → ReLU → Linear on the pooled vector (names `mlp.0.*`,
/// `mlp.2.*` as in ParlAI's state dict, `cand_encoder.mlp.*`).
#[derive(Debug)]
pub struct CandidateMlp {
    first: nn::Linear,
    second: nn::Linear,
}

impl CandidateMlp {
    pub fn new(p: &nn::Path, d: i64) -> Self {
        let p = p / "mlp";
        CandidateMlp { first: nn::linear(&p / "0", d, d, Default::default()), second: nn::linear(&p / "2", d, d, Default::default()) }
    }

    /// `[B, d]` pooled → `[B, d]`.
    pub fn forward(&self, v: &Tensor) -> Tensor {
        use tch::nn::Module;
        self.second.forward(&self.first.forward(v).relu())
    }
}

/// L2-normalises the rows of `[B, d]`.
pub fn normalized(v: Tensor) -> Tensor {
    let norm = v.norm_scalaropt_dim(2.0, [-1], true).clamp_min(1e-12);
    v / norm
}

/// Pools token outputs `[B, n, d]` into `[B, d]`.
pub fn pool(h: &Tensor, mask: &Tensor, pooling: Pooling, normalize: bool) -> Tensor {
    let v = match pooling {
        Pooling::First => h.select(1, 0),
        // Padding masked out, so a candidate's vector does not depend on its batch (ParlAI's
        // max also sees the zeros at padded positions).
        Pooling::Max => h.masked_fill(&mask.eq(0).unsqueeze(-1), f64::NEG_INFINITY).amax([1], false),
        Pooling::Mean => {
            let m = mask.to_kind(h.kind()).unsqueeze(-1);
            let sum = (h * &m).sum_dim_intlist(1, false, h.kind());
            sum / m.sum_dim_intlist(1, false, h.kind()).clamp_min(1e-9)
        }
    };
    if normalize {
        normalized(v)
    } else {
        v
    }
}

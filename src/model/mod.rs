//! The Poly-encoder: context and candidate encoders, the poly head, and scoring.

pub mod attention;
pub mod bert;
pub mod encoder;
pub mod family;
pub mod explain;
pub mod parlai;
pub mod int8;
pub mod lowp;
pub mod rows;
pub mod poly;
pub mod scoring;
pub mod format;
pub mod mixed;
pub(crate) mod init;
pub(crate) mod weights;

use encoder::{Encoder, EncoderConfig};
use poly::PolyHead;
use rows::{CandidateRows, Precision};
use scoring::ContextVectors;
use format::*;
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Device, Kind, Tensor};

/// One padded batch, ready for the encoder.
pub struct Batch {
    /// `[B, L]` token ids
    pub ids: Tensor,
    /// `[B, L]` segment ids (all 0: one segment)
    pub type_ids: Tensor,
    /// `[B, L]` 1 for real tokens, 0 for padding
    pub mask: Tensor,
}

pub struct PolyEncoder {
    pub settings: PolySettings,
    pub config: EncoderConfig,
    pub device: Device,
    pub dir: PathBuf,
    context_encoder: Encoder,
    /// None when encoders are shared.
    candidate_encoder: Option<Encoder>,
    pub head: PolyHead,
    /// `candidate_mlp.safetensors` when the directory has one (ParlAI bi-encoders).
    candidate_mlp: Option<(VarStore, poly::CandidateMlp)>,
    pub encoder_vs: VarStore,
    pub candidate_vs: Option<VarStore>,
    pub head_vs: VarStore,
}

impl PolyEncoder {
    pub fn load(dir: &Path, device: Device) -> Result<Self, FormatError> {
        Self::load_with(dir, PolySettings::load(dir)?, device)
    }

    /// With the directory's `polyrank.json` already read (the server reads it once).
    pub fn load_with(dir: &Path, settings: PolySettings, device: Device) -> Result<Self, FormatError> {
        let config = EncoderConfig::load(dir)?;
        let (encoder_vs, context_encoder) = load_encoder(dir, &config, device)?;
        let (candidate_vs, candidate_encoder) = if settings.share_encoders {
            (None, None)
        } else {
            let cdir = dir.join(CANDIDATE_ENCODER_DIR);
            let cconfig = EncoderConfig::load(&cdir)?;
            if cconfig.hidden_size() != config.hidden_size() {
                return Err(FormatError::malformed(
                    &cdir.join(CONFIG_FILE),
                    "candidate encoder hidden_size differs from the context encoder's",
                ));
            }
            let (vs, encoder) = load_encoder(&cdir, &cconfig, device)?;
            (Some(vs), Some(encoder))
        };
        let mut head_vs = VarStore::new(device);
        let head = PolyHead::new(&head_vs.root(), &settings, config.hidden_size());
        let head_path = dir.join(HEAD_FILE);
        if !head_vs.variables().is_empty() || head_path.exists() {
            weights::load_into(&mut head_vs, &head_path)?;
        }
        let mlp_path = dir.join(CANDIDATE_MLP_FILE);
        let candidate_mlp = if mlp_path.exists() {
            let mut vs = VarStore::new(device);
            let mlp = poly::CandidateMlp::new(&vs.root(), config.hidden_size());
            weights::load_into(&mut vs, &mlp_path)?;
            Some((vs, mlp))
        } else {
            None
        };
        Ok(PolyEncoder {
            settings,
            config,
            device,
            dir: dir.to_path_buf(),
            context_encoder,
            candidate_encoder,
            head,
            candidate_mlp,
            encoder_vs,
            candidate_vs,
            head_vs,
        })
    }

    /// Runs the transformer encoders in `kind` (fp16 / bf16 on CUDA halve their cost); their
    /// outputs are cast back to fp32, so the head, pooling and scoring keep fp32 precision.
    pub fn set_precision(&mut self, kind: Kind) {
        self.encoder_vs.set_kind(kind);
        if let Some(vs) = self.candidate_vs.as_mut() {
            vs.set_kind(kind);
        }
    }

    pub fn dim(&self) -> i64 {
        self.config.hidden_size()
    }

    fn candidate_encoder_ref(&self) -> &Encoder {
        self.candidate_encoder.as_ref().unwrap_or(&self.context_encoder)
    }

    /// Token outputs of the context encoder, scaled by `output_scaling`.
    pub(crate) fn context_tokens(&self, batch: &Batch) -> Tensor {
        let h = self.context_encoder.forward(&batch.ids, &batch.type_ids, &batch.mask).to_kind(Kind::Float);
        scaled(h, self.settings.output_scaling)
    }

    /// `[B, d]` pooled candidate vectors.
    pub fn candidate_vectors(&self, batch: &Batch) -> Tensor {
        let h = self.candidate_encoder_ref().forward(&batch.ids, &batch.type_ids, &batch.mask).to_kind(Kind::Float);
        let h = scaled(h, self.settings.output_scaling);
        // The candidate MLP (when there is one) reads the pooled vector before `normalize`.
        let pooled = poly::pool(&h, &batch.mask, self.settings.candidate_pooling, false);
        let v = match &self.candidate_mlp {
            Some((_, mlp)) => mlp.forward(&pooled),
            None => pooled,
        };
        if self.settings.normalize {
            poly::normalized(v)
        } else {
            v
        }
    }

    /// The m vectors (1 in bi mode) each candidate attends over.
    pub fn context_codes(&self, batch: &Batch) -> ContextVectors {
        let h = self.context_tokens(batch);
        self.head.context_codes(&h, &batch.mask)
    }

    /// `[B, N]` scores of each context against every candidate row.
    pub fn score(&self, codes: &ContextVectors, candidates: &Tensor) -> Tensor {
        scoring::score(codes, candidates, &self.head.candidate_attention)
    }

    /// The context codes of token outputs computed earlier (one `[n_i, d]` tensor per
    /// context, padding removed): the head alone, as head-only training and eval run it.
    pub(crate) fn codes_from_tokens(&self, contexts: &[Tensor]) -> ContextVectors {
        let lens: Vec<i64> = contexts.iter().map(|t| t.size()[0]).collect();
        let h = Tensor::pad_sequence(contexts, true, 0.0, "right");
        let l = h.size()[1];
        let lens = Tensor::from_slice(&lens).to_device(h.device()).unsqueeze(1);
        let mask = Tensor::arange(l, (Kind::Int64, h.device())).unsqueeze(0).lt_tensor(&lens).to_kind(Kind::Int64);
        self.head.context_codes(&h, &mask)
    }

    /// Ranking, the one place it is written: for context b of `codes`, the best `top_k[b]`
    /// rows of `candidates`, best first, with their scores.
    pub fn rank(&self, codes: &ContextVectors, candidates: &Tensor, top_k: &[i64]) -> Vec<Vec<(i64, f32)>> {
        let scores = self.score(codes, candidates);
        top_k.iter().enumerate().map(|(b, &k)| scoring::top_k(&scores.get(b as i64), k)).collect()
    }

    /// Ranking over the pool's rows in whatever precision they are kept: the same answer as
    /// `rank` over their fp32 vectors (see `lowp`).
    pub fn rank_pool(&self, codes: &ContextVectors, rows: &CandidateRows, top_k: &[i64]) -> Vec<Vec<(i64, f32)>> {
        let (ranked, effort) = lowp::rank(codes, rows, &self.head.candidate_attention, top_k);
        if rows.precision() != Precision::Float32 {
            metrics::histogram!(crate::metrics::RESCORED_ROWS).record(effort.rescored as f64);
        }
        ranked
    }

    /// One context against some rows of `pool`; results carry pool row numbers.
    pub fn rank_rows(&self, codes: &ContextVectors, pool: &CandidateRows, rows: &[i64], k: i64) -> Vec<(i64, f32)> {
        let idx = Tensor::from_slice(rows).to_device(pool.device());
        let ranked = self.rank_pool(codes, &pool.select(&idx), &[k]).swap_remove(0);
        ranked.into_iter().map(|(j, s)| (rows[j as usize], s)).collect()
    }

    /// One context against `pool`, approximately: only the `preselect` rows with the best dot
    /// product against the masked mean of the context's vectors (a bi-encoder pass, 2·d·N
    /// FLOPs instead of 2·m·d·N, in the rows' precision) are scored exactly.
    pub fn rank_approximate(&self, codes: &ContextVectors, pool: &CandidateRows, preselect: i64, k: i64) -> Vec<(i64, f32)> {
        let mask = codes.mask.to_kind(Kind::Float).unsqueeze(-1); // [1, m, 1]
        let mean = (&codes.y.to_kind(Kind::Float) * &mask).sum_dim_intlist(1, false, Kind::Float) / mask.sum(Kind::Float).clamp_min(1.0); // [1, d]
        let mean = mean.transpose(0, 1).contiguous(); // [d, 1]
        let pre = match (pool.matrix(), pool.low()) {
            (Some(m), _) => m.matmul(&mean.to_kind(m.kind())).squeeze_dim(-1),
            (None, Some((low, scale, _))) if pool.precision() == Precision::Int8 => {
                // Row order only: the context's scale is one positive factor and drops out.
                let s = mean.abs().max().clamp_min(1e-30) / 63.0;
                let q = (&mean / s).round().clamp(-63.0, 63.0).transpose(0, 1); // [1, d]
                match int8::prepack(&q).and_then(|p| int8::matmul(low, &p)) {
                    Ok(dots) => dots.squeeze_dim(-1) * scale,
                    Err(_) => pool.exact().matmul(&mean).squeeze_dim(-1),
                }
            }
            (None, Some((low, _, _))) => low.matmul(&mean.to_kind(Kind::BFloat16)).squeeze_dim(-1).to_kind(Kind::Float),
            (None, None) => unreachable!("rows are a matrix or a low-precision copy"),
        };
        let (_, idx) = pre.topk(preselect.min(pool.len()), -1, true, false);
        let rows: Vec<i64> = Vec::try_from(idx.to_device(tch::Device::Cpu)).unwrap_or_default();
        self.rank_rows(codes, pool, &rows, k)
    }
}

fn scaled(h: Tensor, scaling: f64) -> Tensor {
    if scaling == 1.0 {
        h
    } else {
        h * scaling
    }
}

fn load_encoder(dir: &Path, config: &EncoderConfig, device: Device) -> Result<(VarStore, Encoder), FormatError> {
    let mut vs = VarStore::new(device);
    let encoder = Encoder::new(vs.root(), config);
    weights::load_encoder_into(&mut vs, dir, &|name| config.var_name(name))?;
    Ok((vs, encoder))
}

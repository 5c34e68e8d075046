//! ParlAI's `TransformerEncoder` (`parlai/agents/transformer/modules/encoder.py`), the encoder
//! of ParlAI's poly- and bi-encoders and of the paper's released models: one struct per block,
//! variables under ParlAI's own state-dict names (`embeddings.weight`,
//! `layers.3.attention.q_lin.weight`, `layers.3.ffn.lin1.weight`, `layers.3.norm2.bias`, …),
//! so an imported checkpoint loads as it is (`polyrank import parlai`).
//!
//! The three variants differ only in where LayerNorm sits:
//! - `aiayn`: after each residual sum (post-norm), no norm on the embeddings;
//! - `xlm`: post-norm, and `norm_embeddings` on the embedding sum;
//! - `prelayernorm`: before each sublayer, and `norm_embeddings` on the last layer's output.

use super::attention::{masked_logit, MultiHead};
use super::format::{FormatError, CONFIG_FILE};
use super::mixed::linear;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{nn, nn::Module, Kind, Tensor};

/// `model_type` in config.json of an encoder written by `polyrank import parlai`.
pub const MODEL_TYPE: &str = "parlai_transformer";

/// ParlAI's `LAYER_NORM_EPS`.
const LAYER_NORM_EPS: f64 = 1e-5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    Aiayn,
    Xlm,
    Prelayernorm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FfnActivation {
    Relu,
    Gelu,
}

/// The options of ParlAI's `.opt` file that shape the encoder, as config.json keeps them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParlaiConfig {
    pub model_type: String,
    pub vocab_size: i64,
    pub embedding_size: i64,
    pub n_layers: i64,
    pub n_heads: i64,
    pub ffn_size: i64,
    pub n_positions: i64,
    /// 0: no segment embeddings.
    pub n_segments: i64,
    pub variant: Variant,
    pub activation: FfnActivation,
    /// Multiply token embeddings by √d (ParlAI `--embeddings-scale`).
    pub embeddings_scale: bool,
    /// The dictionary's null token id: ParlAI masks every position holding it.
    pub padding_idx: i64,
}

impl ParlaiConfig {
    pub(crate) fn validate(&self, path: &Path) -> Result<(), FormatError> {
        if self.n_heads < 1 || self.embedding_size % self.n_heads != 0 {
            return Err(FormatError::malformed(path, "embedding_size must be a multiple of n_heads"));
        }
        if self.n_positions < 1 || self.vocab_size < 1 || self.n_layers < 0 || self.ffn_size < 1 {
            return Err(FormatError::malformed(path, "n_positions, vocab_size and ffn_size must be positive"));
        }
        Ok(())
    }

    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).expect("config serialises");
        std::fs::write(dir.join(CONFIG_FILE), text + "\n")
    }
}

fn layer_norm(p: nn::Path, d: i64) -> nn::LayerNorm {
    nn::layer_norm(p, vec![d], nn::LayerNormConfig { eps: LAYER_NORM_EPS, ..Default::default() })
}

/// Token, position and segment embeddings (`forward_embedding`).
#[derive(Debug)]
struct Embeddings {
    embeddings: nn::Embedding,
    position_embeddings: nn::Embedding,
    segment_embeddings: Option<nn::Embedding>,
    scale: Option<f64>,
}

impl Embeddings {
    fn new(p: &nn::Path, c: &ParlaiConfig) -> Self {
        let d = c.embedding_size;
        Embeddings {
            embeddings: nn::embedding(p / "embeddings", c.vocab_size, d, Default::default()),
            position_embeddings: nn::embedding(p / "position_embeddings", c.n_positions, d, Default::default()),
            segment_embeddings: (c.n_segments >= 1)
                .then(|| nn::embedding(p / "segment_embeddings", c.n_segments, d, Default::default())),
            scale: c.embeddings_scale.then(|| (d as f64).sqrt()),
        }
    }

    /// Positions count real tokens only (`cumsum(mask) - 1`), as ParlAI's do.
    fn forward(&self, ids: &Tensor, segments: &Tensor, mask: &Tensor) -> Tensor {
        let positions = (mask.cumsum(1, Kind::Int64) - 1).clamp_min(0);
        let mut x = self.embeddings.forward(ids);
        if let Some(s) = self.scale {
            x = x * s;
        }
        x = x + self.position_embeddings.forward(&positions);
        if let Some(seg) = &self.segment_embeddings {
            x = x + seg.forward(segments);
        }
        x
    }
}

/// `TransformerFFN`: lin2(act(lin1(x))).
#[derive(Debug)]
struct Ffn {
    lin1: nn::Linear,
    lin2: nn::Linear,
    activation: FfnActivation,
}

impl Ffn {
    fn new(p: nn::Path, c: &ParlaiConfig) -> Self {
        Ffn {
            lin1: nn::linear(&p / "lin1", c.embedding_size, c.ffn_size, Default::default()),
            lin2: nn::linear(&p / "lin2", c.ffn_size, c.embedding_size, Default::default()),
            activation: c.activation,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = linear(&self.lin1, x);
        let h = match self.activation {
            FfnActivation::Relu => h.relu(),
            FfnActivation::Gelu => h.gelu("none"),
        };
        linear(&self.lin2, &h)
    }
}

/// ParlAI's `MultiHeadAttention` in self-attention use: queries scaled by 1/√(d/heads) and
/// masked keys filled with a large negative before a float softmax.
fn self_attention(mh: &MultiHead, x: &Tensor, key_mask: &Tensor) -> Tensor {
    let d = x.size()[2];
    let q = mh.split(&linear(&mh.q_lin, x)) * mh.scale(d);
    let k = mh.split(&linear(&mh.k_lin, x));
    let v = mh.split(&linear(&mh.v_lin, x));
    let logits = q.matmul(&k.transpose(-1, -2));
    let blocked = key_mask.logical_not().unsqueeze(1).unsqueeze(1); // [B, 1, 1, n]
    let logits = logits.masked_fill(&blocked, masked_logit(logits.kind()));
    let weights = logits.softmax(-1, Kind::Float).to_kind(v.kind());
    linear(&mh.out_lin, &mh.merge(&weights.matmul(&v)))
}

/// `TransformerEncoderLayer`.
#[derive(Debug)]
struct Layer {
    attention: MultiHead,
    norm1: nn::LayerNorm,
    ffn: Ffn,
    norm2: nn::LayerNorm,
    variant: Variant,
}

impl Layer {
    fn new(p: nn::Path, c: &ParlaiConfig) -> Self {
        Layer {
            attention: MultiHead::new(&p / "attention", c.embedding_size, c.n_heads),
            norm1: layer_norm(&p / "norm1", c.embedding_size),
            ffn: Ffn::new(&p / "ffn", c),
            norm2: layer_norm(&p / "norm2", c.embedding_size),
            variant: c.variant,
        }
    }

    fn forward(&self, x: &Tensor, key_mask: &Tensor, keep: &Tensor) -> Tensor {
        let pre = self.variant == Variant::Prelayernorm;
        let sub_in = if pre { self.norm1.forward(x) } else { x.shallow_clone() };
        let mut x = x + self_attention(&self.attention, &sub_in, key_mask);
        if !pre {
            x = self.norm1.forward(&x);
        }
        let sub_in = if pre { self.norm2.forward(&x) } else { x.shallow_clone() };
        x = &x + self.ffn.forward(&sub_in);
        if !pre {
            x = self.norm2.forward(&x);
        }
        x * keep
    }
}

/// ParlAI's `TransformerEncoder` without the reduction (pooling and `output_scaling` are the
/// Poly-encoder's, done by `PolyEncoder` for every encoder family alike).
#[derive(Debug)]
pub struct ParlaiEncoder {
    embeddings: Embeddings,
    norm_embeddings: Option<nn::LayerNorm>,
    layers: Vec<Layer>,
    variant: Variant,
    pub config: ParlaiConfig,
}

impl ParlaiEncoder {
    pub fn new(p: nn::Path, c: &ParlaiConfig) -> Self {
        let norm_embeddings = (c.variant != Variant::Aiayn).then(|| layer_norm(&p / "norm_embeddings", c.embedding_size));
        ParlaiEncoder {
            embeddings: Embeddings::new(&p, c),
            norm_embeddings,
            layers: (0..c.n_layers).map(|i| Layer::new(&p / "layers" / i, c)).collect(),
            variant: c.variant,
            config: c.clone(),
        }
    }

    /// `mask: [B, n]`, 1 for real tokens. Returns `[B, n, d]`; what padding positions hold
    /// is left to the pooling, which masks them (ParlAI's mean adds them in: zeros, but the
    /// final LayerNorm's bias with `prelayernorm`; polyrank's answer is the unpadded one).
    pub(crate) fn forward(&self, ids: &Tensor, segments: &Tensor, mask: &Tensor) -> Tensor {
        let key_mask = mask.to_kind(Kind::Bool);
        let mut x = self.embeddings.forward(ids, segments, mask);
        if self.variant == Variant::Xlm {
            x = self.norm_embeddings.as_ref().expect("xlm has norm_embeddings").forward(&x);
        }
        let keep = mask.to_kind(x.kind()).unsqueeze(-1);
        x = x * &keep;
        for layer in &self.layers {
            x = layer.forward(&x, &key_mask, &keep);
        }
        if self.variant == Variant::Prelayernorm {
            x = self.norm_embeddings.as_ref().expect("prelayernorm has norm_embeddings").forward(&x);
        }
        x
    }
}

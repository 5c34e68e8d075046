//! A BERT encoder in tch, one struct per block, variables named as in HF checkpoints
//! (`embeddings.word_embeddings.weight`, `encoder.layer.3.attention.self.query.weight`, …).

use super::format::{FormatError, CONFIG_FILE};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{nn, nn::Module, Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: i64,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: i64,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> i64 {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl BertConfig {
    pub fn load(dir: &Path) -> Result<Self, FormatError> {
        let path = dir.join(CONFIG_FILE);
        let text = super::format::read_text(&path)?;
        let c: BertConfig =
            serde_json::from_str(&text).map_err(|e| FormatError::malformed(&path, e))?;
        if c.hidden_size % c.num_attention_heads != 0 {
            return Err(FormatError::malformed(
                &path,
                "hidden_size must be a multiple of num_attention_heads",
            ));
        }
        if !matches!(c.hidden_act.as_str(), "gelu" | "gelu_new" | "relu") {
            return Err(FormatError::malformed(
                &path,
                format!("hidden_act `{}` is not supported (gelu, gelu_new, relu)", c.hidden_act),
            ));
        }
        Ok(c)
    }
}

/// Word + position + token-type embeddings, then LayerNorm.
#[derive(Debug)]
struct Embeddings {
    word: nn::Embedding,
    position: nn::Embedding,
    token_type: nn::Embedding,
    norm: nn::LayerNorm,
}

fn layer_norm(p: nn::Path, d: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(p, vec![d], nn::LayerNormConfig { eps, ..Default::default() })
}

impl Embeddings {
    fn new(p: nn::Path, c: &BertConfig) -> Self {
        let d = c.hidden_size;
        Embeddings {
            word: nn::embedding(&p / "word_embeddings", c.vocab_size, d, Default::default()),
            position: nn::embedding(&p / "position_embeddings", c.max_position_embeddings, d, Default::default()),
            token_type: nn::embedding(&p / "token_type_embeddings", c.type_vocab_size, d, Default::default()),
            norm: layer_norm(&p / "LayerNorm", d, c.layer_norm_eps),
        }
    }

    fn forward(&self, ids: &Tensor, type_ids: &Tensor) -> Tensor {
        let positions = Tensor::arange(ids.size()[1], (Kind::Int64, ids.device())).unsqueeze(0);
        let e = self.word.forward(ids) + self.position.forward(&positions) + self.token_type.forward(type_ids);
        self.norm.forward(&e)
    }
}

/// Multi-head self-attention: softmax(QKᵀ/√d_head + mask) V.
#[derive(Debug)]
struct SelfAttention {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    heads: i64,
}

impl SelfAttention {
    fn new(p: nn::Path, c: &BertConfig) -> Self {
        let d = c.hidden_size;
        SelfAttention {
            query: nn::linear(&p / "query", d, d, Default::default()),
            key: nn::linear(&p / "key", d, d, Default::default()),
            value: nn::linear(&p / "value", d, d, Default::default()),
            heads: c.num_attention_heads,
        }
    }

    /// `x: [B, n, d]`, `additive_mask: [B, 1, 1, n]` (0 for tokens, large negative for padding).
    fn forward(&self, x: &Tensor, additive_mask: &Tensor) -> Tensor {
        let (b, n, d) = x.size3().expect("[B, n, d]");
        let dh = d / self.heads;
        let split = |t: Tensor| t.view([b, n, self.heads, dh]).transpose(1, 2);
        let q = split(self.query.forward(x));
        let k = split(self.key.forward(x));
        let v = split(self.value.forward(x));
        let logits = q.matmul(&k.transpose(-1, -2)) / (dh as f64).sqrt() + additive_mask;
        let attn = logits.softmax(-1, logits.kind());
        attn.matmul(&v).transpose(1, 2).contiguous().view([b, n, d])
    }
}

/// Dense + residual + LayerNorm (BERT's "output" blocks).
#[derive(Debug)]
struct ResidualOutput {
    dense: nn::Linear,
    norm: nn::LayerNorm,
}

impl ResidualOutput {
    fn new(p: nn::Path, d_in: i64, d: i64, eps: f64) -> Self {
        ResidualOutput {
            dense: nn::linear(&p / "dense", d_in, d, Default::default()),
            norm: layer_norm(&p / "LayerNorm", d, eps),
        }
    }
    fn forward(&self, x: &Tensor, residual: &Tensor) -> Tensor {
        self.norm.forward(&(self.dense.forward(x) + residual))
    }
}

#[derive(Debug)]
struct Layer {
    attention: SelfAttention,
    attention_output: ResidualOutput,
    intermediate: nn::Linear,
    output: ResidualOutput,
    act: String,
}

impl Layer {
    fn new(p: nn::Path, c: &BertConfig) -> Self {
        let (d, i, eps) = (c.hidden_size, c.intermediate_size, c.layer_norm_eps);
        Layer {
            attention: SelfAttention::new(&p / "attention" / "self", c),
            attention_output: ResidualOutput::new(&p / "attention" / "output", d, d, eps),
            intermediate: nn::linear(&p / "intermediate" / "dense", d, i, Default::default()),
            output: ResidualOutput::new(&p / "output", i, d, eps),
            act: c.hidden_act.clone(),
        }
    }

    fn forward(&self, x: &Tensor, additive_mask: &Tensor) -> Tensor {
        let a = self.attention_output.forward(&self.attention.forward(x, additive_mask), x);
        let h = self.intermediate.forward(&a);
        let h = match self.act.as_str() {
            "relu" => h.relu(),
            "gelu_new" => h.gelu("tanh"),
            _ => h.gelu("none"),
        };
        self.output.forward(&h, &a)
    }
}

/// The whole encoder: token ids → contextual token outputs `[B, n, d]`.
#[derive(Debug)]
pub struct Bert {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    pub config: BertConfig,
}

impl Bert {
    pub fn new(p: nn::Path, c: &BertConfig) -> Self {
        let layers = (0..c.num_hidden_layers)
            .map(|i| Layer::new(&p / "encoder" / "layer" / i, c))
            .collect();
        Bert { embeddings: Embeddings::new(&p / "embeddings", c), layers, config: c.clone() }
    }

    /// `mask: [B, n]` with 1 for real tokens and 0 for padding.
    pub fn forward(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor) -> Tensor {
        self.forward_from(self.embed(ids, type_ids), mask, 0)
    }

    pub fn embed(&self, ids: &Tensor, type_ids: &Tensor) -> Tensor {
        self.embeddings.forward(ids, type_ids)
    }

    /// Runs layers `start..` on hidden states; lets training precompute frozen lower layers.
    pub fn forward_from(&self, hidden: Tensor, mask: &Tensor, start: usize) -> Tensor {
        // Padding gets a large negative logit; exp() of it is exactly 0 in fp32, so a padded
        // row gives the same outputs as the same row alone.
        let additive = (mask.to_kind(hidden.kind()).ones_like() - mask.to_kind(hidden.kind()))
            .view([mask.size()[0], 1, 1, mask.size()[1]])
            * -1e4;
        self.layers[start..].iter().fold(hidden, |h, layer| layer.forward(&h, &additive))
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

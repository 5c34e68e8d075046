//! A BERT encoder in tch, one struct per block of HF's `modeling_bert.py` (pooler left out:
//! nothing here reads it). Variables carry their checkpoint names
//! (`embeddings.word_embeddings.weight`, `encoder.layer.3.attention.self.query.weight`, …),
//! so HF weights load as they are.
//!
//! The HF families most sentence-transformers models use are these same blocks:
//! RoBERTa / XLM-RoBERTa / CamemBERT differ only in their position ids; DistilBERT has no
//! token types and other names (`config.json` keys and tensor names mapped in `family.rs`);
//! MPNet has no token types, RoBERTa's position ids and a relative position bias added to
//! every layer's attention scores (`RelativePositionBias`).

use super::format::{FormatError, CONFIG_FILE};
use super::mixed::linear;
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
    #[serde(default)]
    pub hidden_act: Activation,
    pub max_position_embeddings: i64,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: i64,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub model_type: Option<String>,
    /// RoBERTa's padding id: its position ids start after it (see `PositionIds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<i64>,
    /// MPNet's relative position buckets (the rows of `encoder.relative_attention_bias`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relative_attention_num_buckets: Option<i64>,
}

/// How position ids are counted. BERT: 0, 1, 2, … RoBERTa and XLM-RoBERTa (HF
/// `create_position_ids_from_input_ids`): real tokens count from `pad_token_id + 1`, padding
/// sits at `pad_token_id`, so their checkpoints' position tables are `pad_token_id + 1` longer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum PositionIds {
    FromZero,
    AfterPadding(i64),
}

impl BertConfig {
    fn position_ids(&self) -> PositionIds {
        match self.model_type.as_deref() {
            Some("roberta" | "xlm-roberta" | "camembert") => PositionIds::AfterPadding(self.pad_token_id.unwrap_or(1)),
            // HF's MPNet embeddings fix their padding index at 1, whatever the config says.
            Some("mpnet") => PositionIds::AfterPadding(1),
            _ => PositionIds::FromZero,
        }
    }
}

fn default_type_vocab() -> i64 {
    2
}
fn default_eps() -> f64 {
    1e-12
}

/// `hidden_act`, read as its config.json string; parsing it with the config makes an
/// unsupported one a load error rather than a surprise in the first forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Activation {
    #[default]
    Gelu,
    /// The tanh approximation of GELU.
    GeluNew,
    Relu,
}

impl Activation {
    const ALL: [Activation; 3] = [Activation::Gelu, Activation::GeluNew, Activation::Relu];

    fn name(self) -> &'static str {
        match self {
            Activation::Gelu => "gelu",
            Activation::GeluNew => "gelu_new",
            Activation::Relu => "relu",
        }
    }

    fn forward(self, xs: &Tensor) -> Tensor {
        match self {
            Activation::Gelu => xs.gelu("none"),
            Activation::GeluNew => xs.gelu("tanh"),
            Activation::Relu => xs.relu(),
        }
    }
}

impl TryFrom<String> for Activation {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Activation::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| format!("hidden_act `{s}` is not supported (gelu, gelu_new, relu)"))
    }
}

impl From<Activation> for String {
    fn from(a: Activation) -> String {
        a.name().to_string()
    }
}

/// The HF families whose checkpoints are BERT's blocks (see the module's comment).
pub(crate) const FAMILIES: [&str; 6] = ["bert", "roberta", "xlm-roberta", "camembert", "distilbert", "mpnet"];

impl BertConfig {
    pub fn load(dir: &Path) -> Result<Self, FormatError> {
        let path = dir.join(CONFIG_FILE);
        let text = super::format::read_text(&path)?;
        Self::from_value(serde_json::from_str(&text).map_err(|e| FormatError::malformed(&path, e))?, &path)
    }

    pub(crate) fn from_value(value: serde_json::Value, path: &Path) -> Result<Self, FormatError> {
        let path = path.to_path_buf();
        let value = super::family::bert_config_keys(value);
        let c: BertConfig = serde_json::from_value(value).map_err(|e| FormatError::malformed(&path, e))?;
        if let Some(t) = c.model_type.as_deref().filter(|t| !FAMILIES.contains(t)) {
            return Err(FormatError::malformed(
                &path,
                format!("model_type `{t}` is not supported (supported: {}, and parlai_transformer from `polyrank import parlai`)", FAMILIES.join(", ")),
            ));
        }
        if c.hidden_size % c.num_attention_heads != 0 {
            return Err(FormatError::malformed(
                &path,
                "hidden_size must be a multiple of num_attention_heads",
            ));
        }
        Ok(c)
    }
}

fn layer_norm(p: nn::Path, d: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(p, vec![d], nn::LayerNormConfig { eps, ..Default::default() })
}

#[derive(Debug)]
struct BertEmbeddings {
    word_embeddings: nn::Embedding,
    position_embeddings: nn::Embedding,
    /// None where the family has no token types (`type_vocab_size` 0: DistilBERT, MPNet).
    token_type_embeddings: Option<nn::Embedding>,
    layer_norm: nn::LayerNorm,
    positions: PositionIds,
}

impl BertEmbeddings {
    fn new(p: nn::Path, c: &BertConfig) -> Self {
        let d = c.hidden_size;
        BertEmbeddings {
            word_embeddings: nn::embedding(&p / "word_embeddings", c.vocab_size, d, Default::default()),
            position_embeddings: nn::embedding(&p / "position_embeddings", c.max_position_embeddings, d, Default::default()),
            token_type_embeddings: (c.type_vocab_size > 0)
                .then(|| nn::embedding(&p / "token_type_embeddings", c.type_vocab_size, d, Default::default())),
            layer_norm: layer_norm(&p / "LayerNorm", d, c.layer_norm_eps),
            positions: c.position_ids(),
        }
    }

    fn forward(&self, input_ids: &Tensor, token_type_ids: &Tensor, mask: &Tensor) -> Tensor {
        let position_ids = match self.positions {
            PositionIds::FromZero => Tensor::arange(input_ids.size()[1], (Kind::Int64, input_ids.device())).unsqueeze(0),
            PositionIds::AfterPadding(pad) => {
                let mask = mask.to_kind(Kind::Int64);
                mask.cumsum(1, Kind::Int64) * &mask + pad
            }
        };
        let mut embeddings = self.word_embeddings.forward(input_ids) + self.position_embeddings.forward(&position_ids);
        if let Some(types) = &self.token_type_embeddings {
            embeddings += types.forward(token_type_ids);
        }
        self.layer_norm.forward(&embeddings)
    }
}

#[derive(Debug)]
struct BertSelfAttention {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    num_attention_heads: i64,
}

impl BertSelfAttention {
    fn new(p: nn::Path, c: &BertConfig) -> Self {
        let d = c.hidden_size;
        BertSelfAttention {
            query: nn::linear(&p / "query", d, d, Default::default()),
            key: nn::linear(&p / "key", d, d, Default::default()),
            value: nn::linear(&p / "value", d, d, Default::default()),
            num_attention_heads: c.num_attention_heads,
        }
    }

    /// `hidden_states: [B, n, d]`, `attention_mask: [B, 1, 1, n]` (see `extended_attention_mask`).
    fn forward(&self, hidden_states: &Tensor, attention_mask: &Tensor) -> Tensor {
        let (b, n, d) = hidden_states.size3().expect("[B, n, d]");
        let dh = d / self.num_attention_heads;
        let split_heads = |t: Tensor| t.view([b, n, self.num_attention_heads, dh]).transpose(1, 2);
        let q = split_heads(linear(&self.query, hidden_states));
        let k = split_heads(linear(&self.key, hidden_states));
        let v = split_heads(linear(&self.value, hidden_states));
        let scores = q.matmul(&k.transpose(-1, -2)) / (dh as f64).sqrt() + attention_mask;
        // fp32 accumulation: a half-precision softmax over long rows loses the small weights.
        let probs = scores.softmax(-1, Kind::Float).to_kind(scores.kind());
        probs.matmul(&v).transpose(1, 2).contiguous().view([b, n, d])
    }
}

/// The dense + residual + LayerNorm that `BertSelfOutput` and `BertOutput` share in HF too;
/// only their input widths differ.
fn dense_add_norm(dense: &nn::Linear, layer_norm: &nn::LayerNorm, hidden_states: &Tensor, input_tensor: &Tensor) -> Tensor {
    layer_norm.forward(&(linear(dense, hidden_states) + input_tensor))
}

#[derive(Debug)]
struct BertSelfOutput {
    dense: nn::Linear,
    layer_norm: nn::LayerNorm,
}

impl BertSelfOutput {
    fn new(p: nn::Path, c: &BertConfig) -> Self {
        let d = c.hidden_size;
        BertSelfOutput {
            dense: nn::linear(&p / "dense", d, d, Default::default()),
            layer_norm: layer_norm(&p / "LayerNorm", d, c.layer_norm_eps),
        }
    }

    fn forward(&self, hidden_states: &Tensor, input_tensor: &Tensor) -> Tensor {
        dense_add_norm(&self.dense, &self.layer_norm, hidden_states, input_tensor)
    }
}

#[derive(Debug)]
struct BertAttention {
    /// HF's `self` (a Rust keyword).
    self_attention: BertSelfAttention,
    output: BertSelfOutput,
}

impl BertAttention {
    fn new(p: nn::Path, c: &BertConfig) -> Self {
        BertAttention {
            self_attention: BertSelfAttention::new(&p / "self", c),
            output: BertSelfOutput::new(&p / "output", c),
        }
    }

    fn forward(&self, hidden_states: &Tensor, attention_mask: &Tensor) -> Tensor {
        let self_output = self.self_attention.forward(hidden_states, attention_mask);
        self.output.forward(&self_output, hidden_states)
    }
}

#[derive(Debug)]
struct BertIntermediate {
    dense: nn::Linear,
    intermediate_act_fn: Activation,
}

impl BertIntermediate {
    fn new(p: nn::Path, c: &BertConfig) -> Self {
        BertIntermediate {
            dense: nn::linear(&p / "dense", c.hidden_size, c.intermediate_size, Default::default()),
            intermediate_act_fn: c.hidden_act,
        }
    }

    fn forward(&self, hidden_states: &Tensor) -> Tensor {
        self.intermediate_act_fn.forward(&linear(&self.dense, hidden_states))
    }
}

#[derive(Debug)]
struct BertOutput {
    dense: nn::Linear,
    layer_norm: nn::LayerNorm,
}

impl BertOutput {
    fn new(p: nn::Path, c: &BertConfig) -> Self {
        BertOutput {
            dense: nn::linear(&p / "dense", c.intermediate_size, c.hidden_size, Default::default()),
            layer_norm: layer_norm(&p / "LayerNorm", c.hidden_size, c.layer_norm_eps),
        }
    }

    fn forward(&self, hidden_states: &Tensor, input_tensor: &Tensor) -> Tensor {
        dense_add_norm(&self.dense, &self.layer_norm, hidden_states, input_tensor)
    }
}

#[derive(Debug)]
struct BertLayer {
    attention: BertAttention,
    intermediate: BertIntermediate,
    output: BertOutput,
}

impl BertLayer {
    fn new(p: nn::Path, c: &BertConfig) -> Self {
        BertLayer {
            attention: BertAttention::new(&p / "attention", c),
            intermediate: BertIntermediate::new(&p / "intermediate", c),
            output: BertOutput::new(&p / "output", c),
        }
    }

    fn forward(&self, hidden_states: &Tensor, attention_mask: &Tensor) -> Tensor {
        let attention_output = self.attention.forward(hidden_states, attention_mask);
        let intermediate_output = self.intermediate.forward(&attention_output);
        self.output.forward(&intermediate_output, &attention_output)
    }
}

/// MPNet's `relative_attention_bias`: a learned `[heads]` bias per bucket of the distance
/// between key and query, the same for every layer (HF `MPNetEncoder.compute_position_bias`).
#[derive(Debug)]
struct RelativePositionBias {
    relative_attention_bias: nn::Embedding,
}

impl RelativePositionBias {
    /// HF buckets with 32 whatever the config's bucket count, and distances up to 128.
    const NUM_BUCKETS: i64 = 32;
    const MAX_DISTANCE: f64 = 128.0;

    fn new(p: &nn::Path, buckets: i64, heads: i64) -> Self {
        RelativePositionBias { relative_attention_bias: nn::embedding(p / "relative_attention_bias", buckets, heads, Default::default()) }
    }

    /// `relative_position = key − query`: half the buckets per direction; within a direction,
    /// exact distances below a quarter of the buckets, then log-spaced up to `MAX_DISTANCE`.
    fn bucket(relative_position: &Tensor) -> Tensor {
        let half = Self::NUM_BUCKETS / 2;
        let n = -relative_position;
        let ret = n.lt(0).to_kind(Kind::Int64) * half;
        let n = n.abs();
        let max_exact = half / 2;
        let large = ((n.to_kind(Kind::Float) / max_exact as f64).log() / (Self::MAX_DISTANCE / max_exact as f64).ln()
            * (half - max_exact) as f64)
            .to_kind(Kind::Int64)
            + max_exact;
        let large = large.clamp_max(half - 1);
        ret + n.where_self(&n.lt(max_exact), &large)
    }

    /// `[1, heads, n, n]`, added to the attention scores of every layer.
    fn forward(&self, n: i64, device: tch::Device) -> Tensor {
        let pos = Tensor::arange(n, (Kind::Int64, device));
        let relative = pos.unsqueeze(0) - pos.unsqueeze(1);
        self.relative_attention_bias.forward(&Self::bucket(&relative)).permute([2, 0, 1]).unsqueeze(0)
    }
}

#[derive(Debug)]
struct BertEncoder {
    layer: Vec<BertLayer>,
    /// MPNet only.
    position_bias: Option<RelativePositionBias>,
}

impl BertEncoder {
    fn new(p: nn::Path, c: &BertConfig) -> Self {
        let layer = (0..c.num_hidden_layers).map(|i| BertLayer::new(&p / "layer" / i, c)).collect();
        let position_bias = c.relative_attention_num_buckets.map(|b| RelativePositionBias::new(&p, b, c.num_attention_heads));
        BertEncoder { layer, position_bias }
    }

    /// `attention_mask: [B, 1, 1, n]` additive; a position bias joins it as `[B, heads, n, n]`.
    fn forward(&self, hidden_states: Tensor, attention_mask: &Tensor) -> Tensor {
        let mask = match &self.position_bias {
            Some(bias) => attention_mask + bias.forward(hidden_states.size()[1], hidden_states.device()).to_kind(attention_mask.kind()),
            None => attention_mask.shallow_clone(),
        };
        self.layer.iter().fold(hidden_states, |h, layer| layer.forward(&h, &mask))
    }
}

/// `[B, n]` of 1 (token) / 0 (padding) → additive `[B, 1, 1, n]`. Padding gets a large negative
/// logit; exp() of it is exactly 0 in fp32, so a padded row gives the same outputs as the same
/// row alone.
fn extended_attention_mask(mask: &Tensor, kind: Kind) -> Tensor {
    let mask = mask.to_kind(kind);
    (mask.ones_like() - &mask).view([mask.size()[0], 1, 1, mask.size()[1]]) * -1e4
}

/// HF's `BertModel` without the pooler: token ids → contextual token outputs `[B, n, d]`.
#[derive(Debug)]
pub struct Bert {
    embeddings: BertEmbeddings,
    encoder: BertEncoder,
    pub config: BertConfig,
}

impl Bert {
    pub fn new(p: nn::Path, c: &BertConfig) -> Self {
        // The encoder's variables are created before the embeddings' so that a seeded random
        // init (testkit's tiny models) draws the same values as it always has.
        let encoder = BertEncoder::new(&p / "encoder", c);
        Bert { embeddings: BertEmbeddings::new(&p / "embeddings", c), encoder, config: c.clone() }
    }

    /// `mask: [B, n]` with 1 for real tokens and 0 for padding.
    pub(crate) fn forward(&self, input_ids: &Tensor, token_type_ids: &Tensor, mask: &Tensor) -> Tensor {
        let embedding_output = self.embeddings.forward(input_ids, token_type_ids, mask);
        let attention_mask = extended_attention_mask(mask, embedding_output.kind());
        self.encoder.forward(embedding_output, &attention_mask)
    }
}

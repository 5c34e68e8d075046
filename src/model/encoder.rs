//! The encoder families a model directory may hold, chosen by config.json's `model_type`:
//! HF BERT and the families built of its blocks (RoBERTa, XLM-RoBERTa, CamemBERT,
//! DistilBERT, MPNet: `bert.rs`, `family.rs`) or ParlAI's
//! transformer (written by `polyrank import parlai`). Everything above the encoder (pooling,
//! output scaling, the poly head, scoring) is the same for all.

use super::bert::{Bert, BertConfig};
use super::format::{FormatError, CONFIG_FILE};
use super::parlai::{ParlaiConfig, ParlaiEncoder, MODEL_TYPE as PARLAI};
use std::path::Path;
use tch::{nn, Tensor};

#[derive(Debug, Clone)]
pub enum EncoderConfig {
    Bert(BertConfig),
    Parlai(ParlaiConfig),
}

impl EncoderConfig {
    pub fn load(dir: &Path) -> Result<Self, FormatError> {
        let path = dir.join(CONFIG_FILE);
        let text = super::format::read_text(&path)?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| FormatError::malformed(&path, e))?;
        if value.get("model_type").and_then(|v| v.as_str()) == Some(PARLAI) {
            let c: ParlaiConfig = serde_json::from_value(value).map_err(|e| FormatError::malformed(&path, e))?;
            c.validate(&path)?;
            Ok(EncoderConfig::Parlai(c))
        } else {
            Ok(EncoderConfig::Bert(BertConfig::from_value(value, &path)?))
        }
    }

    pub fn hidden_size(&self) -> i64 {
        match self {
            EncoderConfig::Bert(c) => c.hidden_size,
            EncoderConfig::Parlai(c) => c.embedding_size,
        }
    }

    pub fn num_layers(&self) -> i64 {
        match self {
            EncoderConfig::Bert(c) => c.num_hidden_layers,
            EncoderConfig::Parlai(c) => c.n_layers,
        }
    }

    /// A checkpoint tensor's name → the encoder's variable name, where they differ
    /// (DistilBERT and MPNet: BERT's blocks under other names, `family.rs`).
    pub(crate) fn var_name(&self, name: &str) -> Option<String> {
        match self {
            EncoderConfig::Bert(c) => super::family::bert_name(c.model_type.as_deref(), name),
            EncoderConfig::Parlai(_) => None,
        }
    }

    /// The family, as `/info` and logs name it.
    pub fn family(&self) -> String {
        match self {
            EncoderConfig::Bert(c) => c.model_type.clone().unwrap_or_else(|| "bert".into()),
            EncoderConfig::Parlai(_) => PARLAI.into(),
        }
    }
}

#[derive(Debug)]
pub enum Encoder {
    Bert(Bert),
    Parlai(ParlaiEncoder),
}

impl Encoder {
    pub fn new(p: nn::Path, c: &EncoderConfig) -> Self {
        match c {
            EncoderConfig::Bert(c) => Encoder::Bert(Bert::new(p, c)),
            EncoderConfig::Parlai(c) => Encoder::Parlai(ParlaiEncoder::new(p, c)),
        }
    }

    /// Token outputs `[B, n, d]`; `mask: [B, n]` is 1 for real tokens.
    pub(crate) fn forward(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor) -> Tensor {
        match self {
            Encoder::Bert(e) => e.forward(ids, type_ids, mask),
            Encoder::Parlai(e) => e.forward(ids, type_ids, mask),
        }
    }
}

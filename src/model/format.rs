//! The model directory format: an unmodified HF BERT checkpoint plus `polyrank.json` (the
//! Poly-encoder settings) and `poly_head.safetensors` (codes and attention projections).
//! Every loader error names the file it is about.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const SETTINGS_FILE: &str = "polyrank.json";
pub const HEAD_FILE: &str = "poly_head.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Optional, beside `model.safetensors`: the weights as base + int8 difference (model/weights.rs).
pub const WEIGHTS_DELTA_FILE: &str = "model.delta.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// With `share_encoders: false` the candidate encoder's checkpoint lives in this sub-directory.
pub const CANDIDATE_ENCODER_DIR: &str = "candidate_encoder";
/// Optional: a Linear–ReLU–Linear on each pooled candidate vector (ParlAI bi-encoders with
/// shared encoders; `poly::CandidateMlp`). Part of the encoder side: the pool cache hashes it.
pub const CANDIDATE_MLP_FILE: &str = "candidate_mlp.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: file is missing")]
    Missing { path: PathBuf },
    #[error("{path}: {message}")]
    Malformed { path: PathBuf, message: String },
}

impl FormatError {
    pub fn malformed(path: &Path, message: impl std::fmt::Display) -> Self {
        FormatError::Malformed { path: path.to_path_buf(), message: message.to_string() }
    }
}

/// Poly-encoder (m attended codes) or bi-encoder (one pooled context vector).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Poly,
    Bi,
}

/// How the m context vectors are read from the context's token outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolyType {
    /// m learned code vectors attend over the tokens.
    Codes,
    /// The first m token outputs, zero-padded and masked when the context is shorter.
    NFirst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKind {
    Basic,
    Sqrt,
    Multihead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionSpec {
    pub kind: AttentionKind,
    /// Only read for `multihead`.
    #[serde(default = "default_heads")]
    pub heads: i64,
}

fn default_heads() -> i64 {
    4
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    Mean,
    First,
    /// Per dimension, the largest output over the real tokens (ParlAI `--reduction-type max`).
    Max,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolySettings {
    pub mode: Mode,
    /// m, the number of context vectors (ignored in bi mode).
    pub n_codes: i64,
    pub poly_type: PolyType,
    pub codes_attention: AttentionSpec,
    pub candidate_attention: AttentionSpec,
    pub candidate_pooling: Pooling,
    /// Pooling of the context in bi mode.
    #[serde(default = "default_pooling")]
    pub context_pooling: Pooling,
    pub share_encoders: bool,
    pub max_context_tokens: usize,
    pub max_candidate_tokens: usize,
    /// Joins the turns of a multi-turn context (ParlAI joins with a newline).
    pub turn_delimiter: String,
    /// Multiplies every encoder output (ParlAI `--output-scaling`).
    #[serde(default = "default_scaling")]
    pub output_scaling: f64,
    /// L2-normalise pooled vectors (candidates, and the context in bi mode), as
    /// sentence-transformers' Normalize module does.
    #[serde(default)]
    pub normalize: bool,
    /// False while the head holds initial (untrained) codes; surfaced by `/info`.
    #[serde(default)]
    pub trained: bool,
    /// Free text: where the head came from.
    #[serde(default)]
    pub description: String,
}

fn default_pooling() -> Pooling {
    Pooling::Mean
}
fn default_scaling() -> f64 {
    1.0
}

impl PolySettings {
    /// ParlAI's defaults, with MiniLM's lengths.
    pub(crate) fn default_poly(n_codes: i64) -> Self {
        PolySettings {
            mode: Mode::Poly,
            n_codes,
            poly_type: PolyType::Codes,
            codes_attention: AttentionSpec { kind: AttentionKind::Basic, heads: 4 },
            candidate_attention: AttentionSpec { kind: AttentionKind::Basic, heads: 4 },
            candidate_pooling: Pooling::Mean,
            context_pooling: Pooling::Mean,
            share_encoders: true,
            max_context_tokens: 256,
            max_candidate_tokens: 256,
            turn_delimiter: "\n".to_string(),
            output_scaling: 1.0,
            normalize: true,
            trained: false,
            description: String::new(),
        }
    }

    /// Number of context vectors the scorer sees.
    pub(crate) fn context_vectors(&self) -> i64 {
        match self.mode {
            Mode::Poly => self.n_codes,
            Mode::Bi => 1,
        }
    }

    pub(crate) fn validate(&self, path: &Path) -> Result<(), FormatError> {
        let bad = |m: &str| Err(FormatError::malformed(path, m));
        if self.mode == Mode::Poly && self.n_codes < 1 {
            return bad("n_codes must be at least 1");
        }
        if self.max_context_tokens < 2 || self.max_candidate_tokens < 2 {
            return bad("max_context_tokens and max_candidate_tokens must be at least 2");
        }
        for (name, spec) in [("codes_attention", self.codes_attention), ("candidate_attention", self.candidate_attention)] {
            if spec.kind == AttentionKind::Multihead && spec.heads < 1 {
                return bad(&format!("{name}.heads must be at least 1"));
            }
        }
        if !(self.output_scaling.is_finite() && self.output_scaling > 0.0) {
            return bad("output_scaling must be a positive number");
        }
        Ok(())
    }

    pub fn load(dir: &Path) -> Result<Self, FormatError> {
        let path = dir.join(SETTINGS_FILE);
        let text = read_text(&path)?;
        let s: PolySettings =
            serde_json::from_str(&text).map_err(|e| FormatError::malformed(&path, e))?;
        s.validate(&path)?;
        Ok(s)
    }

    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).expect("settings serialise");
        std::fs::write(dir.join(SETTINGS_FILE), text + "\n")
    }
}

/// Reads a file, telling a missing file apart from an unreadable one.
pub(crate) fn read_text(path: &Path) -> Result<String, FormatError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(FormatError::Missing { path: path.to_path_buf() })
        }
        Err(e) => Err(FormatError::malformed(path, e)),
    }
}

pub(crate) fn require_file(path: &Path) -> Result<(), FormatError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(FormatError::Missing { path: path.to_path_buf() })
    }
}

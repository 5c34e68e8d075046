//! Text → padded id tensors. Contexts keep their latest turns (left truncation); candidates
//! keep their beginning. The tokenizer.json's own padding/truncation are replaced.

use crate::model::format::{FormatError, PolySettings, TOKENIZER_FILE};
pub use crate::model::Batch;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use tokenizers::{Encoding, Tokenizer as HfTokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextKind {
    Context,
    Candidate,
}

/// The model's tokenizer twice: once configured for contexts, once for candidates.
pub struct Tokenizer {
    context: HfTokenizer,
    candidate: HfTokenizer,
    delimiter: String,
}

fn configured(dir: &Path, max_len: usize, direction: TruncationDirection) -> Result<HfTokenizer, FormatError> {
    let path = dir.join(TOKENIZER_FILE);
    crate::model::format::require_file(&path)?;
    let mut tok = HfTokenizer::from_file(&path).map_err(|e| FormatError::malformed(&path, e))?;
    tok.with_padding(None);
    tok.with_truncation(Some(TruncationParams {
        max_length: max_len,
        direction,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
    }))
    .map_err(|e| FormatError::malformed(&path, e))?;
    Ok(tok)
}

impl Tokenizer {
    pub fn load(dir: &Path, s: &PolySettings) -> Result<Self, FormatError> {
        Ok(Tokenizer {
            context: configured(dir, s.max_context_tokens, TruncationDirection::Left)?,
            candidate: configured(dir, s.max_candidate_tokens, TruncationDirection::Right)?,
            delimiter: s.turn_delimiter.clone(),
        })
    }

    /// Multi-turn contexts are joined with the model's delimiter, oldest first.
    pub fn join_turns<S: AsRef<str>>(&self, turns: &[S]) -> String {
        turns.iter().map(|t| t.as_ref()).collect::<Vec<_>>().join(&self.delimiter)
    }

    pub fn tokenize(&self, texts: &[String], kind: TextKind) -> Result<Vec<Encoding>, String> {
        let tok = match kind {
            TextKind::Context => &self.context,
            TextKind::Candidate => &self.candidate,
        };
        texts
            .iter()
            .map(|t| tok.encode(t.as_str(), true).map_err(|e| e.to_string()))
            .collect()
    }
}

/// Pads encodings to the longest one.
pub(crate) fn to_batch(encodings: &[&Encoding], device: Device) -> Batch {
    let b = encodings.len() as i64;
    let l = encodings.iter().map(|e| e.get_ids().len()).max().unwrap_or(0).max(1);
    let mut ids = vec![0i64; encodings.len() * l];
    let mut types = vec![0i64; encodings.len() * l];
    let mut mask = vec![0i64; encodings.len() * l];
    for (row, e) in encodings.iter().enumerate() {
        for (col, (&id, &ty)) in e.get_ids().iter().zip(e.get_type_ids()).enumerate() {
            ids[row * l + col] = id as i64;
            types[row * l + col] = ty as i64;
            mask[row * l + col] = 1;
        }
    }
    let t = |v: Vec<i64>| Tensor::from_slice(&v).view([b, l as i64]).to_kind(Kind::Int64).to_device(device);
    Batch { ids: t(ids), type_ids: t(types), mask: t(mask) }
}

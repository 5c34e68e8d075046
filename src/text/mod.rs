//! Text → padded id tensors. Contexts keep their latest turns (left truncation); candidates
//! keep their beginning. Two kinds of tokenizer: an HF `tokenizer.json` (its own padding and
//! truncation replaced), or a ParlAI dictionary (`parlai`, from `polyrank import parlai`).

pub mod parlai;

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

/// The files that define a model directory's tokenizer: `tokenizer.json`, or the ParlAI
/// dictionary's (what the pool cache's key and `train`'s copy of a model must include).
pub fn tokenizer_files(dir: &Path) -> Vec<std::path::PathBuf> {
    if dir.join(parlai::SETTINGS_FILE).exists() {
        [parlai::SETTINGS_FILE, parlai::DICT_FILE, parlai::CODECS_FILE, parlai::VOCAB_FILE, parlai::MERGES_FILE]
            .iter()
            .map(|f| dir.join(f))
            .filter(|p| p.exists())
            .collect()
    } else {
        vec![dir.join(TOKENIZER_FILE)]
    }
}

/// The model's tokenizer, and how turns are joined.
pub struct Tokenizer {
    kind: Vocab,
    delimiter: String,
}

enum Vocab {
    /// Configured twice: once for contexts, once for candidates.
    Hf { context: HfTokenizer, candidate: HfTokenizer },
    Parlai(parlai::ParlaiText),
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
        let kind = if dir.join(parlai::SETTINGS_FILE).exists() {
            Vocab::Parlai(parlai::ParlaiText::load(dir)?)
        } else {
            Vocab::Hf {
                context: configured(dir, s.max_context_tokens, TruncationDirection::Left)?,
                candidate: configured(dir, s.max_candidate_tokens, TruncationDirection::Right)?,
            }
        };
        Ok(Tokenizer { kind, delimiter: s.turn_delimiter.clone() })
    }

    /// Multi-turn contexts are joined with the model's delimiter, oldest first.
    /// For a ParlAI dictionary they are joined with `parlai::TURN_SEPARATOR`, so each turn is
    /// tokenized alone as ParlAI does.
    pub fn join_turns<S: AsRef<str>>(&self, turns: &[S]) -> String {
        let sep = match self.kind {
            Vocab::Parlai(_) => parlai::TURN_SEPARATOR.to_string(),
            Vocab::Hf { .. } => self.delimiter.clone(),
        };
        turns.iter().map(|t| t.as_ref()).collect::<Vec<_>>().join(&sep)
    }

    pub fn tokenize(&self, texts: &[String], kind: TextKind) -> Result<Vec<Encoding>, String> {
        match (&self.kind, kind) {
            (Vocab::Hf { context, candidate }, kind) => {
                let tok = if kind == TextKind::Context { context } else { candidate };
                texts.iter().map(|t| tok.encode(t.as_str(), true).map_err(|e| e.to_string())).collect()
            }
            (Vocab::Parlai(p), TextKind::Context) => {
                Ok(texts.iter().map(|t| p.context_turns(&t.split(parlai::TURN_SEPARATOR).collect::<Vec<_>>(), &self.delimiter)).collect())
            }
            (Vocab::Parlai(p), TextKind::Candidate) => Ok(texts.iter().map(|t| p.candidate(t)).collect()),
        }
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

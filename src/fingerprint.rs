//! What a model's outputs depend on, hashed by content: the one definition used by the pool
//! cache (file name), eval (which models can share an encoding pass) and train (the frozen
//! features cache). Content, not paths: a fine-tuned encoder written over the same path
//! must never match features computed with the old weights.

use crate::model::format::*;
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Streams a file into the hash, length-prefixed so two different splits of the same bytes
/// into files hash differently.
pub(crate) fn hash_file(h: &mut Sha256, path: &Path) -> Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("hashing {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    h.update(f.metadata()?.len().to_le_bytes());
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

/// The encoder side of a model directory: config, weights (and their delta, when stored as
/// base + delta) and tokenizer, and the candidate encoder's when it has its own.
pub(crate) fn encoder_files(dir: &Path, settings: &PolySettings) -> Vec<PathBuf> {
    let weights = |d: &Path| {
        let delta = d.join(WEIGHTS_DELTA_FILE);
        [Some(d.join(CONFIG_FILE)), Some(d.join(WEIGHTS_FILE)), delta.exists().then_some(delta)].into_iter().flatten()
    };
    let mut files: Vec<PathBuf> = weights(dir).collect();
    files.extend(crate::text::tokenizer_files(dir));
    let mlp = dir.join(CANDIDATE_MLP_FILE);
    if mlp.exists() {
        files.push(mlp);
    }
    if !settings.share_encoders {
        files.extend(weights(&dir.join(CANDIDATE_ENCODER_DIR)));
    }
    files
}

/// The settings that change encoder outputs (token outputs and pooled candidate vectors),
/// and nothing that only the head reads.
fn encoder_settings(s: &PolySettings) -> String {
    format!(
        "{}|{}|{:?}|{}|{}|{}|{:?}",
        s.max_context_tokens, s.max_candidate_tokens, s.candidate_pooling, s.normalize, s.output_scaling, s.share_encoders, s.turn_delimiter
    )
}

/// Hex SHA-256 of the encoder's files and output-changing settings, plus `extra` (what the
/// caller's features depend on besides the model, e.g. the data).
pub fn encoder_fingerprint(dir: &Path, settings: &PolySettings, extra: &[u8]) -> Result<String> {
    let mut h = Sha256::new();
    for f in encoder_files(dir, settings) {
        hash_file(&mut h, &f)?;
    }
    h.update(encoder_settings(settings).as_bytes());
    h.update((extra.len() as u64).to_le_bytes());
    h.update(extra);
    Ok(hex::encode(h.finalize()))
}

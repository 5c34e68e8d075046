#![allow(dead_code)]
//! Shared helpers for the integration tests.

pub mod contract;
pub mod pg;
pub mod server;

use std::collections::HashMap;
use std::path::PathBuf;

/// Largest absolute elementwise difference of two tensors.
pub fn max_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// `max_diff` over two sets of tensors with the same names (weights, gradients).
pub fn max_diff_by_name(a: &HashMap<String, tch::Tensor>, b: &HashMap<String, tch::Tensor>) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().map(|(k, t)| max_diff(t, &b[k])).fold(0.0, f64::max)
}

/// The toy task the fine-tuning tests learn: the reply repeats the word the context's last
/// turn likes, whatever the first turn says.
pub const TOY_WORDS: [&str; 10] = ["pizza", "cats", "dogs", "rain", "music", "guitar", "books", "paris", "sun", "food"];

pub fn toy_pairs(n: usize) -> Vec<polyrank::offline::train::Pair> {
    (0..n)
        .map(|i| {
            let (w, filler) = (TOY_WORDS[i % 10], TOY_WORDS[(i * 7 + 3) % 10]);
            polyrank::offline::train::Pair { context: vec![format!("hello {filler}"), format!("i like {w}")], response: format!("{w} {w} is good") }
        })
        .collect()
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The project venv's python (sentence-transformers reference, Python baseline).
pub fn python() -> PathBuf {
    std::env::var_os("POLYRANK_PYTHON").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/python"))
}

/// The default MiniLM-based model laid out by `make model`.
pub fn default_model() -> PathBuf {
    let dir = root().join("models/default");
    assert!(
        dir.join("model.safetensors").exists(),
        "models/default is not prepared: run `make model` (or `make test`, which does)"
    );
    dir
}

/// The unmodified all-MiniLM-L6-v2 as a bi-encoder (`models/minilm-bi`, laid out by `make
/// model`): the checkpoint sentence-transformers loads, for parity.
pub fn minilm() -> PathBuf {
    let dir = root().join("models/minilm-bi");
    assert!(dir.join("model.safetensors").exists(), "models/minilm-bi is not prepared: run `make model`");
    dir
}


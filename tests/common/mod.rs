#![allow(dead_code)]
//! Shared helpers for the integration tests.

pub mod contract;
pub mod server;

use std::path::PathBuf;

/// Largest absolute elementwise difference of two tensors.
pub fn max_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
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


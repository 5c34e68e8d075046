#![allow(dead_code)]
//! Shared helpers for the integration tests.

pub mod contract;
pub mod server;

use polyrank::model::settings::{Mode, PolySettings, SETTINGS_FILE};
use std::path::{Path, PathBuf};

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

/// A copy of the default model's layout (links to its files) with other settings.
pub fn default_model_with(dir: &Path, edit: impl FnOnce(&mut PolySettings)) -> PathBuf {
    let src = default_model();
    std::fs::create_dir_all(dir).unwrap();
    for name in ["config.json", "model.safetensors", "tokenizer.json", "poly_head.safetensors"] {
        std::os::unix::fs::symlink(src.join(name).canonicalize().unwrap(), dir.join(name)).unwrap();
    }
    let mut s = PolySettings::load(&src).unwrap();
    edit(&mut s);
    s.save(dir).unwrap();
    assert!(dir.join(SETTINGS_FILE).exists());
    dir.to_path_buf()
}

pub fn bi_encoder(dir: &Path) -> PathBuf {
    default_model_with(dir, |s| s.mode = Mode::Bi)
}

//! A fresh head for an existing checkpoint (`polyrank init-head`, and `polyrank train` when it
//! starts a new head).

use super::encoder::EncoderConfig;
use super::format::*;
use super::poly::PolyHead;
use super::weights::save_vars;
use anyhow::{Context, Result};
use std::path::Path;
use tch::{nn::VarStore, Device};

/// Writes `polyrank.json` and a freshly initialised `poly_head.safetensors` (seeded) for a
/// directory that already holds the BERT checkpoint.
pub fn init_head(dir: &Path, settings: &PolySettings, seed: i64) -> Result<()> {
    let config = EncoderConfig::load(dir)?;
    settings.validate(&dir.join(SETTINGS_FILE))?;
    tch::manual_seed(seed);
    let vs = VarStore::new(Device::Cpu);
    let _head = PolyHead::new(&vs.root(), settings, config.hidden_size());
    save_vars(&vs, &dir.join(HEAD_FILE)).context("writing the head")?;
    settings.save(dir)?;
    Ok(())
}


//! Fills a `VarStore` from a safetensors checkpoint, by the checkpoint's own tensor names.

use super::format::FormatError;
use std::collections::HashMap;
use std::path::Path;
use tch::{nn::VarStore, Tensor};

/// Prefixes some exporters put in front of the BERT tensor names (`bert.embeddings...`).
const KNOWN_PREFIXES: [&str; 2] = ["bert.", "model."];

pub(crate) fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>, FormatError> {
    super::format::require_file(path)?;
    let tensors = Tensor::read_safetensors(path)
        .map_err(|e| FormatError::malformed(path, format!("not a readable safetensors file: {e}")))?;
    Ok(tensors.into_iter().collect())
}

/// Copies every variable of `vs` from the file; a missing name or a wrong shape names the file
/// and the tensor. Extra tensors in the file (pooler, position_ids buffers) are ignored.
pub(crate) fn load_into(vs: &mut VarStore, path: &Path) -> Result<(), FormatError> {
    let mut tensors = read_tensors(path)?;
    for prefix in KNOWN_PREFIXES {
        if tensors.keys().any(|k| k.starts_with(prefix)) {
            tensors = tensors
                .into_iter()
                .map(|(k, v)| (k.strip_prefix(prefix).map(str::to_string).unwrap_or(k), v))
                .collect();
        }
    }
    let _guard = tch::no_grad_guard();
    // Sorted so the first missing tensor reported is the same on every run.
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, mut var) in vars {
        let src = lookup(&tensors, &name).ok_or_else(|| {
            FormatError::malformed(path, format!("tensor `{name}` is missing"))
        })?;
        if src.size() != var.size() {
            return Err(FormatError::malformed(
                path,
                format!("tensor `{name}` has shape {:?}, expected {:?}", src.size(), var.size()),
            ));
        }
        var.copy_(&src.to_kind(var.kind()));
    }
    Ok(())
}

/// Old BERT checkpoints call LayerNorm parameters gamma/beta.
fn lookup<'a>(tensors: &'a HashMap<String, Tensor>, name: &str) -> Option<&'a Tensor> {
    tensors.get(name).or_else(|| {
        let alt = if let Some(p) = name.strip_suffix("LayerNorm.weight") {
            format!("{p}LayerNorm.gamma")
        } else if let Some(p) = name.strip_suffix("LayerNorm.bias") {
            format!("{p}LayerNorm.beta")
        } else {
            return None;
        };
        tensors.get(&alt)
    })
}

/// Writes every variable of `vs` under its own name.
pub(crate) fn save_vars(vs: &VarStore, path: &Path) -> Result<(), tch::TchError> {
    let mut vars: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach().to_device(tch::Device::Cpu).contiguous()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&vars, path)
}

//! Fills a `VarStore` from a safetensors checkpoint, by the checkpoint's own tensor names.
//!
//! An encoder's weights may also be stored as a base plus a quantized difference: beside
//! `model.safetensors` (the base), `model.delta.safetensors` holds, for a base tensor `N`,
//! `N.q` (int8, N's shape) and `N.scale` (f32, one per row, or one for a 1-d tensor); the
//! weight is `N + N.q * N.scale`. Why: a fine-tuned model that starts from weights already
//! in the repository then costs a sixth of another fp16 copy in git (MiniLM: 7.7 MB against
//! 42 MB; tensors that did not change, such as frozen embeddings, are not stored at all).

use super::format::{FormatError, WEIGHTS_DELTA_FILE, WEIGHTS_FILE};
use std::collections::HashMap;
use std::path::Path;
use tch::{nn::VarStore, Kind, Tensor};

/// Prefixes a task model puts in front of its encoder's tensor names (`bert.embeddings...`
/// in `BertForMaskedLM`, `roberta.` / `distilbert.` / `mpnet.` likewise).
const KNOWN_PREFIXES: [&str; 5] = ["bert.", "model.", "roberta.", "distilbert.", "mpnet."];

/// A checkpoint tensor's name → the variable it fills, where they differ (None: the same).
pub(crate) type Rename<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The encoder's names: task-model prefixes cut, then the family's names mapped.
fn canonical(mut tensors: HashMap<String, Tensor>, rename: Rename) -> HashMap<String, Tensor> {
    for prefix in KNOWN_PREFIXES {
        if tensors.keys().any(|k| k.starts_with(prefix)) {
            tensors = tensors.into_iter().map(|(k, v)| (k.strip_prefix(prefix).map(str::to_string).unwrap_or(k), v)).collect();
        }
    }
    tensors.into_iter().map(|(k, v)| (rename(&k).unwrap_or(k), v)).collect()
}

pub(crate) fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>, FormatError> {
    super::format::require_file(path)?;
    let tensors = Tensor::read_safetensors(path)
        .map_err(|e| FormatError::malformed(path, format!("not a readable safetensors file: {e}")))?;
    Ok(tensors.into_iter().collect())
}

/// An encoder directory's weights under the encoder's names: `model.safetensors`, with
/// `model.delta.safetensors` (in the encoder's names) added when present (in f32).
pub(crate) fn read_encoder(dir: &Path, rename: Rename) -> Result<HashMap<String, Tensor>, FormatError> {
    let mut tensors = canonical(read_tensors(&dir.join(WEIGHTS_FILE))?, rename);
    let delta_path = dir.join(WEIGHTS_DELTA_FILE);
    if !delta_path.exists() {
        return Ok(tensors);
    }
    let mut delta = read_tensors(&delta_path)?;
    let _guard = tch::no_grad_guard();
    let mut names: Vec<String> = delta.keys().filter_map(|k| k.strip_suffix(".q").map(str::to_string)).collect();
    names.sort();
    for name in names {
        let bad = |m: String| FormatError::malformed(&delta_path, format!("tensor `{name}`: {m}"));
        let q = delta.remove(&format!("{name}.q")).expect("listed");
        let scale = delta.remove(&format!("{name}.scale")).ok_or_else(|| bad("has `.q` but no `.scale`".into()))?;
        let base = tensors.get_mut(&name).ok_or_else(|| bad(format!("is not in {WEIGHTS_FILE}")))?;
        if q.kind() != Kind::Int8 || q.size() != base.size() {
            return Err(bad(format!("`.q` must be int8 of shape {:?}, is {:?} {:?}", base.size(), q.kind(), q.size())));
        }
        let rows = if base.dim() == 2 { vec![base.size()[0], 1] } else { vec![1] };
        if scale.size() != rows {
            return Err(bad(format!("`.scale` must have shape {rows:?}, has {:?}", scale.size())));
        }
        *base = base.to_kind(Kind::Float) + q.to_kind(Kind::Float) * scale.to_kind(Kind::Float);
    }
    if let Some(extra) = delta.keys().min() {
        return Err(FormatError::malformed(&delta_path, format!("tensor `{extra}` is neither a `.q` nor its `.scale`")));
    }
    Ok(tensors)
}

/// Fills `vs` from an encoder directory (base and delta, see the module's comment).
pub(crate) fn load_encoder_into(vs: &mut VarStore, dir: &Path, rename: Rename) -> Result<(), FormatError> {
    fill(vs, read_encoder(dir, rename)?, &dir.join(WEIGHTS_FILE))
}

/// Writes an encoder directory's weights as one plain checkpoint (base and delta added), under
/// the encoder's names.
pub(crate) fn materialize(dir: &Path, dst: &Path, rename: Rename) -> anyhow::Result<()> {
    let mut tensors: Vec<(String, Tensor)> = read_encoder(dir, rename)?.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&tensors, dst)?;
    Ok(())
}

/// Copies every variable of `vs` from the file; a missing name or a wrong shape names the file
/// and the tensor. Extra tensors in the file (pooler, position_ids buffers) are ignored.
pub(crate) fn load_into(vs: &mut VarStore, path: &Path) -> Result<(), FormatError> {
    fill(vs, read_tensors(path)?, path)
}

fn fill(vs: &mut VarStore, tensors: HashMap<String, Tensor>, path: &Path) -> Result<(), FormatError> {
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

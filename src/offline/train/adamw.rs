//! AdamW (Loshchilov & Hutter) whose state can be saved and restored. tch's optimizers keep
//! their moments inside libtorch with no way to read them back, so a resumed run would
//! restart the moments and drift from an uninterrupted one; here they are plain tensors
//! written beside the checkpoint, which makes `--resume` exact.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor};

pub struct Param {
    pub name: String,
    pub var: Tensor,
    /// Index into the learning rates passed to `step` (encoder, head).
    pub group: usize,
    /// Biases and LayerNorm parameters are not decayed (the usual BERT recipe).
    decay: bool,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    pub params: Vec<Param>,
    pub weight_decay: f64,
    pub step: i64,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl AdamW {
    pub fn new(groups: Vec<Vec<(String, Tensor)>>, weight_decay: f64) -> Self {
        let mut params = Vec::new();
        for (group, vars) in groups.into_iter().enumerate() {
            for (name, var) in vars {
                let decay = var.dim() >= 2 && !name.contains("LayerNorm");
                let (m, v) = (var.zeros_like(), var.zeros_like());
                params.push(Param { name, var, group, decay, m, v });
            }
        }
        // A fixed order, so the global gradient norm sums in the same order every run.
        params.sort_by(|a, b| (a.group, &a.name).cmp(&(b.group, &b.name)));
        AdamW { params, weight_decay, step: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }

    pub(crate) fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.var.zero_grad();
        }
    }

    /// Scales gradients so their global L2 norm is at most `max`; returns the norm before.
    pub(crate) fn clip_grad_norm(&mut self, max: f64) -> f64 {
        let _g = tch::no_grad_guard();
        let sq: f64 = self
            .params
            .iter()
            .filter(|p| p.var.grad().defined())
            .map(|p| p.var.grad().pow_tensor_scalar(2).sum(Kind::Double).double_value(&[]))
            .sum();
        let norm = sq.sqrt();
        if max > 0.0 && norm > max {
            for p in &self.params {
                let mut g = p.var.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(max / (norm + 1e-6));
                }
            }
        }
        norm
    }

    /// One update with a learning rate per group; parameters without a gradient are skipped.
    pub(crate) fn step(&mut self, lrs: &[f64]) {
        let _g = tch::no_grad_guard();
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        for p in &mut self.params {
            let g = p.var.grad();
            if !g.defined() {
                continue;
            }
            let lr = lrs[p.group];
            if p.decay && self.weight_decay > 0.0 {
                let _ = p.var.g_mul_scalar_(1.0 - lr * self.weight_decay);
            }
            p.m.copy_(&(&p.m * b1 + &g * (1.0 - b1)));
            p.v.copy_(&(&p.v * b2 + (&g * &g) * (1.0 - b2)));
            let update = (&p.m / bc1) / ((&p.v / bc2).sqrt() + self.eps);
            let _ = p.var.g_sub_(&(update * lr));
        }
    }

    /// Writes the moments, the step count and `tag` (the caller's checkpoint step, checked on
    /// load against the rest of the checkpoint).
    pub fn save(&self, path: &Path, tag: i64) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for p in &self.params {
            named.push((format!("m/{}/{}", p.group, p.name), p.m.shallow_clone()));
            named.push((format!("v/{}/{}", p.group, p.name), p.v.shallow_clone()));
        }
        named.push(("step".into(), Tensor::from_slice(&[self.step])));
        named.push(("tag".into(), Tensor::from_slice(&[tag])));
        Tensor::write_safetensors(&named, path).with_context(|| format!("writing {}", path.display()))
    }

    /// Restores the state; returns the tag it was saved with.
    pub fn load(&mut self, path: &Path) -> Result<i64> {
        let mut t: HashMap<String, Tensor> = Tensor::read_safetensors(path)
            .with_context(|| format!("reading {}", path.display()))?
            .into_iter()
            .collect();
        let _g = tch::no_grad_guard();
        for p in &mut self.params {
            for (kind, dst) in [("m", &mut p.m), ("v", &mut p.v)] {
                let key = format!("{kind}/{}/{}", p.group, p.name);
                match t.remove(&key) {
                    Some(src) if src.size() == dst.size() => dst.copy_(&src),
                    _ => bail!("{}: no usable `{key}` (trained with other settings?)", path.display()),
                }
            }
        }
        self.step = t.remove("step").context("optimizer state has no step")?.int64_value(&[0]);
        Ok(t.remove("tag").context("optimizer state has no tag")?.int64_value(&[0]))
    }
}

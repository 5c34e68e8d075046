//! Head-only training: the encoder stays frozen, so its outputs are computed once up front
//! (or read from `--features-cache`); each step then costs only the head and a B×B score
//! matrix. Each epoch writes a checkpoint.

use super::{apply_init_std, load_pairs, load_state, load_valid, log_entry, prepare_out, save_settings_and_state, score_valid, Pair, TrainArgs, TrainState};
use crate::offline::eval::{context_tokens, progress_bar, Features};
use crate::model::format::*;
use crate::infer::ranker::Ranker;
use crate::text::TextKind;
use anyhow::{bail, Result};
use std::path::Path;
use std::time::Instant;
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor};

pub(super) fn train(a: &TrainArgs) -> Result<TrainState> {
    let settings = prepare_out(a, false)?;
    let mut state = load_state(a)?;
    let mut ranker = Ranker::load(&a.out, Device::Cpu)?;
    apply_init_std(a, &mut ranker);
    if ranker.model.head_vs.variables().is_empty() {
        bail!("this head has no trainable parameters (bi mode or n_first with basic attention): fine-tune the encoder with --train-layers");
    }
    let mut pairs = load_pairs(&a.data)?;
    if let Some(n) = a.limit {
        pairs.truncate(n);
    }

    // Frozen encoder outputs, once (or from --features-cache).
    let t0 = Instant::now();
    let key = features_key(a, &ranker, pairs.len())?;
    let (contexts, cands) = match a.features_cache.as_deref().and_then(|p| load_features(p, &key)) {
        Some(f) => f,
        None => {
            let f = precompute(&ranker, &pairs)?;
            if let Some(p) = &a.features_cache {
                save_features(p, &key, &f.0, &f.1)?;
            }
            f
        }
    };
    let valid: Vec<Features> = load_valid(a)?.iter().map(|ex| Features::compute(&ranker, ex, 64, false)).collect::<Result<_>>()?;
    let pre = t0.elapsed().as_secs_f64();
    state.precompute_seconds = pre;
    tracing::info!(pairs = pairs.len(), seconds = format!("{pre:.1}"), "encoder outputs precomputed");

    let mut opt = tch::nn::AdamW { wd: a.weight_decay, ..Default::default() }.build(&ranker.model.head_vs, a.lr)?;
    let n = pairs.len() as i64;
    if state.epochs_done == 0 {
        state.initial_valid = score_valid(&ranker.model, &valid).map(|v| v.0);
    }
    for epoch in state.epochs_done..a.epochs {
        let te = Instant::now();
        // The order depends on (seed, epoch) only, so a resumed run sees the same batches.
        tch::manual_seed(a.seed.wrapping_mul(1000).wrapping_add(epoch as i64));
        let order: Vec<i64> = Vec::try_from(Tensor::randperm(n, (Kind::Int64, Device::Cpu)))?;
        let (mut total, mut steps) = (0.0, 0);
        for batch in order.chunks(a.batch_size) {
            if batch.len() < 2 {
                continue;
            }
            let loss = step_loss(&ranker, &contexts, &cands, batch, a.extra_negatives, n, a.logit_scale);
            opt.backward_step(&loss);
            total += loss.double_value(&[]);
            steps += 1;
        }
        let loss = total / steps.max(1) as f64;
        state.history.push(log_entry(epoch + 1, loss, score_valid(&ranker.model, &valid), te.elapsed().as_secs_f64()));
        state.epochs_done = epoch + 1;
        // Head first, then settings, then state: a crash in between leaves an older but
        // consistent head, and resume trusts only train_state.json's epoch count.
        crate::model::weights::save_vars(&ranker.model.head_vs, &a.out.join(HEAD_FILE))?;
        let what = format!("poly head (m={}) trained by `polyrank train` on a frozen encoder, {} epochs", settings.n_codes, state.epochs_done);
        save_settings_and_state(&settings, &a.out, &state, &what)?;
    }
    Ok(state)
}

fn precompute(ranker: &Ranker, pairs: &[Pair]) -> Result<(Vec<Tensor>, Tensor)> {
    let bar = progress_bar(true, (pairs.len() * 2) as u64, "precomputing");
    let joined: Vec<String> = pairs.iter().map(|p| ranker.text.join_turns(&p.context)).collect();
    let contexts = context_tokens(&ranker.model, ranker, &joined, 64, &bar)?;
    let responses: Vec<String> = pairs.iter().map(|p| p.response.clone()).collect();
    let enc = ranker.tokenize(&responses, TextKind::Candidate).map_err(anyhow::Error::msg)?;
    let cands = tch::no_grad(|| ranker.candidate_vectors(&enc, 64));
    bar.finish_and_clear();
    Ok((contexts, cands))
}

/// What the cached features depend on: the pairs file's content, the limit, and the
/// encoder's content fingerprint (weights, tokenizer, output-changing settings).
fn features_key(a: &TrainArgs, ranker: &Ranker, n: usize) -> Result<String> {
    let mut extra = std::fs::read(&a.data)?;
    extra.extend_from_slice(&n.to_le_bytes());
    crate::fingerprint::encoder_fingerprint(&a.out, &ranker.model.settings, &extra)
}

fn save_features(path: &Path, key: &str, contexts: &[Tensor], cands: &Tensor) -> Result<()> {
    let mut named: Vec<(String, Tensor)> = contexts.iter().enumerate().map(|(i, t)| (format!("ctx.{i}"), t.shallow_clone())).collect();
    named.push(("candidates".into(), cands.shallow_clone()));
    named.push(("key".into(), Tensor::from_slice(key.as_bytes())));
    Tensor::write_safetensors(&named, path)?;
    Ok(())
}

fn load_features(path: &Path, key: &str) -> Option<(Vec<Tensor>, Tensor)> {
    let mut m: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(path).ok()?.into_iter().collect();
    let stored: Vec<u8> = Vec::try_from(m.remove("key")?).ok()?;
    if stored != key.as_bytes() {
        tracing::info!("features cache is for other data or another encoder; recomputing");
        return None;
    }
    let cands = m.remove("candidates")?;
    let contexts: Option<Vec<Tensor>> = (0..cands.size()[0]).map(|i| m.remove(&format!("ctx.{i}"))).collect();
    tracing::info!(path = %path.display(), "encoder outputs from the features cache");
    contexts.map(|c| (c, cands))
}

/// Cross-entropy of each context against the batch's responses (its own is the target),
/// plus optional random extra negatives.
fn step_loss(ranker: &Ranker, contexts: &[Tensor], cands: &Tensor, batch: &[i64], extra: usize, n: i64, scale: f64) -> Tensor {
    let ctx: Vec<Tensor> = batch.iter().map(|&i| contexts[i as usize].shallow_clone()).collect();
    let codes = ranker.model.codes_from_tokens(&ctx);
    let mut rows = batch.to_vec();
    if extra > 0 {
        let r: Vec<i64> = Vec::try_from(Tensor::randint(n, [extra as i64], (Kind::Int64, Device::Cpu))).unwrap_or_default();
        rows.extend(r);
    }
    let c = cands.index_select(0, &Tensor::from_slice(&rows));
    let target = Tensor::arange(batch.len() as i64, (Kind::Int64, Device::Cpu));
    super::finetune::in_batch_loss(&ranker.model, &codes, &c, &target, scale, None)
}

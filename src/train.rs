//! `polyrank train`: learns the Poly-encoder head (codes, and attention projections when
//! multihead) on (context, response) pairs with cross-entropy over in-batch negatives, as in
//! the paper. The encoder stays frozen, so its outputs are computed once up front: each step
//! then costs only the head and an B×B score matrix, which is what makes this practical on
//! two CPU cores. Seeded; each epoch writes a checkpoint in the model format and can be
//! resumed from.

use crate::eval::{context_tokens, head_codes, metrics, progress_bar, Example, Features, Metrics};
use crate::model::settings::*;
use crate::ranker::Ranker;
use crate::tokenizer::TextKind;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pair {
    pub context: Vec<String>,
    pub response: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Model directory to start from (its encoder, tokenizer and settings).
    #[arg(long, default_value = "models/default")]
    pub base: PathBuf,
    /// Training pairs, JSONL {"context": [turns], "response": text}.
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out examples (eval format) scored after every epoch.
    #[arg(long)]
    pub valid: Option<PathBuf>,
    /// Output model directory (written after every epoch).
    #[arg(long)]
    pub out: PathBuf,
    /// m for a fresh head; omitted: continue from the base model's head.
    #[arg(long)]
    pub n_codes: Option<i64>,
    /// A fresh head's codes ~ N(0, std²) instead of ParlAI's uniform [0, 1). Small codes
    /// attend almost uniformly, so training starts at mean pooling (the bi-encoder).
    #[arg(long)]
    pub init_std: Option<f64>,
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Multiplies the scores inside the training loss only (a softmax temperature). The
    /// default model's candidate vectors are unit length, so raw scores differ by little and
    /// an unscaled cross-entropy mostly rewards inflating every score rather than ranking.
    #[arg(long, default_value_t = 1.0)]
    pub logit_scale: f64,
    /// Extra random negatives per batch, drawn from the other responses.
    #[arg(long, default_value_t = 0)]
    pub extra_negatives: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Continue from the checkpoint in --out (its head and epoch count).
    #[arg(long)]
    pub resume: bool,
    /// Use at most this many pairs.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Keep the frozen encoder outputs in this file and reuse them when the data, limit and
    /// encoder match (a re-run then skips the slow part).
    #[arg(long)]
    pub features_cache: Option<PathBuf>,
    /// libtorch threads (fixed, so runs are repeatable).
    #[arg(long, default_value_t = 2)]
    pub threads: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub loss: f64,
    pub valid: Option<Metrics>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainState {
    pub epochs_done: usize,
    pub seed: i64,
    pub history: Vec<EpochLog>,
    /// Held-out metrics of the head before the first step.
    pub initial_valid: Option<Metrics>,
    pub precompute_seconds: f64,
}

const STATE_FILE: &str = "train_state.json";

pub fn load_pairs(path: &Path) -> Result<Vec<Pair>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let pairs: Vec<Pair> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| serde_json::from_str(l).with_context(|| format!("{}:{}: expected {{context, response}}", path.display(), n + 1)))
        .collect::<Result<_>>()?;
    if pairs.len() < 2 {
        bail!("{}: need at least two pairs for in-batch negatives", path.display());
    }
    Ok(pairs)
}

/// Lays out `out` as a model directory: links to the base encoder files, settings, head.
fn prepare_out(a: &TrainArgs) -> Result<PolySettings> {
    std::fs::create_dir_all(&a.out)?;
    let mut links = vec![CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE];
    let base_settings = PolySettings::load(&a.base)?;
    if !base_settings.share_encoders {
        links.push(CANDIDATE_ENCODER_DIR);
    }
    for name in links {
        let (src, dst) = (a.base.join(name).canonicalize()?, a.out.join(name));
        if dst.symlink_metadata().is_ok() {
            std::fs::remove_file(&dst)?;
        }
        std::os::unix::fs::symlink(&src, &dst).with_context(|| format!("linking {}", dst.display()))?;
    }
    if a.resume {
        return Ok(PolySettings::load(&a.out)?);
    }
    let mut s = base_settings;
    match a.n_codes {
        Some(m) => {
            s.mode = Mode::Poly;
            s.n_codes = m;
            crate::testkit::init_head(&a.out, &s, a.seed)?;
        }
        None => {
            s.save(&a.out)?;
            std::fs::copy(a.base.join(HEAD_FILE), a.out.join(HEAD_FILE))?;
        }
    }
    Ok(s)
}

pub fn train(a: TrainArgs) -> Result<TrainState> {
    tch::set_num_threads(a.threads);
    tch::manual_seed(a.seed);
    let settings = prepare_out(&a)?;
    let mut state: TrainState = if a.resume {
        serde_json::from_str(&std::fs::read_to_string(a.out.join(STATE_FILE)).context("--resume needs a train_state.json in --out")?)?
    } else {
        TrainState { seed: a.seed, ..Default::default() }
    };
    let mut ranker = Ranker::load(&a.out, Device::Cpu)?;
    if let (Some(std), Some(codes), false) = (a.init_std, ranker.model.head.codes.as_mut(), a.resume) {
        tch::no_grad(|| codes.copy_(&(Tensor::randn_like(codes) * std)));
    }
    if ranker.model.head_vs.variables().is_empty() {
        bail!("this head has no trainable parameters (bi mode or n_first with basic attention)");
    }
    let mut pairs = load_pairs(&a.data)?;
    if let Some(n) = a.limit {
        pairs.truncate(n);
    }

    // Frozen encoder outputs, once (or from --features-cache).
    let t0 = Instant::now();
    let key = features_key(&a, &ranker, pairs.len())?;
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
    let valid = match &a.valid {
        Some(p) => {
            let ex: Vec<Example> = crate::eval::load_examples(p)?;
            Some(Features::compute(&ranker, &ex, 64, false)?)
        }
        None => None,
    };
    let pre = t0.elapsed().as_secs_f64();
    state.precompute_seconds = pre;
    tracing::info!(pairs = pairs.len(), seconds = format!("{pre:.1}"), "encoder outputs precomputed");

    let mut opt = tch::nn::AdamW { wd: a.weight_decay, ..Default::default() }.build(&ranker.model.head_vs, a.lr)?;
    let n = pairs.len() as i64;
    if state.epochs_done == 0 {
        if let Some(f) = &valid {
            let m = metrics(&f.ranks(&ranker.model, 64));
            tracing::info!(epoch = 0, valid_r1 = format!("{:.4}", m.r_at_1), "before training");
            state.initial_valid = Some(m);
        }
    }
    for epoch in state.epochs_done..a.epochs {
        let te = Instant::now();
        // The order depends on (seed, epoch) only, so a resumed run sees the same batches.
        tch::manual_seed(a.seed.wrapping_mul(1000).wrapping_add(epoch as i64));
        let order = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
        let order: Vec<i64> = Vec::try_from(order)?;
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
        let valid_m = valid.as_ref().map(|f| metrics(&f.ranks(&ranker.model, 64)));
        let log = EpochLog { epoch: epoch + 1, loss, valid: valid_m, seconds: te.elapsed().as_secs_f64() };
        match &valid_m {
            Some(m) => tracing::info!(epoch = epoch + 1, loss = format!("{loss:.4}"), valid_r1 = format!("{:.4}", m.r_at_1), secs = format!("{:.1}", log.seconds), "epoch"),
            None => tracing::info!(epoch = epoch + 1, loss = format!("{loss:.4}"), secs = format!("{:.1}", log.seconds), "epoch"),
        }
        state.history.push(log);
        state.epochs_done = epoch + 1;
        save_checkpoint(&mut ranker, &settings, &a.out, &state)?;
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

/// What the cached features depend on: the pairs file, the limit, the encoder and settings.
fn features_key(a: &TrainArgs, ranker: &Ranker, n: usize) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(std::fs::read(&a.data)?);
    h.update(n.to_le_bytes());
    h.update(std::fs::canonicalize(a.base.join(WEIGHTS_FILE))?.to_string_lossy().as_bytes());
    let s = &ranker.model.settings;
    h.update(format!("{}/{}/{}/{:?}/{}", s.max_context_tokens, s.max_candidate_tokens, s.output_scaling, s.candidate_pooling, s.normalize));
    Ok(hex::encode(h.finalize()))
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
    let codes = head_codes(&ranker.model, &ctx);
    let mut rows = batch.to_vec();
    if extra > 0 {
        let r: Vec<i64> = Vec::try_from(Tensor::randint(n, [extra as i64], (Kind::Int64, Device::Cpu))).unwrap_or_default();
        rows.extend(r);
    }
    let c = cands.index_select(0, &Tensor::from_slice(&rows));
    let scores = ranker.model.score(&codes, &c); // [B, B + extra]
    let target = Tensor::arange(batch.len() as i64, (Kind::Int64, Device::Cpu));
    (scores * scale).cross_entropy_for_logits(&target)
}

fn save_checkpoint(ranker: &mut Ranker, settings: &PolySettings, out: &Path, state: &TrainState) -> Result<()> {
    let mut s = settings.clone();
    s.trained = true;
    let last = state.history.last();
    s.description = format!(
        "poly head (m={}) trained by `polyrank train`, seed {}, {} epochs{}",
        s.n_codes,
        state.seed,
        state.epochs_done,
        last.and_then(|l| l.valid).map(|m| format!(", held-out R@1/20 {:.3}", m.r_at_1)).unwrap_or_default()
    );
    // Head first, then settings, then state: a crash in between leaves an older but
    // consistent head, and resume trusts only train_state.json's epoch count.
    crate::model::weights::save_vars(&ranker.model.head_vs, &out.join(HEAD_FILE))?;
    s.save(out)?;
    std::fs::write(out.join(STATE_FILE), serde_json::to_string_pretty(state)?)?;
    Ok(())
}

//! Fine-tuning the encoder with the head (the paper's recipe): cross-entropy of each context
//! against every response of its batch, AdamW with separate learning rates for the encoder
//! and the head, linear warm-up then linear decay, global gradient-norm clipping.
//!
//! Large batches on a small machine: in-batch negatives want batches of hundreds, and the
//! graph of a whole batch of transformer passes may not fit. With `--grad-cache` (Gao et al.
//! 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup") the batch
//! is first encoded without a graph; the loss over the whole batch is back-propagated to the
//! encoder outputs only (the head trains here); then each chunk is re-encoded with a graph
//! and its slice of those output gradients is back-propagated into the encoder. The result is
//! the full-batch gradient (the encoder has no dropout here, so both passes are the same
//! function) with memory for one chunk. Without it, the chunks' graphs are all kept and the
//! extra forward pass is saved. Either way the batch is encoded in length-sorted chunks, so
//! short texts are not padded to the longest of the batch.

use super::adamw::AdamW;
use super::{apply_init_std, load_pairs, load_state, load_valid, log_entry, prepare_out, save_settings_and_state, score_valid, write_atomically, Pair, Precision, TrainArgs, TrainLayers, TrainState};
use crate::offline::eval::Features;
use crate::model::scoring::ContextVectors;
use crate::model::format::*;
use crate::model::mixed::with_matmul_kind;
use crate::model::PolyEncoder;
use crate::infer::ranker::Ranker;
use crate::text::{to_batch, Batch, Tokenizer, TextKind};
use anyhow::{Context, Result};
use std::path::Path;
use std::time::Instant;
use tch::{nn::VarStore, Device, Kind, Tensor};
use tokenizers::Encoding;

const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Mean cross-entropy of `scale · score(codes, cands)` against `target` (the index of each
/// context's own response among `cands`); `mask` (added to the logits) removes columns that
/// are no true negative for a row.
pub(crate) fn in_batch_loss(model: &PolyEncoder, codes: &ContextVectors, cands: &Tensor, target: &Tensor, scale: f64, mask: Option<&Tensor>) -> Tensor {
    let logits = model.score(codes, cands) * scale;
    let logits = match mask {
        Some(m) => logits + m,
        None => logits,
    };
    logits.cross_entropy_for_logits(target)
}

/// Marks the encoder variables that train (`requires_grad`) and returns them by name.
fn select_trainable(vs: &VarStore, layers: usize, total: usize, embeddings: bool) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for (name, t) in vs.variables() {
        // `encoder.layer.{i}.…` (BERT) or `layers.{i}.…` (ParlAI): the top `layers` of `total`
        // train; everything else is the embeddings (and ParlAI's `norm_embeddings`).
        let layer = name
            .strip_prefix("encoder.layer.")
            .or_else(|| name.strip_prefix("layers."))
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        let trains = match layer {
            Some(i) => i + layers >= total,
            None => embeddings,
        };
        let t = t.set_requires_grad(trains);
        if trains {
            out.push((name, t));
        }
    }
    out
}

/// One batch, tokenized and split into length-sorted chunks; `target[r]` is the column of
/// context row r's own response (rows and columns are in chunk order). `mask` drops, per
/// row, every other column whose text is the row's own response (a repeated "lol" in the
/// batch is no negative).
struct PreparedBatch {
    contexts: Vec<Batch>,
    candidates: Vec<Batch>,
    target: Tensor,
    mask: Tensor,
}

fn length_sorted(enc: &[Encoding]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..enc.len()).collect();
    order.sort_by_key(|&i| (enc[i].get_ids().len(), i));
    order
}

fn chunked(enc: &[Encoding], order: &[usize], chunk: usize, device: Device) -> Vec<Batch> {
    order.chunks(chunk.max(1)).map(|c| to_batch(&c.iter().map(|&i| &enc[i]).collect::<Vec<_>>(), device)).collect()
}

impl PreparedBatch {
    /// With `context_negatives`, each pair's last context turn joins the candidates as one
    /// more negative for every row: the text most like the context is not a reply to it, and
    /// random in-batch negatives never teach that (a similarity encoder ranks an echo of the
    /// question above the answer).
    fn new(text: &Tokenizer, pairs: &[&Pair], chunk: usize, context_negatives: bool, device: Device) -> Result<Self> {
        let contexts: Vec<String> = pairs.iter().map(|p| text.join_turns(&p.context)).collect();
        let mut candidates: Vec<String> = pairs.iter().map(|p| p.response.clone()).collect();
        if context_negatives {
            candidates.extend(pairs.iter().filter_map(|p| p.context.last().cloned()));
        }
        let ce = text.tokenize(&contexts, TextKind::Context).map_err(anyhow::Error::msg)?;
        let re = text.tokenize(&candidates, TextKind::Candidate).map_err(anyhow::Error::msg)?;
        let (co, ro) = (length_sorted(&ce), length_sorted(&re));
        let mut column = vec![0i64; candidates.len()];
        for (col, &i) in ro.iter().enumerate() {
            column[i] = col as i64;
        }
        let target: Vec<i64> = co.iter().map(|&i| column[i]).collect();
        let (b, n) = (co.len(), ro.len());
        let mut mask = vec![0f32; b * n];
        for (r, &i) in co.iter().enumerate() {
            for (col, &j) in ro.iter().enumerate() {
                if j != i && candidates[j] == candidates[i] {
                    mask[r * n + col] = -1e4;
                }
            }
        }
        Ok(PreparedBatch {
            contexts: chunked(&ce, &co, chunk, device),
            candidates: chunked(&re, &ro, chunk, device),
            target: Tensor::from_slice(&target).to_device(device),
            mask: Tensor::from_slice(&mask).view([b as i64, n as i64]).to_device(device),
        })
    }
}

fn cat_codes(parts: Vec<ContextVectors>) -> ContextVectors {
    let (ys, masks): (Vec<Tensor>, Vec<Tensor>) = parts.into_iter().map(|c| (c.y, c.mask)).unzip();
    ContextVectors { y: Tensor::cat(&ys, 0), mask: Tensor::cat(&masks, 0) }
}

/// Forward and backward of one batch; leaves the full-batch gradient in every trainable
/// variable (added to what is there) and returns the loss.
fn accumulate_gradients(model: &PolyEncoder, b: &PreparedBatch, scale: f64, grad_cache: bool) -> f64 {
    if !grad_cache {
        let codes = cat_codes(b.contexts.iter().map(|c| model.context_codes(c)).collect());
        let cands = Tensor::cat(&b.candidates.iter().map(|c| model.candidate_vectors(c)).collect::<Vec<_>>(), 0);
        let loss = in_batch_loss(model, &codes, &cands, &b.target, scale, Some(&b.mask));
        loss.backward();
        return loss.double_value(&[]);
    }
    // 1. Encoder outputs without a graph, as leaves that collect the loss gradient.
    let leaf = |t: Tensor| t.detach().set_requires_grad(true);
    let tokens: Vec<Tensor> = tch::no_grad(|| b.contexts.iter().map(|c| model.context_tokens(c)).collect::<Vec<_>>()).into_iter().map(leaf).collect();
    let vectors: Vec<Tensor> = tch::no_grad(|| b.candidates.iter().map(|c| model.candidate_vectors(c)).collect::<Vec<_>>()).into_iter().map(leaf).collect();
    // 2. The head and the loss over the whole batch: the head's gradient is final here.
    let codes = cat_codes(tokens.iter().zip(&b.contexts).map(|(h, c)| model.head.context_codes(h, &c.mask)).collect());
    let loss = in_batch_loss(model, &codes, &Tensor::cat(&vectors, 0), &b.target, scale, Some(&b.mask));
    loss.backward();
    // 3. Chunk by chunk: re-encode with a graph and push the cached output gradient through.
    // d/dθ Σ (out ⊙ g) with g fixed is exactly gᵀ ∂out/∂θ.
    for (c, h) in b.contexts.iter().zip(&tokens) {
        (model.context_tokens(c) * h.grad()).sum(Kind::Float).backward();
    }
    for (c, v) in b.candidates.iter().zip(&vectors) {
        (model.candidate_vectors(c) * v.grad()).sum(Kind::Float).backward();
    }
    loss.double_value(&[])
}

/// The learning-rate multiplier at `step` (0-based): linear warm-up, then linear decay to 0.
pub fn schedule(step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        (step + 1) as f64 / warmup as f64
    } else {
        ((total - step) as f64 / (total - warmup).max(1) as f64).clamp(0.0, 1.0)
    }
}

/// Everything a step needs: the model, the training tokenizer (training lengths), the
/// trainable variables under their optimizer.
pub struct Trainer {
    pub ranker: Ranker,
    text: Tokenizer,
    opt: AdamW,
    /// `--precision`: the dense layers' kind inside a training step (None: fp32).
    matmul_kind: Option<Kind>,
    pub trainable: usize,
}

impl Trainer {
    /// Loads `dir` and marks what trains (see `--train-layers`, `--train-embeddings`).
    pub fn new(dir: &Path, a: &TrainArgs) -> Result<Self> {
        let mut ranker = Ranker::load(dir, Device::Cpu)?;
        apply_init_std(a, &mut ranker);
        let m = &ranker.model;
        let total = m.config.num_layers() as usize;
        let layers = a.train_layers.count(total);
        let embeddings = a.train_embeddings && a.train_layers == TrainLayers::All;
        let mut encoder = select_trainable(&m.encoder_vs, layers, total, embeddings);
        if let Some(vs) = &m.candidate_vs {
            let cand = select_trainable(vs, layers, total, embeddings);
            encoder.extend(cand.into_iter().map(|(n, t)| (format!("{CANDIDATE_ENCODER_DIR}/{n}"), t)));
        }
        let head: Vec<(String, Tensor)> = m.head_vs.variables().into_iter().collect();
        let trainable = encoder.iter().chain(&head).map(|(_, t)| t.numel()).sum();
        let opt = AdamW::new(vec![encoder, head], a.weight_decay);
        let mut s = ranker.model.settings.clone();
        s.max_context_tokens = a.max_context_tokens.unwrap_or(s.max_context_tokens);
        s.max_candidate_tokens = a.max_candidate_tokens.unwrap_or(s.max_candidate_tokens);
        let text = Tokenizer::load(dir, &s)?;
        Ok(Trainer { ranker, text, opt, matmul_kind: a.precision.matmul_kind(), trainable })
    }

    /// Loss and gradients of one batch, without an update (gradients are zeroed first).
    pub fn gradients(&mut self, pairs: &[&Pair], chunk: usize, scale: f64, grad_cache: bool, context_negatives: bool) -> Result<f64> {
        self.opt.zero_grad();
        let b = PreparedBatch::new(&self.text, pairs, chunk, context_negatives, self.ranker.model.device)?;
        Ok(with_matmul_kind(self.matmul_kind, || accumulate_gradients(&self.ranker.model, &b, scale, grad_cache)))
    }

    /// The trainable variables' gradients by name (for tests and diagnostics).
    pub fn grads(&self) -> Vec<(String, Tensor)> {
        self.opt.params.iter().filter(|p| p.var.grad().defined()).map(|p| (format!("{}/{}", p.group, p.name), p.var.grad().copy())).collect()
    }

    fn step(&mut self, pairs: &[&Pair], a: &TrainArgs, lr_mult: f64) -> Result<f64> {
        let loss = self.gradients(pairs, a.chunk_size, a.logit_scale, a.grad_cache, a.context_negatives)?;
        self.opt.clip_grad_norm(a.clip_norm);
        self.opt.step(&[a.lr_encoder * lr_mult, a.lr * lr_mult]);
        Ok(loss)
    }

    /// A complete model directory in `out` (encoders, head) plus the optimizer state; every
    /// file through a temp file and a rename. The optimizer file goes first and carries
    /// `step`: a crash before train_state.json is written leaves a step that disagrees with
    /// it, which `--resume` detects instead of silently mixing two checkpoints.
    fn save(&self, out: &Path, step: usize) -> Result<()> {
        write_atomically(&out.join(OPTIMIZER_FILE), |p| self.opt.save(p, step as i64))?;
        let m = &self.ranker.model;
        let save_vs = |vs: &VarStore, path: &Path| write_atomically(path, |p| Ok(crate::model::weights::save_vars(vs, p)?));
        save_vs(&m.encoder_vs, &out.join(WEIGHTS_FILE))?;
        if let Some(vs) = &m.candidate_vs {
            save_vs(vs, &out.join(CANDIDATE_ENCODER_DIR).join(WEIGHTS_FILE))?;
        }
        if !m.head_vs.variables().is_empty() {
            save_vs(&m.head_vs, &out.join(HEAD_FILE))?;
        }
        Ok(())
    }
}

pub(super) fn train(a: &TrainArgs) -> Result<TrainState> {
    let settings = prepare_out(a, true)?;
    let mut state = load_state(a)?;
    let mut t = Trainer::new(&a.out, a)?;
    let mut pairs = load_pairs(&a.data)?;
    if let Some(n) = a.limit {
        pairs.truncate(n);
    }
    let per_epoch = pairs.len().div_ceil(a.batch_size);
    let total = a.max_steps.unwrap_or(a.epochs * per_epoch);
    // Everything that decides the batches and the updates: a resumed run must match it.
    let recipe = format!(
        "seed {} | {} pairs of {} | batch {} | steps {total} | warm-up {} | layers {:?} embeddings {} | lr {} / encoder {} | wd {} | clip {} | scale {} | tokens {:?}/{:?} | context negatives {}",
        a.seed, pairs.len(), a.data.display(), a.batch_size, a.warmup_steps, a.train_layers, a.train_embeddings, a.lr, a.lr_encoder,
        a.weight_decay, a.clip_norm, a.logit_scale, a.max_context_tokens, a.max_candidate_tokens, a.context_negatives
    );
    // Said only when not fp32, so the recipes of runs from before the option still match.
    let recipe = match a.precision {
        Precision::Fp32 => recipe,
        p => format!("{recipe} | precision {p:?}"),
    };
    if a.resume {
        if !state.recipe.is_empty() && state.recipe != recipe {
            anyhow::bail!("--resume with other settings than the checkpoint's:\n  checkpoint: {}\n  now:        {recipe}", state.recipe);
        }
        let tag = t.opt.load(&a.out.join(OPTIMIZER_FILE)).context("--resume")?;
        if tag != state.steps_done as i64 {
            anyhow::bail!(
                "{}: the optimizer state is from step {tag} but train_state.json from step {} (a crash while saving): start the run again",
                a.out.display(),
                state.steps_done
            );
        }
    }
    state.recipe = recipe;
    let end = a.stop_after.map_or(total, |n| (state.steps_done + n).min(total));
    let valid_sets = load_valid(a)?;
    let features = |r: &Ranker| -> Result<Vec<Features>> { valid_sets.iter().map(|ex| Features::compute(r, ex, 64, false)).collect() };
    tracing::info!(pairs = pairs.len(), steps = total, from = state.steps_done, trainable = t.trainable, "fine-tuning");
    if state.steps_done == 0 {
        state.initial_valid = score_valid(&t.ranker.model, &features(&t.ranker)?).map(|v| v.0);
    }
    let what = |s: &TrainState| {
        format!(
            "{} fine-tuned by `polyrank train` ({} layers{}), {} steps of {} pairs",
            if settings.mode == Mode::Bi { "bi-encoder".to_string() } else { format!("poly-encoder (m={})", settings.n_codes) },
            match a.train_layers { TrainLayers::All => "all".to_string(), TrainLayers::Top(n) => format!("top {n}") },
            if a.train_embeddings { " + embeddings" } else { "" },
            s.steps_done,
            a.batch_size
        )
    };
    let (mut loss_sum, mut loss_n, mut since) = (0.0, 0, Instant::now());
    let mut order: Option<(usize, Vec<i64>)> = None;
    for step in state.steps_done..end {
        // The order depends on (seed, epoch) only, so a resumed run sees the same batches.
        let (epoch, at) = (step / per_epoch, step % per_epoch);
        if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            tch::manual_seed(a.seed.wrapping_mul(1000).wrapping_add(epoch as i64));
            order = Some((epoch, Vec::try_from(Tensor::randperm(pairs.len() as i64, (Kind::Int64, Device::Cpu)))?));
        }
        let ids = &order.as_ref().expect("order").1[at * a.batch_size..((at + 1) * a.batch_size).min(pairs.len())];
        // A last batch of one pair has no negative: no update, but the step still counts
        // (and checkpoints), so a run always reaches its end.
        if ids.len() >= 2 {
            let batch: Vec<&Pair> = ids.iter().map(|&i| &pairs[i as usize]).collect();
            let ts = Instant::now();
            loss_sum += t.step(&batch, a, schedule(step, a.warmup_steps, total))?;
            loss_n += 1;
            let secs = ts.elapsed().as_secs_f64();
            state.train_seconds += secs;
            state.pairs_per_second = batch.len() as f64 / secs;
        }
        state.steps_done = step + 1;
        if state.steps_done % 5 == 0 {
            tracing::info!(step = state.steps_done, of = total, loss = format!("{:.4}", loss_sum / loss_n.max(1) as f64), pairs_per_s = format!("{:.1}", state.pairs_per_second), "step");
        }
        let last = state.steps_done == end;
        let validate = last || state.steps_done % a.valid_every.max(1) == 0;
        if validate || state.steps_done % a.save_every.max(1) == 0 {
            let valid = if validate { score_valid(&t.ranker.model, &features(&t.ranker)?) } else { None };
            if validate {
                state.history.push(log_entry(state.steps_done, loss_sum / loss_n.max(1) as f64, valid, since.elapsed().as_secs_f64()));
                (loss_sum, loss_n, since) = (0.0, 0, Instant::now());
            }
            t.save(&a.out, state.steps_done)?;
            save_settings_and_state(&settings, &a.out, &state, &what(&state))?;
        }
    }
    state.epochs_done = state.steps_done / per_epoch;
    Ok(state)
}

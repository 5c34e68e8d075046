//! Ranking evaluation: R@1/5/10 and MRR over examples with a fixed candidate list each.
//!
//! Inputs: JSONL `{"context": [turns], "candidates": [...], "label": index}`, or ParlAI's
//! ConvAI2 text format (`N text<TAB>label<TAB><TAB>cand1|cand2|...`, episodes restart at
//! N = 1, `your persona:` lines folded into the context). The frozen encoders run once per
//! distinct text (`Features`); the head then scores — so training re-scores cheaply each epoch.

use crate::model::PolyEncoder;
use crate::infer::ranker::Ranker;
use crate::text::{to_batch, TextKind};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Example {
    pub context: Vec<String>,
    pub candidates: Vec<String>,
    pub label: usize,
}

pub fn load_examples(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let examples = if jsonl { parse_jsonl(&text, path)? } else { parse_convai2(&text, path)? };
    for (i, e) in examples.iter().enumerate() {
        if e.label >= e.candidates.len() {
            bail!("{}: example {}: label {} but {} candidates", path.display(), i + 1, e.label, e.candidates.len());
        }
    }
    if examples.is_empty() {
        bail!("{}: no examples", path.display());
    }
    Ok(examples)
}

fn parse_jsonl(text: &str, path: &Path) -> Result<Vec<Example>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| serde_json::from_str(l).with_context(|| format!("{}:{}: expected {{context, candidates, label}}", path.display(), n + 1)))
        .collect()
}

/// ConvAI2: within an episode each line adds the partner's text and the reply (label) to the
/// history; persona lines (no tab) come first.
pub(crate) fn parse_convai2(text: &str, path: &Path) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    let mut persona: Vec<String> = Vec::new();
    let mut history: Vec<String> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let (num, rest) = line.split_once(' ').with_context(|| format!("{}: expected `N text`", at()))?;
        let num: usize = num.parse().with_context(|| format!("{}: line number `{num}`", at()))?;
        if num == 1 {
            persona.clear();
            history.clear();
        }
        let fields: Vec<&str> = rest.split('\t').collect();
        if fields.len() == 1 {
            if let Some(p) = rest.strip_prefix("your persona:") {
                persona.push(format!("your persona: {}", p.trim()));
                continue;
            }
            bail!("{}: a line without a label that is not a persona line", at());
        }
        if fields.len() < 4 {
            bail!("{}: expected text<TAB>label<TAB><TAB>candidates", at());
        }
        let (text, label) = (fields[0].to_string(), fields[1].to_string());
        let candidates: Vec<String> = fields[3].split('|').map(str::to_string).collect();
        let label_idx = candidates
            .iter()
            .position(|c| *c == label)
            .with_context(|| format!("{}: the label is not among the candidates", at()))?;
        history.push(text);
        let mut context = persona.clone();
        context.extend(history.iter().cloned());
        out.push(Example { context, candidates, label: label_idx });
        history.push(label);
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RankMetrics {
    pub examples: usize,
    pub r_at_1: f64,
    pub r_at_5: f64,
    pub r_at_10: f64,
    pub mrr: f64,
    /// Standard errors over examples: √(p(1−p)/n) for R@1, s/√n for MRR.
    #[serde(default)]
    pub r_at_1_se: f64,
    #[serde(default)]
    pub mrr_se: f64,
}

/// From 1-based ranks of the true candidate.
pub fn rank_metrics(ranks: &[usize]) -> RankMetrics {
    let n = ranks.len().max(1) as f64;
    let within = |k: usize| ranks.iter().filter(|&&r| r <= k).count() as f64 / n;
    let r1 = within(1);
    let mrr = ranks.iter().map(|&r| 1.0 / r as f64).sum::<f64>() / n;
    let mrr_var = ranks.iter().map(|&r| (1.0 / r as f64 - mrr).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    RankMetrics {
        examples: ranks.len(),
        r_at_1: r1,
        r_at_5: within(5),
        r_at_10: within(10),
        mrr,
        r_at_1_se: (r1 * (1.0 - r1) / n).sqrt(),
        mrr_se: (mrr_var / n).sqrt(),
    }
}

/// 1 + the number of candidates scoring strictly higher than the label (ties count for it).
pub fn rank_of(scores: &[f32], label: usize) -> usize {
    1 + scores.iter().filter(|&&s| s > scores[label]).count()
}

/// Frozen-encoder outputs for a set of examples.
pub struct Features {
    /// Per example: the context's token outputs `[n, d]`.
    pub contexts: Vec<Tensor>,
    /// `[distinct candidates, d]`
    pub candidates: Tensor,
    /// Per example: rows of `candidates`, in the example's order.
    pub rows: Vec<Tensor>,
    pub labels: Vec<usize>,
}

impl Features {
    pub(crate) fn compute(ranker: &Ranker, examples: &[Example], batch: usize, progress: bool) -> Result<Features> {
        let _g = tch::no_grad_guard();
        let mut index: HashMap<&str, i64> = HashMap::new();
        let mut distinct: Vec<String> = Vec::new();
        let rows: Vec<Tensor> = examples
            .iter()
            .map(|e| {
                let r: Vec<i64> = e
                    .candidates
                    .iter()
                    .map(|c| {
                        *index.entry(c.as_str()).or_insert_with(|| {
                            distinct.push(c.clone());
                            distinct.len() as i64 - 1
                        })
                    })
                    .collect();
                Tensor::from_slice(&r)
            })
            .collect();
        let bar = progress_bar(progress, (examples.len() + distinct.len()) as u64, "encoding");
        let mut cand_parts = Vec::new();
        for chunk in distinct.chunks(batch * 8) {
            let enc = ranker.tokenize(chunk, TextKind::Candidate).map_err(anyhow::Error::msg)?;
            cand_parts.push(ranker.candidate_vectors(&enc, batch));
            bar.inc(chunk.len() as u64);
        }
        let joined: Vec<String> = examples.iter().map(|e| ranker.text.join_turns(&e.context)).collect();
        let contexts = context_tokens(&ranker.model, ranker, &joined, batch, &bar)?;
        bar.finish_and_clear();
        Ok(Features { contexts, candidates: Tensor::cat(&cand_parts, 0), rows, labels: examples.iter().map(|e| e.label).collect() })
    }

    /// Ranks of every example's label under the model's current head.
    pub(crate) fn ranks(&self, model: &PolyEncoder, batch: usize) -> Vec<usize> {
        let _g = tch::no_grad_guard();
        let mut ranks = Vec::with_capacity(self.labels.len());
        for start in (0..self.contexts.len()).step_by(batch.max(1)) {
            let end = (start + batch).min(self.contexts.len());
            let codes = model.codes_from_tokens(&self.contexts[start..end]);
            for i in start..end {
                let cands = self.candidates.index_select(0, &self.rows[i]);
                let s = model.score(&codes.select((i - start) as i64), &cands).squeeze_dim(0);
                let s: Vec<f32> = Vec::try_from(s.to_kind(Kind::Float)).expect("scores");
                ranks.push(rank_of(&s, self.labels[i]));
            }
        }
        ranks
    }
}

/// Token outputs of the context encoder, one `[n_i, d]` tensor per text (padding removed).
/// Texts are batched in length order so little compute goes to padding.
pub(crate) fn context_tokens(model: &PolyEncoder, ranker: &Ranker, texts: &[String], batch: usize, bar: &indicatif::ProgressBar) -> Result<Vec<Tensor>> {
    let _g = tch::no_grad_guard();
    let enc = ranker.tokenize(texts, TextKind::Context).map_err(anyhow::Error::msg)?;
    let mut order: Vec<usize> = (0..enc.len()).collect();
    order.sort_by_key(|&i| enc[i].get_ids().len());
    let mut out: Vec<Option<Tensor>> = (0..enc.len()).map(|_| None).collect();
    for chunk in order.chunks(batch.max(1)) {
        let refs: Vec<_> = chunk.iter().map(|&i| &enc[i]).collect();
        let h = model.context_tokens(&to_batch(&refs, model.device));
        for (row, &i) in chunk.iter().enumerate() {
            out[i] = Some(h.get(row as i64).narrow(0, 0, enc[i].get_ids().len() as i64).copy());
        }
        bar.inc(chunk.len() as u64);
    }
    Ok(out.into_iter().map(|t| t.expect("every text encoded")).collect())
}

pub(crate) fn progress_bar(show: bool, len: u64, msg: &'static str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_message(msg);
    bar
}

/// One model on a set of examples, in one call.
pub fn evaluate(ranker: &Ranker, examples: &[Example], batch: usize, progress: bool) -> Result<RankMetrics> {
    let f = Features::compute(ranker, examples, batch, progress)?;
    Ok(rank_metrics(&f.ranks(&ranker.model, batch)))
}

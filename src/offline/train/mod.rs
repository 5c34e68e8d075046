//! `polyrank train`: learns a Poly-encoder (or bi-encoder) on (context, response) pairs with
//! cross-entropy over in-batch negatives, as in the paper. Two paths:
//! - `--train-layers 0` (head only, `head.rs`): the encoder stays frozen, its outputs are
//!   computed once and cached, and each step costs only the head.
//! - `--train-layers N|all` (`finetune.rs`): the top N transformer layers (and optionally the
//!   embeddings) are fine-tuned with the head, with gradient caching for large batches.
//! Both are seeded and resumable, and every checkpoint is a complete model directory that
//! `serve` and `eval` load unchanged.

mod adamw;
pub mod finetune;
mod head;

use crate::offline::eval::{rank_metrics, Example, Features, RankMetrics};
use crate::model::format::*;
use crate::model::PolyEncoder;
use crate::infer::ranker::Ranker;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pair {
    pub context: Vec<String>,
    pub response: String,
}

/// What the encoder's dense layers multiply in during fine-tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    Fp32,
    Bf16,
}

impl Precision {
    pub fn matmul_kind(self) -> Option<tch::Kind> {
        match self {
            Precision::Fp32 => None,
            Precision::Bf16 => Some(tch::Kind::BFloat16),
        }
    }
}

/// Which transformer layers train: none (head only), the top N, or all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainLayers {
    Top(usize),
    All,
}

impl std::str::FromStr for TrainLayers {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(TrainLayers::All),
            n => n.parse().map(TrainLayers::Top).map_err(|_| format!("`{n}`: expected a number of layers or `all`")),
        }
    }
}

impl TrainLayers {
    /// How many of `total` layers train.
    pub fn count(self, total: usize) -> usize {
        match self {
            TrainLayers::All => total,
            TrainLayers::Top(n) => n.min(total),
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Model directory to start from (its encoder, tokenizer and settings).
    #[arg(long, default_value = "models/default")]
    pub base: PathBuf,
    /// Training pairs, JSONL {"context": [turns], "response": text}.
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out examples (eval format); repeat for several sets. Scored at every checkpoint;
    /// the log shows each set and all of them together.
    #[arg(long)]
    pub valid: Vec<PathBuf>,
    /// Output model directory (a complete model directory after every checkpoint).
    #[arg(long)]
    pub out: PathBuf,
    /// m for a fresh head; omitted: continue from the base model's head.
    #[arg(long)]
    pub n_codes: Option<i64>,
    /// A fresh head's codes ~ N(0, std²) instead of ParlAI's uniform [0, 1). Small codes
    /// attend almost uniformly, so training starts at mean pooling (the bi-encoder).
    #[arg(long)]
    pub init_std: Option<f64>,
    /// Transformer layers to fine-tune from the top: 0 (head only, frozen encoder), N, or `all`.
    #[arg(long, default_value = "0")]
    pub train_layers: TrainLayers,
    /// Fine-tuning from a model with one shared encoder: give the candidates an encoder of
    /// their own (a copy of the base's, `share_encoders: false`), as the paper's recipes do.
    /// One shared encoder scores a text highest against itself, so an echo of the context
    /// outranks any reply; two encoders can learn the asymmetry.
    #[arg(long)]
    pub separate_encoders: bool,
    /// Fine-tune the embeddings too (with --train-layers all).
    #[arg(long)]
    pub train_embeddings: bool,
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    /// Stop after this many optimizer steps in all (overrides --epochs; the learning-rate
    /// schedule is laid out over it).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Pairs per step; every other response in the batch is a negative.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Fine-tuning: the batch is encoded in length-sorted chunks of this many texts.
    #[arg(long, default_value_t = 64)]
    pub chunk_size: usize,
    /// Fine-tuning: gradient caching (encode the batch without a graph, take the loss
    /// gradient w.r.t. the vectors, re-encode chunk by chunk with one). Memory then grows with
    /// the chunk, not the batch, for one extra forward pass. `false` keeps the whole batch's
    /// graph: faster where memory allows.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub grad_cache: bool,
    /// Fine-tuning: `bf16` multiplies the encoder's dense layers in bfloat16 (weights,
    /// gradients and the optimizer stay fp32; see `model::mixed`): about 1.6× the steps per
    /// second on CPUs with AVX512-BF16 (without it, bf16 is emulated and may be slower: measure
    /// with scripts/train_throughput.sh). Validation passes and the
    /// saved model are fp32 either way.
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    /// Learning rate of the head.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Learning rate of the encoder layers being fine-tuned.
    #[arg(long, default_value_t = 5e-5)]
    pub lr_encoder: f64,
    /// Fine-tuning: linear warm-up over this many steps, then linear decay to 0.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Fine-tuning: clip the global gradient norm to this (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub clip_norm: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Multiplies the scores inside the training loss only (a softmax temperature). The
    /// default model's candidate vectors are unit length, so raw scores differ by little and
    /// an unscaled cross-entropy mostly rewards inflating every score rather than ranking.
    #[arg(long, default_value_t = 1.0)]
    pub logit_scale: f64,
    /// Fine-tuning: each pair's last context turn is one more negative for every context of
    /// the batch (an echo of the context is not a reply to it).
    #[arg(long)]
    pub context_negatives: bool,
    /// Extra random negatives per batch, drawn from the other responses (head only).
    #[arg(long, default_value_t = 0)]
    pub extra_negatives: usize,
    /// Fine-tuning: truncate training contexts / candidates to this many tokens (the model's
    /// own limits by default). Shorter is faster; serving keeps the model's limits.
    #[arg(long)]
    pub max_context_tokens: Option<usize>,
    #[arg(long)]
    pub max_candidate_tokens: Option<usize>,
    /// Fine-tuning: write a checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 20)]
    pub save_every: usize,
    /// Fine-tuning: score the valid sets every N steps (and at the end).
    #[arg(long, default_value_t = 50)]
    pub valid_every: usize,
    /// Fine-tuning: end this invocation after N more steps (checkpointed); `--resume` goes on.
    #[arg(long)]
    pub stop_after: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Continue from the checkpoint in --out (weights, head, optimizer state and step).
    #[arg(long)]
    pub resume: bool,
    /// Use at most this many pairs.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Head only: keep the frozen encoder outputs in this file and reuse them when the data,
    /// limit, encoder content, tokenizer and settings match.
    #[arg(long)]
    pub features_cache: Option<PathBuf>,
    /// libtorch threads (fixed, so runs are repeatable).
    #[arg(long, default_value_t = 2)]
    pub threads: i32,
}

impl TrainArgs {
    /// Parses `polyrank train`'s flags (without the program and subcommand names): the
    /// defaults are the CLI's, wherever these arguments come from.
    pub fn from_flags<S: AsRef<str>>(flags: &[S]) -> Result<Self> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: TrainArgs,
        }
        let argv = std::iter::once("train").chain(flags.iter().map(|s| s.as_ref()));
        Ok(<Cli as clap::Parser>::try_parse_from(argv)?.args)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLog {
    /// Head only: the epoch; fine-tuning: the optimizer step of this entry.
    pub epoch: usize,
    /// Mean training loss since the previous entry.
    pub loss: f64,
    /// All valid sets together.
    pub valid: Option<RankMetrics>,
    /// Each valid set, in --valid order.
    #[serde(default)]
    pub valid_sets: Vec<RankMetrics>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainState {
    pub epochs_done: usize,
    /// Fine-tuning: optimizer steps done.
    #[serde(default)]
    pub steps_done: usize,
    pub seed: i64,
    pub history: Vec<EpochLog>,
    /// Held-out metrics before the first step.
    pub initial_valid: Option<RankMetrics>,
    pub precompute_seconds: f64,
    /// Fine-tuning: training seconds so far (over all invocations) and pairs per second.
    #[serde(default)]
    pub train_seconds: f64,
    #[serde(default)]
    pub pairs_per_second: f64,
    /// Fine-tuning: the settings that decide batches and updates; `--resume` must match.
    #[serde(default)]
    pub recipe: String,
}

const STATE_FILE: &str = "train_state.json";

pub(crate) fn load_pairs(path: &Path) -> Result<Vec<Pair>> {
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

pub fn train(a: TrainArgs) -> Result<TrainState> {
    tch::set_num_threads(a.threads);
    tch::manual_seed(a.seed);
    if a.batch_size < 2 {
        bail!("--batch-size must be at least 2 (in-batch negatives)");
    }
    match a.train_layers {
        TrainLayers::Top(0) => head::train(&a),
        _ => finetune::train(&a),
    }
}

/// Lays out `out` as a model directory from the base. Encoder files are linked when they
/// stay frozen and copied when they will be rewritten; the settings and head are written
/// fresh (a new head) or copied.
fn prepare_out(a: &TrainArgs, copy_encoder: bool) -> Result<PolySettings> {
    std::fs::create_dir_all(&a.out)?;
    if a.resume {
        return Ok(PolySettings::load(&a.out)?);
    }
    let base_settings = PolySettings::load(&a.base)?;
    let mut dirs = vec![PathBuf::new()];
    if !base_settings.share_encoders {
        dirs.push(PathBuf::from(CANDIDATE_ENCODER_DIR));
    }
    for sub in dirs {
        let (from, to) = (a.base.join(&sub), a.out.join(&sub));
        std::fs::create_dir_all(&to)?;
        use crate::text::parlai::{CODECS_FILE, DICT_FILE, MERGES_FILE, SETTINGS_FILE as PARLAI_TOKENIZER, VOCAB_FILE};
        // The candidate MLP is copied as it is: training reads it but does not update it.
        for name in [CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_DELTA_FILE, TOKENIZER_FILE, PARLAI_TOKENIZER, DICT_FILE, CODECS_FILE, VOCAB_FILE, MERGES_FILE, CANDIDATE_MLP_FILE] {
            let (src, dst) = (from.join(name), to.join(name));
            if dst.symlink_metadata().is_ok() {
                std::fs::remove_file(&dst)?;
            }
            if !src.exists() {
                continue; // a candidate encoder may use the context encoder's tokenizer
            }
            match (copy_encoder, name) {
                (false, _) => {
                    std::os::unix::fs::symlink(src.canonicalize()?, &dst).with_context(|| format!("linking {}", dst.display()))?
                }
                // Checkpoints are written whole: a base's delta is added into the weights file.
                (true, WEIGHTS_FILE) => {
                    let config = crate::model::encoder::EncoderConfig::load(&from)?;
                    crate::model::weights::materialize(&from, &dst, &|n| config.var_name(n)).with_context(|| format!("writing {}", dst.display()))?
                }
                (true, WEIGHTS_DELTA_FILE) => {}
                (true, _) => {
                    std::fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
                }
            }
        }
    }
    let mut s = base_settings;
    if a.separate_encoders && s.share_encoders {
        anyhow::ensure!(copy_encoder, "--separate-encoders needs --train-layers (a fine-tuned encoder)");
        let cand = a.out.join(CANDIDATE_ENCODER_DIR);
        std::fs::create_dir_all(&cand)?;
        for name in [CONFIG_FILE, WEIGHTS_FILE] {
            std::fs::copy(a.out.join(name), cand.join(name)).with_context(|| format!("copying {name} into {}", cand.display()))?;
        }
        s.share_encoders = false;
    }
    match a.n_codes {
        Some(m) => {
            s.mode = Mode::Poly;
            s.n_codes = m;
            crate::model::init::init_head(&a.out, &s, a.seed)?;
        }
        None => {
            s.save(&a.out)?;
            let head = a.base.join(HEAD_FILE);
            if head.exists() {
                std::fs::copy(head, a.out.join(HEAD_FILE))?;
            }
        }
    }
    Ok(s)
}

fn load_state(a: &TrainArgs) -> Result<TrainState> {
    if a.resume {
        let text = std::fs::read_to_string(a.out.join(STATE_FILE)).context("--resume needs a train_state.json in --out")?;
        Ok(serde_json::from_str(&text)?)
    } else {
        Ok(TrainState { seed: a.seed, ..Default::default() })
    }
}

/// Re-initialises a fresh head's codes ~ N(0, std²) (see `--init-std`).
fn apply_init_std(a: &TrainArgs, ranker: &mut Ranker) {
    if let (Some(std), Some(codes), false) = (a.init_std, ranker.model.head.codes.as_mut(), a.resume) {
        tch::no_grad(|| codes.copy_(&(tch::Tensor::randn_like(codes) * std)));
    }
}

/// The valid sets, loaded once.
fn load_valid(a: &TrainArgs) -> Result<Vec<Vec<Example>>> {
    a.valid.iter().map(|p| crate::offline::eval::load_examples(p)).collect()
}

/// R@k and MRR of every set and of all of them together.
fn score_valid(model: &PolyEncoder, features: &[Features]) -> Option<(RankMetrics, Vec<RankMetrics>)> {
    if features.is_empty() {
        return None;
    }
    let ranks: Vec<Vec<usize>> = features.iter().map(|f| f.ranks(model, 64)).collect();
    let all: Vec<usize> = ranks.iter().flatten().copied().collect();
    Some((rank_metrics(&all), ranks.iter().map(|r| rank_metrics(r)).collect()))
}

fn log_entry(epoch: usize, loss: f64, valid: Option<(RankMetrics, Vec<RankMetrics>)>, seconds: f64) -> EpochLog {
    let (valid, valid_sets) = match valid {
        Some((m, sets)) => (Some(m), sets),
        None => (None, Vec::new()),
    };
    let sets: Vec<String> = valid_sets.iter().map(|m| format!("{:.4}", m.r_at_1)).collect();
    tracing::info!(
        step_or_epoch = epoch,
        loss = format!("{loss:.4}"),
        valid_r1 = valid.map(|m| format!("{:.4}", m.r_at_1)).unwrap_or_default(),
        valid_sets_r1 = sets.join(" "),
        secs = format!("{seconds:.1}"),
        "checkpoint"
    );
    EpochLog { epoch, loss, valid, valid_sets, seconds }
}

/// Writes a file through a temp name and a rename, so a crash leaves the old file or the new.
fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    write(&tmp)?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// Settings (marked trained, with a description) and train_state.json, in that order: resume
/// trusts only the state file, written last.
fn save_settings_and_state(settings: &PolySettings, out: &Path, state: &TrainState, what: &str) -> Result<()> {
    let mut s = settings.clone();
    s.trained = true;
    let last = state.history.iter().rev().find_map(|l| l.valid);
    s.description = format!(
        "{what}, seed {}{}",
        state.seed,
        last.map(|m| format!(", held-out R@1/20 {:.3}", m.r_at_1)).unwrap_or_default()
    );
    s.save(out)?;
    write_atomically(&out.join(STATE_FILE), |p| Ok(std::fs::write(p, serde_json::to_string_pretty(state)?)?))
}

//! Small command-line jobs (the server has its own module).

use crate::model::format::*;
use crate::infer::ranker::Ranker;
use crate::text::TextKind;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

const DEMO_CANDIDATES: &[&str] = &[
    "I love pizza, especially with mushrooms.",
    "My favourite food is sushi.",
    "The train leaves at seven tomorrow morning.",
    "I have two cats and a dog.",
    "It has been raining all week here.",
    "I play the guitar in a small band.",
    "Paris is beautiful in the spring.",
    "I am reading a book about the history of Rome.",
];

#[derive(Args)]
pub struct RankArgs {
    /// Context turns, oldest first.
    #[arg(required = true)]
    pub context: Vec<String>,
    #[arg(long, default_value = "models/default")]
    pub model: PathBuf,
    #[arg(long, default_value_t = 5)]
    pub top_k: i64,
}

pub fn rank(a: RankArgs) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let ranker = Ranker::load(&a.model, tch::Device::Cpu)?;
    let texts: Vec<String> = DEMO_CANDIDATES.iter().map(|s| s.to_string()).collect();
    let enc = ranker.tokenize(&texts, TextKind::Candidate).map_err(anyhow::Error::msg)?;
    let cands = ranker.candidate_vectors(&enc, 32);
    for (i, score) in ranker.rank(&a.context, &cands, a.top_k).map_err(anyhow::Error::msg)? {
        println!("{score:>9.4}  {}", texts[i as usize]);
    }
    Ok(())
}

#[derive(Args)]
pub struct InitHeadArgs {
    /// Directory holding config.json, model.safetensors and tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 64)]
    pub n_codes: i64,
    #[arg(long, value_parser = ["poly", "bi"], default_value = "poly")]
    pub mode: String,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    #[arg(long, default_value = "")]
    pub description: String,
}

pub fn init_head(a: InitHeadArgs) -> Result<()> {
    let mut s = PolySettings::default_poly(a.n_codes);
    if a.mode == "bi" {
        s.mode = Mode::Bi;
    }
    s.description = a.description;
    crate::model::init::init_head(&a.model, &s, a.seed)?;
    eprintln!("wrote {} and {}", a.model.join(SETTINGS_FILE).display(), a.model.join(HEAD_FILE).display());
    Ok(())
}

#[derive(Args)]
pub struct EvalArgs {
    /// Model directories; repeat to compare several. Models that share an encoder (same
    /// weights and tokenizer content and encoder-side settings) share one encoding pass.
    #[arg(long, default_value = "models/default", num_args = 1..)]
    pub model: Vec<PathBuf>,
    /// JSONL {"context": [turns], "candidates": [...], "label": i}, or ConvAI2 text format.
    #[arg(long)]
    pub data: PathBuf,
    /// Print one JSON object per model instead of a table.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Evaluate only the first N examples.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Precision of the transformer encoders, as `serve`'s `dtype` (the head and scoring stay
    /// in fp32): what a precision does to quality.
    #[arg(long, value_enum, default_value_t = crate::config::Dtype::Float32)]
    pub dtype: crate::config::Dtype,
}

/// What the encoder-side features depend on: the encoder's content and settings.
fn encoder_identity(r: &Ranker) -> Result<String> {
    crate::fingerprint::encoder_fingerprint(&r.model.dir, &r.model.settings, &[])
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let mut examples = crate::offline::eval::load_examples(&a.data)?;
    if let Some(n) = a.limit {
        examples.truncate(n);
    }
    if !a.json {
        println!("| model | examples | R@1 ± se | R@5 | R@10 | MRR ± se |");
        println!("|---|---|---|---|---|---|");
    }
    let mut shared: Option<(String, crate::offline::eval::Features)> = None;
    for dir in &a.model {
        let ranker = Ranker::load_in(dir, tch::Device::Cpu, a.dtype.kind())?;
        let id = encoder_identity(&ranker)?;
        if shared.as_ref().is_none_or(|(k, _)| *k != id) || !ranker.model.settings.share_encoders {
            let f = crate::offline::eval::Features::compute(&ranker, &examples, a.batch_size, !a.json)?;
            shared = Some((id, f));
        }
        let features = &shared.as_ref().expect("features computed").1;
        let m = crate::offline::eval::rank_metrics(&features.ranks(&ranker.model, a.batch_size));
        if a.json {
            println!("{}", serde_json::json!({"model": dir, "metrics": m}));
        } else {
            println!(
                "| {} | {} | {:.4} ± {:.4} | {:.4} | {:.4} | {:.4} ± {:.4} |",
                dir.display(),
                m.examples,
                m.r_at_1,
                m.r_at_1_se,
                m.r_at_5,
                m.r_at_10,
                m.mrr,
                m.mrr_se
            );
        }
    }
    Ok(())
}

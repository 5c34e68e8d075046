//! Tiny random-weight models with a small vocabulary, for fast tests and benchmarks. Behind
//! the `testkit` feature: the tests turn it on (see Cargo.toml's dev-dependencies); the
//! shipped binary does not carry it.

use crate::model::bert::{Activation, Bert, BertConfig};
use crate::model::init::init_head;
use crate::model::format::*;
use crate::model::weights::save_vars;
use anyhow::Result;
use std::path::Path;
use tch::{nn::VarStore, Device, Tensor};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::Tokenizer;

/// Words the tiny tokenizer knows whole; anything else falls back to single letters.
const WORDS: &[&str] = &[
    "the", "a", "is", "what", "your", "favourite", "food", "pizza", "i", "like", "love", "cats",
    "dogs", "weather", "rain", "sun", "today", "hello", "how", "are", "you", "good", "bad",
    "music", "play", "guitar", "read", "books", "travel", "paris",
];

pub fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: tiny_vocab().len() as i64,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        hidden_act: Activation::Gelu,
        max_position_embeddings: 128,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        model_type: Some("bert".into()),
        pad_token_id: None,
        relative_attention_num_buckets: None,
    }
}

fn tiny_vocab() -> Vec<String> {
    let mut v: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"].iter().map(|s| s.to_string()).collect();
    let chars = "abcdefghijklmnopqrstuvwxyz0123456789";
    v.extend(chars.chars().map(|c| c.to_string()));
    v.extend(chars.chars().map(|c| format!("##{c}")));
    v.extend(".,!?'\"-:;()".chars().map(|c| c.to_string()));
    for w in WORDS {
        if !v.iter().any(|t| t == w) {
            v.push(w.to_string());
        }
    }
    v
}

fn write_tiny_tokenizer(dir: &Path) -> Result<()> {
    let vocab = tiny_vocab();
    let id = |t: &str| vocab.iter().position(|v| v == t).unwrap() as u32;
    let (cls, sep) = (id("[CLS]"), id("[SEP]"));
    // vocab.txt is what BERT checkpoints ship beside tokenizer.json; WordPiece reads it.
    let vocab_path = dir.join("vocab.txt");
    std::fs::write(&vocab_path, vocab.join("\n") + "\n")?;
    let model = WordPiece::from_file(&vocab_path.to_string_lossy())
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(BertProcessing::new(("[SEP]".into(), sep), ("[CLS]".into(), cls))));
    tok.save(dir.join(TOKENIZER_FILE), false).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// A complete random-weight model directory (config, weights, tokenizer, head, settings).
/// LayerNorm parameters are randomised too, so a test cannot pass by their identity values.
pub fn write_tiny_model(dir: &Path, settings: &PolySettings, seed: i64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let config = tiny_config();
    tch::manual_seed(seed);
    let write_encoder = |d: &Path| -> Result<()> {
        std::fs::create_dir_all(d)?;
        std::fs::write(d.join(CONFIG_FILE), serde_json::to_string_pretty(&config)?)?;
        let vs = VarStore::new(Device::Cpu);
        let _bert = Bert::new(vs.root(), &config);
        tch::no_grad(|| {
            for (name, mut t) in vs.variables() {
                if name.contains("LayerNorm") {
                    let noise = Tensor::randn_like(&t) * 0.1;
                    t.copy_(&(&t + noise));
                }
            }
        });
        save_vars(&vs, &d.join(WEIGHTS_FILE))?;
        write_tiny_tokenizer(d)
    };
    write_encoder(dir)?;
    if !settings.share_encoders {
        write_encoder(&dir.join(CANDIDATE_ENCODER_DIR))?;
    }
    init_head(dir, settings, seed + 1)
}

/// Settings for tiny test models: short lengths so truncation is exercised.
pub fn tiny_settings(n_codes: i64) -> PolySettings {
    PolySettings {
        max_context_tokens: 48,
        max_candidate_tokens: 32,
        normalize: false,
        description: "tiny random-weight test model".into(),
        ..PolySettings::default_poly(n_codes)
    }
}

//! `polyrank import parlai --model-file F`: a ParlAI `transformer/polyencoder` or
//! `transformer/biencoder` model file (`F`, `F.opt`, `F.dict`, `F.dict.codecs`) turned into a
//! polyrank model directory that `serve`, `eval` and `train` load unchanged:
//!
//! | ParlAI | polyrank directory |
//! |---|---|
//! | `F.opt` encoder options | `config.json`, `candidate_encoder/config.json` (`model_type: parlai_transformer`) |
//! | poly-encoder `encoder_ctxt.*`, `encoder_cand.*` | `model.safetensors`, `candidate_encoder/model.safetensors` (prefix dropped) |
//! | poly-encoder `codes`, `code_attention.*`, `attention.*` | `poly_head.safetensors` (`attention.*` → `candidate_attention.*`) |
//! | bi-encoder `context_encoder.*`, `cand_encoder.*` (separate encoders) | `model.safetensors`, `candidate_encoder/model.safetensors` |
//! | bi-encoder `cand_encoder.mlp.*` (shared encoders: ParlAI's response wrapper) | `candidate_mlp.safetensors` (`mlp.*`) |
//! | poly options, truncation, delimiter | `polyrank.json` (a bi-encoder: `mode: bi`) |
//! | `F.dict`, `F.dict.codecs` (bpe) or `F.dict-vocab.json` + `F.dict-merges.txt` (bytelevelbpe), dictionary options | `parlai.dict`, `parlai.dict.codecs` or `parlai.dict-vocab.json` + `parlai.dict-merges.txt`, `parlai_tokenizer.json` |
//!
//! Every option the conversion cannot honour is refused by name rather than imported into a
//! model that would answer differently from ParlAI.

use crate::model::format::*;
use crate::model::parlai::{FfnActivation, ParlaiConfig, Variant, MODEL_TYPE};
use crate::text::parlai::{ParlaiTextSettings, Split, CODECS_FILE, DICT_FILE, MERGES_FILE, VOCAB_FILE};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

#[derive(Args)]
pub struct ImportArgs {
    #[command(subcommand)]
    pub source: Source,
}

#[derive(Subcommand)]
pub enum Source {
    /// A ParlAI transformer/polyencoder or transformer/biencoder model file (with its .opt,
    /// .dict and .dict.codecs).
    Parlai(ParlaiArgs),
}

#[derive(Args)]
pub struct ParlaiArgs {
    /// The model file ParlAI saved (`--model-file`); F.opt and F.dict must sit beside it.
    #[arg(long)]
    pub model_file: PathBuf,
    /// The polyrank model directory to write (default: F's name + `-polyrank` beside it).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: ImportArgs) -> Result<()> {
    match a.source {
        Source::Parlai(p) => {
            let out = p.out.clone().unwrap_or_else(|| {
                let mut name = p.model_file.file_name().unwrap_or_default().to_os_string();
                name.push("-polyrank");
                p.model_file.with_file_name(name)
            });
            let summary = import_parlai(&p.model_file, &out)?;
            eprintln!("wrote {}: {summary}", out.display());
            Ok(())
        }
    }
}

/// The `.opt` file's values with ParlAI's defaults for the ones it may leave out.
struct Opt(serde_json::Map<String, Value>);

impl Opt {
    fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        match serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))? {
            Value::Object(m) => Ok(Opt(m)),
            _ => bail!("{} is not a JSON object", path.display()),
        }
    }
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    fn str_or(&self, k: &str, d: &str) -> String {
        self.get(k).and_then(Value::as_str).unwrap_or(d).to_string()
    }
    fn int_or(&self, k: &str, d: i64) -> i64 {
        self.get(k).and_then(Value::as_i64).unwrap_or(d)
    }
    fn bool_or(&self, k: &str, d: bool) -> bool {
        self.get(k).and_then(Value::as_bool).unwrap_or(d)
    }
    fn float_or(&self, k: &str, d: f64) -> f64 {
        self.get(k).and_then(Value::as_f64).unwrap_or(d)
    }
    fn need_int(&self, k: &str) -> Result<i64> {
        self.get(k).and_then(Value::as_i64).ok_or_else(|| anyhow!("option `{k}` is missing from the .opt file"))
    }
    /// ParlAI's `text_truncate or truncate` (0 and unset fall through), negative = none.
    fn truncate(&self, k: &str) -> Option<usize> {
        let v = self.get(k).and_then(Value::as_i64).filter(|&v| v != 0).unwrap_or_else(|| self.int_or("truncate", -1));
        (v >= 0).then_some(v as usize)
    }
}

fn unsupported(option: &str, value: impl std::fmt::Display, supported: &str) -> anyhow::Error {
    anyhow!("option `{option}` = `{value}` is not supported by polyrank (supported: {supported})")
}

fn attention(opt: &Opt, kind_key: &str, heads_key: &str) -> Result<AttentionSpec> {
    let kind = match opt.str_or(kind_key, "basic").as_str() {
        "basic" => AttentionKind::Basic,
        "sqrt" => AttentionKind::Sqrt,
        "multihead" => AttentionKind::Multihead,
        other => return Err(unsupported(kind_key, other, "basic, sqrt, multihead")),
    };
    Ok(AttentionSpec { kind, heads: opt.int_or(heads_key, 4) })
}

const POLY: &str = "transformer/polyencoder";
const BI: &str = "transformer/biencoder";

/// Options that change tokens or history in ways polyrank does not reproduce.
fn refuse_unsupported(opt: &Opt) -> Result<()> {
    let model = opt.str_or("model", "");
    if model != POLY && model != BI {
        return Err(unsupported("model", &model, "transformer/polyencoder, transformer/biencoder"));
    }
    if model == BI {
        // Fixed candidates are scored without memories.
        if opt.bool_or("use_memories", false) {
            return Err(unsupported("use_memories", true, "false"));
        }
        // ParlAI normalizes both sides in training but only the context when it scores
        // fixed candidates it encoded beforehand: no one answer to reproduce.
        if opt.bool_or("normalize_sent_emb", false) {
            return Err(unsupported("normalize_sent_emb", true, "false"));
        }
    }
    for (key, default) in [("person_tokens", false), ("history_reversed", false), ("split_lines", false)] {
        if opt.bool_or(key, default) {
            return Err(unsupported(key, true, "false"));
        }
    }
    if opt.get("history_add_global_end_token").is_some_and(|v| v.as_str() != Some("None")) {
        return Err(unsupported("history_add_global_end_token", opt.get("history_add_global_end_token").unwrap(), "None"));
    }
    if opt.int_or("dict_max_ngram_size", -1) > 1 {
        return Err(unsupported("dict_max_ngram_size", opt.int_or("dict_max_ngram_size", -1), "-1"));
    }
    Ok(())
}

fn encoder_config(opt: &Opt, vocab_size: i64, padding_idx: i64) -> Result<ParlaiConfig> {
    let variant = match opt.str_or("variant", "aiayn").as_str() {
        "aiayn" => Variant::Aiayn,
        "xlm" => Variant::Xlm,
        "prelayernorm" => Variant::Prelayernorm,
        other => return Err(unsupported("variant", other, "aiayn, xlm, prelayernorm")),
    };
    let activation = match opt.str_or("activation", "relu").as_str() {
        "relu" => FfnActivation::Relu,
        "gelu" => FfnActivation::Gelu,
        other => return Err(unsupported("activation", other, "relu, gelu")),
    };
    let n_layers = match opt.int_or("n_encoder_layers", -1) {
        n if n > 0 => n,
        _ => opt.need_int("n_layers")?,
    };
    // get_n_positions_from_options
    let n_positions = match opt.int_or("n_positions", 0) {
        n if n > 0 => n,
        _ => [opt.int_or("truncate", 0), opt.int_or("text_truncate", 0), opt.int_or("label_truncate", 0)]
            .into_iter()
            .max()
            .filter(|&n| n > 0)
            .unwrap_or(1024),
    };
    Ok(ParlaiConfig {
        model_type: MODEL_TYPE.into(),
        vocab_size,
        embedding_size: opt.need_int("embedding_size")?,
        n_layers,
        n_heads: opt.need_int("n_heads")?,
        ffn_size: opt.need_int("ffn_size")?,
        n_positions,
        n_segments: opt.int_or("n_segments", 0),
        variant,
        activation,
        embeddings_scale: opt.bool_or("embeddings_scale", false),
        padding_idx,
    })
}

fn text_settings(opt: &Opt, n_positions: usize) -> Result<ParlaiTextSettings> {
    let tokenizer = match opt.str_or("dict_tokenizer", "re").as_str() {
        "bpe" => Split::Bpe,
        "re" => Split::Re,
        "bytelevelbpe" => Split::ByteLevelBpe,
        other => return Err(unsupported("dict_tokenizer", other, "bpe, bytelevelbpe, re")),
    };
    // Where ParlAI would not truncate, the encoder's positions still end: cut there.
    let text_truncate = opt.truncate("text_truncate").unwrap_or(n_positions.saturating_sub(2)).min(n_positions.saturating_sub(2));
    let label_truncate = opt.truncate("label_truncate").unwrap_or(n_positions).min(n_positions);
    Ok(ParlaiTextSettings {
        tokenizer,
        lower: opt.bool_or("dict_lower", false),
        null_token: opt.str_or("dict_nulltoken", "__null__"),
        start_token: opt.str_or("dict_starttoken", "__start__"),
        end_token: opt.str_or("dict_endtoken", "__end__"),
        unk_token: opt.str_or("dict_unktoken", "__unk__"),
        text_truncate: Some(text_truncate),
        label_truncate: Some(label_truncate),
        // ParlAI reads a missing or null option as true.
        bpe_add_prefix_space: opt.get("bpe_add_prefix_space").and_then(Value::as_bool).unwrap_or(true),
        history_size: Some(opt.int_or("history_size", -1)).filter(|&n| n > 0).map(|n| n as usize),
    })
}

fn poly_settings(opt: &Opt, text: &ParlaiTextSettings, model_file: &Path, config: &ParlaiConfig) -> Result<PolySettings> {
    let poly_type = match opt.str_or("polyencoder_type", "codes").as_str() {
        "codes" => PolyType::Codes,
        "n_first" => PolyType::NFirst,
        other => return Err(unsupported("polyencoder_type", other, "codes, n_first")),
    };
    let candidate_pooling = match opt.str_or("reduction_type", "mean").as_str() {
        "mean" => Pooling::Mean,
        "first" => Pooling::First,
        "max" => Pooling::Max,
        other => return Err(unsupported("reduction_type", other, "mean, first, max")),
    };
    let bi = opt.str_or("model", "") == BI;
    let s = PolySettings {
        mode: if bi { Mode::Bi } else { Mode::Poly },
        n_codes: if bi { 1 } else { opt.int_or("poly_n_codes", 64) },
        poly_type,
        codes_attention: attention(opt, "codes_attention_type", "codes_attention_num_heads")?,
        candidate_attention: attention(opt, "poly_attention_type", "poly_attention_num_heads")?,
        candidate_pooling,
        // The bi-encoder reduces both sides alike; the poly-encoder's context is its codes.
        context_pooling: if bi { candidate_pooling } else { Pooling::Mean },
        // PolyEncoderModule always builds two encoders (`--share-encoders` is the bi-encoder's).
        share_encoders: bi && opt.bool_or("share_encoders", true),
        max_context_tokens: text.text_truncate.unwrap_or(0) + 2,
        max_candidate_tokens: text.label_truncate.unwrap_or(0),
        turn_delimiter: opt.str_or("delimiter", "\n"),
        output_scaling: opt.float_or("output_scaling", 1.0),
        normalize: false,
        trained: true,
        description: format!(
            "imported from the ParlAI model file {} ({}, variant {:?}, {} layers, d={}{})",
            model_file.display(),
            opt.str_or("model", ""),
            config.variant,
            config.n_layers,
            config.embedding_size,
            if bi { String::new() } else { format!(", m={}", opt.int_or("poly_n_codes", 64)) }
        ),
    };
    s.validate(Path::new("polyrank.json")).map_err(|e| anyhow!("{e}"))?;
    Ok(s)
}

/// The model's state dict, every tensor in fp32, by its ParlAI name.
fn read_state_dict(model_file: &Path) -> Result<BTreeMap<String, Tensor>> {
    let reader = pytorch_reader::PytorchReader::with_top_level_key(model_file, "model")
        .map_err(|e| anyhow!("{}: not a ParlAI model file with a `model` state dict: {e:?}", model_file.display()))?;
    let mut out = BTreeMap::new();
    for (name, t) in reader.tensors() {
        use pytorch_reader::DType;
        let kind = match t.dtype() {
            DType::F32 => Kind::Float,
            DType::F16 => Kind::Half,
            DType::BF16 => Kind::BFloat16,
            DType::F64 => Kind::Double,
            other => bail!("{}: tensor `{name}` has dtype {other:?}; weights must be floating point", model_file.display()),
        };
        let bytes = t.read().with_context(|| format!("reading tensor `{name}`"))?;
        let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
        out.insert(name.clone(), Tensor::f_from_data_size(&bytes, &shape, kind)?.to_kind(Kind::Float));
    }
    Ok(out)
}

/// The tensors under `prefix`, renamed by `rename` (None drops one).
fn take(state: &BTreeMap<String, Tensor>, prefix: &str) -> Vec<(String, Tensor)> {
    state
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|rest| (rest.to_string(), v.shallow_clone())))
        .collect()
}

fn sibling(model_file: &Path, suffix: &str) -> PathBuf {
    let mut s = model_file.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Writes the polyrank directory `out`; returns a one-line summary.
pub fn import_parlai(model_file: &Path, out: &Path) -> Result<String> {
    let opt = Opt::load(&sibling(model_file, ".opt"))?;
    refuse_unsupported(&opt)?;
    let dict = [sibling(model_file, ".dict"), opt.get("dict_file").and_then(Value::as_str).map(PathBuf::from).unwrap_or_default()]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("{}: the dictionary file is missing", sibling(model_file, ".dict").display()))?;
    let state = read_state_dict(model_file)?;
    let bi = opt.str_or("model", "") == BI;
    let shared = bi && opt.bool_or("share_encoders", true);
    // Where each side's transformer sits in the state dict.
    let (context_prefix, candidate_prefix) = if bi { ("context_encoder.", "cand_encoder.") } else { ("encoder_ctxt.", "encoder_cand.") };
    let key = format!("{context_prefix}embeddings.weight");
    let embeddings = state
        .get(&key)
        .ok_or_else(|| anyhow!("{}: no `{key}`: not a {} state dict", model_file.display(), opt.str_or("model", "")))?;
    let vocab_size = embeddings.size()[0];

    std::fs::create_dir_all(out)?;
    std::fs::copy(&dict, out.join(DICT_FILE)).with_context(|| format!("copying {}", dict.display()))?;
    // The padding id is the null token's, which the dictionary puts first when it has one.
    let config = encoder_config(&opt, vocab_size, 0)?;
    let text = text_settings(&opt, config.n_positions as usize)?;
    let copies: &[(&str, &str)] = match text.tokenizer {
        Split::Bpe => &[(".codecs", CODECS_FILE)],
        // HuggingFaceBpeHelper's files, saved beside the dictionary.
        Split::ByteLevelBpe => &[("-vocab.json", VOCAB_FILE), ("-merges.txt", MERGES_FILE)],
        Split::Re => &[],
    };
    for (suffix, name) in copies {
        let src = sibling(&dict, suffix);
        std::fs::copy(&src, out.join(name)).with_context(|| format!("copying {}", src.display()))?;
    }
    text.save(out)?;
    // The padding id from the dictionary as polyrank reads it.
    let tokenizer = crate::text::parlai::ParlaiText::load(out).map_err(|e| anyhow!("{e}"))?;
    let config = ParlaiConfig { padding_idx: tokenizer.id_of(&text.null_token).unwrap_or(0) as i64, ..config };
    if tokenizer.len() as i64 > vocab_size {
        bail!("{}: the dictionary has {} tokens but the embeddings only {vocab_size} rows", dict.display(), tokenizer.len());
    }

    let mut sides = vec![(context_prefix, out.to_path_buf())];
    if !shared {
        sides.push((candidate_prefix, out.join(CANDIDATE_ENCODER_DIR)));
    }
    for (prefix, dir) in sides {
        let tensors = take(&state, prefix);
        if tensors.is_empty() {
            bail!("{}: no `{prefix}*` tensors in the state dict", model_file.display());
        }
        std::fs::create_dir_all(&dir)?;
        config.save(&dir)?;
        Tensor::write_safetensors(&tensors, dir.join(WEIGHTS_FILE))?;
    }
    if shared {
        // The candidate side is the context's transformer read through ParlAI's response
        // wrapper (`cand_encoder.transformer.*` are the context encoder's own tensors).
        let mlp: Vec<(String, Tensor)> = take(&state, "cand_encoder.mlp.").into_iter().map(|(k, v)| (format!("mlp.{k}"), v)).collect();
        if mlp.len() != 4 {
            bail!("{}: a bi-encoder with shared encoders needs `cand_encoder.mlp.{{0,2}}.{{weight,bias}}`", model_file.display());
        }
        Tensor::write_safetensors(&mlp, out.join(CANDIDATE_MLP_FILE))?;
    }
    let mut head: Vec<(String, Tensor)> = Vec::new();
    if !bi {
        if let Some(codes) = state.get("codes") {
            head.push(("codes".into(), codes.shallow_clone()));
        }
        head.extend(take(&state, "code_attention.").into_iter().map(|(k, v)| (format!("code_attention.{k}"), v)));
        head.extend(take(&state, "attention.").into_iter().map(|(k, v)| (format!("candidate_attention.{k}"), v)));
    }
    let settings = poly_settings(&opt, &text, model_file, &config)?;
    // An n_first model with basic or sqrt attention has no head parameters, and no head file.
    if !head.is_empty() {
        Tensor::write_safetensors(&head, out.join(HEAD_FILE))?;
    }
    settings.save(out)?;
    // Load what was written, as `serve` will: a missing or misshapen tensor fails here.
    let model = crate::model::PolyEncoder::load(out, tch::Device::Cpu).map_err(|e| anyhow!("the imported model does not load: {e}"))?;
    Ok(format!(
        "ParlAI {} variant {:?}, {} layers, d={}, vocabulary {}, m={} ({:?}), dict tokenizer {:?}",
        opt.str_or("model", ""),
        config.variant,
        config.n_layers,
        model.dim(),
        vocab_size,
        settings.n_codes,
        settings.poly_type,
        text.tokenizer
    ))
}

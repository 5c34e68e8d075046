//! The HF encoder families polyrank serves besides BERT (RoBERTa, XLM-RoBERTa, DistilBERT with
//! learned or sinusoidal positions, MPNet) against `transformers`' own forward: tiny
//! random-weight models built and saved by `transformers` (scripts/hf_reference.py, some as
//! task models whose checkpoints prefix the encoder), loaded by polyrank as a user's model
//! directory. Token outputs of a right-padded batch, and the mean-pooled vectors, agree
//! within 1e-5 at every real position.

mod common;
use common::max_diff;
use polyrank::model::format::{PolyType, Pooling};
use polyrank::model::{Batch, PolyEncoder};
use polyrank::testkit::tiny_settings;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

const FAMILIES: [&str; 6] = ["bert", "roberta", "xlm-roberta", "distilbert", "distilbert-sinusoidal", "mpnet"];

/// `transformers`' models and answers, made once per test process.
fn reference() -> &'static (tempfile::TempDir, PathBuf) {
    static R: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    R.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("hf");
        let out = Command::new(common::python())
            .arg(common::root().join("scripts/hf_reference.py"))
            .arg(&root)
            .output()
            .expect("running scripts/hf_reference.py");
        assert!(out.status.success(), "the transformers reference failed:\n{}", String::from_utf8_lossy(&out.stderr));
        (dir, root)
    })
}

fn check(family: &str) {
    let _g = tch::no_grad_guard();
    let dir = reference().1.join(family);
    let t: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(dir.join("reference.safetensors")).unwrap().into_iter().collect();
    let (ids, mask, hidden) = (&t["ids"], &t["mask"], &t["hidden"]);
    let (_, l, _) = hidden.size3().unwrap();
    // `n_first` over every position: the context vectors are the encoder's token outputs as
    // they are (zero at padding); candidates are their masked mean.
    let mut s = tiny_settings(l);
    s.poly_type = PolyType::NFirst;
    s.candidate_pooling = Pooling::Mean;
    s.normalize = false;
    s.save(&dir).unwrap();
    let model = PolyEncoder::load(&dir, Device::Cpu).unwrap_or_else(|e| panic!("{family}: {e}"));
    let batch = Batch { ids: ids.shallow_clone(), type_ids: ids.zeros_like(), mask: mask.shallow_clone() };

    let m = mask.to_kind(Kind::Float).unsqueeze(-1);
    let want = hidden * &m;
    let got = model.context_codes(&batch).y;
    let diff = max_diff(&got, &want);
    eprintln!("{family}: token outputs max |Δ| {diff:.2e}");
    assert!(diff <= 1e-5, "{family}: token outputs differ from transformers' by {diff}");
    // Not a trivially small output either: the comparison has something to compare.
    assert!(want.abs().max().double_value(&[]) > 0.1, "{family}: outputs are near zero");

    let mean = want.sum_dim_intlist(1, false, Kind::Float) / m.sum_dim_intlist(1, false, Kind::Float);
    let diff = max_diff(&model.candidate_vectors(&batch), &mean);
    eprintln!("{family}: mean-pooled max |Δ| {diff:.2e}");
    assert!(diff <= 1e-5, "{family}: mean-pooled vectors differ by {diff}");
    assert_eq!(model.config.family(), family.trim_end_matches("-sinusoidal"));
}

#[test]
fn bert_matches_transformers() {
    check(FAMILIES[0]);
}

#[test]
fn roberta_task_checkpoint_matches_transformers() {
    check(FAMILIES[1]);
}

#[test]
fn xlm_roberta_matches_transformers() {
    check(FAMILIES[2]);
}

#[test]
fn distilbert_task_checkpoint_matches_transformers() {
    check(FAMILIES[3]);
}

#[test]
fn distilbert_sinusoidal_relu_matches_transformers() {
    check(FAMILIES[4]);
}

#[test]
fn mpnet_with_its_relative_position_bias_matches_transformers() {
    check(FAMILIES[5]);
}

/// A family that is not BERT's blocks is refused by name at load, not read as BERT.
#[test]
fn an_unsupported_family_is_a_load_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = reference().1.join("bert");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    config["model_type"] = "electra".into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    tiny_settings(4).save(dir.path()).unwrap();
    let err = PolyEncoder::load(dir.path(), Device::Cpu).err().expect("electra must not load").to_string();
    assert!(err.contains("electra") && err.contains("mpnet"), "{err}");
}

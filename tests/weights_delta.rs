//! Encoder weights stored as a base plus an int8 difference (`model.delta.safetensors`):
//! the model loads as if the weights were stored whole, the delta is part of the encoder's
//! fingerprint (pool cache, store), a damaged delta is named, and fine-tuning from such a
//! model starts from the added weights.

mod common;

use common::max_diff;
use polyrank::fingerprint::encoder_fingerprint;
use polyrank::infer::ranker::Ranker;
use polyrank::model::format::*;
use polyrank::offline::train::{train, TrainArgs};
use polyrank::text::TextKind;
use polyrank::testkit::{tiny_settings, write_tiny_model};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Rewrites `dir`'s weights as base + delta holding the same values: base = w - q * scale
/// for random int8 q and one scale per row, so only base + delta reproduces w.
fn split_into_delta(dir: &Path, seed: i64) {
    tch::manual_seed(seed);
    let path = dir.join(WEIGHTS_FILE);
    let mut base = Vec::new();
    let mut delta = Vec::new();
    for (name, w) in Tensor::read_safetensors(&path).unwrap() {
        let rows = if w.dim() == 2 { vec![w.size()[0], 1] } else { vec![1] };
        let q = Tensor::randint_low(-127, 128, w.size().as_slice(), (Kind::Int8, Device::Cpu));
        let scale = Tensor::rand(rows.as_slice(), (Kind::Float, Device::Cpu)) * 0.05 + 0.01;
        base.push((name.clone(), &w - q.to_kind(Kind::Float) * &scale));
        delta.push((format!("{name}.q"), q));
        delta.push((format!("{name}.scale"), scale));
    }
    Tensor::write_safetensors(&base, &path).unwrap();
    Tensor::write_safetensors(&delta, dir.join(WEIGHTS_DELTA_FILE)).unwrap();
}

fn outputs(dir: &Path) -> (Tensor, Tensor) {
    let r = Ranker::load(dir, Device::Cpu).unwrap();
    let texts: Vec<String> = ["hello there", "i like pizza and cats", "music"].iter().map(|s| s.to_string()).collect();
    let cands = r.candidate_vectors(&r.tokenize(&texts, TextKind::Candidate).unwrap(), 8);
    let ctx = r.context_codes(&r.tokenize(&texts, TextKind::Context).unwrap(), 8).y;
    (cands, ctx)
}

/// A copy, not a second `write_tiny_model` with the same seed: tests in this binary run in
/// parallel and share libtorch's global generator.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn a_model_stored_as_base_plus_delta_loads_as_the_whole_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, split) = (tmp.path().join("whole"), tmp.path().join("split"));
    let mut settings = tiny_settings(4);
    settings.share_encoders = false;
    write_tiny_model(&whole, &settings, 7).unwrap();
    copy_dir(&whole, &split);
    split_into_delta(&split, 1);
    split_into_delta(&split.join(CANDIDATE_ENCODER_DIR), 2);

    let (c0, y0) = outputs(&whole);
    let (c1, y1) = outputs(&split);
    let (dc, dy) = (max_diff(&c0, &c1), max_diff(&y0, &y1));
    assert!(dc < 1e-4 && dy < 1e-4, "base + delta differs from the whole weights: {dc:.2e} / {dy:.2e}");

    // The delta is what makes them equal: without it the outputs move, and so does the key
    // under which the pool's vectors are cached.
    let with = encoder_fingerprint(&split, &settings, b"").unwrap();
    std::fs::rename(split.join(CANDIDATE_ENCODER_DIR).join(WEIGHTS_DELTA_FILE), tmp.path().join("cand.delta")).unwrap();
    let (c2, _) = outputs(&split);
    assert!(max_diff(&c0, &c2) > 1e-2, "the candidate encoder's delta was not applied");
    assert_ne!(with, encoder_fingerprint(&split, &settings, b"").unwrap(), "the fingerprint ignores the delta");
    std::fs::rename(tmp.path().join("cand.delta"), split.join(CANDIDATE_ENCODER_DIR).join(WEIGHTS_DELTA_FILE)).unwrap();
    assert_eq!(with, encoder_fingerprint(&split, &settings, b"").unwrap());
}

#[test]
fn a_damaged_delta_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny_model(tmp.path(), &tiny_settings(4), 7).unwrap();
    split_into_delta(tmp.path(), 1);
    let path = tmp.path().join(WEIGHTS_DELTA_FILE);
    let good: Vec<(String, Tensor)> = Tensor::read_safetensors(&path).unwrap();
    let cases: [(&str, Box<dyn Fn(&str, &Tensor) -> Option<Tensor>>, &str); 3] = [
        ("q shape", Box::new(|n, t| Some(if n.ends_with(".q") { t.narrow(0, 0, 1).copy() } else { t.shallow_clone() })), "must be int8 of shape"),
        ("no scale", Box::new(|n, t| (!n.ends_with(".scale")).then(|| t.shallow_clone())), "no `.scale`"),
        ("q float", Box::new(|n, t| Some(if n.ends_with(".q") { t.to_kind(Kind::Float) } else { t.shallow_clone() })), "must be int8"),
    ];
    for (what, change, expect) in cases {
        let bad: Vec<(String, Tensor)> = good.iter().filter_map(|(n, t)| change(n, t).map(|t| (n.clone(), t))).collect();
        Tensor::write_safetensors(&bad, &path).unwrap();
        let e = match Ranker::load(tmp.path(), Device::Cpu) {
            Ok(_) => panic!("{what}: a damaged delta loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(WEIGHTS_DELTA_FILE) && e.contains(expect), "{what}: {e}");
    }
    let mut extra: Vec<(String, Tensor)> = good.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    extra.push(("encoder.layer.0.stray".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu))));
    Tensor::write_safetensors(&extra, &path).unwrap();
    let e = Ranker::load(tmp.path(), Device::Cpu).err().expect("a stray tensor loaded").to_string();
    assert!(e.contains("stray"), "{e}");
}

#[test]
fn fine_tuning_from_a_delta_model_starts_from_the_added_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, split, out) = (tmp.path().join("whole"), tmp.path().join("split"), tmp.path().join("out"));
    write_tiny_model(&whole, &tiny_settings(4), 7).unwrap();
    copy_dir(&whole, &split);
    split_into_delta(&split, 1);
    let data = tmp.path().join("train.jsonl");
    std::fs::write(&data, "{\"context\": [\"hello\"], \"response\": \"hi there\"}\n{\"context\": [\"pizza?\"], \"response\": \"i like it\"}\n").unwrap();
    // Learning rates of zero: one step leaves the weights where they started.
    let flags: Vec<String> = [
        "--base", split.to_str().unwrap(), "--out", out.to_str().unwrap(), "--data", data.to_str().unwrap(),
        "--train-layers", "all", "--lr", "0", "--lr-encoder", "0", "--max-steps", "1", "--batch-size", "2", "--threads", "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    train(TrainArgs::from_flags(&flags).unwrap()).unwrap();
    assert!(!out.join(WEIGHTS_DELTA_FILE).exists(), "a checkpoint's weights are written whole");
    let (c0, y0) = outputs(&whole);
    let (c1, y1) = outputs(&out);
    let (dc, dy) = (max_diff(&c0, &c1), max_diff(&y0, &y1));
    assert!(dc < 1e-4 && dy < 1e-4, "fine-tuning started from other weights: {dc:.2e} / {dy:.2e}");
}

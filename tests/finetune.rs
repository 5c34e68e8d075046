//! Fine-tuning the encoder (`polyrank train --train-layers`): gradient caching gives the
//! full-batch gradient, gradients reach the encoder, a tiny model learns a toy task, resume is
//! exact, separate encoders both train, and checkpoints load as model directories.

mod common;

use common::{max_diff_by_name, toy_pairs, TOY_WORDS};
use polyrank::model::format::*;
use polyrank::testkit::{tiny_settings, write_tiny_model};
use polyrank::offline::train::finetune::Trainer;
use polyrank::offline::train::{train, Pair, TrainArgs};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use tch::Tensor;

/// Every test here takes this lock first: tiny models and batch orders are drawn from
/// libtorch's global random generator, so tests running side by side drew each other's
/// numbers — about one run in twenty, `fine_tuning_learns…` trained another model and missed
/// its bar.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn write_toy(dir: &Path) -> (PathBuf, PathBuf) {
    let train: String = toy_pairs(400)
        .iter()
        .map(|p| serde_json::json!({"context": p.context, "response": p.response}).to_string() + "\n")
        .collect();
    let valid: String = (0..40)
        .map(|i| {
            let cands: Vec<String> = TOY_WORDS.iter().map(|c| format!("{c} {c} is good")).collect();
            let ctx = [format!("hello {}", TOY_WORDS[(i * 3 + 1) % 10]), format!("i like {}", TOY_WORDS[i % 10])];
            serde_json::json!({"context": ctx, "candidates": cands, "label": i % 10}).to_string() + "\n"
        })
        .collect();
    let (t, v) = (dir.join("train.jsonl"), dir.join("valid.jsonl"));
    std::fs::write(&t, train).unwrap();
    std::fs::write(&v, valid).unwrap();
    (t, v)
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn args(flags: &[&str]) -> TrainArgs {
    TrainArgs::from_flags(flags).unwrap()
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

#[test]
fn gradient_caching_gives_the_full_batch_gradient_and_reaches_the_encoder() {
    let _serial = serial();
    for share in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        let mut settings = tiny_settings(4);
        settings.share_encoders = share;
        write_tiny_model(&base, &settings, 5).unwrap();
        let a = args(&["--base", &s(&base), "--data", "x", "--out", "x", "--train-layers", "all", "--train-embeddings", "--threads", "1"]);
        let mut t = Trainer::new(&base, &a).unwrap();
        let pairs = toy_pairs(12);
        let refs: Vec<&Pair> = pairs.iter().collect();
        let direct_loss = t.gradients(&refs, 64, 3.0, false, true).unwrap();
        let direct: HashMap<String, Tensor> = t.grads().into_iter().collect();
        let cached_loss = t.gradients(&refs, 5, 3.0, true, true).unwrap();
        let cached: HashMap<String, Tensor> = t.grads().into_iter().collect();
        assert!((direct_loss - cached_loss).abs() < 1e-5, "{direct_loss} vs {cached_loss}");
        assert_eq!(direct.len(), cached.len());
        let scale = direct.values().map(|g| g.abs().max().double_value(&[])).fold(0.0, f64::max);
        let diff = max_diff_by_name(&direct, &cached);
        eprintln!("share={share}: {} gradients, max |g| {scale:.3e}, max diff {diff:.3e}", direct.len());
        assert!(diff <= 1e-5 * scale.max(1.0), "gradient caching differs from the full batch: {diff}");
        // Gradients reach the encoder(s): the bottom layer and the embeddings of each.
        let norm = |prefix: &str| -> f64 {
            direct.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, g)| g.norm().double_value(&[])).sum()
        };
        assert!(norm("0/encoder.layer.0.") > 0.0, "no gradient in the context encoder's bottom layer");
        assert!(norm("0/embeddings.") > 0.0, "no gradient in the embeddings");
        assert!(norm("1/") > 0.0, "no gradient in the head");
        if !share {
            assert!(norm("0/candidate_encoder/encoder.layer.0.") > 0.0, "no gradient in the candidate encoder");
        }
    }
}

#[test]
fn only_the_requested_layers_train() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    write_tiny_model(&base, &tiny_settings(4), 5).unwrap();
    let a = args(&["--base", &s(&base), "--data", "x", "--out", "x", "--train-layers", "1", "--threads", "1"]);
    let mut t = Trainer::new(&base, &a).unwrap();
    let pairs = toy_pairs(6);
    t.gradients(&pairs.iter().collect::<Vec<_>>(), 64, 1.0, true, false).unwrap();
    let names: Vec<String> = t.grads().into_iter().map(|(k, _)| k).collect();
    assert!(names.iter().any(|k| k.starts_with("0/encoder.layer.1.")), "{names:?}");
    assert!(!names.iter().any(|k| k.starts_with("0/encoder.layer.0.") || k.starts_with("0/embeddings.")), "{names:?}");
}

#[test]
fn fine_tuning_learns_checkpoints_load_and_resume_is_exact() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let mut settings = tiny_settings(8);
    settings.normalize = true;
    write_tiny_model(&base, &settings, 3).unwrap();
    let (train_path, valid_path) = write_toy(dir.path());
    let out = dir.path().join("ft");
    let flags = |out: &Path| -> Vec<String> {
        [
            "--base", &s(&base), "--data", &s(&train_path), "--valid", &s(&valid_path), "--out", &s(out),
            "--train-layers", "all", "--train-embeddings", "--context-negatives", "--batch-size", "32", "--chunk-size", "8",
            "--lr", "1e-2", "--lr-encoder", "3e-3", "--warmup-steps", "3", "--logit-scale", "10",
            "--max-steps", "36", "--valid-every", "12", "--save-every", "4", "--seed", "2", "--threads", "1",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let state = train(TrainArgs::from_flags(&flags(&out)).unwrap()).unwrap();
    assert_eq!(state.steps_done, 36);
    let (first, last) = (&state.history[0], state.history.last().unwrap());
    let (before, after) = (state.initial_valid.unwrap().r_at_1, last.valid.unwrap().r_at_1);
    eprintln!("loss {} → {}; R@1 {before} → {after}; {:.1} pairs/s", first.loss, last.loss, state.pairs_per_second);
    assert!(last.loss < first.loss * 0.8, "loss {} → {}", first.loss, last.loss);
    assert!(after > before + 0.2, "R@1 {before} → {after}");

    // The encoder itself changed, and the checkpoint is a model directory that eval loads
    // and that agrees with training's own figure.
    let diff = max_diff_by_name(&tensors(&base.join(WEIGHTS_FILE)), &tensors(&out.join(WEIGHTS_FILE)));
    assert!(diff > 1e-3, "encoder weights unchanged ({diff})");
    assert!(!out.join(WEIGHTS_FILE).symlink_metadata().unwrap().file_type().is_symlink());
    let ranker = polyrank::infer::ranker::Ranker::load(&out, tch::Device::Cpu).unwrap();
    assert!(ranker.model.settings.trained);
    let examples = polyrank::offline::eval::load_examples(&valid_path).unwrap();
    let m = polyrank::offline::eval::evaluate(&ranker, &examples, 16, false).unwrap();
    assert!((m.r_at_1 - after).abs() < 1e-9, "eval {} vs training {after}", m.r_at_1);

    // Resume: 12 steps, a stop, then the rest (checkpoint every 4) ends exactly where the
    // straight run ended: weights, head and optimizer state restored, same batches.
    let split = dir.path().join("split");
    let mut f = flags(&split);
    f.extend(["--stop-after".to_string(), "12".to_string()]);
    let part = train(TrainArgs::from_flags(&f).unwrap()).unwrap();
    assert_eq!(part.steps_done, 12);
    let mut f = flags(&split);
    f.push("--resume".into());
    let resumed = train(TrainArgs::from_flags(&f).unwrap()).unwrap();
    assert_eq!(resumed.steps_done, 36);
    for file in [WEIGHTS_FILE, HEAD_FILE] {
        let d = max_diff_by_name(&tensors(&out.join(file)), &tensors(&split.join(file)));
        assert!(d < 1e-6, "{file}: resumed run differs from the straight run by {d}");
    }
    assert_eq!(resumed.history.last().unwrap().valid.unwrap().r_at_1, after);
    // Resuming with other settings would silently change the batches or the schedule.
    let mut f = flags(&split);
    f.extend(["--resume", "--weight-decay", "0.1"].map(String::from));
    let err = train(TrainArgs::from_flags(&f).unwrap()).unwrap_err().to_string();
    assert!(err.contains("other settings"), "{err}");
}

#[test]
fn separate_encoders_both_fine_tune_and_load() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let mut settings = tiny_settings(4);
    settings.share_encoders = false;
    write_tiny_model(&base, &settings, 7).unwrap();
    let (train_path, _) = write_toy(dir.path());
    let out = dir.path().join("ft");
    train(args(&[
        "--base", &s(&base), "--data", &s(&train_path), "--out", &s(&out), "--train-layers", "all",
        "--batch-size", "16", "--max-steps", "3", "--lr-encoder", "1e-3", "--threads", "1",
    ]))
    .unwrap();
    let cand = Path::new(CANDIDATE_ENCODER_DIR).join(WEIGHTS_FILE);
    let d_ctx = max_diff_by_name(&tensors(&base.join(WEIGHTS_FILE)), &tensors(&out.join(WEIGHTS_FILE)));
    let d_cand = max_diff_by_name(&tensors(&base.join(&cand)), &tensors(&out.join(&cand)));
    assert!(d_ctx > 0.0 && d_cand > 0.0, "context encoder moved {d_ctx}, candidate encoder {d_cand}");
    let r = polyrank::infer::ranker::Ranker::load(&out, tch::Device::Cpu).unwrap();
    assert!(!r.model.settings.share_encoders);

    // From a shared base, --separate-encoders gives the candidates their own copy, and both
    // train apart from there.
    let shared = dir.path().join("shared");
    write_tiny_model(&shared, &tiny_settings(4), 8).unwrap();
    let out = dir.path().join("split");
    train(args(&[
        "--base", &s(&shared), "--data", &s(&train_path), "--out", &s(&out), "--train-layers", "all", "--separate-encoders",
        "--context-negatives", "--batch-size", "16", "--max-steps", "3", "--lr-encoder", "1e-3", "--threads", "1",
    ]))
    .unwrap();
    let r = polyrank::infer::ranker::Ranker::load(&out, tch::Device::Cpu).unwrap();
    assert!(!r.model.settings.share_encoders);
    let base_w = tensors(&shared.join(WEIGHTS_FILE));
    let (ctx_w, cand_w) = (tensors(&out.join(WEIGHTS_FILE)), tensors(&out.join(&cand)));
    assert!(max_diff_by_name(&base_w, &ctx_w) > 0.0 && max_diff_by_name(&base_w, &cand_w) > 0.0 && max_diff_by_name(&ctx_w, &cand_w) > 0.0);
}

#[test]
fn the_encoder_fingerprint_follows_content_not_paths() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    let settings = tiny_settings(4);
    write_tiny_model(&m, &settings, 1).unwrap();
    let fp = |s: &PolySettings| polyrank::fingerprint::encoder_fingerprint(&m, s, b"data").unwrap();
    let before = fp(&settings);
    // Head-only changes leave the encoder's outputs, and so the fingerprint, as they were.
    let mut head_only = settings.clone();
    head_only.n_codes = 9;
    head_only.description = "other".into();
    assert_eq!(fp(&head_only), before);
    // New weights at the same path, a new tokenizer, or an output-changing setting do not.
    let mut t = tensors(&m.join(WEIGHTS_FILE));
    let w = t.get_mut("encoder.layer.0.output.dense.bias").unwrap();
    *w = &*w + 1e-3;
    Tensor::write_safetensors(&t.into_iter().collect::<Vec<_>>(), m.join(WEIGHTS_FILE)).unwrap();
    let after_weights = fp(&settings);
    assert_ne!(after_weights, before);
    let tok = std::fs::read_to_string(m.join(TOKENIZER_FILE)).unwrap();
    std::fs::write(m.join(TOKENIZER_FILE), tok.replace("\"pizza\"", "\"pizzas\"")).unwrap();
    assert_ne!(fp(&settings), after_weights);
    let mut delim = settings.clone();
    delim.turn_delimiter = " | ".into();
    assert_ne!(fp(&delim), fp(&settings));
}

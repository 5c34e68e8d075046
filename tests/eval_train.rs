//! Ranking metrics, the eval formats, and training: a tiny generated model learns a toy task,
//! and its checkpoint loads in eval and serve.

mod common;
use polyrank::offline::eval::{load_examples, rank_metrics, rank_of, Example};
use polyrank::offline::train::{train, TrainArgs};
use polyrank::testkit::{tiny_settings, write_tiny_model};
use std::path::Path;

#[test]
fn metrics_of_known_ranks() {
    let m = rank_metrics(&[1, 2, 6, 11]);
    assert_eq!(m.examples, 4);
    assert_eq!((m.r_at_1, m.r_at_5, m.r_at_10), (0.25, 0.5, 0.75));
    assert!((m.mrr - (1.0 + 0.5 + 1.0 / 6.0 + 1.0 / 11.0) / 4.0).abs() < 1e-12);
    assert!((m.r_at_1_se - (0.25f64 * 0.75 / 4.0).sqrt()).abs() < 1e-12);
    assert!(m.mrr_se > 0.0 && rank_metrics(&[2, 2, 2]).mrr_se == 0.0);
    assert_eq!(rank_of(&[0.1, 0.9, 0.5, 0.9], 2), 3);
    assert_eq!(rank_of(&[0.1, 0.9, 0.5, 0.9], 1), 1, "ties count for the label");
    assert_eq!(rank_of(&[3.0, 2.0, 1.0], 2), 3);
}

#[test]
fn convai2_format_folds_persona_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("valid.txt");
    std::fs::write(
        &p,
        "1 your persona: i like cats.\n2 your persona: i live in paris.\n3 hi there\thello !\t\tbye|hello !|ok\n4 do you have pets ?\ti have a cat .\t\ti have a cat .|no|maybe\n1 your persona: i read books.\n2 good morning\tmorning !\t\tmorning !|night\n",
    )
    .unwrap();
    let ex = load_examples(&p).unwrap();
    assert_eq!(ex.len(), 3);
    assert_eq!(
        ex[0],
        Example {
            context: vec!["your persona: i like cats.".into(), "your persona: i live in paris.".into(), "hi there".into()],
            candidates: vec!["bye".into(), "hello !".into(), "ok".into()],
            label: 1
        }
    );
    assert_eq!(ex[1].context[2..], ["hi there", "hello !", "do you have pets ?"]);
    assert_eq!(ex[1].label, 0);
    assert_eq!(ex[2].context, ["your persona: i read books.", "good morning"], "a new episode starts fresh");
    std::fs::write(&p, "1 hi\tmissing\t\ta|b\n").unwrap();
    assert!(load_examples(&p).unwrap_err().to_string().contains("label is not among"));
}

#[test]
fn jsonl_examples_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.jsonl");
    std::fs::write(&p, r#"{"context": ["hi"], "candidates": ["a", "b"], "label": 2}"#).unwrap();
    assert!(load_examples(&p).unwrap_err().to_string().contains("label 2 but 2 candidates"));
}

const WORDS: [&str; 10] = ["pizza", "cats", "dogs", "rain", "music", "guitar", "books", "paris", "sun", "food"];

/// Toy task: "i like W" → a reply about W. Separable, so even a frozen random encoder plus
/// trained codes can learn it.
fn write_toy(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut pairs = String::new();
    for i in 0..400 {
        let w = WORDS[i % 10];
        let filler = WORDS[(i * 7 + 3) % 10];
        pairs += &serde_json::json!({"context": [format!("hello {filler}"), format!("i like {w}")], "response": format!("{w} {w} is good")}).to_string();
        pairs.push('\n');
    }
    let train = dir.join("train.jsonl");
    std::fs::write(&train, pairs).unwrap();
    let mut valid = String::new();
    for i in 0..40 {
        let w = WORDS[i % 10];
        let cands: Vec<String> = WORDS.iter().map(|c| format!("{c} {c} is good")).collect();
        // Same form as training, other filler words.
        let filler = WORDS[(i * 3 + 1) % 10];
        valid += &serde_json::json!({"context": [format!("hello {filler}"), format!("i like {w}")], "candidates": cands, "label": i % 10}).to_string();
        valid.push('\n');
    }
    let valid_path = dir.join("valid.jsonl");
    std::fs::write(&valid_path, valid).unwrap();
    (train, valid_path)
}

#[test]
fn training_lowers_the_loss_raises_r1_and_the_checkpoint_serves() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    // Multihead attention gives the head projections to learn: with a frozen random encoder,
    // codes alone can only re-weight tokens whose features were never aligned.
    let mut settings = tiny_settings(8);
    settings.codes_attention.kind = polyrank::model::format::AttentionKind::Multihead;
    settings.candidate_attention.kind = polyrank::model::format::AttentionKind::Multihead;
    write_tiny_model(&base, &settings, 3).unwrap();
    let (train_path, valid_path) = write_toy(dir.path());
    let out = dir.path().join("trained");
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let args = TrainArgs::from_flags(&[
        "--base", &p(&base), "--data", &p(&train_path), "--valid", &p(&valid_path), "--out", &p(&out),
        "--n-codes", "8", "--epochs", "10", "--batch-size", "32", "--lr", "1e-2", "--seed", "1", "--threads", "1",
    ])
    .unwrap();
    let state = train(args.clone()).unwrap();
    let first = &state.history[0];
    let last = state.history.last().unwrap();
    eprintln!("loss {} → {}; R@1 {:?} → {:?}", first.loss, last.loss, state.initial_valid.map(|m| m.r_at_1), last.valid.map(|m| m.r_at_1));
    assert!(last.loss < first.loss * 0.95, "loss {} → {}", first.loss, last.loss);
    let before = state.initial_valid.unwrap().r_at_1;
    let after = last.valid.unwrap().r_at_1;
    assert!(after > before + 0.1, "R@1 {before} → {after}");

    // The checkpoint is a model directory: eval loads it and agrees with training's figure.
    let ranker = polyrank::infer::ranker::Ranker::load(&out, tch::Device::Cpu).unwrap();
    assert!(ranker.model.settings.trained);
    let m = polyrank::offline::eval::evaluate(&ranker, &load_examples(&valid_path).unwrap(), 16, false).unwrap();
    assert!((m.r_at_1 - after).abs() < 1e-9, "eval {} vs training {after}", m.r_at_1);

    // Same seed → same result.
    let again = train(TrainArgs { out: dir.path().join("again"), ..args.clone() }).unwrap();
    assert_eq!(again.history.last().unwrap().valid.unwrap().r_at_1, after);

    // Resume: two epochs, then the rest, ends where the straight run ended.
    let split = dir.path().join("split");
    train(TrainArgs { out: split.clone(), epochs: 2, ..args.clone() }).unwrap();
    let resumed = train(TrainArgs { out: split.clone(), resume: true, ..args.clone() }).unwrap();
    assert_eq!(resumed.epochs_done, 10);
    assert_eq!(resumed.history.len(), 10);

    // And it serves.
    let pool = dir.path().join("pool.txt");
    std::fs::write(&pool, WORDS.iter().map(|w| format!("{w} {w} is good\n")).collect::<String>()).unwrap();
    let s = common::server::Server::start(&common::server::Setup::new(&out, &pool, &dir.path().join("cache")));
    s.wait_ready();
    let (_, info) = s.get("/info");
    assert!(info.contains("\"trained\":true"), "{info}");
    let (st, v) = s.post("/rank", &serde_json::json!({"context": "i like music", "top_k": 1, "return_text": true}));
    assert_eq!(st, 200);
    assert!(v["results"][0]["text"].is_string());
}

//! The real all-MiniLM-L6-v2 weights: candidate vectors must match sentence-transformers,
//! run at test time from the project's venv, and a relevant reply must win.

mod common;
use polyrank::infer::ranker::Ranker;
use polyrank::text::TextKind;
use std::process::Command;
use tch::{Device, Kind, Tensor};

fn parity_texts() -> Vec<String> {
    let mut t: Vec<String> = [
        "hello", "Hi!", "What is your favourite food?", "I love pizza with extra cheese.",
        "The quick brown fox jumps over the lazy dog.", "ok", "?", "...", "!!!", "a",
        "Café crème brûlée à la française", "naïve façade jalapeño", "Ångström über straße",
        "東京は日本の首都です。", "我喜欢吃饺子", "한국어 문장입니다", "Это предложение на русском языке.",
        "مرحبا كيف حالك", "🎉🎉 party time 🥳", "I ❤️ NY", "👍", "3.14159 is pi", "Call me at 555-0123",
        "1 2 3 4 5 6 7 8 9 10", "2026-11-27T01:24:03Z", "e=mc^2", "user@example.com",
        "https://example.org/path?q=1", "C++ and C# are languages", "don't won't can't shouldn't",
        "ALL CAPS SENTENCE HERE", "MiXeD CaSe WoRdS", "tabs\tand\nnewlines\r\nhere", "   leading and trailing   ",
        "word", "two words", "supercalifragilisticexpialidocious", "antidisestablishmentarianism",
        "The weather today is sunny with a chance of rain later.", "Do you have any pets?",
        "I have two cats named Luna and Milo.", "What do you do for a living?", "I am a nurse at the hospital.",
        "Let's go hiking this weekend.", "My grandmother taught me to bake bread.",
        "Quantum entanglement is a physical phenomenon.", "(parentheses) [brackets] {braces}",
        "\"quoted\" 'single' `backtick`", "#hashtag @mention", "50% off — today only!",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Longer than the 256-token limit: truncation must agree too.
    t.push("I like long walks on the beach and reading books. ".repeat(40));
    t.push("números y acentos: mañana será otro día. ".repeat(30));
    t.push("ok ".repeat(300));
    t
}

#[test]
fn candidate_vectors_match_sentence_transformers() {
    let _g = tch::no_grad_guard();
    let model = common::minilm();
    let texts = parity_texts();
    assert!(texts.len() >= 50);
    let dir = tempfile::tempdir().unwrap();
    let (inp, out) = (dir.path().join("texts.json"), dir.path().join("ref.json"));
    std::fs::write(&inp, serde_json::to_string(&texts).unwrap()).unwrap();
    // The reference loads the untouched sentence-transformers directory the weights come from
    // (with its own modules.json: 256-token limit, mean pooling, Normalize).
    let st_dir = model.join("model.safetensors").canonicalize().unwrap().parent().unwrap().to_path_buf();
    assert!(st_dir.join("modules.json").exists(), "{st_dir:?} is not a sentence-transformers directory");
    let status = Command::new(common::python())
        .arg(common::root().join("scripts/st_reference.py"))
        .args([&st_dir, &inp, &out])
        .status()
        .expect("running the sentence-transformers reference");
    assert!(status.success(), "reference script failed");
    let reference: Vec<Vec<f32>> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let reference = Tensor::from_slice(&reference.concat()).view([texts.len() as i64, -1]);
    // The reference normalises through the model's own Normalize module; do it here so the
    // comparison also holds if that module is ever absent.
    let reference = &reference / reference.norm_scalaropt_dim(2.0, [-1], true);

    let ranker = Ranker::load(&model, Device::Cpu).unwrap();
    let enc = ranker.tokenize(&texts, TextKind::Candidate).unwrap();
    let ours = ranker.candidate_vectors(&enc, 16);
    assert_eq!(ours.size(), reference.size());
    let cos = (&ours * &reference).sum_dim_intlist(-1, false, Kind::Float)
        / (ours.norm_scalaropt_dim(2.0, [-1], false) * reference.norm_scalaropt_dim(2.0, [-1], false));
    let min_cos = cos.min().double_value(&[]);
    let max_abs = (&ours - &reference).abs().max().double_value(&[]);
    for (i, c) in Vec::<f32>::try_from(&cos).unwrap().iter().enumerate() {
        if *c < 0.99999 {
            eprintln!("text {i} {:?}: cosine {c}", &texts[i][..texts[i].len().min(40)]);
        }
    }
    eprintln!("parity over {} texts: min cosine {min_cos:.8}, max abs diff {max_abs:.3e}", texts.len());
    assert!(min_cos >= 0.99999, "min cosine {min_cos}");
    assert!(max_abs <= 1e-4, "max abs diff {max_abs}");
}

fn assert_relevant_wins(model: &std::path::Path) {
    let _g = tch::no_grad_guard();
    let ranker = Ranker::load(model, Device::Cpu).unwrap();
    let cands: Vec<String> = [
        "The stock market closed lower on Tuesday.",
        "My favourite food is pizza, I could eat it every day.",
        "The train to Boston leaves at seven.",
        "I replaced the brake pads on my car.",
        "Photosynthesis happens in the chloroplasts.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let enc = ranker.tokenize(&cands, TextKind::Candidate).unwrap();
    let vecs = ranker.candidate_vectors(&enc, 8);
    let ranked = ranker.rank(&["what is your favourite food?".to_string()], &vecs, 5).unwrap();
    assert_eq!(ranked[0].0, 1, "{model:?}: ranking {ranked:?}");
    assert!(ranked[0].1 > ranked[1].1);
}

#[test]
fn relevant_reply_outranks_unrelated_ones_default_model() {
    assert_relevant_wins(&common::default_model());
}

#[test]
fn relevant_reply_outranks_unrelated_ones_bi_encoder() {
    assert_relevant_wins(&common::minilm());
}

//! A text alone and inside a padded batch must give the same outputs: this is what a broken
//! attention mask or pooling mask fails.

mod common;

use common::max_diff;
use polyrank::model::format::{AttentionKind, PolySettings, PolyType, Pooling};
use polyrank::infer::ranker::Ranker;
use polyrank::testkit::{tiny_settings, write_tiny_model};
use polyrank::text::TextKind;
use tch::Device;

const TEXTS: [&str; 4] = [
    "hi",
    "what is your favourite food? i like pizza and travel to paris in the rain",
    "cats",
    "how are you today, good or bad?",
];

fn check(settings: PolySettings) {
    let _g = tch::no_grad_guard();
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), &settings, 7).unwrap();
    let r = Ranker::load(dir.path(), Device::Cpu).unwrap();
    let texts: Vec<String> = TEXTS.iter().map(|s| s.to_string()).collect();
    for kind in [TextKind::Candidate, TextKind::Context] {
        let enc = r.tokenize(&texts, kind).unwrap();
        // The lengths really differ, so the batch really pads.
        assert!(enc[0].get_ids().len() + 5 < enc[1].get_ids().len());
        for (i, e) in enc.iter().enumerate() {
            let one = std::slice::from_ref(e);
            let (alone, batched) = match kind {
                TextKind::Candidate => (r.candidate_vectors(one, 8), r.candidate_vectors(&enc, 8).narrow(0, i as i64, 1)),
                TextKind::Context => {
                    let a = r.context_codes(one, 8);
                    let b = r.context_codes(&enc, 8);
                    assert!(a.mask.equal(&b.mask.narrow(0, i as i64, 1)), "code mask differs for {i}");
                    (a.y, b.y.narrow(0, i as i64, 1))
                }
            };
            let diff = max_diff(&alone, &batched);
            assert!(diff <= 1e-5, "{kind:?} text {i}: alone vs batched differ by {diff}");
        }
    }
}

#[test]
fn padding_invariance_codes_mean() {
    check(tiny_settings(8));
}

#[test]
fn padding_invariance_first_pooling_multihead() {
    let mut s = tiny_settings(4);
    s.candidate_pooling = Pooling::First;
    s.codes_attention.kind = AttentionKind::Multihead;
    s.candidate_attention.kind = AttentionKind::Multihead;
    s.codes_attention.heads = 2;
    check(s);
}

#[test]
fn padding_invariance_n_first_separate_encoders() {
    let mut s = tiny_settings(16);
    s.poly_type = PolyType::NFirst;
    s.share_encoders = false;
    s.codes_attention.kind = AttentionKind::Sqrt;
    check(s);
}

#[test]
fn n_first_masks_codes_beyond_a_short_context() {
    let _g = tch::no_grad_guard();
    let dir = tempfile::tempdir().unwrap();
    let mut s = tiny_settings(16);
    s.poly_type = PolyType::NFirst;
    write_tiny_model(dir.path(), &s, 3).unwrap();
    let r = Ranker::load(dir.path(), Device::Cpu).unwrap();
    let enc = r.tokenize(&["hi".to_string()], TextKind::Context).unwrap();
    let n = enc[0].get_ids().len() as i64; // [CLS] hi [SEP]
    let codes = r.context_codes(&enc, 1);
    assert_eq!(codes.y.size(), vec![1, 16, 32]);
    let real: i64 = codes.mask.sum(tch::Kind::Int64).int64_value(&[]);
    assert_eq!(real, n);
    assert_eq!(codes.y.narrow(1, n, 16 - n).abs().sum(tch::Kind::Float).double_value(&[]), 0.0);
}

#[test]
fn context_truncation_keeps_latest_turns() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), &tiny_settings(4), 1).unwrap();
    let r = Ranker::load(dir.path(), Device::Cpu).unwrap();
    let long_turn = "the weather is bad ".repeat(40);
    let joined = r.text.join_turns(&[long_turn.clone(), "i like cats".to_string()]);
    let ctx = r.tokenize(&[joined.clone()], TextKind::Context).unwrap();
    let toks = ctx[0].get_tokens();
    assert_eq!(toks.len(), 48);
    assert_eq!(toks.first().unwrap(), "[CLS]");
    assert_eq!(&toks[toks.len() - 4..], &["i", "like", "cats", "[SEP]"]);
    // Candidates keep their beginning instead.
    let cand = r.tokenize(&[joined], TextKind::Candidate).unwrap();
    assert_eq!(cand[0].get_tokens().len(), 32);
    assert_eq!(&cand[0].get_tokens()[1..3], &["the", "weather"]);
}

//! A hand-written probe of what a response ranker is for: for each of 40 contexts, a good
//! reply and a paraphrase of the context itself. A sentence-similarity encoder prefers the
//! paraphrase; a model trained on response selection must prefer the reply.

mod common;
use polyrank::infer::ranker::Ranker;
use polyrank::text::TextKind;
use serde::Deserialize;
use std::path::Path;

#[derive(Deserialize)]
struct Item {
    context: String,
    reply: String,
    paraphrase: String,
}

/// Share of items whose reply outscores the paraphrase.
fn reply_rate(model: &Path, items: &[Item]) -> f64 {
    let _g = tch::no_grad_guard();
    let r = Ranker::load(model, tch::Device::Cpu).unwrap();
    let wins = items
        .iter()
        .filter(|it| {
            let texts = vec![it.reply.clone(), it.paraphrase.clone()];
            let enc = r.tokenize(&texts, TextKind::Candidate).unwrap();
            let cands = r.candidate_vectors(&enc, 2);
            let best = r.rank(std::slice::from_ref(&it.context), &cands, 1).unwrap();
            best[0].0 == 0
        })
        .count();
    wins as f64 / items.len() as f64
}

#[test]
fn the_default_model_prefers_replies_over_paraphrases() {
    let text = std::fs::read_to_string(common::root().join("tests/data/reply_probe.jsonl")).unwrap();
    let items: Vec<Item> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(items.len() >= 30);
    let default = reply_rate(&common::default_model(), &items);
    // The zero-shot sentence-similarity bi-encoder, for comparison (not asserted).
    let zero_shot = reply_rate(&common::root().join("models/minilm-bi"), &items);
    eprintln!("reply above paraphrase: default {default:.3}, zero-shot MiniLM bi-encoder {zero_shot:.3} ({} items)", items.len());
    // The bar is 90 %; the committed default (740 fine-tuning steps) reaches 95 %
    // (38 of 40), the 590-step one 97.5 %, the 110-step one 77.5 %, the zero-shot encoder 0 %.
    assert!(default >= 0.9, "the default model prefers the reply in only {:.0} % of items", default * 100.0);
    assert!(default >= zero_shot + 0.5, "default {default:.3} vs zero-shot {zero_shot:.3}");
}

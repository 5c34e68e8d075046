//! Half-precision encoders (`dtype`): on this CPU-only machine, bf16 and fp16 compute must
//! stay close to fp32 on the real default model and rank alike; the CUDA path runs the same
//! code (scripts/gpu-check.sh reports the error there).

mod common;

use common::contract::Contract;
use common::server::{Server, Setup};
use polyrank::infer::ranker::Ranker;
use polyrank::text::TextKind;
use serde_json::json;
use tch::{Device, Kind};

const CONTEXTS: &[&str] = &["hi! how are you?\ngood. what do you do for fun?", "what is your favourite food?", "i just adopted a puppy", "do you like to travel?"];
const REPLIES: &[&str] = &[
    "i like to play guitar and go hiking", "pizza, definitely pizza", "congratulations! what breed is it?",
    "yes, i went to japan last year", "the weather is nice today", "i work as a nurse", "my favourite colour is blue",
    "i have two cats and a dog", "i am doing great, thanks for asking", "i love reading mystery novels",
];

#[test]
fn bf16_and_fp16_encoders_stay_close_to_fp32_and_rank_alike() {
    let _g = tch::no_grad_guard();
    let model = common::default_model();
    let reference = Ranker::load(&model, Device::Cpu).unwrap();
    let replies: Vec<String> = REPLIES.iter().map(|s| s.to_string()).collect();
    let contexts: Vec<String> = CONTEXTS.iter().map(|s| s.to_string()).collect();
    let enc_c = reference.tokenize(&replies, TextKind::Candidate).unwrap();
    let enc_x = reference.tokenize(&contexts, TextKind::Context).unwrap();
    let c32 = reference.candidate_vectors(&enc_c, 16);
    let x32 = reference.context_codes(&enc_x, 8);
    for (kind, tolerance) in [(Kind::BFloat16, 0.05), (Kind::Half, 0.01)] {
        let r = Ranker::load_in(&model, Device::Cpu, kind).unwrap();
        let c = r.candidate_vectors(&enc_c, 16);
        let x = r.context_codes(&enc_x, 8);
        assert_eq!((c.kind(), x.y.kind()), (Kind::Float, Kind::Float), "outputs are fp32 whatever the compute");
        let dc = (&c - &c32).abs().max().double_value(&[]);
        let dx = (&x.y - &x32.y).abs().max().double_value(&[]);
        eprintln!("{kind:?}: candidate vectors max |Δ| {dc:.2e}, context vectors max |Δ| {dx:.2e}");
        assert!(dc < tolerance && dx < tolerance * 4.0, "{kind:?}: {dc} / {dx}");
        for i in 0..CONTEXTS.len() as i64 {
            let a = reference.model.rank(&x32.select(i), &c32, &[3]).remove(0);
            let b = r.model.rank(&x.select(i), &c, &[3]).remove(0);
            assert_eq!(a[0].0, b[0].0, "{kind:?}: context {i} top reply differs: {a:?} vs {b:?}");
        }
    }
}

#[test]
fn serve_with_a_bf16_encoder_answers_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool.txt");
    std::fs::write(&pool, REPLIES.join("\n")).unwrap();
    let s = Server::start(&Setup::new(&common::default_model(), &pool, &dir.path().join("cache")).arg("--dtype", "bfloat16"));
    s.wait_ready();
    let c = Contract::load();
    let (st, info) = s.get("/info");
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    c.check("/info", "get", st, "application/json", &info);
    assert_eq!(info["dtype"], "bfloat16");
    let (st, v) = s.post("/rank", &json!({"context": "what is your favourite food?", "top_k": 1, "return_text": true}));
    c.check("/rank", "post", st, "application/json", &v);
    assert_eq!(v["results"][0]["text"], "pizza, definitely pizza", "{v}");
}

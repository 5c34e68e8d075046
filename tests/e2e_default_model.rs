//! End to end on the real default model (MiniLM + poly head) over HTTP, with a slice of the
//! default chitchat pool plus one known relevant reply.

mod common;
use common::server::{Server, Setup};
use serde_json::{json, Value};

#[test]
fn default_model_serves_relevant_replies_over_http() {
    let model = common::default_model();
    let src = common::root().join("data/chitchat-pool.jsonl");
    let text = std::fs::read_to_string(&src).expect("data/chitchat-pool.jsonl: run `make model`");
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool.jsonl");
    let mut lines: Vec<String> = text.lines().take(300).map(str::to_string).collect();
    lines.push(json!({"id": "food", "text": "My favourite food is pizza, I could eat it every day."}).to_string());
    std::fs::write(&pool, lines.join("\n")).unwrap();

    let s = Server::start(&Setup::new(&model, &pool, &dir.path().join("cache")));
    s.wait_ready();
    let (_, info) = s.get("/info");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!((info["dim"].as_i64(), info["pool_size"].as_i64()), (Some(384), Some(301)));
    let (st, v) = s.post("/rank", &json!({"context": ["hi! how are you?", "what is your favourite food?"], "top_k": 10, "return_text": true}));
    assert_eq!(st, 200, "{v}");
    let ids: Vec<&str> = v["results"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"food"), "the food reply is not in the top 10: {v}");
    // Inline candidates: the relevant one wins outright.
    let (st, v) = s.post("/rank", &json!({"context": "what is your favourite food?", "candidates": [
        "The stock market closed lower on Tuesday.", "I replaced the brake pads on my car.",
        "I love sushi more than anything.", "The train to Boston leaves at seven."]}));
    assert_eq!(st, 200);
    assert_eq!(v["results"][0]["id"], "2", "{v}");
}

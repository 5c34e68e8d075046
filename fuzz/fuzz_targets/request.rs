//! Request parsing and tokenization on arbitrary bytes: the JSON bodies of /rank and /encode,
//! their validation, multi-turn joining, and the MiniLM tokenizer with both truncation sides.
//! Nothing here may panic. `make fuzz` runs it (see README).
#![no_main]

use libfuzzer_sys::fuzz_target;
use polyrank::http::api::{ContextInput, EncodeRequest, RankRequest};
use polyrank::infer::admission::check_texts;
use polyrank::model::format::PolySettings;
use polyrank::text::{Tokenizer, TextKind};
use std::path::Path;
use std::sync::OnceLock;

fn encoder() -> &'static Tokenizer {
    static ENC: OnceLock<Tokenizer> = OnceLock::new();
    ENC.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/default");
        let settings = PolySettings::load(&dir).expect("models/default (run `make model`)");
        Tokenizer::load(&dir, &settings).expect("tokenizer")
    })
}

fn tokenize_all(texts: &[String]) {
    let _ = check_texts("texts", texts, 256, 20_000);
    for kind in [TextKind::Context, TextKind::Candidate] {
        if let Ok(enc) = encoder().tokenize(texts, kind) {
            for e in enc {
                assert!(e.get_ids().len() <= 256, "truncation must hold");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<RankRequest>(data) {
        let turns = match req.context {
            ContextInput::Text(t) => vec![t],
            ContextInput::Turns(t) => t,
        };
        let joined = encoder().join_turns(&turns);
        tokenize_all(&[joined]);
        if let Some(c) = req.candidates {
            tokenize_all(&c);
        }
    }
    if let Ok(req) = serde_json::from_slice::<EncodeRequest>(data) {
        tokenize_all(&req.texts);
    }
    // Raw text straight into the tokenizer too.
    if let Ok(s) = std::str::from_utf8(data) {
        tokenize_all(&[s.to_string()]);
    }
});

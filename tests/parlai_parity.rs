//! `polyrank import parlai` against ParlAI 1.7.2 itself (scripts/parlai_reference.py, run here
//! from the project venv with ParlAI on PYTHONPATH): ParlAI builds BPE and `re` dictionaries
//! from real text and tiny random-weight poly-encoders in four variants and bi-encoders in two
//! (shared encoders with ParlAI's candidate MLP; separate encoders and word embeddings), saves
//! them with its own code, and says what they compute. polyrank imports each model file with its CLI and
//! must give the same token ids, context codes, candidate vectors and scores (1e-4), the same
//! ranking, and, served over HTTP, the same top-10 as ParlAI's own fixed-candidate ranking.

mod common;
use polyrank::infer::ranker::Ranker;
use polyrank::text::parlai::ParlaiText;
use polyrank::text::TextKind;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

const VARIANTS: [&str; 6] = [
    "paper",
    "aiayn_first_multihead",
    "prelayernorm_nfirst_max",
    "xlm_sqrt_codes_multihead_cands",
    "biencoder_shared_first",
    "biencoder_separate_mean",
];

struct Reference {
    _dir: tempfile::TempDir,
    root: PathBuf,
    spec: Value,
}

fn spec() -> Value {
    json!({
        "n_texts": 12000,
        "spc_csv": common::root().join("../shared/data/spc/Synthetic-Persona-Chat_test.csv"),
        "contexts": [
            ["hello there", "how are you today?"],
            ["I love pizza.", "Do you?", "yes, with mushrooms and extra cheese!"],
            ["what do you do for a living"],
            ["Ok"],
            // Longer than the tiny models' 40-token text_truncate: the latest tokens are kept.
            ["i like long walks on the beach and reading books about the history of rome, ".repeat(4), "and you?"]
        ],
        "candidates": [
            "I am a nurse.", "pizza is my favourite food", "I have two cats", "the weather is nice",
            "I work at a bank downtown", "do you like music?", "I play guitar", "let's go hiking",
            "my dog is named max", "I read a lot of books", "I am from Paris", "that sounds fun!",
            "Hmm, I don't know... maybe?", "Mushrooms are the best topping",
            // Longer than the 24-token label_truncate: ParlAI cuts the end token too.
            "I usually wake up early, make coffee, walk the dog, read the news and then I go to work by bike"
        ],
        "fixed_contexts": ["hello there\nhow are you today?", "I love pizza.\nDo you?", "what do you do for a living", "tell me about your pets"]
    })
}

/// ParlAI's models and answers, made once per test process.
fn reference() -> &'static Reference {
    static R: OnceLock<Reference> = OnceLock::new();
    R.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("parlai");
        let spec = spec();
        let spec_path = dir.path().join("spec.json");
        std::fs::write(&spec_path, spec.to_string()).unwrap();
        let out = Command::new(common::python())
            .arg(common::root().join("scripts/parlai_reference.py"))
            .arg(&spec_path)
            .arg(&root)
            .env("PYTHONPATH", common::root().join(".venv/parlai-lib"))
            .output()
            .expect("running scripts/parlai_reference.py");
        assert!(out.status.success(), "ParlAI reference failed:\n{}", String::from_utf8_lossy(&out.stderr));
        for v in VARIANTS {
            import(&root.join(v).join("model"), &root.join(v).join("polyrank")).expect("import");
        }
        Reference { _dir: dir, root, spec }
    })
}

/// `polyrank import parlai`, the binary a user runs. Err: its stderr.
fn import(model_file: &Path, out: &Path) -> Result<(), String> {
    let o = Command::new(env!("CARGO_BIN_EXE_polyrank"))
        .args(["import", "parlai", "--model-file"])
        .arg(model_file)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    if o.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).to_string())
    }
}

fn load_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn tensor(v: &Value) -> Tensor {
    fn flat(v: &Value, out: &mut Vec<f32>, shape: &mut Vec<i64>, depth: usize) {
        match v {
            Value::Array(a) => {
                if shape.len() == depth {
                    shape.push(a.len() as i64);
                }
                for x in a {
                    flat(x, out, shape, depth + 1);
                }
            }
            x => out.push(x.as_f64().unwrap() as f32),
        }
    }
    let (mut out, mut shape) = (vec![], vec![]);
    flat(v, &mut out, &mut shape, 0);
    Tensor::from_slice(&out).view(shape.as_slice())
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

#[test]
fn parlai_dictionaries_and_polyrank_give_identical_ids_on_real_text() {
    let r = reference();
    // The variant whose dictionary each tokenizer was built with.
    for (dict, variant) in [
        ("bpe_start_end", "paper"),
        ("bpe", "aiayn_first_multihead"),
        ("re", "prelayernorm_nfirst_max"),
        ("bytelevel", "xlm_sqrt_codes_multihead_cands"),
        ("bytelevel_noprefix", "biencoder_separate_mean"),
    ] {
        let expected = load_json(&r.root.join(format!("tokens-{dict}.json")));
        let texts: Vec<String> = serde_json::from_value(expected["texts"].clone()).unwrap();
        assert!(texts.len() >= 10_000, "{} texts", texts.len());
        let want = ids(&expected["ids"]);
        let ours = ParlaiText::load(&r.root.join(variant).join("polyrank")).unwrap();
        assert_eq!(ours.len() as u64, expected["size"].as_u64().unwrap(), "{dict}: dictionary size");
        let mut differ = vec![];
        for (text, want) in texts.iter().zip(&want) {
            let got: Vec<u32> = ours.txt2vec(text).iter().map(|t| t.id).collect();
            if &got != want {
                differ.push(format!("{text:?}: ParlAI {want:?}, polyrank {got:?}"));
            }
        }
        assert!(differ.is_empty(), "{dict}: {} of {} texts differ, e.g.\n{}", differ.len(), texts.len(), differ[..differ.len().min(5)].join("\n"));
    }
}

#[test]
fn imported_models_compute_what_parlai_computes() {
    let _g = tch::no_grad_guard();
    let r = reference();
    let contexts: Vec<Vec<String>> = serde_json::from_value(r.spec["contexts"].clone()).unwrap();
    let candidates: Vec<String> = serde_json::from_value(r.spec["candidates"].clone()).unwrap();
    for v in VARIANTS {
        let reference = load_json(&r.root.join(v).join("reference.json"));
        let ranker = Ranker::load(&r.root.join(v).join("polyrank"), Device::Cpu).unwrap();
        // Turns as the server gets them: each tokenized alone, as ParlAI's history does.
        let joined: Vec<String> = contexts.iter().map(|t| ranker.text.join_turns(t)).collect();
        let ctx_enc = ranker.tokenize(&joined, TextKind::Context).unwrap();
        let cand_enc = ranker.tokenize(&candidates, TextKind::Candidate).unwrap();
        let got_ctx: Vec<Vec<u32>> = ctx_enc.iter().map(|e| e.get_ids().to_vec()).collect();
        let got_cand: Vec<Vec<u32>> = cand_enc.iter().map(|e| e.get_ids().to_vec()).collect();
        assert_eq!(got_ctx, ids(&reference["context_ids"]), "{v}: context ids (history joined, truncated, start/end)");
        assert_eq!(got_cand, ids(&reference["candidate_ids"]), "{v}: candidate ids");

        // Batched as the server batches: contexts and candidates of different lengths padded.
        let codes = ranker.context_codes(&ctx_enc, 8);
        let cands = ranker.candidate_vectors(&cand_enc, 8);
        let want_mask = tensor(&reference["ctxt_mask"]).to_kind(Kind::Bool);
        assert!(codes.mask.to_kind(Kind::Bool).equal(&want_mask), "{v}: context code mask");
        // n_first pads short contexts with masked zero vectors; ParlAI's padding rows hold
        // whatever the encoder left there. Only unmasked codes take part in scoring.
        let keep = want_mask.unsqueeze(-1).to_kind(Kind::Float);
        let d_codes = max_diff(&(&codes.y * &keep), &(tensor(&reference["ctxt_rep"]) * &keep));
        let d_cands = max_diff(&cands, &tensor(&reference["cand_rep"]));
        let scores = ranker.model.score(&codes, &cands);
        let want_scores = tensor(&reference["scores"]);
        let d_scores = max_diff(&scores, &want_scores);
        eprintln!("{v}: max |Δ| codes {d_codes:.2e}, candidates {d_cands:.2e}, scores {d_scores:.2e}");
        assert!(d_codes < 1e-4 && d_cands < 1e-4 && d_scores < 1e-4, "{v}: codes {d_codes}, candidates {d_cands}, scores {d_scores}");
        let order = |s: &Tensor| -> Vec<Vec<i64>> {
            (0..s.size()[0]).map(|b| Vec::<i64>::try_from(s.get(b).argsort(0, true)).unwrap()).collect()
        };
        assert_eq!(order(&scores), order(&want_scores), "{v}: ranking of the fixed candidates");
    }
}

#[test]
fn a_served_import_ranks_like_parlais_own_fixed_candidate_agent() {
    let r = reference();
    let candidates: Vec<String> = serde_json::from_value(r.spec["candidates"].clone()).unwrap();
    let fixed: Vec<String> = serde_json::from_value(r.spec["fixed_contexts"].clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool.txt");
    std::fs::write(&pool, candidates.join("\n") + "\n").unwrap();
    // Mean and first pooling: ParlAI's batched candidate encoding equals the unpadded one.
    for v in ["paper", "aiayn_first_multihead", "xlm_sqrt_codes_multihead_cands", "biencoder_shared_first", "biencoder_separate_mean"] {
        let reference = load_json(&r.root.join(v).join("reference.json"));
        let setup = common::server::Setup::new(&r.root.join(v).join("polyrank"), &pool, &dir.path().join(format!("cache-{v}")))
            .arg("--scoring-precision", "float32");
        let server = common::server::Server::start(&setup);
        server.wait_ready();
        for (i, text) in fixed.iter().enumerate() {
            // One message, as ParlAI's agent observed it (its `\n` inside the one turn).
            let (status, body) = server.post("/rank", &json!({"context": text, "top_k": 10, "return_text": true}));
            assert_eq!(status, 200, "{body}");
            let got: Vec<&str> = body["results"].as_array().unwrap().iter().map(|h| h["text"].as_str().unwrap()).collect();
            let want: Vec<&str> = reference["fixed_top10"][i].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
            assert_eq!(got, want, "{v}: top-10 for {text:?}");
        }
        let (_, info) = server.get("/info");
        assert!(info.contains("parlai_transformer"), "/info names the encoder family: {info}");
    }
}

#[test]
fn options_polyrank_cannot_serve_are_refused_by_name() {
    let r = reference();
    let src = r.root.join("paper");
    let cases = [
        ("variant", json!("bart")),
        ("dict_tokenizer", json!("gpt2")),
        ("model", json!("transformer/crossencoder")),
        ("reduction_type", json!("none")),
        ("person_tokens", json!(true)),
        ("activation", json!("swish")),
    ];
    // The import's error for `src`'s model file with one option of its .opt changed.
    let refused = |src: &Path, key: &str, value: &Value| -> String {
        let dir = tempfile::tempdir().unwrap();
        for f in ["model", "model.dict", "model.dict.codecs"] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        let mut opt = load_json(&src.join("model.opt"));
        opt[key] = value.clone();
        std::fs::write(dir.path().join("model.opt"), opt.to_string()).unwrap();
        import(&dir.path().join("model"), &dir.path().join("out")).expect_err(key)
    };
    for (key, value) in cases {
        let err = refused(&src, key, &value);
        assert!(err.contains(&format!("`{key}`")) && err.contains(&value.to_string().trim_matches('"').to_string()), "{key}: {err}");
    }
    // Bi-encoder options with no one ParlAI answer to reproduce.
    let src = r.root.join("biencoder_shared_first");
    for (key, value) in [("normalize_sent_emb", json!(true)), ("use_memories", json!(true))] {
        let err = refused(&src, key, &value);
        assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
    }
    // A file that is not a ParlAI model at all.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model"), b"not a checkpoint").unwrap();
    std::fs::copy(src.join("model.opt"), dir.path().join("model.opt")).unwrap();
    std::fs::copy(src.join("model.dict"), dir.path().join("model.dict")).unwrap();
    let err = import(&dir.path().join("model"), &dir.path().join("out")).unwrap_err();
    assert!(err.contains("not a ParlAI model file"), "{err}");
}

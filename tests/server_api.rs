//! The real server on a loopback port with a tiny generated model: every route, every error
//! status, each response checked against openapi.yaml.

mod common;
use common::contract::Contract;
use common::server::{tiny_setup, Server, Setup};
use serde_json::{json, Value};

struct Fixture {
    _dir: tempfile::TempDir,
    setup: Setup,
}

fn fixture(pool_size: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let setup = tiny_setup(dir.path(), pool_size, 11);
    Fixture { _dir: dir, setup }
}

/// Sends a request and checks the response against the contract.
fn call(s: &Server, c: &Contract, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let req = match method {
        "post" => s.client.post(s.url(path)).json(body.unwrap()),
        _ => s.client.get(s.url(path)),
    };
    let r = req.send().unwrap();
    let status = r.status().as_u16();
    let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let text = r.text().unwrap();
    let media = ct.split(';').next().unwrap().trim().to_string();
    let value = if media == "application/json" { serde_json::from_str(&text).unwrap() } else { Value::String(text) };
    c.check(path, method, status, &media, &value);
    (status, value)
}

fn raw_post(s: &Server, path: &str, content_type: &str, body: impl Into<reqwest::blocking::Body>) -> (u16, Value) {
    let r = s.client.post(s.url(path)).header("content-type", content_type).body(body).send().unwrap();
    (r.status().as_u16(), r.json().unwrap_or(Value::Null))
}

fn ids(v: &Value) -> Vec<String> {
    v["results"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_string()).collect()
}

fn scores(v: &Value) -> Vec<f64> {
    v["results"].as_array().unwrap().iter().map(|r| r["score"].as_f64().unwrap()).collect()
}

#[test]
fn every_route_answers_as_documented() {
    let f = fixture(300);
    let s = Server::start(&f.setup);
    s.wait_ready();
    let c = Contract::load();
    assert_eq!(
        c.paths(),
        ["/candidates", "/candidates/{id}", "/encode", "/health/live", "/health/ready", "/info", "/metrics", "/openapi.yaml", "/rank"]
    );

    // Pool ranking: top_k results, best first, text on request.
    let (st, v) = call(&s, &c, "post", "/rank", Some(&json!({"context": "i like pizza", "top_k": 5, "return_text": true})));
    assert_eq!(st, 200);
    let sc = scores(&v);
    assert_eq!(sc.len(), 5);
    assert!(sc.windows(2).all(|w| w[0] >= w[1]), "not sorted: {sc:?}");
    assert!(v["results"][0]["text"].as_str().unwrap().starts_with("i like"));
    let top = ids(&v);

    // Without return_text, no text; default top_k is 10.
    let (_, v) = call(&s, &c, "post", "/rank", Some(&json!({"context": "i like pizza"})));
    assert_eq!(ids(&v).len(), 10);
    assert!(v["results"][0].get("text").is_none());
    assert_eq!(ids(&v)[..5], top[..]);

    // A subset of the pool by id: only those ids come back, scored as in the full ranking.
    let subset = vec![top[2].clone(), "c7".into(), top[0].clone()];
    let (st, v) = call(&s, &c, "post", "/rank", Some(&json!({"context": "i like pizza", "ids": subset, "top_k": 10})));
    assert_eq!(st, 200);
    let got = ids(&v);
    assert_eq!(got.len(), 3);
    assert_eq!(got[0], top[0]);
    assert!(got.contains(&"c7".to_string()));

    // Approximate mode with a preselection larger than the pool is the exact ranking.
    let (st, v) = call(&s, &c, "post", "/rank", Some(&json!({"context": "i like pizza", "top_k": 5, "approximate": true})));
    assert_eq!(st, 200);
    assert_eq!(ids(&v), top);

    // Inline candidates: ids are positions, scores match the same texts from the pool.
    let (_, full) = call(&s, &c, "post", "/rank", Some(&json!({"context": "i like pizza", "top_k": 3, "return_text": true})));
    let texts: Vec<String> = full["results"].as_array().unwrap().iter().map(|r| r["text"].as_str().unwrap().into()).collect();
    let inline: Vec<String> = texts.iter().rev().cloned().collect();
    let (st, v) = call(&s, &c, "post", "/rank", Some(&json!({"context": "i like pizza", "candidates": inline, "return_text": true})));
    assert_eq!(st, 200);
    assert_eq!(ids(&v), ["2", "1", "0"]);
    for (a, b) in scores(&v).iter().zip(scores(&full)) {
        assert!((a - b).abs() < 1e-4, "inline {a} vs pool {b}");
    }

    // Multi-turn: turns are joined, and a long history is cut from the left, so an extra
    // oldest turn changes nothing while the latest turns decide.
    let history = "the weather is bad ".repeat(40);
    let (_, a) = call(&s, &c, "post", "/rank", Some(&json!({"context": [history.clone(), "i like cats"], "top_k": 5})));
    let (_, b) = call(&s, &c, "post", "/rank", Some(&json!({"context": ["paris music guitar", history, "i like cats"], "top_k": 5})));
    assert_eq!(ids(&a), ids(&b));
    assert_eq!(scores(&a), scores(&b));
    let (_, two) = call(&s, &c, "post", "/rank", Some(&json!({"context": ["hello", "i like cats"], "top_k": 5})));
    let (_, one) = call(&s, &c, "post", "/rank", Some(&json!({"context": "i like cats", "top_k": 5})));
    assert_ne!(scores(&two), scores(&one), "earlier turns must count when they fit");

    // Encode.
    let (st, v) = call(&s, &c, "post", "/encode", Some(&json!({"texts": ["hello", "i like cats"], "kind": "candidate"})));
    assert_eq!(st, 200);
    assert_eq!(v["dim"], 32);
    assert_eq!(v["embeddings"].as_array().unwrap().len(), 2);
    assert_eq!(v["embeddings"][0].as_array().unwrap().len(), 32);
    let (st, v) = call(&s, &c, "post", "/encode", Some(&json!({"texts": ["hello"], "kind": "context"})));
    assert_eq!(st, 200);
    assert_eq!(v["m"], 8);
    assert_eq!(v["embeddings"][0].as_array().unwrap().len(), 8);
    assert_eq!(v["embeddings"][0][0].as_array().unwrap().len(), 32);

    // Oversized content under the default limits (2 MiB body, 20,000 characters, 1,000
    // inline candidates): refused with a reason, not truncated.
    let (st, v) = call(&s, &c, "post", "/rank", Some(&json!({"context": "x".repeat(100_000)})));
    assert_eq!((st, v["error_type"].as_str()), (422, Some("validation")));
    assert!(v["error"].as_str().unwrap().contains("100000 characters"), "{v}");
    let (st, v) = call(&s, &c, "post", "/rank", Some(&json!({"context": "hi", "candidates": vec!["ok"; 10_000]})));
    assert_eq!((st, v["error_type"].as_str()), (422, Some("validation")));
    assert!(v["error"].as_str().unwrap().contains("got 10000"), "{v}");

    // Probes, info, metrics, the document itself.
    assert_eq!(call(&s, &c, "get", "/health/live", None).0, 200);
    assert_eq!(call(&s, &c, "get", "/health/ready", None).1["status"], "ready");
    let (_, info) = call(&s, &c, "get", "/info", None);
    assert_eq!((info["n_codes"].as_i64(), info["dim"].as_i64(), info["pool_size"].as_i64()), (Some(8), Some(32), Some(300)));
    assert_eq!(info["trained"], false);
    let (st, text) = call(&s, &c, "get", "/metrics", None);
    assert_eq!(st, 200);
    let text = text.as_str().unwrap();
    for name in ["polyrank_requests_total{route=\"/rank\",status=\"200\"}", "stage=\"tokenize\"", "stage=\"queue\"", "stage=\"inference\"", "stage=\"score\"", "polyrank_pool_size 300"] {
        assert!(text.contains(name), "metrics lack {name}");
    }
    let (st, doc) = call(&s, &c, "get", "/openapi.yaml", None);
    assert_eq!(st, 200);
    assert_eq!(doc.as_str().unwrap(), std::fs::read_to_string(common::root().join("openapi.yaml")).unwrap());
}

#[test]
fn every_bad_request_gets_its_documented_error() {
    let f = fixture(50);
    let mut s = Server::start(&f.setup.arg("--max-top-k", "100").arg("--max-inline-candidates", "20").arg("--max-text-chars", "500").arg("--body-limit-bytes", "65536").arg("--approx-preselect", "5"));
    s.wait_ready();
    let c = Contract::load();
    let err = |st: u16, v: &Value, ty: &str| {
        assert_eq!(v["error_type"], ty, "{v}");
        assert!(!v["error"].as_str().unwrap().is_empty());
        st
    };
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"context": ""}), 422, "validation"),
        (json!({"context": "   "}), 422, "validation"),
        (json!({"context": []}), 422, "validation"),
        (json!({"context": ["ok", ""]}), 422, "validation"),
        (json!({"context": 5}), 422, "validation"),
        (json!({"context": "hi", "top_k": 0}), 422, "validation"),
        (json!({"context": "hi", "top_k": -3}), 422, "validation"),
        (json!({"context": "hi", "top_k": 101}), 422, "validation"),
        (json!({"context": "hi", "top_k": 1e30}), 422, "validation"),
        (json!({"context": "hi", "top_k": 2.5}), 422, "validation"),
        (json!({"context": "hi", "top_k": "3"}), 422, "validation"),
        (json!({"context": "hi", "candidates": []}), 422, "validation"),
        (json!({"context": "hi", "candidates": vec!["x"; 21]}), 422, "validation"),
        (json!({"context": "hi", "candidates": ["ok", ""]}), 422, "validation"),
        (json!({"context": "hi", "ids": ["c1", "nope"]}), 422, "validation"),
        (json!({"context": "hi", "ids": ["c1"], "candidates": ["a"]}), 422, "validation"),
        (json!({"context": "x".repeat(501)}), 422, "validation"),
        (json!({"context": "hi", "surprise": 1}), 422, "validation"),
        (json!({"top_k": 3}), 422, "validation"),
        (json!({"context": "hi", "ids": ["c1"], "approximate": true}), 422, "validation"),
        (json!({"context": "hi", "candidates": ["a"], "approximate": true}), 422, "validation"),
        (json!({"context": "hi", "ids": null}), 422, "validation"),
        (json!({"context": "hi", "top_k": null}), 422, "validation"),
    ];
    for (body, status, ty) in &cases {
        let (st, v) = call(&s, &c, "post", "/rank", Some(body));
        let shown: String = body.to_string().chars().take(200).collect();
        assert_eq!(st, *status, "{shown} → {v}");
        err(st, &v, ty);
        assert!(v["error"].as_str().unwrap().len() > 5);
    }
    for body in [json!({"texts": [], "kind": "context"}), json!({"texts": ["a"], "kind": "poem"}), json!({"texts": [""], "kind": "candidate"}), json!({"texts": ["a"]})] {
        let (st, v) = call(&s, &c, "post", "/encode", Some(&body));
        assert_eq!(err(st, &v, "validation"), 422, "{body}");
    }
    // Malformed JSON, invalid UTF-8, wrong content type, too large.
    let (st, v) = raw_post(&s, "/rank", "application/json", "{\"context\": ");
    assert_eq!(err(st, &v, "invalid_json"), 400);
    let (st, v) = raw_post(&s, "/rank", "application/json", vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}']);
    assert_eq!(err(st, &v, "invalid_json"), 400);
    c.check("/rank", "post", 400, "application/json", &v);
    let (st, v) = raw_post(&s, "/rank", "text/plain", "{\"context\": \"hi\"}");
    assert_eq!(err(st, &v, "unsupported_media_type"), 415);
    c.check("/rank", "post", 415, "application/json", &v);
    let big = json!({"context": "hi", "candidates": vec!["word ".repeat(100); 200]}).to_string();
    assert!(big.len() > 65536);
    let (st, v) = raw_post(&s, "/rank", "application/json", big);
    assert_eq!(err(st, &v, "payload_too_large"), 413);
    c.check("/rank", "post", 413, "application/json", &v);
    // The server does not read a body it refuses and closes that connection; a client that
    // reuses it may see it closed mid-request, so go on with a fresh client.
    s.client = reqwest::blocking::Client::builder().timeout(std::time::Duration::from_secs(120)).pool_idle_timeout(std::time::Duration::from_secs(2)).build().unwrap();
    // Unknown route and method: JSON errors too.
    let r = s.client.get(s.url("/nope")).send().unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(r.json::<Value>().unwrap()["error_type"], "not_found");
    let r = s.client.delete(s.url("/rank")).send().unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.json::<Value>().unwrap()["error_type"], "method_not_allowed");
    // Approximate mode scores only the preselected 5 rows exactly: 5 results, each with its
    // exact score.
    let (st, approx) = call(&s, &c, "post", "/rank", Some(&json!({"context": "i like cats", "top_k": 10, "approximate": true})));
    assert_eq!(st, 200);
    assert_eq!(ids(&approx).len(), 5);
    let (_, exact) = call(&s, &c, "post", "/rank", Some(&json!({"context": "i like cats", "ids": ids(&approx), "top_k": 10})));
    assert_eq!(ids(&exact), ids(&approx));
    for (a, b) in scores(&approx).iter().zip(scores(&exact)) {
        assert!((a - b).abs() < 1e-5);
    }
    // Still serving.
    assert_eq!(call(&s, &c, "post", "/rank", Some(&json!({"context": "hi"}))).0, 200);
}

#[test]
fn settings_come_from_file_then_env_then_flag() {
    let f = fixture(20);
    let base = f.setup.clone().env("POLYRANK_MAX_TOP_K", "77").env("POLYRANK_MAX_ENCODE_TEXTS", "9");
    let s = Server::start(&base.arg("--max-top-k", "55"));
    let (_, info) = s.get("/info");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["limits"]["max_top_k"], 55, "flag beats env");
    assert_eq!(info["limits"]["max_encode_texts"], 9, "env beats file");
    assert_eq!(info["limits"]["max_text_chars"], 20000, "file value");
    drop(s);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_polyrank")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in ["--model-dir", "--candidates", "--cache-dir", "--device", "--port", "--max-batch-tokens", "--queue-capacity", "--api-key", "POLYRANK_MAX_TOP_K"] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn api_key_guards_the_model_routes_and_leaves_probes_info_and_metrics_open() {
    let f = fixture(20);
    let s = Server::start(&f.setup.arg("--api-key", "s3cret"));
    s.wait_ready();
    let body = json!({"context": "hi"});
    assert_eq!(s.post("/rank", &body).0, 401);
    assert_eq!(s.post("/encode", &json!({"texts": ["a"], "kind": "candidate"})).0, 401);
    let r = s.client.post(s.url("/rank")).bearer_auth("wrong").json(&body).send().unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.json::<Value>().unwrap()["error_type"], "unauthorized");
    let r = s.client.post(s.url("/rank")).bearer_auth("s3cret").json(&body).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = s.client.post(s.url("/rank")).header("x-api-key", "s3cret").json(&body).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    for open in ["/health/live", "/health/ready", "/metrics", "/info"] {
        assert_eq!(s.get(open).0, 200, "{open}");
    }
    drop(s);
    // The same through the environment.
    let f = fixture(20);
    let s = Server::start(&f.setup.env("POLYRANK_API_KEY", "envkey"));
    s.wait_ready();
    assert_eq!(s.post("/rank", &body).0, 401);
    let r = s.client.post(s.url("/rank")).bearer_auth("envkey").json(&body).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

/// `"explain": true`: each result's heaviest context vectors are those its own attention
/// weights most, recomputed here from `/encode`'s context vectors y_i and candidate vector c
/// (basic attention: w_i = softmax_i(c·y_i), score = c·Σ w_i y_i); the tokens are the
/// context's own; nothing else of the answer moves, and a request without it carries none.
#[test]
fn explain_names_the_context_vectors_and_tokens_a_result_read() {
    let f = fixture(200);
    let s = Server::start(&f.setup);
    s.wait_ready();
    let c = Contract::load();
    let joined = "do you like music? i like cats and dogs".to_string();
    let context = json!(joined);
    let (_, plain) = call(&s, &c, "post", "/rank", Some(&json!({"context": context, "top_k": 8, "return_text": true})));
    let (st, v) = call(&s, &c, "post", "/rank", Some(&json!({"context": context, "top_k": 8, "return_text": true, "explain": true})));
    assert_eq!(st, 200, "{v}");
    assert!(plain["results"][0].get("explain").is_none(), "explain is off by default: {plain}");
    assert_eq!(ids(&v), ids(&plain));
    assert_eq!(scores(&v), scores(&plain));

    let (_, ctx) = call(&s, &c, "post", "/encode", Some(&json!({"texts": [joined], "kind": "context"})));
    let y: Vec<Vec<f64>> = ctx["embeddings"][0].as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()).collect();
    let texts: Vec<String> = v["results"].as_array().unwrap().iter().map(|r| r["text"].as_str().unwrap().to_string()).collect();
    let (_, cands) = call(&s, &c, "post", "/encode", Some(&json!({"texts": texts, "kind": "candidate"})));
    let words: String = joined.to_lowercase();
    for (i, result) in v["results"].as_array().unwrap().iter().enumerate() {
        let cv: Vec<f64> = cands["embeddings"][i].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let logits: Vec<f64> = y.iter().map(|yi| yi.iter().zip(&cv).map(|(a, b)| a * b).sum()).collect();
        let max = logits.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
        let w: Vec<f64> = logits.iter().map(|l| (l - max).exp() / z).collect();
        let score: f64 = w.iter().zip(&logits).map(|(a, b)| a * b).sum();
        let mut order: Vec<usize> = (0..w.len()).collect();
        order.sort_by(|&a, &b| w[b].total_cmp(&w[a]));

        let ex = result["explain"].as_array().unwrap_or_else(|| panic!("no explain: {result}"));
        assert_eq!(ex.len(), 3, "{result}");
        // The recomputation is the served model's: its score is the served score.
        let served = result["score"].as_f64().unwrap();
        assert!((served - score).abs() <= 1e-4 * score.abs().max(1.0), "recomputed score {score}, served {served}");
        for (rank, code) in ex.iter().enumerate() {
            let k = code["code"].as_u64().unwrap() as usize;
            let weight = code["weight"].as_f64().unwrap();
            assert!((weight - w[k]).abs() < 1e-4, "code {k}: served weight {weight}, recomputed {}", w[k]);
            assert!((w[order[rank]] - weight).abs() < 1e-4, "rank {rank} should weigh {} (code {}), got code {k} at {weight}", w[order[rank]], order[rank]);
            let tokens = code["tokens"].as_array().unwrap();
            assert!(!tokens.is_empty() && tokens.len() <= 5, "{code}");
            let tw: Vec<f64> = tokens.iter().map(|t| t["weight"].as_f64().unwrap()).collect();
            assert!(tw.windows(2).all(|p| p[0] >= p[1]) && tw.iter().sum::<f64>() <= 1.0 + 1e-4, "token weights {tw:?}");
            for t in tokens {
                let tok = t["token"].as_str().unwrap();
                let bare = tok.trim_start_matches("##");
                assert!(tok.starts_with('[') || words.contains(bare), "token {tok:?} is not from the context {joined:?}");
            }
        }
    }

    // The same texts given inline explain alike (their vectors are encoded per request).
    let (st, inline) = call(&s, &c, "post", "/rank", Some(&json!({"context": context, "candidates": texts[..3], "explain": true})));
    assert_eq!(st, 200, "{inline}");
    for r in inline["results"].as_array().unwrap() {
        let pos: usize = r["id"].as_str().unwrap().parse().unwrap();
        let a = &r["explain"];
        let b = &v["results"][pos]["explain"];
        for (x, y) in a.as_array().unwrap().iter().zip(b.as_array().unwrap()) {
            assert_eq!(x["code"], y["code"]);
            assert!((x["weight"].as_f64().unwrap() - y["weight"].as_f64().unwrap()).abs() < 1e-4);
        }
    }

    // Bounded: more than 100 explained results is refused with a reason.
    let (st, e) = call(&s, &c, "post", "/rank", Some(&json!({"context": "hi", "top_k": 101, "explain": true})));
    assert_eq!((st, e["error_type"].as_str()), (422, Some("validation")), "{e}");
    assert!(e["error"].as_str().unwrap().contains("explain"), "{e}");
}

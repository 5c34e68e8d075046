//! No request within the limits may stall the service: cost-bounded admission, chunked and
//! cancellable encoding, inline candidates batched across requests, settings checked at
//! startup, clean exits, cache-directory hygiene, and quiet probes. And none may take it down
//! (issue 24): bounded candidate meta and answers, connections that time out, probes that
//! answer while descriptors are under attack.

mod common;
use common::server::{tiny_setup, unsafe_kill, Server, Setup};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The real default model over the first 300 candidates of the default pool.
fn real_setup(dir: &Path) -> Setup {
    let text = std::fs::read_to_string(common::root().join("data/chitchat-pool.jsonl")).expect("run `make model`");
    let pool = dir.join("pool.jsonl");
    std::fs::write(&pool, text.lines().take(300).collect::<Vec<_>>().join("\n")).unwrap();
    Setup::new(&common::default_model(), &pool, &dir.join("cache"))
}

/// A text of about `chars` characters in plain English words (about 256 tokens per 1,100).
fn long_text(seed: usize, chars: usize) -> String {
    let words = ["the", "weather", "today", "is", "lovely", "and", "we", "walked", "along", "river", "talking", "about", "music"];
    let mut s = String::new();
    let mut i = seed;
    while s.len() < chars {
        s += words[i % words.len()];
        s.push(' ');
        i = i * 7 + 3;
    }
    s
}

fn timed_post(s: &Server, body: &Value) -> (u16, Value, f64) {
    let t = Instant::now();
    let (st, v) = s.post("/rank", body);
    (st, v, t.elapsed().as_secs_f64())
}

#[test]
fn the_dearest_admissible_request_does_not_stall_others_and_a_dearer_one_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&real_setup(dir.path()));
    s.wait_ready();
    // 63 candidates truncated at 256 tokens + a short context: just under the 16,384-token
    // default budget, the most the model can be asked in one request.
    let dear = json!({"context": "which one is about music?", "candidates": (0..63).map(|i| long_text(i, 1600)).collect::<Vec<_>>(), "top_k": 3});
    let (st, v, _) = timed_post(&s, &json!({"context": "hi", "top_k": 2}));
    assert_eq!(st, 200, "{v}");
    let (dear_result, plain) = std::thread::scope(|scope| {
        let h = scope.spawn(|| timed_post(&s, &dear));
        std::thread::sleep(Duration::from_millis(400)); // the dear request is being encoded
        let plain: Vec<(u16, f64)> = (0..3)
            .map(|_| {
                let (st, _, secs) = timed_post(&s, &json!({"context": "hi", "top_k": 2}));
                (st, secs)
            })
            .collect();
        (h.join().unwrap(), plain)
    });
    eprintln!("dear request: {} in {:.2} s; plain requests meanwhile: {plain:?}", dear_result.0, dear_result.2);
    assert_eq!(dear_result.0, 200, "{}", dear_result.1);
    assert!(dear_result.2 > 1.0, "the dear request was not dear ({:.2} s): the test measures nothing", dear_result.2);
    for (st, secs) in plain {
        assert_eq!(st, 200);
        assert!(secs < 2.0, "a plain /rank took {secs:.2} s while the dear request ran");
    }

    // The case: 1,000 candidates of ~2,080 characters (a 2.08 MB body, under the
    // 2 MiB limit): refused before any tokenizing or encoding, with the cost and the budget.
    let huge = json!({"context": "hi", "candidates": (0..1000).map(|i| long_text(i, 2080)).collect::<Vec<_>>()});
    let body = serde_json::to_vec(&huge).unwrap();
    assert!(body.len() < 2 * 1024 * 1024);
    let t = Instant::now();
    let r = s.client.post(s.url("/rank")).header("content-type", "application/json").body(body).send().unwrap();
    let secs = t.elapsed().as_secs_f64();
    let status = r.status().as_u16();
    let v: Value = r.json().unwrap();
    eprintln!("inadmissible request: {status} in {:.1} ms: {}", secs * 1e3, v["error"]);
    assert_eq!((status, v["error_type"].as_str()), (422, Some("validation")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("16384"), "the message names the budget: {v}");
    assert!(secs < 0.1, "refusing took {secs:.3} s");
    // Over the budget only once tokenized (long words split into many word pieces, so the
    // cheap bound lets it through): refused after tokenizing, with the exact cost.
    let pieces = "antidisestablishmentarianism ".repeat(60);
    let over = json!({"context": "hi", "candidates": vec![pieces; 64]});
    let (st, v) = s.post("/rank", &over);
    assert_eq!(st, 422, "{v}");
    assert!(v["error"].as_str().unwrap().contains("costs 16387 tokens"), "64 × 256 + [CLS] hi [SEP]: {v}");
    let (st, v) = s.post("/encode", &json!({"kind": "candidate", "texts": (0..100).map(|i| long_text(i, 1600)).collect::<Vec<_>>()}));
    assert_eq!(st, 422, "/encode has the same budget: {v}");
}

#[test]
fn a_timed_out_request_frees_the_model_and_sigterm_then_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&real_setup(dir.path()).arg("--request-timeout-ms", "1000"));
    s.wait_ready();
    let dear = json!({"context": "music?", "candidates": (0..63).map(|i| long_text(i, 1600)).collect::<Vec<_>>()});
    let (st, v, secs) = timed_post(&s, &dear);
    assert_eq!((st, v["error_type"].as_str()), (503, Some("timeout")), "{v}");
    // The abandoned work stops at its next chunk: the model is free again at once.
    let (st, _, after) = timed_post(&s, &json!({"context": "hi", "top_k": 2}));
    eprintln!("timed out after {secs:.2} s; the next plain /rank took {:.0} ms", after * 1e3);
    assert_eq!(st, 200);
    assert!(after < 1.0, "the next request waited {after:.2} s for abandoned work");
    // Now the encoding rate is known: the same request cannot finish inside its second, so
    // it is refused at once (429, retry later) instead of being queued to time out.
    let (st, v, secs) = timed_post(&s, &dear);
    assert_eq!((st, v["error_type"].as_str()), (429, Some("overloaded")), "{v}");
    assert!(secs < 0.5, "refused after {secs:.2} s");
    drop(s);

    // SIGTERM while the inference thread works on a request past its deadline: the drain
    // ends with the 503, the thread stops at its next chunk, the process exits 0, no panic.
    let s = Server::start(&real_setup(dir.path()).arg("--request-timeout-ms", "1000"));
    s.wait_ready();
    let pid = s.child.id() as i32;
    let st = std::thread::scope(|scope| {
        let h = scope.spawn(|| timed_post(&s, &dear).0);
        std::thread::sleep(Duration::from_millis(400));
        unsafe_kill(pid, "TERM");
        h.join().unwrap()
    });
    assert_eq!(st, 503);
    let (status, logs) = s.terminate_with_logs();
    assert_eq!(status.code(), Some(0), "{status}\n{logs}");
    assert!(!logs.contains("panicked") && logs.contains("stopped"), "{logs}");
}

#[test]
fn inline_candidates_of_concurrent_requests_share_one_encoder_pass() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&real_setup(dir.path()));
    s.wait_ready();
    let body = |i: usize| {
        json!({"context": format!("what do you do on weekend number {i}?"), "candidates": (0..5).map(|j| format!("reply {j} to request {i}: I like hiking and reading")).collect::<Vec<_>>(), "top_k": 5})
    };
    for i in 0..4 {
        assert_eq!(s.post("/rank", &body(1000 + i)).0, 200); // warm-up
    }
    let t = Instant::now();
    for i in 0..32 {
        let (st, v) = s.post("/rank", &body(i));
        assert_eq!(st, 200, "{v}");
    }
    let sequential = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (s, body) = (&s, &body);
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..32).map(|i| scope.spawn(move || s.post("/rank", &body(100 + i)).0)).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let concurrent = t.elapsed().as_secs_f64();
    eprintln!("32 requests × 5 inline candidates: one after another {sequential:.2} s, concurrently {concurrent:.2} s ({:.2}×)", sequential / concurrent);
    assert_eq!(statuses, vec![200; 32]);
    assert!(sequential / concurrent >= 1.5, "concurrent {concurrent:.2} s vs sequential {sequential:.2} s");
    // The encoding is booked under inference, not score.
    let inference = s.metric("polyrank_stage_duration_seconds_sum{stage=\"inference\"}").unwrap();
    let score = s.metric("polyrank_stage_duration_seconds_sum{stage=\"score\"}").unwrap();
    assert!(inference > 5.0 * score, "inference {inference} s vs score {score} s");
}

fn polyrank(args: &[&str], setup: &Setup) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_polyrank"))
        .current_dir(common::root())
        .arg("serve")
        .args(["--host", "127.0.0.1", "--model-dir", setup.model.to_str().unwrap(), "--candidates", setup.pool.to_str().unwrap(), "--cache-dir", setup.cache.to_str().unwrap()])
        .args(args)
        .env_remove("POLYRANK_API_KEY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_settings_fail_the_start_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let setup = tiny_setup(dir.path(), 50, 3);
    let cases: &[(&[&str], &str)] = &[
        (&["--threads", "100000"], "threads = 100000"),
        (&["--threads", "64"], "per core"),
        (&["--max-batch-tokens", "0"], "max_batch_tokens must be at least 1"),
        (&["--request-timeout-ms", "0"], "request_timeout_ms must be at least 1"),
        (&["--body-limit-bytes", "0"], "body_limit_bytes must be at least 1"),
        (&["--max-text-chars", "0"], "max_text_chars must be at least 1"),
        (&["--max-request-tokens", "10"], "max_request_tokens = 10"),
        (&["--device", "cuda:7"], "device `cuda:7`: this host has"),
        (&["--device", "tpu"], "expected cpu, cuda or cuda:N"),
        (&["--max-meta-keys", "0"], "max_meta_keys must be at least 1"),
        (&["--max-connections", "0"], "max_connections must be at least 1"),
        (&["--keep-alive-timeout-ms", "20000"], "keep_alive_timeout_ms = 20000 is more than header_read_timeout_ms = 10000"),
    ];
    for (args, message) in cases {
        let (code, stderr) = polyrank(&[&["--port", "0"], *args].concat(), &setup);
        assert_eq!(code, Some(1), "{args:?} must fail the start with exit 1:\n{stderr}");
        assert!(stderr.contains(message), "{args:?}: expected `{message}` in:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}:\n{stderr}");
    }
}

#[test]
fn a_start_that_fails_during_pool_encoding_exits_1_every_time() {
    let dir = tempfile::tempdir().unwrap();
    // A pool big enough that its encoding is under way when the bind fails.
    let setup = tiny_setup(dir.path(), 40_000, 4);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    for attempt in 0..10 {
        let t = Instant::now();
        let (code, stderr) = polyrank(&["--port", &port], &setup);
        assert_eq!(code, Some(1), "attempt {attempt}: not exit 1 (a signal gives None):\n{stderr}");
        assert!(stderr.contains("binding 127.0.0.1:") && stderr.contains(&port), "attempt {attempt}:\n{stderr}");
        assert!(!stderr.contains("panicked"), "attempt {attempt}:\n{stderr}");
        assert!(!stderr.contains("pool encoded"), "attempt {attempt}: the pool finished first, the case was not exercised");
        assert!(t.elapsed() < Duration::from_secs(20));
    }
    drop(taken);
}

fn files(dir: &Path, pred: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).filter(|p| pred(&p.file_name().unwrap().to_string_lossy())).collect()
}

#[test]
fn stale_temp_files_and_superseded_caches_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let setup = tiny_setup(dir.path(), 200, 5);
    std::fs::create_dir_all(&setup.cache).unwrap();
    // A temp file left by a writer that is gone (a pid that cannot be running) and one of
    // this test process (alive): only the first is removed.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().replace(['/', '.'], "_");
    let dead = setup.cache.join(format!("abc.pool.tmp.{host}.4000000000"));
    let alive = setup.cache.join(format!("def.pool.tmp.{host}.{}", std::process::id()));
    // Another host's write in progress (its pid means nothing here): kept.
    let other_host = setup.cache.join("ghi.pool.tmp.otherhost.4000000000");
    std::fs::write(&other_host, b"partial").unwrap();
    std::fs::write(&dead, b"partial").unwrap();
    std::fs::write(&alive, b"partial").unwrap();
    // Four pools in turn with cache_keep = 2: the current file and the newest other remain.
    let mut seen = Vec::new();
    for n in 0..4 {
        let pool = dir.path().join(format!("pool{n}.jsonl"));
        common::server::write_pool(&pool, 100 + n);
        // A store of its own each time: the pool files only seed a new store (an existing
        // store takes just their changes, without the pool cache).
        let store = dir.path().join(format!("store{n}"));
        let s = Server::start(&Setup { pool, ..setup.clone() }.arg("--cache-keep", "2").arg("--store-dir", store.to_str().unwrap()));
        s.wait_ready();
        let current = files(&setup.cache, |n| n.ends_with(".pool"));
        seen.push(current.clone());
        drop(s);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!dead.exists(), "the dead writer's temp file is still there");
    assert!(alive.exists(), "a live writer's temp file was removed");
    assert!(other_host.exists(), "another host's recent temp file was removed");
    let last = files(&setup.cache, |n| n.ends_with(".pool"));
    assert_eq!(last.len(), 2, "{last:?} (history {seen:?})");
}

#[test]
fn probes_do_not_log_errors_and_duplicate_ids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let setup = tiny_setup(dir.path(), 30_000, 6);
    let s = Server::start(&setup.clone().env("POLYRANK_TEST_SLOW_CACHE_WRITE_MS", "1500"));
    let mut loading = 0;
    while s.get("/health/ready").0 == 503 {
        loading += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(loading >= 5, "readiness was 503 only {loading} times: the case was not exercised");
    let logs = s.logs();
    assert!(!logs.lines().any(|l| l.contains("ERROR")), "{loading} readiness polls during startup logged errors:\n{logs}");
    let (st, v) = s.post("/rank", &json!({"context": "hi", "ids": ["c1", "c2", "c1"]}));
    assert_eq!((st, v["error_type"].as_str()), (422, Some("validation")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("\"c1\""), "{v}");
    common::contract::Contract::load().check("/rank", "post", 422, "application/json", &v);
}

// ---- Issue 24: bounded meta, bounded answers, connection hygiene -------------------------------

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches("kB").trim().parse().unwrap();
    kb * 1024
}

/// The largest meta the defaults accept, and the dearest for the index: 64 top-level numeric
/// fields (each indexed twice: by value and in order) whose ~100-character names are new to
/// the index (`tag` makes them unique), 8,000+ bytes of JSON.
fn max_meta(tag: usize) -> Value {
    let mut m = serde_json::Map::new();
    for i in 0..64 {
        m.insert(format!("{tag:08}-{i:02}-{}", "x".repeat(100)), json!(tag * 64 + i));
    }
    let v = Value::Object(m);
    let n = serde_json::to_vec(&v).unwrap().len();
    assert!((7000..=8192).contains(&n), "max_meta is {n} bytes");
    v
}

fn info(s: &Server) -> Value {
    let (st, body) = s.get("/info");
    assert_eq!(st, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn meta_over_any_limit_refuses_the_whole_batch_and_ids_must_be_printable() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&tiny_setup(dir.path(), 50, 21));
    s.wait_ready();
    let contract = common::contract::Contract::load();
    let deep = (0..5).fold(json!(1), |v, _| json!({"d": v})); // the meta object + 5 levels
    let wide = Value::Object((0..100_000).map(|i| (format!("k{i}"), json!(i))).collect());
    let cases: Vec<(&str, Value, &str)> = vec![
        ("100,000 keys (the issue's 1.68 MB meta)", wide, "max_meta_keys"),
        ("65 keys over two levels", json!({"a": Value::Object((0..40).map(|i| (format!("a{i}"), json!(i))).collect()), "b": Value::Object((0..23).map(|i| (format!("b{i}"), json!(i))).collect())}), "max_meta_keys"),
        ("6 levels", deep, "max_meta_depth"),
        ("a 1.9 MB string", json!({"s": "x".repeat(1_900_000)}), "max_meta_string_chars"),
        ("a 2,000-character key", json!({"k".repeat(2000): 1}), "max_meta_string_chars"),
        ("9 KB of 16 strings", Value::Object((0..16).map(|i| (format!("s{i}"), json!("y".repeat(560)))).collect()), "max_meta_bytes"),
    ];
    for (what, meta, limit) in cases {
        let body = json!({"candidates": [{"id": "fine-1", "text": "a fine candidate", "meta": {"lang": "en"}}, {"id": "bad-1", "text": "i like pizza", "meta": meta}]});
        let t = Instant::now();
        let (st, v) = s.post("/candidates", &body);
        let secs = t.elapsed().as_secs_f64();
        eprintln!("{what}: {st} in {:.0} ms: {}", secs * 1e3, v["error"]);
        assert_eq!((st, v["error_type"].as_str()), (422, Some("validation")), "{what}: {v}");
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(limit) && msg.contains("candidates[1].meta"), "{what}: the message names the limit and the candidate: {msg}");
        assert!(secs < 1.0, "{what}: refusing took {secs:.2} s");
        contract.check("/candidates", "post", 422, "application/json", &v);
        assert_eq!(s.send("get", "/candidates/fine-1", None).0, 404, "{what}: nothing of the batch was applied");
    }
    // At the limits exactly: accepted.
    let at_limits = json!({"candidates": [{"id": "edge", "text": "i like cats", "meta": {"a": {"b": {"c": "z".repeat(1024)}}, "n": 1}}, {"id": "widest", "text": "i like dogs", "meta": max_meta(7)}]});
    let (st, v) = s.post("/candidates", &at_limits);
    assert_eq!(st, 200, "{v}");
    assert_eq!(info(&s)["pool_size"], 52);

    for (what, id) in [("NUL", "a\u{0}b"), ("a newline", "a\nb"), ("a tab", "a\tb"), ("DEL", "a\u{7f}"), ("a C1 control", "a\u{85}b"), ("RLO", "invoice\u{202E}fdp.exe"), ("an isolate", "a\u{2066}b"), ("RLM", "a\u{200F}"), ("a line separator", "a\u{2028}b")] {
        let (st, v) = s.post("/candidates", &json!({"candidates": [{"id": id, "text": "i like rain"}]}));
        assert_eq!((st, v["error_type"].as_str()), (422, Some("validation")), "an id with {what}: {v}");
        assert!(v["error"].as_str().unwrap().contains("U+"), "{what}: {v}");
        contract.check("/candidates", "post", 422, "application/json", &v);
    }
    let (st, v) = s.post("/candidates", &json!({"candidates": [{"id": "ünïcödé-id 名前 😀", "text": "i like sun"}]}));
    assert_eq!(st, 200, "printable non-ASCII ids are fine: {v}");
}

#[test]
fn max_size_metas_keep_memory_bounded_answers_are_bounded_and_deletes_give_memory_back() {
    let dir = tempfile::tempdir().unwrap();
    // A long time budget: admission refuses a large write (429) when the encoding rate it
    // measured says it cannot finish in time, and on a crowded machine that rate can be low.
    let s = Server::start(&tiny_setup(dir.path(), 50, 22).arg("--request-timeout-ms", "120000"));
    s.wait_ready();
    let pid = s.child.id();
    let cand = |i: usize| json!({"id": format!("m{i}"), "text": format!("i like music {i}"), "meta": max_meta(i)});
    // Warm-up: the first write grows buffers that stay.
    assert_eq!(s.post("/candidates", &json!({"candidates": [cand(999_999)]})).0, 200);
    assert_eq!(s.send("delete", "/candidates", Some(&json!({"ids": ["m999999"]}))).0, 200);
    let index0 = info(&s)["meta_index"].clone();
    let base = rss(pid);

    // The attack, at the largest meta the limits let through: 20 requests of one
    // candidate each (before: ~165 MB each).
    for i in 0..20 {
        let (st, v) = s.post("/candidates", &json!({"candidates": [cand(i)]}));
        assert_eq!(st, 200, "{v}");
    }
    let after20 = rss(pid);
    let grown20 = after20.saturating_sub(base) as f64 / 1e6;
    eprintln!("20 max-size metas: RSS {:.1} → {:.1} MB (+{grown20:.2} MB); index {}", base as f64 / 1e6, after20 as f64 / 1e6, info(&s)["meta_index"]);
    assert!(grown20 < 16.0, "20 accepted max-size metas grew RSS by {grown20:.1} MB (bound: 16 MB)");

    // 1,000 more, in requests of 125 (1 MB bodies): memory in proportion, and /info agrees.
    for b in 0..8 {
        let batch: Vec<Value> = (0..125).map(|j| cand(20 + b * 125 + j)).collect();
        let (st, v) = s.post("/candidates", &json!({"candidates": batch}));
        assert_eq!(st, 200, "{v}\n{}", s.logs());
    }
    let full = rss(pid);
    let idx = info(&s)["meta_index"].clone();
    let grown = full.saturating_sub(base) as f64;
    eprintln!("1,020 max-size metas: RSS +{:.1} MB; index estimate {:.1} MB ({} fields, {} unindexed)", grown / 1e6, idx["bytes"].as_f64().unwrap() / 1e6, idx["fields"], idx["unindexed"]);
    assert_eq!(idx["fields"], 64 * 1020 + 1, "every field of every meta indexed, plus the pool's `n`");
    assert_eq!(s.metric("polyrank_meta_index_bytes"), idx["bytes"].as_f64(), "the gauge says what /info says");
    assert!(idx["bytes"].as_f64().unwrap() <= idx["max_bytes"].as_f64().unwrap());
    // The estimate /info reports is the memory the index really takes (the rest of the growth
    // is the meta itself, about a tenth).
    let ratio = idx["bytes"].as_f64().unwrap() / grown;
    assert!((0.7..=1.2).contains(&ratio), "index estimate / RSS growth = {ratio:.2}");

    // The answer is bounded too: 1,000 results with their meta (8 MB) are refused, at once.
    let t = Instant::now();
    let (st, v) = s.post("/rank", &json!({"context": "music", "top_k": 1000, "return_meta": true}));
    let secs = t.elapsed().as_secs_f64();
    eprintln!("top_k 1000 with meta: {st} in {:.0} ms: {}", secs * 1e3, v["error"]);
    assert_eq!((st, v["error_type"].as_str()), (422, Some("validation")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("max_response_bytes"), "{v}");
    common::contract::Contract::load().check("/rank", "post", 422, "application/json", &v);
    assert!(secs < 2.0, "refusing the answer took {secs:.2} s");
    let (st, v) = s.post("/rank", &json!({"context": "music", "top_k": 100, "return_meta": true}));
    assert_eq!(st, 200, "100 results with meta fit the default budget: {v}");
    assert_eq!(v["results"].as_array().unwrap().len(), 100);

    // Deleting them gives it back: the index to the byte, the process's memory within 10 %
    // of what they took.
    let ids: Vec<String> = (0..1020).map(|i| format!("m{i}")).collect();
    for chunk in ids.chunks(510) {
        let (st, v) = s.send("delete", "/candidates", Some(&json!({"ids": chunk})));
        assert_eq!((st, v["deleted"].as_u64()), (200, Some(510)), "{v}");
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = rss(pid);
    let left = after.saturating_sub(base) as f64;
    eprintln!("after deleting them: RSS {:.1} MB above the start ({:.1} % of the growth)", left / 1e6, 100.0 * left / grown);
    assert_eq!(info(&s)["meta_index"], index0, "the index is back where it started");
    assert!(left <= 0.10 * grown, "after the deletes RSS is {:.1} MB above the start, more than 10 % of the {:.1} MB the upserts took", left / 1e6, grown / 1e6);
}

#[test]
fn a_store_holding_meta_over_todays_limits_opens_and_serves_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let setup = tiny_setup(dir.path(), 50, 23).store(&store);
    // What an older version (no meta limits) could write: limits opened wide.
    let loose = setup.clone().arg("--max-meta-keys", "1000000").arg("--max-meta-bytes", "2000000").arg("--max-meta-depth", "100").arg("--max-meta-string-chars", "2000000");
    let mut big = serde_json::Map::new();
    for i in 0..5000 {
        big.insert(format!("k{i}"), json!(i));
    }
    big.insert("lang".into(), json!("en"));
    big.insert("deep".into(), (0..8).fold(json!("bottom"), |v, _| json!({"d": v})));
    let big = Value::Object(big);
    let s = Server::start(&loose);
    s.wait_ready();
    let body = json!({"candidates": [{"id": "big", "text": "i like books", "meta": big}, {"id": "small", "text": "i like paris", "meta": {"lang": "en"}}]});
    assert_eq!(s.post("/candidates", &body).0, 200);
    assert!(s.terminate().success());

    // Today's defaults: the store opens, the candidate is kept whole, with a warning.
    let s = Server::start(&setup);
    s.wait_ready();
    let logs = s.logs();
    assert!(logs.contains("over the meta limits were kept"), "{logs}");
    assert!(!logs.contains("panicked"), "{logs}");
    let idx = info(&s)["meta_index"].clone();
    assert_eq!(idx["unindexed"], 1, "{idx}");
    let (st, v) = s.send("get", "/candidates/big", None);
    assert_eq!(st, 200);
    assert_eq!(v["meta"], body["candidates"][0]["meta"], "its meta is served as stored");
    // Filters find it on any field, indexed or not, and only where it matches.
    let ids = |filter: Value| -> Vec<String> {
        let (st, v) = s.post("/rank", &json!({"context": "hi", "top_k": 100, "filter": filter}));
        assert_eq!(st, 200, "{v}");
        let mut ids = common::server::result_ids(&v);
        ids.sort();
        ids
    };
    assert_eq!(ids(json!({"lang": "en"})), ["big", "small"]);
    assert_eq!(ids(json!({"k4999": 4999})), ["big"]);
    assert_eq!(ids(json!({"k4999": {"$gte": 5000}})), Vec::<String>::new());
    assert_eq!(ids(json!({"n": 3})), ["c3"]);
    // The same meta is refused as a new write; deleting the old one frees its place.
    let (st, v) = s.post("/candidates", &json!({"candidates": [body["candidates"][0].clone()]}));
    assert_eq!((st, v["error_type"].as_str()), (422, Some("validation")), "{v}");
    assert_eq!(s.send("delete", "/candidates", Some(&json!({"ids": ["big"]}))).0, 200);
    assert_eq!(info(&s)["meta_index"]["unindexed"], 0);
}

/// Connects and sends half a request head (no blank line): the idle socket.
fn half_header(addr: &str) -> std::net::TcpStream {
    use std::io::Write;
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
    c
}

/// Whether the server has closed this socket (EOF or reset), without waiting.
fn closed(c: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    c.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a response before the close
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn idle_half_sent_headers_cannot_exhaust_descriptors_or_starve_the_probes() {
    let dir = tempfile::tempdir().unwrap();
    let setup = tiny_setup(dir.path(), 50, 24).nofile(1024).arg("--header-read-timeout-ms", "8000").arg("--keep-alive-timeout-ms", "6000");
    let s = Server::start(&setup);
    s.wait_ready();
    let addr = s.base.trim_start_matches("http://").to_string();
    let fresh = || reqwest::blocking::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(5)).build().unwrap();

    // The attack: 1,100 sockets that send half a header and go idle (ulimit -n 1024).
    let t0 = Instant::now();
    let mut slowest = 0f64;
    let mut idle: Vec<std::net::TcpStream> = (0..1100)
        .map(|_| {
            let t = Instant::now();
            let c = half_header(&addr);
            slowest = slowest.max(t.elapsed().as_secs_f64());
            c
        })
        .collect();
    eprintln!("1,100 half-header sockets open in {:.0} ms (slowest connect {:.0} ms)", t0.elapsed().as_secs_f64() * 1e3, slowest * 1e3);
    let opened = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..3 {
        let t = Instant::now();
        let r = fresh().get(s.url("/health/live")).send();
        let secs = t.elapsed().as_secs_f64();
        let st = r.as_ref().map(|r| r.status().as_u16()).unwrap_or(0);
        eprintln!("/health/live under attack, try {i}: {st} in {:.1} ms", secs * 1e3);
        assert_eq!(st, 200, "{r:?}");
        assert!(secs < 1.0, "/health/live took {secs:.2} s");
    }
    // Other routes past the cap: a clear 503, not a hang.
    let r = fresh().get(s.url("/info")).send().unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().unwrap();
    assert_eq!(v["error_type"], "overloaded", "{v}");
    common::contract::Contract::load().check("/info", "get", 503, "application/json", &v);

    // Every idle socket is closed after the keep-alive timeout (6 s after it was opened; those
    // past the cap at once), and then the server serves everyone again.
    let deadline = opened + Duration::from_millis(6000 + 2000);
    let open = loop {
        let open = idle.iter_mut().map(closed).filter(|&c| !c).count();
        if open == 0 || Instant::now() > deadline {
            break open;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("idle sockets still open {:.1} s after the last one was opened: {open}", opened.elapsed().as_secs_f64());
    assert_eq!(open, 0, "{open} of 1,100 idle sockets still open {:.1} s after the last one was opened", opened.elapsed().as_secs_f64());
    assert_eq!(info(&s)["pool_size"], 50);
    let logs = s.logs();
    assert!(!logs.contains("Too many open files") && !logs.contains("accept error"), "{logs}");

    // A header sent a byte at a time (slowloris) keeps the idle timer quiet; the header timer
    // (8 s) closes it.
    let mut slow = half_header(&addr);
    let t = Instant::now();
    let slow_secs = loop {
        use std::io::Write;
        if closed(&mut slow) {
            break t.elapsed().as_secs_f64();
        }
        assert!(t.elapsed() < Duration::from_secs(15), "a trickled header was never cut off");
        slow.set_nonblocking(false).unwrap();
        let _ = slow.write_all(b"x");
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!("trickled header closed after {slow_secs:.2} s");
    assert!((7.5..10.0).contains(&slow_secs), "closed after {slow_secs:.2} s, not by the 8 s header timer");

    // A kept-alive connection with nothing in flight is closed after 6 s of quiet, not before.
    let mut ka = std::net::TcpStream::connect(&addr).unwrap();
    {
        use std::io::{Read, Write};
        ka.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 1024];
        let n = ka.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    }
    let t = Instant::now();
    std::thread::sleep(Duration::from_millis(5000));
    assert!(!closed(&mut ka), "closed before the keep-alive timeout");
    while !closed(&mut ka) {
        assert!(t.elapsed() < Duration::from_secs(9), "an idle kept-alive connection was never closed");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("idle kept-alive connection closed after {:.2} s", t.elapsed().as_secs_f64());

    // And a cap that cannot fit the open-file limit fails the start, naming both.
    let out = Command::new("bash")
        .arg("-c")
        .arg("ulimit -n 1024 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_polyrank"))
        .current_dir(common::root())
        .args(["serve", "--port", "0", "--max-connections", "1000", "--model-dir", setup.model.to_str().unwrap(), "--candidates", setup.pool.to_str().unwrap()])
        .env_remove("POLYRANK_API_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("max_connections = 1000") && stderr.contains("open-file limit is 1024"), "{stderr}");
}

#[test]
fn the_key_scheme_is_case_insensitive_and_paths_stay_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let setup = tiny_setup(dir.path(), 50, 25).store(&store).arg("--api-key", "k-25");
    let s = Server::start(&setup);
    s.wait_ready();
    let rank = |auth: &str| {
        let r = s.client.post(s.url("/rank")).header("authorization", auth).json(&json!({"context": "hi", "top_k": 1})).send().unwrap();
        r.status().as_u16()
    };
    for auth in ["Bearer k-25", "bearer k-25", "BEARER k-25", "bEaReR  k-25"] {
        assert_eq!(rank(auth), 200, "{auth}");
    }
    for auth in ["Bearer k-26", "Basic k-25", "Bearerk-25", "k-25"] {
        assert_eq!(rank(auth), 401, "{auth}");
    }
    for (method, path) in [("post", "/candidates"), ("delete", "/candidates"), ("get", "/candidates/c1"), ("post", "/encode")] {
        assert_eq!(s.send(method, path, Some(&json!({}))).0, 401, "{method} {path} is protected");
    }
    // /info is open, and shows no absolute path of this host.
    let tmp = dir.path().to_str().unwrap();
    let (_, text) = s.get("/info");
    assert!(!text.contains(tmp), "/info shows {tmp}: {text}");
    assert_eq!(info(&s)["model_dir"], "model");
    // A second process on the same store fails to start: readiness says why without the path
    // (the log has it).
    let other = Server::start(&setup);
    let t0 = Instant::now();
    let (st, body) = loop {
        let (st, body) = other.get("/health/ready");
        if !body.contains("loading") || t0.elapsed() > Duration::from_secs(30) {
            break (st, body);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("in use by another polyrank process") && !body.contains(tmp), "{body}");
    let (st, v) = other.send("post", "/rank", Some(&json!({"context": "hi"})));
    assert_eq!(st, 401, "{v}");
    let r = other.client.post(other.url("/rank")).header("x-api-key", "k-25").json(&json!({"context": "hi"})).send().unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let text = r.text().unwrap();
    assert!(text.contains("not_ready") && !text.contains(tmp), "{text}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(other.logs().contains(tmp), "the log keeps the path");
}

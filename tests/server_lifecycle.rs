//! Startup, restart and overload behaviour of the real server: readiness, the pool cache
//! (reuse, corruption, kill -9 mid-write), 429 on a full queue, 503 past the time budget,
//! and draining on SIGTERM.

mod common;
use common::contract::Contract;
use common::server::{tiny_setup, unsafe_kill, Server, Setup};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const POOL: usize = 600;

fn fixture() -> (tempfile::TempDir, Setup) {
    let dir = tempfile::tempdir().unwrap();
    let setup = tiny_setup(dir.path(), POOL, 21);
    (dir, setup)
}

/// A new store for each start, as a new replica has: the pool files seed it through the
/// pool cache, which is what these tests are about (a restart with the same store reads its
/// snapshot instead; tests/live_pool.rs covers that).
fn fresh_store(setup: Setup) -> Setup {
    let store = tempfile::tempdir().unwrap().keep();
    setup.arg("--store-dir", store.to_str().unwrap())
}

fn files_in(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.to_string_lossy().contains(suffix)).collect())
        .unwrap_or_default()
}

fn cache_file(setup: &Setup) -> PathBuf {
    let f = files_in(&setup.cache, ".pool");
    let whole: Vec<_> = f.into_iter().filter(|p| p.extension().is_some_and(|e| e == "pool")).collect();
    assert_eq!(whole.len(), 1, "expected one cache file");
    whole[0].clone()
}

fn ranking(s: &Server) -> Value {
    let (st, v) = s.post("/rank", &json!({"context": "i like music", "top_k": 20}));
    assert_eq!(st, 200, "{v}");
    v["results"].clone()
}

#[test]
fn readiness_flips_and_a_restart_reuses_the_cache() {
    let (_d, setup) = fixture();
    // Stretch the cache write so the loading phase is long enough to observe.
    let s = Server::start(&fresh_store(setup.clone().env("POLYRANK_TEST_SLOW_CACHE_WRITE_MS", "1500")));
    let c = Contract::load();
    let (st, body) = s.get("/health/ready");
    assert_eq!(st, 503, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["status"], "loading");
    c.check("/health/ready", "get", 503, "application/json", &ready);
    assert_eq!(s.get("/health/live").0, 200, "liveness answers while loading");
    let (st, v) = s.post("/rank", &json!({"context": "hi"}));
    assert_eq!((st, v["error_type"].as_str()), (503, Some("not_ready")));
    c.check("/rank", "post", 503, "application/json", &v);
    s.wait_ready();
    assert_eq!(s.metric("polyrank_pool_cache_reused"), Some(0.0));
    assert_eq!(s.metric("polyrank_pool_encoded_total"), Some(POOL as f64));
    let first = ranking(&s);
    assert!(s.terminate().success());

    let s = Server::start(&fresh_store(setup.clone()));
    s.wait_ready();
    assert!(s.logs().contains("pool cache reused"), "{}", s.logs());
    assert_eq!(s.metric("polyrank_pool_cache_reused"), Some(1.0));
    assert_eq!(s.metric("polyrank_pool_encoded_total"), Some(0.0));
    assert_eq!(ranking(&s), first, "cached vectors rank exactly as fresh ones");
}

#[test]
fn a_corrupted_or_truncated_cache_is_rebuilt_never_served() {
    let (_d, setup) = fixture();
    let s = Server::start(&fresh_store(setup.clone()));
    s.wait_ready();
    let first = ranking(&s);
    drop(s);
    let path = cache_file(&setup);

    // One flipped byte in the vectors.
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let s = Server::start(&fresh_store(setup.clone()));
    s.wait_ready();
    assert!(s.logs().contains("checksum mismatch"), "{}", s.logs());
    assert_eq!(s.metric("polyrank_pool_encoded_total"), Some(POOL as f64), "re-encoded");
    assert_eq!(ranking(&s), first);
    drop(s);

    // Truncated file.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let s = Server::start(&fresh_store(setup.clone()));
    s.wait_ready();
    assert!(s.logs().contains("truncated"), "{}", s.logs());
    assert_eq!(s.metric("polyrank_pool_encoded_total"), Some(POOL as f64));
    drop(s);

    // The rebuilt file is whole again.
    let s = Server::start(&fresh_store(setup.clone()));
    s.wait_ready();
    assert_eq!(s.metric("polyrank_pool_cache_reused"), Some(1.0));
    assert_eq!(ranking(&s), first);
}

#[test]
fn kill_9_while_the_cache_is_written_leaves_nothing_served() {
    let (_d, setup) = fixture();
    let s = Server::start(&setup.clone().env("POLYRANK_TEST_SLOW_CACHE_WRITE_MS", "4000"));
    let t0 = Instant::now();
    while files_in(&setup.cache, ".tmp.").is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(60), "cache write never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300)); // part of the file is on disk
    unsafe_kill(s.child.id() as i32, "KILL");
    drop(s);
    let partial = files_in(&setup.cache, ".tmp.");
    assert_eq!(partial.len(), 1);
    let partial_len = std::fs::metadata(&partial[0]).unwrap().len();
    assert!(partial_len > 0, "the write had begun");
    assert!(
        files_in(&setup.cache, ".pool").iter().all(|p| p.to_string_lossy().contains(".tmp.")),
        "no complete cache file may exist after the kill"
    );

    let s = Server::start(&setup);
    s.wait_ready();
    assert_eq!(s.metric("polyrank_pool_cache_reused"), Some(0.0));
    assert_eq!(s.metric("polyrank_pool_encoded_total"), Some(POOL as f64));
    assert_eq!(s.post("/rank", &json!({"context": "hi"})).0, 200);
    let _ = cache_file(&setup); // a whole file now
}

/// Requests heavy enough (hundreds of inline candidates) to keep the model busy.
fn heavy() -> Value {
    let cands: Vec<String> = (0..500).map(|i| format!("i like music and books and paris and rain {i} {}", "cats ".repeat(15))).collect();
    json!({"context": "what is your favourite food", "candidates": cands, "top_k": 3})
}

#[test]
fn a_full_queue_answers_429_and_the_rest_succeed() {
    let (_d, setup) = fixture();
    let setup = setup.arg("--queue-capacity", "1").arg("--max-batch-size", "1").arg("--max-inline-candidates", "1000");
    let s = Server::start(&setup);
    s.wait_ready();
    let c = Contract::load();
    let body = heavy();
    let results: Vec<(u16, Option<String>, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..32)
            .map(|_| {
                scope.spawn(|| {
                    let r = s.client.post(s.url("/rank")).json(&body).send().unwrap();
                    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
                    (r.status().as_u16(), retry, r.json::<Value>().unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let rejected: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    assert!(!rejected.is_empty(), "no 429 from 32 concurrent requests with a queue of 1");
    assert!(ok >= 1);
    assert_eq!(ok + rejected.len(), 32, "only 200 and 429 expected: {:?}", results.iter().map(|r| r.0).collect::<Vec<_>>());
    for (_, retry, v) in &rejected {
        assert_eq!(retry.as_deref(), Some("1"));
        assert_eq!(v["error_type"], "overloaded");
        c.check("/rank", "post", 429, "application/json", v);
    }
    assert!(s.metric("polyrank_queue_rejected_total").unwrap() >= 1.0);
    assert_eq!(s.post("/rank", &json!({"context": "hi"})).0, 200, "serving after the burst");
}

#[test]
fn a_request_past_its_time_budget_gets_503() {
    let (_d, setup) = fixture();
    let s = Server::start(&setup.arg("--request-timeout-ms", "1").arg("--max-inline-candidates", "1000"));
    s.wait_ready();
    let (st, v) = s.post("/rank", &heavy());
    assert_eq!((st, v["error_type"].as_str()), (503, Some("timeout")), "{v}");
    Contract::load().check("/rank", "post", 503, "application/json", &v);
}

#[test]
fn sigterm_drains_in_flight_requests() {
    let (_d, setup) = fixture();
    let s = Server::start(&setup.arg("--max-batch-size", "1").arg("--max-inline-candidates", "1000"));
    s.wait_ready();
    let body = heavy();
    let pid = s.child.id() as i32;
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6)
            .map(|_| scope.spawn(|| s.client.post(s.url("/rank")).json(&body).send().map(|r| r.status().as_u16()).unwrap_or(0)))
            .collect();
        std::thread::sleep(Duration::from_millis(30));
        unsafe_kill(pid, "TERM");
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses, vec![200; 6], "in-flight requests must complete");
    let status = s.terminate();
    assert!(status.success(), "{status}");
}

//! The live pool over real HTTP on a real server: writes and lookups as documented, filters
//! against a brute-force evaluation, durability across kill -9 and torn writes, damage
//! detection, consistency under concurrent writes. (A large store's start time is timed in
//! tests/live_pool_startup.rs, alone in its binary so no other test shares the cores.)

mod common;

use common::contract::Contract;
use common::server::{result_ids as ids, tiny_setup, unsafe_kill, Server};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn checked(s: &Server, c: &Contract, method: &str, path: &str, doc_path: &str, body: Option<&Value>) -> (u16, Value) {
    let (st, v) = s.send(method, path, body);
    c.check(doc_path, method, st, "application/json", &v);
    (st, v)
}

fn cand(id: &str, text: &str, meta: Value) -> Value {
    json!({"id": id, "text": text, "meta": meta})
}

#[test]
fn writes_filters_and_lookups_answer_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&tiny_setup(dir.path(), 200, 41));
    s.wait_ready();
    let c = Contract::load();

    let (st, v) = checked(&s, &c, "post", "/candidates", "/candidates", Some(&json!({"candidates": [
        cand("new-1", "i like pizza in paris", json!({"lang": "xx", "tier": 2})),
        cand("new-2", "the weather is lovely", json!({"lang": "yy", "tier": 3})),
    ]})));
    assert_eq!((st, v["upserted"].as_u64(), v["pool_size"].as_u64()), (200, Some(2), Some(202)), "{v}");

    // Filter: only the matching new candidate, with its meta on request.
    let (st, v) = checked(&s, &c, "post", "/rank", "/rank", Some(&json!({"context": "pizza", "filter": {"lang": "xx"}, "return_meta": true})));
    assert_eq!(st, 200, "{v}");
    assert_eq!(ids(&v), ["new-1"]);
    assert_eq!(v["results"][0]["meta"], json!({"lang": "xx", "tier": 2}));
    let (_, v) = checked(&s, &c, "post", "/rank", "/rank", Some(&json!({"context": "pizza", "filter": {"tier": {"$gte": 2, "$lte": 3}, "lang": {"$in": ["yy", "zz"]}}})));
    assert_eq!(ids(&v), ["new-2"]);
    // The seed pool's meta ({"n": i}) is indexed too; with ids, the filter narrows them.
    let (_, v) = checked(&s, &c, "post", "/rank", "/rank", Some(&json!({"context": "pizza", "filter": {"n": {"$lte": 4}}, "top_k": 50})));
    let mut got = ids(&v);
    got.sort();
    assert_eq!(got, ["c0", "c1", "c2", "c3", "c4"]);
    let (_, v) = checked(&s, &c, "post", "/rank", "/rank", Some(&json!({"context": "pizza", "ids": ["c1", "c9", "new-1"], "filter": {"n": {"$lte": 4}}})));
    assert_eq!(ids(&v), ["c1"]);

    // Replace: same id, new text and meta.
    checked(&s, &c, "post", "/candidates", "/candidates", Some(&json!({"candidates": [cand("new-1", "dogs and cats", json!({"lang": "zz"}))]})));
    let (st, v) = checked(&s, &c, "get", "/candidates/new-1", "/candidates/{id}", None);
    assert_eq!((st, v["text"].as_str()), (200, Some("dogs and cats")), "{v}");
    let (_, v) = s.send("post", "/rank", Some(&json!({"context": "pizza", "filter": {"lang": "xx"}})));
    assert!(ids(&v).is_empty(), "the old meta no longer matches: {v}");

    // Delete: found and missing ids reported; gone from rankings, lookups and id lists.
    let (st, v) = checked(&s, &c, "delete", "/candidates", "/candidates", Some(&json!({"ids": ["new-1", "nope"]})));
    assert_eq!((st, v["deleted"].as_u64(), v["not_found"].clone(), v["pool_size"].as_u64()), (200, Some(1), json!(["nope"]), Some(201)), "{v}");
    let (st, v) = checked(&s, &c, "get", "/candidates/new-1", "/candidates/{id}", None);
    assert_eq!((st, v["error_type"].as_str()), (404, Some("not_found")));
    let (st, v) = checked(&s, &c, "post", "/rank", "/rank", Some(&json!({"context": "pizza", "ids": ["new-1"]})));
    assert_eq!(st, 422, "{v}");
    let (_, v) = s.send("post", "/rank", Some(&json!({"context": "dogs and cats", "top_k": 1000})));
    assert!(!ids(&v).contains(&"new-1".to_string()));
    assert_eq!(ids(&v).len(), 201);

    // Bad writes and filters: 422 with a message, nothing applied.
    for (path, method, body, needle) in [
        ("/candidates", "post", json!({"candidates": [{"id": "a", "text": "x", "meta": null}]}), "null"),
        ("/candidates", "post", json!({"candidates": [cand("a", "x", json!({})), cand("a", "y", json!({}))]}), "more than once"),
        ("/candidates", "post", json!({"candidates": [{"id": "a", "text": "x", "meta": [1]}]}), "object"),
        ("/candidates", "post", json!({"candidates": [{"id": " ", "text": "x"}]}), "id"),
        ("/candidates", "post", json!({"candidates": []}), "between 1"),
        ("/candidates", "delete", json!({"ids": []}), "between 1"),
        ("/rank", "post", json!({"context": "x", "filter": {"tier": {"$gt": 1}}}), "$gt"),
        ("/rank", "post", json!({"context": "x", "filter": {"tier": {"$in": 3}}}), "$in"),
        ("/rank", "post", json!({"context": "x", "filter": {"tier": [1]}}), "tier"),
        ("/rank", "post", json!({"context": "x", "filter": {"n": 1}, "candidates": ["a"]}), "inline"),
        ("/rank", "post", json!({"context": "x", "filter": {"n": 1}, "approximate": true}), "approximate"),
    ] {
        let (st, v) = checked(&s, &c, method, path, path, Some(&body));
        assert_eq!(st, 422, "{body} → {v}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{body} → {v}");
    }
    let (_, info) = s.send("get", "/info", None);
    assert_eq!(info["pool_size"], 201);
    assert_eq!(s.metric("polyrank_pool_writes_total{op=\"upsert\"}"), Some(3.0));
    assert_eq!(s.metric("polyrank_pool_writes_total{op=\"delete\"}"), Some(1.0));
    assert!(s.metric("polyrank_store_log_bytes").unwrap() > 0.0);
    assert_eq!(s.metric("polyrank_pool_size"), Some(201.0));
    drop(s);

    // With an API key, writes and lookups need it.
    let s = Server::start(&tiny_setup(dir.path(), 200, 41).arg("--api-key", "k3y"));
    s.wait_ready();
    let (st, _) = s.send("post", "/candidates", Some(&json!({"candidates": [cand("z", "zz", json!({}))]})));
    assert_eq!(st, 401);
    assert_eq!(s.send("get", "/candidates/c1", None).0, 401);
    let r = s.client.post(s.url("/candidates")).bearer_auth("k3y").json(&json!({"candidates": [cand("z", "zz", json!({}))]})).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

/// Random meta: some fields missing, strings, ints, floats, bools.
fn random_meta(rng: &mut rand::rngs::StdRng) -> Value {
    let mut m = serde_json::Map::new();
    if rng.gen_bool(0.9) {
        m.insert("lang".into(), json!(["en", "fr", "de"][rng.gen_range(0..3)]));
    }
    if rng.gen_bool(0.8) {
        m.insert("tier".into(), json!(rng.gen_range(0..5)));
    }
    if rng.gen_bool(0.8) {
        m.insert("price".into(), json!((rng.gen_range(0.0..100.0f64) * 10.0).round() / 10.0));
    }
    if rng.gen_bool(0.7) {
        m.insert("active".into(), json!(rng.gen_bool(0.5)));
    }
    Value::Object(m)
}

fn random_filter(rng: &mut rand::rngs::StdRng) -> Value {
    let mut f = serde_json::Map::new();
    for _ in 0..rng.gen_range(1..=3) {
        match rng.gen_range(0..6) {
            0 => f.insert("lang".into(), json!(["en", "fr", "de", "xx"][rng.gen_range(0..4)])),
            1 => {
                let langs = &["en", "de", "xx"][..rng.gen_range(1..=3)];
                f.insert("lang".into(), json!({ "$in": langs }))
            }
            2 => f.insert("tier".into(), json!({"$in": [rng.gen_range(0..5), rng.gen_range(0..5)]})),
            3 => f.insert("price".into(), json!({"$gte": rng.gen_range(0..100), "$lte": rng.gen_range(0..100)})),
            4 => f.insert("active".into(), json!(rng.gen_bool(0.5))),
            _ => f.insert("tier".into(), json!({"$eq": rng.gen_range(0..6) as f64})),
        };
    }
    Value::Object(f)
}

/// The filter semantics written out independently of the server's index.
fn passes(meta: &Value, filter: &Value) -> bool {
    filter.as_object().unwrap().iter().all(|(field, cond)| {
        let Some(v) = meta.get(field) else { return false };
        let eq = |a: &Value, b: &Value| match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => x == y,
            _ => a == b,
        };
        match cond {
            Value::Object(ops) => ops.iter().all(|(op, arg)| match op.as_str() {
                "$eq" => eq(v, arg),
                "$in" => arg.as_array().unwrap().iter().any(|a| eq(v, a)),
                "$gte" => v.as_f64().is_some_and(|x| x >= arg.as_f64().unwrap()),
                "$lte" => v.as_f64().is_some_and(|x| x <= arg.as_f64().unwrap()),
                _ => unreachable!(),
            }),
            c => eq(v, c),
        }
    })
}

#[test]
fn filtered_rankings_equal_brute_force_on_random_meta() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let words = ["pizza", "cats", "dogs", "rain", "music", "guitar", "books", "paris", "sun", "food"];
    let mut metas = HashMap::new();
    let mut lines = String::new();
    for i in 0..400 {
        let meta = random_meta(&mut rng);
        let text = format!("{} and {} {i}", words[rng.gen_range(0..10)], words[rng.gen_range(0..10)]);
        lines += &json!({"id": format!("p{i}"), "text": text, "meta": meta}).to_string();
        lines.push('\n');
        metas.insert(format!("p{i}"), meta);
    }
    let setup = tiny_setup(dir.path(), 1, 43);
    std::fs::write(&setup.pool, lines).unwrap();
    let s = Server::start(&setup);
    s.wait_ready();
    // Some candidates change meta through the API, so the index is exercised after writes.
    let mut updates = Vec::new();
    for i in (0..400).step_by(7) {
        let meta = random_meta(&mut rng);
        metas.insert(format!("p{i}"), meta.clone());
        updates.push(cand(&format!("p{i}"), &format!("updated {i}"), meta));
    }
    for chunk in updates.chunks(20) {
        assert_eq!(s.send("post", "/candidates", Some(&json!({"candidates": chunk}))).0, 200);
    }
    let (mut empty, mut nonempty) = (0, 0);
    for round in 0..80 {
        let filter = random_filter(&mut rng);
        let context = words[round % 10];
        let (st, got) = s.send("post", "/rank", Some(&json!({"context": context, "filter": filter, "top_k": 1000})));
        assert_eq!(st, 200, "{filter} → {got}");
        let mut expected_ids: Vec<String> = metas.iter().filter(|(_, m)| passes(m, &filter)).map(|(id, _)| id.clone()).collect();
        expected_ids.sort();
        if expected_ids.is_empty() {
            empty += 1;
            assert!(ids(&got).is_empty(), "{filter} matched nothing by brute force: {got}");
            continue;
        }
        nonempty += 1;
        // The exact ranking of exactly those candidates.
        let (_, exact) = s.send("post", "/rank", Some(&json!({"context": context, "ids": expected_ids, "top_k": 1000})));
        // Same candidates with the same scores (up to float noise: the two requests score the
        // rows in another order and batch), both best first.
        let scored = |v: &Value| -> Vec<(String, f64)> {
            v["results"].as_array().unwrap().iter().map(|r| (r["id"].as_str().unwrap().to_string(), r["score"].as_f64().unwrap())).collect()
        };
        let (a, b) = (scored(&got), scored(&exact));
        assert_eq!(a.len(), b.len(), "filter {filter}: {} vs {} results", a.len(), b.len());
        let b_scores: HashMap<&str, f64> = b.iter().map(|(id, s)| (id.as_str(), *s)).collect();
        for (id, score) in &a {
            let other = b_scores.get(id.as_str()).unwrap_or_else(|| panic!("filter {filter}: {id} is not in the exact ranking"));
            assert!((score - other).abs() <= 1e-4 * score.abs().max(1.0), "filter {filter}: {id} scored {score} vs {other}");
        }
        assert!(a.windows(2).all(|w| w[0].1 >= w[1].1), "filter {filter}: not best first");
    }
    assert!(empty > 3 && nonempty > 40, "filters too uniform: {empty} empty, {nonempty} non-empty");
}

#[test]
fn acknowledged_writes_survive_kill_9_and_a_torn_batch_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let setup = tiny_setup(dir.path(), 100, 44).store(&store);

    // A: kill -9 right after the last acknowledged write.
    let s = Server::start(&setup);
    s.wait_ready();
    for b in 0..20 {
        let batch: Vec<Value> = (0..3).map(|j| cand(&format!("a{b}-{j}"), &format!("batch {b} item {j}"), json!({"b": b}))).collect();
        assert_eq!(s.send("post", "/candidates", Some(&json!({"candidates": batch}))).0, 200);
    }
    assert_eq!(s.send("delete", "/candidates", Some(&json!({"ids": ["a0-0", "c5"]}))).0, 200);
    unsafe_kill(s.child.id() as i32, "KILL");
    drop(s);
    let s = Server::start(&setup);
    s.wait_ready();
    for b in 0..20 {
        for j in 0..3 {
            let (st, v) = s.send("get", &format!("/candidates/a{b}-{j}"), None);
            if (b, j) == (0, 0) {
                assert_eq!(st, 404);
            } else {
                assert_eq!((st, v["text"].as_str()), (200, Some(format!("batch {b} item {j}").as_str())));
            }
        }
    }
    assert_eq!(s.send("get", "/candidates/c5", None).0, 404);
    assert_eq!(s.send("get", "/info", None).1["pool_size"], 100 + 60 - 2);
    drop(s);

    // B: the process dies half-way through writing a batch's record.
    let s = Server::start(&setup.clone().env("POLYRANK_TEST_CRASH_MID_WAL_WRITE", "2"));
    s.wait_ready();
    let first: Vec<Value> = (0..4).map(|j| cand(&format!("t1-{j}"), &format!("torn test one {j}"), json!({}))).collect();
    let second: Vec<Value> = (0..4).map(|j| cand(&format!("t2-{j}"), &format!("torn test two {j}"), json!({}))).collect();
    assert_eq!(s.send("post", "/candidates", Some(&json!({"candidates": first}))).0, 200);
    let (st, _) = s.send("post", "/candidates", Some(&json!({"candidates": second})));
    assert_ne!(st, 200, "the torn write was acknowledged");
    drop(s);
    let s = Server::start(&setup);
    s.wait_ready();
    assert!(s.logs().contains("cut short by a crash"), "{}", s.logs());
    let present = |p: &str| (0..4).filter(|j| s.send("get", &format!("/candidates/{p}-{j}"), None).0 == 200).count();
    assert_eq!((present("t1"), present("t2")), (4, 0));
    assert_eq!(s.send("post", "/candidates", Some(&json!({"candidates": [cand("after", "after the crash", json!({}))]}))).0, 200);
    drop(s);

    // C: a real kill -9 at an arbitrary moment while batches are being written.
    let s = Server::start(&setup);
    s.wait_ready();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut sent = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch: Vec<Value> = (0..5).map(|j| cand(&format!("k{sent}-{j}"), &format!("killed batch {sent} item {j}"), json!({}))).collect();
                let (st, _) = s.send("post", "/candidates", Some(&json!({"candidates": batch})));
                if st == 200 {
                    acked.lock().unwrap().push(sent);
                }
                sent += 1;
            }
            sent
        });
        std::thread::sleep(Duration::from_millis(1500));
        unsafe_kill(s.child.id() as i32, "KILL");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap()
    });
    drop(s);
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 5, "only {} batches acknowledged before the kill", acked.len());
    let s = Server::start(&setup);
    s.wait_ready();
    for b in 0..sent {
        let present = (0..5).filter(|j| s.send("get", &format!("/candidates/k{b}-{j}"), None).0 == 200).count();
        assert!(present == 0 || present == 5, "batch {b}: {present} of 5 present");
        if acked.contains(&b) {
            assert_eq!(present, 5, "acknowledged batch {b} lost");
        }
    }
}

#[test]
fn a_flipped_byte_in_the_log_or_the_snapshot_is_reported_and_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let setup = tiny_setup(dir.path(), 100, 45).store(&store);
    let s = Server::start(&setup);
    s.wait_ready();
    let batch: Vec<Value> = (0..8).map(|j| cand(&format!("f{j}"), &format!("flip test {j}"), json!({}))).collect();
    assert_eq!(s.send("post", "/candidates", Some(&json!({"candidates": batch}))).0, 200);
    assert!(s.terminate().success());

    for (file, needle) in [("wal.log", "damaged record"), ("snapshot.bin", "damaged snapshot")] {
        let path = store.join(file);
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        bad[good.len() * 2 / 3] ^= 0x10;
        std::fs::write(&path, &bad).unwrap();
        let s = Server::start(&setup);
        let t0 = Instant::now();
        let ready = loop {
            let (st, body) = s.get("/health/ready");
            let v: Value = serde_json::from_str(&body).unwrap();
            if v["status"] != "loading" || t0.elapsed() > Duration::from_secs(30) {
                break (st, v);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(ready.0, 503, "{file}: {}", ready.1);
        assert_eq!(ready.1["status"], "failed");
        assert!(ready.1["error"].as_str().unwrap().contains(needle), "{file}: {}", ready.1);
        let (st, v) = s.send("post", "/rank", Some(&json!({"context": "flip test"})));
        assert_eq!((st, v["error_type"].as_str()), (503, Some("not_ready")), "{file}: {v}");
        drop(s);
        std::fs::write(&path, &good).unwrap();
    }
    let s = Server::start(&setup);
    s.wait_ready();
    assert_eq!(s.send("get", "/candidates/f3", None).0, 200, "restored files serve again");
    // A second process on the same store is refused: its log records would interleave.
    let other = Server::start(&setup);
    let t0 = Instant::now();
    let v = loop {
        let v: Value = serde_json::from_str(&other.get("/health/ready").1).unwrap();
        if v["status"] != "loading" || t0.elapsed() > Duration::from_secs(30) {
            break v;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(v["status"], "failed", "{v}");
    assert!(v["error"].as_str().unwrap().contains("in use by another polyrank process"), "{v}");
    assert_eq!(s.send("get", "/candidates/f3", None).0, 200, "the first one is unaffected");
}

#[test]
fn rankings_during_concurrent_writes_never_fail_nor_return_deleted_ids() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&tiny_setup(dir.path(), 150, 46));
    s.wait_ready();
    // id → text, for what the pool must hold at the end; id → when its delete was answered.
    let model: Mutex<HashMap<String, String>> = Mutex::new((0..150).map(|i| (format!("c{i}"), String::new())).collect());
    let deleted_at: Mutex<HashMap<String, Instant>> = Mutex::new(HashMap::new());
    let statuses: Mutex<HashMap<u16, usize>> = Mutex::new(HashMap::new());
    let seen: Mutex<Vec<(Instant, Vec<String>)>> = Mutex::new(Vec::new());
    let until = Instant::now() + Duration::from_secs(10);
    let words = ["pizza", "cats", "dogs", "rain", "music", "guitar", "books", "paris"];
    std::thread::scope(|scope| {
        for w in 0..2 {
            let (model, deleted_at, statuses) = (&model, &deleted_at, &statuses);
            let s = &s;
            scope.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(w);
                let mut mine: Vec<String> = Vec::new();
                let mut k = 0;
                while Instant::now() < until {
                    if mine.len() < 6 || rng.gen_bool(0.6) {
                        let batch: Vec<Value> = (0..3)
                            .map(|j| cand(&format!("w{w}-{k}-{j}"), &format!("{} {} w{w} {k}", words[(k + j) % 8], words[j % 8]), json!({"writer": w, "k": k})))
                            .collect();
                        let (st, _) = s.send("post", "/candidates", Some(&json!({"candidates": batch})));
                        *statuses.lock().unwrap().entry(st).or_default() += 1;
                        if st == 200 {
                            for j in 0..3 {
                                let id = format!("w{w}-{k}-{j}");
                                model.lock().unwrap().insert(id.clone(), String::new());
                                mine.push(id);
                            }
                        }
                        k += 1;
                    } else {
                        // Deleted ids are never written again: any later sighting is a bug.
                        let n = rng.gen_range(1..=3).min(mine.len());
                        let gone: Vec<String> = mine.drain(..n).collect();
                        let (st, _) = s.send("delete", "/candidates", Some(&json!({"ids": gone})));
                        *statuses.lock().unwrap().entry(st).or_default() += 1;
                        if st == 200 {
                            let at = Instant::now();
                            for id in gone {
                                model.lock().unwrap().remove(&id);
                                deleted_at.lock().unwrap().insert(id, at);
                            }
                        }
                    }
                }
            });
        }
        for r in 0..8 {
            let (statuses, seen) = (&statuses, &seen);
            let s = &s;
            scope.spawn(move || {
                let mut i = 0;
                while Instant::now() < until {
                    let body = if i % 3 == 0 {
                        json!({"context": words[(r + i) % 8], "top_k": 1000, "filter": {"writer": {"$in": [0, 1]}}})
                    } else {
                        json!({"context": words[(r + i) % 8], "top_k": 1000})
                    };
                    let started = Instant::now();
                    let (st, v) = s.send("post", "/rank", Some(&body));
                    *statuses.lock().unwrap().entry(st).or_default() += 1;
                    if st == 200 {
                        seen.lock().unwrap().push((started, ids(&v)));
                    }
                    i += 1;
                }
            });
        }
    });
    let statuses = statuses.into_inner().unwrap();
    eprintln!("statuses: {statuses:?}");
    assert!(statuses.keys().all(|&st| st == 200 || st == 429), "{statuses:?}");
    let deleted_at = deleted_at.into_inner().unwrap();
    let seen = seen.into_inner().unwrap();
    assert!(seen.len() > 100 && deleted_at.len() > 20, "{} rankings, {} deletes", seen.len(), deleted_at.len());
    for (started, got) in &seen {
        for id in got {
            if let Some(at) = deleted_at.get(id) {
                assert!(at > started, "{id} was returned by a ranking sent after its delete was answered");
            }
        }
    }
    // The final pool is exactly the model of the acknowledged writes.
    let model = model.into_inner().unwrap();
    assert_eq!(s.send("get", "/info", None).1["pool_size"], model.len());
    for id in model.keys() {
        assert_eq!(s.send("get", &format!("/candidates/{id}"), None).0, 200, "{id} is missing");
    }
    for id in deleted_at.keys() {
        assert_eq!(s.send("get", &format!("/candidates/{id}"), None).0, 404, "{id} was deleted");
    }
}

#[test]
fn compaction_folds_the_log_into_a_snapshot_and_a_restart_sees_the_same_pool() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let setup = tiny_setup(dir.path(), 50, 47).store(&store).arg("--store-compact-bytes", "4096");
    let s = Server::start(&setup);
    s.wait_ready();
    let before = s.metric("polyrank_store_compactions_total").unwrap_or(0.0);
    for b in 0..40 {
        let batch: Vec<Value> = (0..3).map(|j| cand(&format!("z{b}-{j}"), &format!("compaction test {b} {j}"), json!({"b": b}))).collect();
        assert_eq!(s.send("post", "/candidates", Some(&json!({"candidates": batch}))).0, 200);
        if b % 4 == 3 {
            assert_eq!(s.send("delete", "/candidates", Some(&json!({"ids": [format!("z{}-0", b - 1)]}))).0, 200);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let compactions = s.metric("polyrank_store_compactions_total").unwrap() - before;
    assert!(compactions >= 2.0, "{compactions} compactions for ~{} log bytes", 40 * 3 * 200);
    assert!(s.metric("polyrank_store_last_compaction_timestamp_seconds").unwrap() > 1.7e9);
    let (_, full) = s.send("post", "/rank", Some(&json!({"context": "compaction test", "top_k": 1000})));
    unsafe_kill(s.child.id() as i32, "KILL");
    drop(s);
    let s = Server::start(&setup);
    s.wait_ready();
    let (_, again) = s.send("post", "/rank", Some(&json!({"context": "compaction test", "top_k": 1000})));
    assert_eq!(ids(&again), ids(&full), "the pool after restart differs");
    assert_eq!(ids(&again).len(), 50 + 120 - 10);
}

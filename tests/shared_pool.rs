//! The live pool shared through PostgreSQL (`store_url`): three replicas on loopback, one real
//! throwaway database (tests/common/pg.rs), the tiny model. What a client of several replicas
//! relies on: a write on one is read on the others (at once with `min_seq`, within a second
//! without), concurrent writers and rankers on every replica end with the same pool — the one
//! the acknowledged writes make — and the database going away or a replica losing it costs
//! writes (503) but never rankings, and nothing acknowledged.

mod common;

use common::contract::Contract;
use common::pg::{Postgres, Proxy};
use common::server::{result_ids, tiny_setup, Server, Setup};
use polyrank::pool::live::candidate_hash;
use polyrank::pool::store::Candidate;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

const SEED_POOL: usize = 40;

fn setup(dir: &Path, url: &str) -> Setup {
    // One libtorch thread each: three replicas (six with a second test beside, and two
    // PostgreSQL servers) share two cores. A 10 s budget: with 3 s, about one run in four of
    // the concurrent-writers test saw one write time out while the other test's replicas and
    // database ran beside it (never alone); a timeout is not what these tests are about.
    tiny_setup(dir, SEED_POOL, 5).arg("--store-url", url).arg("--request-timeout-ms", "10000").arg("--threads", "1")
}

fn replicas(setup: &Setup, n: usize) -> Vec<Server> {
    let servers: Vec<Server> = (0..n).map(|_| Server::start(setup)).collect();
    for s in &servers {
        s.wait_ready();
    }
    servers
}

fn info(s: &Server) -> Value {
    s.send("get", "/info", None).1
}

/// The pool the seed file and the acknowledged writes make, by id.
struct Model(BTreeMap<String, Candidate>);

impl Model {
    fn seed(pool_file: &Path) -> Model {
        let text = std::fs::read_to_string(pool_file).unwrap();
        Model(text.lines().map(|l| serde_json::from_str::<Candidate>(l).unwrap()).map(|c| (c.id.clone(), c)).collect())
    }

    /// Applies writes (`(seq, request body)` of /candidates: upserts have `candidates`,
    /// deletes `ids`) in seq order.
    fn apply(&mut self, writes: &[(u64, Value)]) {
        let mut sorted: Vec<&(u64, Value)> = writes.iter().collect();
        sorted.sort_by_key(|(s, _)| *s);
        for (_, body) in sorted {
            if let Some(cands) = body.get("candidates") {
                for c in serde_json::from_value::<Vec<Candidate>>(cands.clone()).unwrap() {
                    self.0.insert(c.id.clone(), c);
                }
            } else {
                for id in body["ids"].as_array().unwrap() {
                    self.0.remove(id.as_str().unwrap());
                }
            }
        }
    }

    /// What /info's pool_digest should say.
    fn digest(&self) -> String {
        format!("{:032x}", self.0.values().fold(0u128, |acc, c| acc.wrapping_add(candidate_hash(c))))
    }
}

/// Waits (up to `within`) until every replica reports `digest`.
fn converge(servers: &[&Server], digest: &str, within: Duration) {
    let t0 = Instant::now();
    loop {
        let got: Vec<String> = servers.iter().map(|s| info(s)["pool_digest"].as_str().unwrap_or("").to_string()).collect();
        if got.iter().all(|d| d == digest) {
            return;
        }
        assert!(t0.elapsed() < within, "replicas did not converge to {digest} within {within:?}: {got:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn upsert(s: &Server, body: &Value) -> (u16, Value) {
    s.send("post", "/candidates", Some(body))
}

#[test]
fn a_write_on_one_replica_is_read_on_the_others_at_once_with_min_seq_and_within_a_second_without() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path(), &pg.url());
    let servers = replicas(&setup, 3);
    let (a, b, c) = (&servers[0], &servers[1], &servers[2]);
    let mut model = Model::seed(&setup.pool);
    converge(&[a, b, c], &model.digest(), Duration::from_secs(5));
    for s in [a, b, c] {
        let i = info(s);
        assert_eq!((i["pool_size"].as_u64(), i["store"]["kind"].as_str(), i["store"]["connected"].as_bool()), (Some(SEED_POOL as u64), Some("postgres"), Some(true)), "{i}");
    }
    // Only one replica seeded (one change), and the schema is polyrank's.
    assert_eq!(pg.sql("SELECT count(*) FROM polyrank_changes"), "1");
    assert_eq!(pg.sql("SELECT count(*) FROM polyrank_candidates WHERE NOT deleted"), SEED_POOL.to_string());

    let mut writes = Vec::new();
    let mut lags = Vec::new();
    for round in 0..8 {
        let text = format!("round {round}: we went hiking in the mountains");
        let body = json!({"candidates": [{"id": format!("w{round}"), "text": text, "meta": {"round": round, "tags": ["x", {"deep": round}]}}]});
        let (st, w) = upsert(a, &body);
        assert_eq!(st, 200, "{w}");
        let seq = w["seq"].as_u64().expect("a write answers with its seq");
        Contract::load().check("/candidates", "post", 200, "application/json", &w);
        writes.push((seq, body.clone()));
        // B with min_seq: at once, by id and by ranking.
        let (st, got) = b.send("get", &format!("/candidates/w{round}?min_seq={seq}"), None);
        assert_eq!((st, got["text"].as_str()), (200, Some(text.as_str())), "{got}");
        assert_eq!(got["meta"], body["candidates"][0]["meta"]);
        let (st, r) = b.post("/rank", &json!({"context": "hiking", "top_k": 1000, "min_seq": seq}));
        assert_eq!(st, 200, "{r}");
        assert!(result_ids(&r).contains(&format!("w{round}")));
        // C without min_seq: within a second.
        let t0 = Instant::now();
        while c.send("get", &format!("/candidates/w{round}"), None).0 != 200 {
            assert!(t0.elapsed() < Duration::from_secs(1), "write {seq} not on C after 1 s");
            std::thread::sleep(Duration::from_millis(2));
        }
        lags.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    eprintln!("visible on another replica without min_seq after (ms): {lags:.1?}");

    // A delete on C: A and B never return it once asked with its seq.
    let del = json!({"ids": ["w0", "c3", "not-there"]});
    let (st, d) = c.send("delete", "/candidates", Some(&del));
    assert_eq!((st, d["deleted"].as_u64(), d["not_found"].clone()), (200, Some(2), json!(["not-there"])), "{d}");
    let seq = d["seq"].as_u64().unwrap();
    writes.push((seq, del));
    for s in [a, b] {
        let (st, r) = s.post("/rank", &json!({"context": "hiking", "top_k": 1000, "min_seq": seq}));
        assert_eq!(st, 200);
        let ids = result_ids(&r);
        assert!(!ids.contains(&"w0".to_string()) && !ids.contains(&"c3".to_string()), "deleted ids ranked after min_seq {seq}");
        assert_eq!(s.send("get", &format!("/candidates/c3?min_seq={seq}"), None).0, 404);
    }
    model.apply(&writes);
    converge(&[a, b, c], &model.digest(), Duration::from_secs(2));

    // A min_seq no replica has reached: 503 `behind` at the request's deadline, not a hang.
    // It waits only the 2 s a notification of such a commit could take, not the whole budget.
    let t0 = Instant::now();
    let (st, e) = b.post("/rank", &json!({"context": "hi", "min_seq": seq + 1000}));
    assert_eq!((st, e["error_type"].as_str()), (503, Some("behind")), "{e}");
    Contract::load().check("/rank", "post", 503, "application/json", &e);
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(1900) && waited < Duration::from_millis(2900), "{waited:?}");
    Contract::load().check("/info", "get", 200, "application/json", &info(b));
    assert_eq!(b.send("get", &format!("/candidates/w1?min_seq={}", seq + 1000), None).0, 503);

    // A fourth replica starts from the database: nothing encoded, the same pool.
    let d = Server::start(&setup);
    d.wait_ready();
    converge(&[&d], &model.digest(), Duration::from_secs(2));
    assert!(!d.logs().contains("encoding pool"), "a replica with this model's vectors in the store encodes nothing");
    // The credentials-free URL is all the logs say of the store.
    assert!(d.logs().contains("127.0.0.1"));
}

#[test]
fn concurrent_writers_and_rankers_on_three_replicas_converge_to_the_acknowledged_pool_also_across_a_kill_9() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path(), &pg.url());
    let servers: Vec<RwLock<Server>> = replicas(&setup, 3).into_iter().map(RwLock::new).collect();
    let stop = AtomicBool::new(false);
    // Acknowledged writes (seq, body) and deletes (seq, ids); rankings (min_seq, ids).
    let writes: Mutex<Vec<(u64, Value)>> = Mutex::new(Vec::new());
    let deletes: Mutex<Vec<(u64, Vec<String>)>> = Mutex::new(Vec::new());
    let rankings: Mutex<Vec<(u64, Vec<String>)>> = Mutex::new(Vec::new());
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let ids: Vec<String> = (0..SEED_POOL).map(|i| format!("c{i}")).chain((0..30).map(|i| format!("n{i}"))).collect();
    let duration = Duration::from_secs(20);
    std::thread::scope(|scope| {
        for w in 0..3 {
            let (servers, stop, writes, deletes, failures, ids) = (&servers, &stop, &writes, &deletes, &failures, &ids);
            scope.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(w as u64);
                let mut n = 0;
                while !stop.load(Ordering::Acquire) {
                    n += 1;
                    let body = if rng.gen_bool(0.35) {
                        let k = rng.gen_range(1..=2);
                        json!({"ids": (0..k).map(|_| ids[rng.gen_range(0..ids.len())].clone()).collect::<std::collections::BTreeSet<_>>()})
                    } else {
                        let k = rng.gen_range(1..=3);
                        let chosen: std::collections::BTreeSet<String> = (0..k).map(|_| ids[rng.gen_range(0..ids.len())].clone()).collect();
                        let cands: Vec<Value> = chosen
                            .into_iter()
                            .map(|id| {
                                let text = format!("writer {w} write {n}: i like {}", ["rain", "cats", "music"][rng.gen_range(0..3)]);
                                if rng.gen_bool(0.5) { json!({"id": id, "text": text, "meta": {"w": w, "n": n, "f": 0.5}}) } else { json!({"id": id, "text": text}) }
                            })
                            .collect();
                        json!({"candidates": cands})
                    };
                    let s = servers[w].read().unwrap();
                    let method = if body.get("ids").is_some() { "delete" } else { "post" };
                    let (st, v) = s.send(method, "/candidates", Some(&body));
                    drop(s);
                    if st != 200 {
                        failures.lock().unwrap().push(format!("writer {w}: {st} {v}"));
                        continue;
                    }
                    let seq = v["seq"].as_u64().unwrap();
                    if let Some(ids) = body.get("ids") {
                        deletes.lock().unwrap().push((seq, serde_json::from_value(ids.clone()).unwrap()));
                    }
                    writes.lock().unwrap().push((seq, body));
                }
            });
        }
        for r in 0..6 {
            let (servers, stop, deletes, rankings, failures) = (&servers, &stop, &deletes, &rankings, &failures);
            scope.spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    // Ask with the newest acknowledged delete's seq: none of its ids may come back.
                    let min_seq = deletes.lock().unwrap().iter().map(|d| d.0).max().unwrap_or(0);
                    let s = servers[r % 3].read().unwrap();
                    let (st, v) = s.send("post", "/rank", Some(&json!({"context": ["hello", "do you like music?"], "top_k": 1000, "min_seq": min_seq})));
                    drop(s);
                    if st != 200 {
                        failures.lock().unwrap().push(format!("ranker {r}: {st} {v}"));
                        continue;
                    }
                    rankings.lock().unwrap().push((min_seq, result_ids(&v)));
                }
            });
        }
        // Mid-stream: replica C killed with SIGKILL (between two of its requests: the lock
        // waits for them), then restarted while the others keep writing.
        std::thread::sleep(duration * 2 / 5);
        {
            let mut c = servers[2].write().unwrap();
            c.child.kill().unwrap(); // SIGKILL
            c.child.wait().unwrap();
            std::thread::sleep(Duration::from_secs(2));
            let t0 = Instant::now();
            *c = Server::start(&setup);
            c.wait_ready();
            eprintln!("replica C restarted and ready in {:.2} s", t0.elapsed().as_secs_f64());
        }
        std::thread::sleep(duration * 3 / 5);
        stop.store(true, Ordering::Release);
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{} requests failed, e.g. {:?}", failures.len(), &failures[..failures.len().min(5)]);
    let writes = writes.into_inner().unwrap();
    let deletes = deletes.into_inner().unwrap();
    let rankings = rankings.into_inner().unwrap();
    eprintln!("{} acknowledged writes ({} deletes), {} rankings in {duration:?}", writes.len(), deletes.len(), rankings.len());
    assert!(writes.len() > 50 && rankings.len() > 150, "too little traffic to mean anything");

    // Every replica holds the pool the acknowledged writes make.
    let mut model = Model::seed(&setup.pool);
    model.apply(&writes);
    let guards: Vec<_> = servers.iter().map(|s| s.read().unwrap()).collect();
    let refs: Vec<&Server> = guards.iter().map(|g| &**g).collect();
    converge(&refs, &model.digest(), Duration::from_secs(5));
    // The seqs are gap-free and each acknowledged once.
    let mut seqs: Vec<u64> = writes.iter().map(|w| w.0).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), writes.len(), "two writes acknowledged with one seq");
    assert_eq!(pg.sql("SELECT max(seq) FROM polyrank_changes"), (writes.len() + 1).to_string(), "only acknowledged writes (and the seed) were committed");

    // No ranking returned an id deleted at or before its min_seq unless written again after.
    let upserts: HashMap<&str, Vec<u64>> = writes.iter().filter(|w| w.1.get("candidates").is_some()).fold(HashMap::new(), |mut m, (seq, b)| {
        for c in b["candidates"].as_array().unwrap() {
            m.entry(c["id"].as_str().unwrap()).or_default().push(*seq);
        }
        m
    });
    for (min_seq, ids) in &rankings {
        for id in ids {
            let deleted_at = deletes.iter().filter(|(s, d)| s <= min_seq && d.contains(id)).map(|d| d.0).max();
            if let Some(d) = deleted_at {
                let again = upserts.get(id.as_str()).is_some_and(|s| s.iter().any(|&u| u > d));
                assert!(again, "ranking with min_seq {min_seq} returned {id}, deleted at seq {d} and never written again");
            }
        }
    }
}

#[test]
fn postgres_down_costs_writes_not_rankings_and_loses_nothing_acknowledged_even_on_kill_9() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let setup = setup(dir.path(), &pg.url());
    let servers = replicas(&setup, 3);
    let refs: Vec<&Server> = servers.iter().collect();
    let mut model = Model::seed(&setup.pool);
    let mut writes = Vec::new();
    let write = |s: &Server, id: &str| -> (u16, Value, Value) {
        let body = json!({"candidates": [{"id": id, "text": format!("{id}: pancakes for breakfast"), "meta": {"id": id}}]});
        let (st, v) = upsert(s, &body);
        (st, v, body)
    };
    let (st, v, body) = write(&servers[0], "before");
    assert_eq!(st, 200, "{v}");
    writes.push((v["seq"].as_u64().unwrap(), body));

    let stop = AtomicBool::new(false);
    let statuses: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for r in 0..3 {
            let (servers, stop, statuses) = (&servers, &stop, &statuses);
            scope.spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let (st, _) = servers[r].send("post", "/rank", Some(&json!({"context": "breakfast", "top_k": 5})));
                    statuses.lock().unwrap().push(st);
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
        pg.stop();
        let down = Instant::now();
        std::thread::sleep(Duration::from_millis(500));
        let (st, e, _) = write(&servers[1], "during");
        assert_eq!((st, e["error_type"].as_str()), (503, Some("store_unavailable")), "{e}");
        Contract::load().check("/candidates", "post", 503, "application/json", &e);
        let (st, e) = servers[2].send("delete", "/candidates", Some(&json!({"ids": ["before"]})));
        assert_eq!((st, e["error_type"].as_str()), (503, Some("store_unavailable")), "{e}");
        // Every replica says so, and how far behind it may be.
        std::thread::sleep(Duration::from_secs(2));
        for s in &servers {
            let i = info(s);
            assert_eq!(i["store"]["connected"], false, "{i}");
            assert!(i["store"]["lag_seconds"].as_f64().unwrap() > 1.0, "{i}");
            assert_eq!(s.metric("polyrank_store_connected"), Some(0.0));
        }
        std::thread::sleep(Duration::from_secs(10).saturating_sub(down.elapsed()));
        pg.start_again();
        stop.store(true, Ordering::Release);
    });
    let statuses = statuses.into_inner().unwrap();
    assert!(statuses.len() > 100 && statuses.iter().all(|&s| s == 200), "rankings while the database was down: {} sent, not 200: {:?}", statuses.len(), statuses.iter().filter(|&&s| s != 200).count());

    // Back: writes succeed again (reconnecting with backoff), and everything converges.
    let t0 = Instant::now();
    let after = loop {
        let (st, v, body) = write(&servers[1], "after");
        if st == 200 {
            writes.push((v["seq"].as_u64().unwrap(), body));
            break v["seq"].as_u64().unwrap();
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "writes still refused 10 s after the database returned: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    for s in &servers {
        assert_eq!(s.send("get", &format!("/candidates/after?min_seq={after}"), None).0, 200);
        assert_eq!(s.send("get", "/candidates/during", None).0, 404, "a refused write was applied");
    }
    model.apply(&writes);
    converge(&refs, &model.digest(), Duration::from_secs(5));

    // kill -9 of the database right after acknowledged writes: all of them survive recovery.
    let mut acked = Vec::new();
    for i in 0..10 {
        let (st, v, body) = write(&servers[i % 3], &format!("k{i}"));
        assert_eq!(st, 200, "{v}");
        acked.push(format!("k{i}"));
        writes.push((v["seq"].as_u64().unwrap(), body));
    }
    pg.kill();
    pg.start_again();
    let rows = pg.sql("SELECT id FROM polyrank_candidates WHERE id LIKE 'k%' AND NOT deleted ORDER BY id");
    assert_eq!(rows.lines().count(), 10, "acknowledged writes lost in the crash: {rows}");
    model.apply(&writes[writes.len() - 10..]);
    converge(&refs, &model.digest(), Duration::from_secs(5));
    // And writes work again after the crash.
    let t0 = Instant::now();
    while write(&servers[0], "post-crash").0 != 200 {
        assert!(t0.elapsed() < Duration::from_secs(10), "writes refused after the crash recovery");
        std::thread::sleep(Duration::from_millis(100));
    }
    for s in &servers {
        let t0 = Instant::now();
        while info(s)["store"]["lag_seconds"].as_f64() != Some(0.0) {
            assert!(t0.elapsed() < Duration::from_secs(5), "lag did not return to 0: {}", info(s));
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn a_replica_cut_off_from_the_database_keeps_serving_reports_its_lag_and_catches_up() {
    let pg = Postgres::start();
    let proxy = Proxy::start(pg.port);
    let dir = tempfile::tempdir().unwrap();
    let direct = setup(dir.path(), &pg.url());
    let a = Server::start(&direct);
    a.wait_ready();
    let cut_setup = setup(dir.path(), &pg.url_via(proxy.port));
    let c = Server::start(&cut_setup);
    c.wait_ready();
    let mut model = Model::seed(&direct.pool);
    converge(&[&a, &c], &model.digest(), Duration::from_secs(5));

    proxy.cut();
    let mut writes = Vec::new();
    for i in 0..5 {
        let body = json!({"candidates": [{"id": format!("p{i}"), "text": format!("partition {i}: the ferry was late")}]});
        let (st, v) = upsert(&a, &body);
        assert_eq!(st, 200, "{v}");
        writes.push((v["seq"].as_u64().unwrap(), body));
    }
    let last = writes.last().unwrap().0;
    std::thread::sleep(Duration::from_millis(1500));
    // Cut off: it still ranks (its pool as it was), says it is behind, refuses writes.
    let (st, r) = c.post("/rank", &json!({"context": "ferry", "top_k": 1000}));
    assert_eq!(st, 200, "{r}");
    assert!(!result_ids(&r).contains(&"p0".to_string()));
    let i = info(&c);
    assert_eq!(i["store"]["connected"], false, "{i}");
    let lag = i["store"]["lag_seconds"].as_f64().unwrap();
    assert!(lag > 1.0, "{i}");
    assert!(c.metric("polyrank_store_lag_seconds").unwrap() > 1.0);
    let (st, e) = upsert(&c, &json!({"candidates": [{"id": "lost", "text": "not stored"}]}));
    assert_eq!((st, e["error_type"].as_str()), (503, Some("store_unavailable")), "{e}");
    let (st, e) = c.send("get", &format!("/candidates/p4?min_seq={last}"), None);
    assert_eq!((st, e["error_type"].as_str()), (503, Some("behind")), "{e}");

    proxy.restore();
    let t0 = Instant::now();
    assert_eq!(c.send("get", &format!("/candidates/p4?min_seq={last}"), None).0, 200);
    eprintln!("caught up {:.2} s after the connection returned (lag was {lag:.1} s)", t0.elapsed().as_secs_f64());
    model.apply(&writes);
    converge(&[&a, &c], &model.digest(), Duration::from_secs(5));
    let t0 = Instant::now();
    while info(&c)["store"]["lag_seconds"].as_f64() != Some(0.0) {
        assert!(t0.elapsed() < Duration::from_secs(5), "{}", info(&c));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_bad_store_url_is_a_clear_error_at_start_and_no_password_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let bad = tiny_setup(dir.path(), 5, 5).arg("--store-url", "mysql://root:hunter2@db/x");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_polyrank"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("serve")
        .args(["--model-dir", bad.model.to_str().unwrap(), "--candidates", bad.pool.to_str().unwrap()])
        .args(&bad.args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("store_url") && !err.contains("hunter2"), "{err}");

    // A reachable database with a wrong password: refused at start, the password not shown.
    let pg = Postgres::start();
    pg.sql("ALTER USER polyrank PASSWORD 'right'");
    let conf = pg.sql("SHOW hba_file");
    std::fs::write(&conf, "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n").unwrap();
    pg.sql("SELECT pg_reload_conf()");
    let url = format!("postgres://polyrank:wrong-hunter2@127.0.0.1:{}/polyrank", pg.port);
    let s = Server::start(&tiny_setup(dir.path(), 5, 5).env("POLYRANK_STORE_URL", &url));
    let t0 = Instant::now();
    let ready = loop {
        let (st, v) = s.send("get", "/health/ready", None);
        if v["status"] == "failed" {
            break (st, v);
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "not failed: {v}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(ready.0, 503);
    let error = ready.1["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("refused the connection") && error.contains("password authentication failed"), "{error}");
    let logs = s.logs();
    assert!(!error.contains("wrong-hunter2") && !logs.contains("wrong-hunter2"), "the password leaked: {error}\n{logs}");
    assert!(!info(&s).to_string().contains("wrong-hunter2"));
}

#[test]
fn replicas_running_other_weights_keep_vectors_of_their_own_and_share_them_with_their_peers() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let old = setup(dir.path(), &pg.url());
    // The same pool with a second model (other weights: another vectors key), as in a rolling
    // update.
    let new_model = dir.path().join("model-2");
    polyrank::testkit::write_tiny_model(&new_model, &polyrank::testkit::tiny_settings(8), 6).unwrap();
    let mut new = old.clone();
    new.model = new_model;
    new.cache = dir.path().join("cache-2");

    let a = Server::start(&old);
    a.wait_ready();
    let b = Server::start(&new);
    b.wait_ready();
    assert!(b.logs().contains("no vectors of this model"), "the new model encoded the pool at start:\n{}", b.logs());
    let mut model = Model::seed(&old.pool);
    converge(&[&a, &b], &model.digest(), Duration::from_secs(5));

    // A write through the old model reaches the new one, which encodes it itself.
    let body = json!({"candidates": [{"id": "rolling", "text": "i like dogs and rain", "meta": {"v": 1}}]});
    let (st, v) = upsert(&a, &body);
    assert_eq!(st, 200, "{v}");
    let seq = v["seq"].as_u64().unwrap();
    let (st, r) = b.post("/rank", &json!({"context": "i like dogs and rain", "top_k": 1000, "min_seq": seq}));
    assert_eq!(st, 200, "{r}");
    assert!(result_ids(&r).contains(&"rolling".to_string()));
    model.apply(&[(seq, body)]);
    converge(&[&a, &b], &model.digest(), Duration::from_secs(2));
    // Each model ranks with its own vectors: the two replicas score differently.
    let (_, ra) = a.post("/rank", &json!({"context": "i like dogs and rain", "top_k": 3, "min_seq": seq}));
    let (_, rb) = b.post("/rank", &json!({"context": "i like dogs and rain", "top_k": 3, "min_seq": seq}));
    assert_ne!(ra["results"][0]["score"], rb["results"][0]["score"]);

    // Both models' vectors are kept for every candidate, so a third replica of either model
    // starts without encoding anything.
    let t0 = Instant::now();
    let keys = loop {
        let k = pg.sql("SELECT count(DISTINCT vectors_key) FROM polyrank_candidate_vectors WHERE id = 'rolling'");
        if k == "2" || t0.elapsed() > Duration::from_secs(5) {
            break k;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(keys, "2", "the new model's vectors of another model's write were not kept");
    let c = Server::start(&new);
    c.wait_ready();
    assert!(!c.logs().contains("encoding pool"), "a replica of the new model encoded again:\n{}", c.logs());
    converge(&[&c], &model.digest(), Duration::from_secs(2));
    let (_, rc) = c.post("/rank", &json!({"context": "i like dogs and rain", "top_k": 3}));
    assert_eq!(rc["results"], rb["results"], "the same model ranks the same from the shared vectors");
}

#[test]
fn min_seq_works_on_the_local_store_too_and_a_seq_no_write_has_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&tiny_setup(dir.path(), 10, 5));
    s.wait_ready();
    let (st, w) = upsert(&s, &json!({"candidates": [{"id": "l1", "text": "a local write"}]}));
    assert_eq!(st, 200, "{w}");
    let seq = w["seq"].as_u64().unwrap();
    assert_eq!(s.send("get", &format!("/candidates/l1?min_seq={seq}"), None).0, 200);
    let i = info(&s);
    assert_eq!((i["store"]["kind"].as_str(), i["store"]["applied_seq"].as_u64()), (Some("local"), Some(seq)), "{i}");
    // A seq beyond any write names no write of this store: 422 at once, not a 503 after the
    // 30 s request budget.
    let t0 = Instant::now();
    let (st, e) = s.post("/rank", &json!({"context": "hi", "min_seq": seq + 1_000_000}));
    assert_eq!((st, e["error_type"].as_str()), (422, Some("validation")), "{e}");
    Contract::load().check("/rank", "post", 422, "application/json", &e);
    let (st, e) = s.send("get", &format!("/candidates/l1?min_seq={}", seq + 1), None);
    assert_eq!(st, 422, "{e}");
    Contract::load().check("/candidates/{id}", "get", 422, "application/json", &e);
    assert!(e["error"].as_str().unwrap().contains("no write with seq"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
}

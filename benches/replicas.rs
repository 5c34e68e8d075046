//! `cargo bench --bench replicas` (`make bench-replicas`): the live pool shared through
//! PostgreSQL, measured on this machine with the real default model and a throwaway database.
//!
//! - ready time of a replica that loads a 100k pool from the database (the first replica
//!   seeds it: its time too);
//! - `/rank` p50 (1 client, 2-turn context) on a shared-store replica vs a local-store one
//!   holding the same pool, measured in alternating rounds, at 10k and 100k;
//! - replication lag: a writer at 10 and 100 upserts/s (open loop) on replica A; how long after
//!   A's answer replica B has applied the write (B's `/info` polled every 2 ms);
//! - upserts/s end to end (4 clients, one candidate each, on two replicas).
//!
//! Options (after `--`): `--sizes 10000,100000`, `--seconds 8` per measurement, `--out bench/`
//! (replicas.md, replicas.json).

#[path = "../tests/common/server.rs"]
#[allow(dead_code)]
mod server;
#[path = "../tests/common/pg.rs"]
#[allow(dead_code)]
mod pg;
mod common;

use common::{load, median, pct, root, synthetic_pool, CONTEXTS};
use pg::Postgres;
use serde_json::{json, Value};
use server::{Server, Setup};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

fn arg(k: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).cloned()
}

fn rank_body(i: usize) -> Value {
    json!({"context": ["hi there!", CONTEXTS[i % CONTEXTS.len()]], "top_k": 10})
}

fn applied_seq(s: &Server) -> u64 {
    s.send("get", "/info", None).1["store"]["applied_seq"].as_u64().unwrap_or(0)
}

/// Upserts at `rate` per second on `a` for `seconds`; returns the lags (ms) until `b` applied
/// each one, measured from `a`'s answer.
fn lag(a: &Server, b: &Server, rate: f64, seconds: f64, tag: &str) -> Vec<f64> {
    let seen: Mutex<HashMap<u64, Instant>> = Mutex::new(HashMap::new());
    let acked: Mutex<Vec<(u64, Instant)>> = Mutex::new(Vec::new());
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut last = applied_seq(b);
            while !done.load(Ordering::Acquire) {
                let now_seq = applied_seq(b);
                let t = Instant::now();
                if now_seq > last {
                    let mut m = seen.lock().unwrap();
                    for q in last + 1..=now_seq {
                        m.insert(q, t);
                    }
                    last = now_seq;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        // Open loop: each write has its start time; a few sender threads keep the schedule.
        let n = (rate * seconds) as usize;
        let start = Instant::now() + Duration::from_millis(200);
        let senders = 8;
        std::thread::scope(|inner| {
            for k in 0..senders {
                let acked = &acked;
                inner.spawn(move || {
                    for i in (k..n).step_by(senders) {
                        let at = start + Duration::from_secs_f64(i as f64 / rate);
                        std::thread::sleep(at.saturating_duration_since(Instant::now()));
                        let body = json!({"candidates": [{"id": format!("{tag}-{i}"), "text": format!("bench write {i}: i like hiking")}]});
                        let (st, v) = a.send("post", "/candidates", Some(&body));
                        if st == 200 {
                            acked.lock().unwrap().push((v["seq"].as_u64().unwrap(), Instant::now()));
                        }
                    }
                });
            }
        });
        std::thread::sleep(Duration::from_secs(2));
        done.store(true, Ordering::Release);
    });
    let seen = seen.into_inner().unwrap();
    let acked = acked.into_inner().unwrap();
    let mut lags: Vec<f64> = acked
        .iter()
        .map(|(q, t)| seen.get(q).map_or(f64::INFINITY, |v| v.saturating_duration_since(*t).as_secs_f64() * 1e3))
        .collect();
    lags.sort_by(|x, y| x.partial_cmp(y).unwrap());
    lags
}

fn main() {
    let sizes: Vec<usize> = arg("--sizes").map(|s| s.split(',').map(|x| x.parse().unwrap()).collect()).unwrap_or(vec![10_000, 100_000]);
    let seconds: f64 = arg("--seconds").map(|s| s.parse().unwrap()).unwrap_or(8.0);
    let out = PathBuf::from(arg("--out").unwrap_or_else(|| "bench".into()));
    let model = root().join("models/default");
    let d = polyrank::model::bert::BertConfig::load(&model).unwrap().hidden_size as i64;
    let mut report = String::from("| measurement | value |\n|---|---|\n");
    let mut json_out = serde_json::Map::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap().trim().to_string())).unwrap_or_default();
    eprintln!("CPU: {cpu}, {} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));

    for &n in &sizes {
        let pg = Postgres::start();
        let dir = tempfile::tempdir().unwrap();
        let (pool, _cache, _) = synthetic_pool(dir.path(), &model, n, d);
        let base = Setup::new(&model, &pool, &dir.path().join("cache")).arg("--threads", "2");
        let shared = base.clone().arg("--store-url", &pg.url());
        // The first replica seeds the database from the pool cache; the second loads it.
        let t0 = Instant::now();
        let a = Server::start(&shared);
        a.wait_ready();
        let seed_s = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let b = Server::start(&shared);
        b.wait_ready();
        let load_s = t0.elapsed().as_secs_f64();
        eprintln!("{n}: first replica seeded the database in {seed_s:.2} s; a second one loaded it and was ready in {load_s:.2} s");
        for l in b.logs().lines().filter(|l| l.contains("pool loaded") || l.contains("shared store open") || l.contains("listening")) {
            eprintln!("  B: {l}");
        }
        report += &format!("| {n}: first replica ready (seeds the database from the pool cache) | {seed_s:.2} s |\n");
        report += &format!("| {n}: next replica ready (loads the pool from PostgreSQL) | {load_s:.2} s |\n");
        json_out.insert(format!("ready_seed_{n}_s"), json!(seed_s));
        json_out.insert(format!("ready_load_{n}_s"), json!(load_s));
        drop(b);

        // /rank p50: shared vs local store, same pool, alternating rounds.
        let local = Server::start(&base.clone().store(&dir.path().join("local-store")));
        local.wait_ready();
        let (mut sh, mut lo) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            lo.push(load(&local.url("/rank"), 1, seconds / 3.0, rank_body).p50_ms);
            sh.push(load(&a.url("/rank"), 1, seconds / 3.0, rank_body).p50_ms);
        }
        drop(local);
        let (sh, lo) = (median(&mut sh), median(&mut lo));
        eprintln!("{n}: /rank p50 shared {sh:.2} ms, local {lo:.2} ms, ratio {:.3}", sh / lo);
        report += &format!("| {n}: /rank p50, shared store / local store (1 client, medians of 3 alternating rounds) | {sh:.2} / {lo:.2} ms = {:.3} |\n", sh / lo);
        json_out.insert(format!("rank_p50_shared_{n}_ms"), json!(sh));
        json_out.insert(format!("rank_p50_local_{n}_ms"), json!(lo));
        drop(a);
    }

    if std::env::args().any(|a| a == "--no-writes") {
        return;
    }
    // Replication lag and write throughput: 10k pool, two replicas.
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let (pool, _, _) = synthetic_pool(dir.path(), &model, 10_000, d);
    let shared = Setup::new(&model, &pool, &dir.path().join("cache")).arg("--threads", "1").arg("--store-url", &pg.url());
    let a = Server::start(&shared);
    a.wait_ready();
    let b = Server::start(&shared);
    b.wait_ready();
    for rate in [10.0, 100.0] {
        let lags = lag(&a, &b, rate, seconds, &format!("r{rate}"));
        let (p50, p99) = (pct(&lags, 0.5), pct(&lags, 0.99));
        eprintln!("lag at {rate}/s: {} writes, p50 {p50:.1} ms, p99 {p99:.1} ms, max {:.1} ms", lags.len(), lags.last().unwrap());
        report += &format!("| replication lag at {rate:.0} upserts/s on A: B applied it, after A's answer (p50 / p99, {} writes) | {p50:.1} / {p99:.1} ms |\n", lags.len());
        json_out.insert(format!("lag_{rate:.0}_p50_ms"), json!(p50));
        json_out.insert(format!("lag_{rate:.0}_p99_ms"), json!(p99));
    }
    let urls = [a.url("/candidates"), b.url("/candidates")];
    let counter = std::sync::atomic::AtomicUsize::new(0);
    let body = |i: usize| json!({"candidates": [{"id": format!("t-{i}-{}", counter.fetch_add(1, Ordering::Relaxed)), "text": format!("throughput write {i}")}]});
    let (la, lb) = std::thread::scope(|s| {
        let ha = s.spawn(|| load(&urls[0], 2, seconds, body));
        let hb = s.spawn(|| load(&urls[1], 2, seconds, body));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    let ups = la.rps + lb.rps;
    eprintln!("upserts end to end: {ups:.0}/s (p50 {:.1} / {:.1} ms), errors {}", la.p50_ms, lb.p50_ms, la.errors + lb.errors);
    report += &format!("| upserts/s end to end (4 clients on 2 replicas, one candidate each) | {ups:.0}/s (p50 {:.1} ms) |\n", la.p50_ms.max(lb.p50_ms));
    json_out.insert("upserts_per_s".into(), json!(ups));

    std::fs::create_dir_all(&out).unwrap();
    let head = format!("Shared store (PostgreSQL 15, loopback), default model, `cargo bench --bench replicas`; CPU: {cpu}.\n\n");
    std::fs::write(out.join("replicas.md"), head + &report).unwrap();
    std::fs::write(out.join("replicas.json"), serde_json::to_string_pretty(&Value::Object(json_out)).unwrap()).unwrap();
    println!("{report}");
}

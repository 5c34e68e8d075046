//! Startup with a 100k-candidate store (snapshot + log): ready within 3 s. Alone in its test
//! binary: the other live-pool tests run in parallel and would share the two cores.

mod common;

use common::server::{result_ids as ids, Server, Setup};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A store of `n` random unit vectors for `model`, seeded from `seed_file`'s candidates (so
/// nothing is upserted at start), plus a log of a few writes.
fn big_store(model: &Path, seed_file: &Path, store: &Path, n: usize) {
    use polyrank::pool::store::{seed_hash, vectors_key, write_snapshot, Candidate, Files, Op, Snapshot, SnapshotHeader};
    let settings = polyrank::model::format::PolySettings::load(model).unwrap();
    let d = polyrank::model::bert::BertConfig::load(model).unwrap().hidden_size as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut unit = |k: usize| -> Vec<f32> {
        let mut v: Vec<f32> = (0..k * d).map(|_| rng.gen_range(-1.0..1.0f32)).collect();
        for row in v.chunks_mut(d) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= norm);
        }
        v
    };
    let mut seed = String::new();
    let mut candidates = Vec::with_capacity(n);
    for i in 0..n {
        let c = Candidate { id: format!("s{i}"), text: format!("stored candidate number {i}"), meta: Some(json!({"bucket": i % 100})) };
        if i < 10 {
            seed += &serde_json::to_string(&c).unwrap();
            seed.push('\n');
        }
        candidates.push(c);
    }
    std::fs::write(seed_file, seed).unwrap();
    std::fs::create_dir_all(store).unwrap();
    let header = SnapshotHeader {
        version: 1,
        vectors_key: vectors_key(model, &settings, polyrank::config::Dtype::Float32).unwrap(),
        seed_hash: seed_hash(&[PathBuf::from(seed_file)]).unwrap(),
        last_seq: 0,
        n,
        d,
    };
    write_snapshot(store, &Snapshot { header, candidates, vectors: unit(n) }).unwrap();
    let mut wal = Files::open(store).unwrap();
    let extra: Vec<Candidate> = (0..5).map(|j| Candidate { id: format!("log{j}"), text: format!("from the log {j}"), meta: None }).collect();
    wal.append(1, &Op::Upsert(extra, unit(5))).unwrap();
    wal.append(2, &Op::Delete(vec!["s7".into()])).unwrap();
}

#[test]
fn a_100k_store_with_a_log_is_ready_within_3_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::default_model();
    let (seed, store) = (dir.path().join("seed.jsonl"), dir.path().join("store"));
    big_store(&model, &seed, &store, 100_000);
    let setup = Setup::new(&model, &seed, &dir.path().join("cache")).store(&store);
    let t0 = Instant::now();
    let s = Server::start(&setup);
    s.wait_ready();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("100k store + log ready in {secs:.2} s");
    assert!(secs <= 3.0, "ready after {secs:.2} s:\n{}", s.logs());
    let (_, info) = s.send("get", "/info", None);
    assert_eq!(info["pool_size"], 100_000 + 5 - 1);
    assert_eq!(s.send("get", "/candidates/log3", None).0, 200);
    assert_eq!(s.send("get", "/candidates/s7", None).0, 404);
    let (st, v) = s.send("post", "/rank", Some(&json!({"context": "hello", "filter": {"bucket": 3}, "top_k": 1000})));
    assert_eq!((st, ids(&v).len()), (200, 1000), "1 % of the pool");
    assert!(!s.logs().contains("encoding pool"), "nothing was encoded");
}

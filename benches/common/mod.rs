//! Shared by the benchmarks: a closed-loop load generator, percentiles, and synthetic pools
//! written straight into the server's cache format.
#![allow(dead_code)]

use polyrank::pool::cache::PoolCache;
use polyrank::model::format::PolySettings;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Contexts the benchmarks send, in turn.
pub const CONTEXTS: &[&str] = &[
    "what is your favourite food?",
    "i just got back from a trip to paris, have you ever been?",
    "do you have any pets at home?",
    "what kind of music do you listen to when you work?",
];

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[derive(Clone, Copy, Default, serde::Serialize)]
pub struct Load {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub rps: f64,
    pub requests: usize,
    pub errors: usize,
}

/// `clients` threads send requests back to back for `seconds`, then wait for the ones in
/// flight; throughput is completed requests over the whole time, so a server slower than the
/// window still gets a figure.
pub fn load(url: &str, clients: usize, seconds: f64, body: impl Fn(usize) -> Value + Sync) -> Load {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let results: Vec<(Vec<f64>, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let body = &body;
                s.spawn(move || {
                    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
                    let (mut lat, mut errors, mut i) = (Vec::new(), 0, c);
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        match client.post(url).json(&body(i)).send() {
                            Ok(r) if r.status().is_success() => {
                                let _ = r.bytes();
                                lat.push(t.elapsed().as_secs_f64() * 1e3);
                            }
                            _ => errors += 1,
                        }
                        i += clients;
                    }
                    (lat, errors)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut lat: Vec<f64> = results.iter().flat_map(|r| r.0.iter().copied()).collect();
    let errors = results.iter().map(|r| r.1).sum();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if lat.is_empty() {
        return Load { errors, ..Default::default() };
    }
    Load { p50_ms: pct(&lat, 0.5), p95_ms: pct(&lat, 0.95), p99_ms: pct(&lat, 0.99), rps: lat.len() as f64 / elapsed, requests: lat.len(), errors }
}

/// A pool of `n` placeholder texts whose cache file holds random unit vectors.
pub fn synthetic_pool(dir: &Path, model: &Path, n: usize, d: i64) -> (PathBuf, PathBuf, PathBuf) {
    let pool = dir.join(format!("pool-{n}.txt"));
    let text: String = (0..n).map(|i| format!("candidate {i}\n")).collect();
    std::fs::write(&pool, text).unwrap();
    let ids = dir.join(format!("ids-{n}.txt"));
    std::fs::write(&ids, (1..=n).map(|i| format!("pool-{n}-{i}\n")).collect::<String>()).unwrap();
    let cache_dir = dir.join("cache");
    let settings = PolySettings::load(model).unwrap();
    let cache = PoolCache::new(&cache_dir, model, &settings, std::slice::from_ref(&pool), polyrank::config::Dtype::Float32).unwrap();
    tch::manual_seed(n as i64);
    let v = Tensor::randn([n as i64, d], (Kind::Float, Device::Cpu));
    let v = &v / v.norm_scalaropt_dim(2.0, [-1], true);
    cache.store(&v).unwrap();
    (pool, cache.path.clone(), ids)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}


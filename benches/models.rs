//! `cargo bench --bench models -- --models DIR,DIR,… [--sizes 10000,100000] [--seconds 5]`:
//! what a model's shape costs when served: /rank p50 / p95 (1 client, back to back, after a
//! warm-up) over pools of random unit vectors written straight into the cache format, for each
//! model on the same machine in the same run. Weights do not change the cost, m and d do; this
//! is the latency column of the README's quality table.
//!
//! `--baseline-bin PATH` compares builds instead: every (model, N) is measured `--rounds`
//! times (default 3) with the baseline binary and this build, alternately, and the table
//! gives the median of the rounds' p50 for each and their ratio. `--baseline-config FILE`
//! gives the baseline its own settings file (one from its commit: `git show REV:config/default.toml`),
//! `--config FILE` this build's (e.g. one pinning `scoring_precision = "float32"`).
//! Each round also measures throughput at `--clients` (default 32) back-to-back clients.

#[path = "../tests/common/server.rs"]
#[allow(dead_code)]
mod server;
mod common;

use common::{load, median, root, synthetic_pool, CONTEXTS};
use polyrank::model::bert::BertConfig;
use polyrank::model::format::{Mode, PolySettings};
use serde_json::json;
use server::{Server, Setup};
use std::path::PathBuf;


fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str| args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).cloned();
    let models: Vec<PathBuf> = get("--models")
        .map(|s| s.split(',').map(|m| root().join(m)).collect())
        .unwrap_or_else(|| vec![root().join("models/minilm-bi"), root().join("models/default")]);
    let sizes: Vec<usize> = get("--sizes").map(|s| s.split(',').map(|x| x.parse().expect("--sizes")).collect()).unwrap_or(vec![10_000, 100_000]);
    let seconds: f64 = get("--seconds").map(|s| s.parse().expect("--seconds")).unwrap_or(5.0);
    let baseline: Option<PathBuf> = get("--baseline-bin").map(PathBuf::from);
    let rounds: usize = get("--rounds").map(|s| s.parse().expect("--rounds")).unwrap_or(3);
    if let Some(base) = baseline {
        // An older binary may not know today's settings file: give it its own.
        let base_config = get("--baseline-config").map(PathBuf::from);
        // This build's own settings file (e.g. one pinning `scoring_precision`).
        let this_config = get("--config").map(PathBuf::from);
        let clients: usize = get("--clients").map(|s| s.parse().expect("--clients")).unwrap_or(32);
        return compare(&models, &sizes, seconds, &base, [base_config.as_deref(), this_config.as_deref()], rounds, clients);
    }
    let mut md = String::from("| model | m | N | /rank p50 ms | p95 ms | requests |\n|---|---|---|---|---|---|\n");
    for model in &models {
        let settings = PolySettings::load(model).unwrap();
        let d = BertConfig::load(model).unwrap().hidden_size;
        let m = if settings.mode == Mode::Bi { 1 } else { settings.n_codes };
        for &n in &sizes {
            let dir = tempfile::tempdir().unwrap();
            let (pool, _, _) = synthetic_pool(dir.path(), model, n, d);
            let s = Server::start(&Setup::new(model, &pool, &dir.path().join("cache")));
            s.wait_ready();
            let url = s.url("/rank");
            let body = |i: usize| json!({"context": CONTEXTS[i % CONTEXTS.len()], "top_k": 10});
            load(&url, 1, 1.0, body); // warm-up
            let r = load(&url, 1, seconds, body);
            assert_eq!(r.errors, 0, "{} at N = {n}: {} failed requests", model.display(), r.errors);
            let name = model.strip_prefix(root()).unwrap_or(model).display();
            let line = format!("| {name} | {m} | {n} | {:.1} | {:.1} | {} |\n", r.p50_ms, r.p95_ms, r.requests);
            eprint!("{line}");
            md += &line;
        }
    }
    println!("\n{md}");
}

/// This build against `base`, alternately, `rounds` times per (model, N).
fn compare(models: &[PathBuf], sizes: &[usize], seconds: f64, base: &std::path::Path, configs: [Option<&std::path::Path>; 2], rounds: usize, clients: usize) {
    let mut md = format!("| model | N | baseline p50 ms | this build p50 ms | p50 ratio (this / baseline) | baseline req/s at {clients} clients | this build req/s | throughput ratio | rounds | scoring precision per round (baseline / this build) |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for model in models {
        let d = BertConfig::load(model).unwrap().hidden_size;
        for &n in sizes {
            let dir = tempfile::tempdir().unwrap();
            let (pool, _, _) = synthetic_pool(dir.path(), model, n, d);
            let mut p50 = [Vec::new(), Vec::new()];
            let mut rps = [Vec::new(), Vec::new()];
            let mut precisions: [Vec<String>; 2] = [Vec::new(), Vec::new()];
            for _ in 0..rounds {
                for (which, bin) in [Some(base), None].into_iter().enumerate() {
                    let mut setup = Setup::new(model, &pool, &dir.path().join("cache"));
                    if let Some(b) = bin {
                        setup = setup.binary(b);
                    }
                    if let Some(c) = configs[which] {
                        setup = setup.arg("--config", c.to_str().unwrap());
                    }
                    let s = Server::start(&setup);
                    s.wait_ready();
                    // This build serves in float32 until it has measured and converted its
                    // pool (~5 s after ready at 1M): time what it settles on.
                    let t0 = std::time::Instant::now();
                    while which == 1 && !s.get("/info").1.contains("\"scoring\"") && t0.elapsed().as_secs() < 120 {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                    let url = s.url("/rank");
                    let body = |i: usize| json!({"context": CONTEXTS[i % CONTEXTS.len()], "top_k": 10});
                    load(&url, 1, 1.0, body);
                    // What each side scores in (`auto` decides at start), said per round.
                    let info: serde_json::Value = serde_json::from_str(&s.get("/info").1).unwrap_or_default();
                    precisions[which].push(info["scoring"]["precision"].as_str().unwrap_or("float32").to_string());
                    eprintln!("N = {n}, {}: {}", if which == 0 { "baseline" } else { "this build" }, info["scoring"]["reason"]);
                    let r = load(&url, 1, seconds, body);
                    assert_eq!(r.errors, 0, "{} failed requests", r.errors);
                    p50[which].push(r.p50_ms);
                    let many = load(&url, clients, seconds, body);
                    assert_eq!(many.errors, 0, "{} failed requests at {clients} clients", many.errors);
                    rps[which].push(many.rps);
                }
            }
            // Every round's p50, for the spread (and a standard error) beside the medians.
            let each = |v: &[f64]| v.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(",");
            eprintln!("N = {n}: p50 per round, baseline {} / this build {}; req/s per round, baseline {} / this build {}", each(&p50[0]), each(&p50[1]), each(&rps[0]), each(&rps[1]));
            let (b, t) = (median(&mut p50[0]), median(&mut p50[1]));
            let name = model.strip_prefix(root()).unwrap_or(model).display();
            let (rb, rt) = (median(&mut rps[0]), median(&mut rps[1]));
            let line = format!(
                "| {name} | {n} | {b:.1} | {t:.1} | {:.3} | {rb:.1} | {rt:.1} | {:.2} | {rounds} | {} / {} |\n",
                t / b,
                rt / rb,
                precisions[0].join(","),
                precisions[1].join(",")
            );
            eprint!("{line}");
            md += &line;
        }
    }
    println!("\n{md}");
}

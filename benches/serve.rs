//! `cargo bench --bench serve`: /rank latency and throughput of the real server against a
//! minimal Python (FastAPI + PyTorch eager) service doing the same maths on the same weights
//! and pool, plus the hardware bound, dynamic batching, /encode throughput and fp16 storage.
//!
//! Options (after `--`): `--sizes 1000,10000,100000,1000000`, `--seconds 6` per measurement,
//! `--out bench/` for results.md, results.json and latency.png.
//!
//! The scoring-precision axis (`--precision-sizes`, default the sizes among 10k, 100k, 1M):
//! at each of those sizes the server again in float32, int8 and bfloat16 (`auto` is the main
//! table's server), 1 client p50 and 32-client throughput, beside the Python service's figures
//! from the same run and, with `--baseline-bin PATH [--baseline-config FILE]`, an older
//! build's (`make bench BASELINE_REV=…` builds one). A precision over 3× float32's p50 at one
//! size is not timed at the larger ones (bf16 where the CPU has no native bf16).
//! Pools are random unit vectors (their texts are placeholders), written straight into the
//! server's cache file format so every size starts from a warm cache.

#[path = "../tests/common/server.rs"]
#[allow(dead_code)]
mod server;
mod common;

use polyrank::infer::ranker::Ranker;
use polyrank::text::TextKind;
use serde_json::{json, Value};
use common::{free_port, load, median, root, synthetic_pool, Load, CONTEXTS};
use server::{Server, Setup};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};


struct Opts {
    sizes: Vec<usize>,
    seconds: f64,
    out: PathBuf,
    precision_sizes: Vec<usize>,
    baseline_bin: Option<PathBuf>,
    baseline_config: Option<PathBuf>,
}

fn opts() -> Opts {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str| args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).cloned();
    let sizes: Vec<usize> = get("--sizes")
        .map(|s| s.split(',').map(|x| x.parse().expect("--sizes")).collect())
        .unwrap_or_else(|| vec![1_000, 10_000, 100_000, 1_000_000]);
    Opts {
        precision_sizes: get("--precision-sizes")
            .map(|s| s.split(',').map(|x| x.parse().expect("--precision-sizes")).collect())
            .unwrap_or_else(|| sizes.iter().copied().filter(|n| [10_000, 100_000, 1_000_000].contains(n)).collect()),
        sizes,
        seconds: get("--seconds").map(|s| s.parse().expect("--seconds")).unwrap_or(6.0),
        out: PathBuf::from(get("--out").unwrap_or_else(|| "bench".into())),
        baseline_bin: get("--baseline-bin").filter(|s| !s.is_empty()).map(PathBuf::from),
        baseline_config: get("--baseline-config").filter(|s| !s.is_empty()).map(PathBuf::from),
    }
}

fn rank_body(i: usize) -> Value {
    json!({"context": CONTEXTS[i % CONTEXTS.len()], "top_k": 10})
}

/// Contexts for the approximate mode's recall@10 against the exact ranking.
const RECALL_CONTEXTS: &[&str] = &[
    "what is your favourite food?", "do you have any pets at home?", "where did you grow up?",
    "what kind of music do you like?", "have you ever been to paris?", "what do you do for work?",
    "i just finished a great book", "it has been raining all week", "do you play any sports?",
    "what are your plans for the weekend?", "i love hiking in the mountains", "my cat is sick today",
    "what movie did you see last?", "i am learning to cook", "do you like coffee or tea?",
    "i moved to a new city", "what is your dream job?", "i have two brothers", "i hate mondays",
    "what games do you play?",
];

fn top_ids(s: &Server, body: Value) -> Vec<String> {
    let (_, v) = s.post("/rank", &body);
    v["results"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_string()).collect()
}

struct Python(Child);
impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python_server(model: &Path, cache: &Path, ids: &Path, port: u16) -> Python {
    let py = std::env::var("POLYRANK_PYTHON").unwrap_or_else(|_| root().join(".venv/bin/python").display().to_string());
    let child = Command::new(py)
        .arg(root().join("scripts/baseline_server.py"))
        .args(["--model".as_ref(), model.as_os_str(), "--pool-cache".as_ref(), cache.as_os_str(), "--ids".as_ref(), ids.as_os_str()])
        .args(["--port", &port.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .expect("python baseline");
    let t0 = Instant::now();
    let client = reqwest::blocking::Client::new();
    while client.get(format!("http://127.0.0.1:{port}/health/ready")).send().map(|r| r.status() != 200).unwrap_or(true) {
        assert!(t0.elapsed() < Duration::from_secs(300), "python baseline did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Python(child)
}

/// The CPU's model name and the flags that decide the scoring precision.
fn cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info.lines().find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())).unwrap_or_else(|| "unknown CPU".into());
    let flags: Vec<&str> = info
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .map(|r| r.split_whitespace().filter(|f| ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"].contains(f)).collect())
        .unwrap_or_default();
    format!("{model} (flags: {})", flags.join(" "))
}

/// `/info`'s `scoring` once the server has measured and converted its pool (it serves in
/// float32 until then: ~5 s after ready at 1M); Null for a build without it, after `wait_s`.
fn settle(s: &Server, wait_s: u64) -> Value {
    let t0 = Instant::now();
    loop {
        let info: Value = serde_json::from_str(&s.get("/info").1).unwrap_or_default();
        if info.get("scoring").is_some() || t0.elapsed() > Duration::from_secs(wait_s) {
            return info["scoring"].clone();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A process's resident and peak resident memory (VmRSS, VmHWM) in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status.lines().find_map(|l| l.strip_prefix(key)).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

/// 1-client p50 and 32-client throughput of one server, once its scoring has settled; its
/// `/info` scoring and its memory after the load (resident, peak).
fn measure(setup: &Setup, seconds: f64) -> (Load, Load, Value, (f64, f64)) {
    let s = Server::start(setup);
    s.wait_ready();
    let scoring = settle(&s, if setup.bin.is_some() { 5 } else { 120 });
    let url = s.url("/rank");
    let _ = load(&url, 1, 1.0, rank_body);
    let one = load(&url, 1, seconds, rank_body);
    let many = load(&url, 32, seconds, rank_body);
    (one, many, scoring, memory_mib(s.child.id()))
}

fn precision_row(n: usize, name: &str, one: &Load, many: &Load, fp32: Option<(&Load, &Load)>, mem: Option<(f64, f64)>) -> String {
    let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}×", a / b) } else { "n/a".into() };
    let (r50, rrps) = match fp32 {
        Some((f1, fm)) => (ratio(one.p50_ms, f1.p50_ms), ratio(many.rps, fm.rps)),
        None => ("—".into(), "—".into()),
    };
    let mem = mem.map(|(rss, peak)| format!("{rss:.0} / {peak:.0}")).unwrap_or_else(|| "—".into());
    format!("| {n} | {name} | {:.1} | {r50} | {:.1} | {rrps} | {mem} |\n", one.p50_ms, many.rps)
}

fn main() {
    let o = opts();
    std::fs::create_dir_all(&o.out).unwrap();
    let model = root().join("models/default");
    let dir = tempfile::tempdir().unwrap();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    tch::set_num_threads(cores as i32);
    let _g = tch::no_grad_guard();

    // The hardware bound: sgemm rate at the scoring shape, and one context encoding.
    let ranker = Ranker::load(&model, Device::Cpu).unwrap();
    let (m, d) = (ranker.model.settings.n_codes, ranker.model.dim());
    let a = Tensor::randn([100_000, d], (Kind::Float, Device::Cpu));
    let b = Tensor::randn([d, m], (Kind::Float, Device::Cpu));
    let mut gemm: Vec<f64> = (0..12)
        .map(|_| {
            let t = Instant::now();
            let _ = a.matmul(&b);
            t.elapsed().as_secs_f64()
        })
        .collect();
    let gflops = 2.0 * (m * d) as f64 * 100_000.0 / median(&mut gemm) / 1e9;
    let mut enc: Vec<f64> = (0..20)
        .map(|i| {
            let t = Instant::now();
            let e = ranker.tokenize(&[CONTEXTS[i % CONTEXTS.len()].to_string()], TextKind::Context).unwrap();
            let _ = ranker.context_codes(&e, 1);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let encode_ms = median(&mut enc);
    eprintln!("sgemm {gflops:.1} GFLOP/s at [100000,{d}]x[{d},{m}]; context encoding {encode_ms:.2} ms");

    // fp16 storage: score error against fp32 on the same vectors.
    let pool32 = Tensor::randn([20_000, d], (Kind::Float, Device::Cpu));
    let pool32 = &pool32 / pool32.norm_scalaropt_dim(2.0, [-1], true);
    let e = ranker.tokenize(&CONTEXTS.iter().map(|s| s.to_string()).collect::<Vec<_>>(), TextKind::Context).unwrap();
    let codes = ranker.context_codes(&e, 4);
    let s32 = ranker.model.score(&codes, &pool32);
    let s16 = ranker.model.score(&codes, &pool32.to_kind(Kind::Half));
    let fp16_err = (&s32 - &s16).abs().max().double_value(&[]);
    drop(ranker);

    let mut rows: Vec<Value> = Vec::new();
    let mut md = String::new();
    md += &format!(
        "Machine: {cores} cores, {}. sgemm at the scoring shape: **{gflops:.1} GFLOP/s**; one context encoding: **{encode_ms:.2} ms**; m = {m}, d = {d}.\n\n",
        cpu()
    );
    md += "| pool N | clients | polyrank p50 / p95 / p99 ms | polyrank req/s | Python p50 / p95 / p99 ms | Python req/s | throughput ratio | p50 ratio |\n|---|---|---|---|---|---|---|---|\n";
    let mut bound_line = String::new();
    let mut ready_100k = None;
    let mut batching_md = String::new();
    let mut approx_md = String::new();
    let mut precision_md = String::new();
    let mut precision_rows: Vec<Value> = Vec::new();
    // Precisions over 3× float32's p50 at a smaller size, not timed again.
    let mut too_slow: Vec<&str> = Vec::new();
    for &n in &o.sizes {
        let (pool, cache, ids) = synthetic_pool(dir.path(), &model, n, d);
        // A store of its own per size; its first start seeds it from the pool cache, so the
        // timed start is a restart that reads the store's snapshot.
        let store = dir.path().join(format!("store-{n}"));
        let setup = Setup::new(&model, &pool, &dir.path().join("cache")).arg("--store-dir", store.to_str().unwrap());
        drop({
            let s = Server::start(&setup);
            s.wait_ready();
            s
        });
        let t0 = Instant::now();
        let s = Server::start(&setup);
        s.wait_ready();
        let ready_s = t0.elapsed().as_secs_f64();
        if n == 100_000 {
            ready_100k = Some(ready_s);
        }
        let auto_scoring = settle(&s, 120);
        let url = s.url("/rank");
        let _ = load(&url, 1, 1.0, rank_body); // warm-up
        let ours: Vec<Load> = [1, 8, 32].iter().map(|&c| load(&url, c, o.seconds, rank_body)).collect();
        if n >= 100_000 {
            let mut recall = 0.0;
            for ctx in RECALL_CONTEXTS {
                let exact = top_ids(&s, json!({"context": ctx, "top_k": 10}));
                let approx = top_ids(&s, json!({"context": ctx, "top_k": 10, "approximate": true}));
                recall += approx.iter().filter(|id| exact.contains(id)).count() as f64 / 10.0;
            }
            recall /= RECALL_CONTEXTS.len() as f64;
            let a = load(&url, 1, o.seconds, |i| json!({"context": CONTEXTS[i % CONTEXTS.len()], "top_k": 10, "approximate": true}));
            approx_md += &format!(
                "| {n} | {:.1} | {:.1} | **{:.2}×** | {recall:.3} |\n",
                ours[0].p50_ms,
                a.p50_ms,
                ours[0].p50_ms / a.p50_ms.max(1e-9)
            );
        }
        let batching = (n <= 100_000).then(|| ours[2]);
        let auto_mem = memory_mib(s.child.id());
        drop(s);
        let unbatched = batching.map(|_| {
            let s = Server::start(&setup.clone().arg("--max-batch-size", "1"));
            s.wait_ready();
            let _ = load(&s.url("/rank"), 1, 1.0, rank_body);
            load(&s.url("/rank"), 32, o.seconds, rank_body)
        });
        if let (Some(b), Some(u)) = (batching, unbatched) {
            batching_md += &format!(
                "| {n} | {:.1} | {:.1} | **{:.2}×** |\n",
                u.rps,
                b.rps,
                b.rps / u.rps.max(1e-9)
            );
        }
        let port = free_port();
        let py = python_server(&model, &cache, &ids, port);
        let purl = format!("http://127.0.0.1:{port}/rank");
        let _ = load(&purl, 1, 1.0, rank_body);
        let theirs: Vec<Load> = [1, 8, 32].iter().map(|&c| load(&purl, c, o.seconds, rank_body)).collect();
        drop(py);
        if o.precision_sizes.contains(&n) {
            // The same pool and store in each scoring precision; `auto` is the server above.
            let mut fp32: Option<(Load, Load)> = None;
            let mut rows = String::new();
            for p in ["float32", "int8", "bfloat16"] {
                if too_slow.contains(&p) {
                    rows += &format!("| {n} | {p} | not timed (over 3× float32 at a smaller pool) | | | | |\n");
                    continue;
                }
                let (one, many, _, mem) = measure(&setup.clone().arg("--scoring-precision", p), o.seconds);
                if let Some((f1, _)) = &fp32 {
                    if one.p50_ms > 3.0 * f1.p50_ms {
                        too_slow.push(p);
                    }
                }
                rows += &precision_row(n, p, &one, &many, fp32.as_ref().map(|(a, b)| (a, b)), Some(mem));
                precision_rows.push(json!({"n": n, "precision": p, "one": one, "many": many, "rss_mib": mem.0, "peak_rss_mib": mem.1}));
                if p == "float32" {
                    fp32 = Some((one, many));
                }
            }
            let f = fp32.as_ref().map(|(a, b)| (a, b));
            let chosen = auto_scoring["precision"].as_str().unwrap_or("?").to_string();
            rows += &precision_row(n, &format!("**auto** (→ {chosen})"), &ours[0], &ours[2], f, Some(auto_mem));
            precision_rows.push(json!({"n": n, "precision": "auto", "chosen": chosen, "reason": auto_scoring["reason"], "one": ours[0], "many": ours[2], "rss_mib": auto_mem.0, "peak_rss_mib": auto_mem.1}));
            if let Some(bin) = &o.baseline_bin {
                let store = dir.path().join(format!("store-baseline-{n}"));
                let mut b = Setup::new(&model, &pool, &dir.path().join("cache")).binary(bin).env("POLYRANK_STORE_DIR", store.to_str().unwrap());
                if let Some(c) = &o.baseline_config {
                    b = b.arg("--config", c.to_str().unwrap());
                }
                let (one, many, _, mem) = measure(&b, o.seconds);
                rows += &precision_row(n, "baseline build", &one, &many, f, Some(mem));
                precision_rows.push(json!({"n": n, "precision": "baseline", "one": one, "many": many, "rss_mib": mem.0, "peak_rss_mib": mem.1}));
            }
            rows += &precision_row(n, "Python (PyTorch eager, fp32)", &theirs[0], &theirs[2], f, None);
            precision_md += &rows;
            eprint!("{rows}");
        }
        for (i, c) in [1, 8, 32].iter().enumerate() {
            let (a, b) = (ours[i], theirs[i]);
            let cell = |l: &Load| match l.requests {
                0 => format!("all {} requests failed | 0", l.errors),
                _ => format!("{:.1} / {:.1} / {:.1} | {:.1}", l.p50_ms, l.p95_ms, l.p99_ms, l.rps),
            };
            let ratios = match (a.requests, b.requests) {
                (0, _) | (_, 0) => "n/a | n/a".to_string(),
                _ => format!("{:.2}× | {:.2}×", a.rps / b.rps, b.p50_ms / a.p50_ms),
            };
            md += &format!("| {n} | {c} | {} | {} | {ratios} |\n", cell(&a), cell(&b));
            rows.push(json!({"n": n, "clients": c, "polyrank": a, "python": b}));
        }
        if n == 100_000 {
            let bound = encode_ms + 2.0 * (m * d) as f64 * n as f64 / (gflops * 1e9) * 1e3;
            bound_line = format!(
                "At N = 100,000: bound = encoding {encode_ms:.2} ms + 2·m·d·N / sgemm = **{bound:.1} ms**; polyrank p50 at 1 client **{:.1} ms** = **{:.2}×** the bound (target ≤ 1.3×).\n",
                ours[0].p50_ms,
                ours[0].p50_ms / bound
            );
        }
        eprintln!("N={n} done (ready in {ready_s:.2} s)");
    }

    let filter_md = if o.sizes.contains(&100_000) { filter_bench(dir.path(), &model, 100_000, d, o.seconds) } else { String::new() };

    // /encode throughput on the default model: 16 candidate texts per request, 8 clients.
    let encode_store = dir.path().join("store-encode");
    let s = Server::start(&Setup::new(&model, &root().join("data/chitchat-pool.jsonl"), &root().join("data/pool-cache")).arg("--store-dir", encode_store.to_str().unwrap()));
    s.wait_ready();
    let texts: Vec<String> = (0..16).map(|i| format!("this is candidate number {i} about food, music and travel")).collect();
    let enc = load(&s.url("/encode"), 8, o.seconds, |_| json!({"texts": texts, "kind": "candidate"}));
    drop(s);

    md += "\n";
    md += &bound_line;
    if let Some(r) = ready_100k {
        md += &format!("Restart with a 100,000-candidate store: ready **{r:.2} s** after process start (target ≤ 3 s).\n");
    }
    md += &format!(
        "\nDynamic batching at 32 clients (req/s):\n\n| pool N | max_batch_size 1 | max_batch_size 32 | gain |\n|---|---|---|---|\n{batching_md}"
    );
    md += &format!(
        "\nApproximate mode (`\"approximate\": true`, 2,000 candidates preselected by the mean of the codes, then scored exactly), 1 client; recall@10 against the exact top 10 over 20 contexts (random-vector pools):\n\n| pool N | exact p50 ms | approximate p50 ms | speed-up | recall@10 |\n|---|---|---|---|---|\n{approx_md}"
    );
    md += &filter_md;
    if !precision_md.is_empty() {
        md += &format!(
            "\nScoring precision, {}: /rank p50 at 1 client and req/s at 32 clients, each against float32 in the same run (lower p50 and higher req/s are better); `auto` is the server of the main table.\n\n| pool N | precision | p50 ms | p50 vs float32 | req/s (32 clients) | req/s vs float32 | resident / peak MiB |\n|---|---|---|---|---|---|---|\n{precision_md}",
            cpu()
        );
    }
    md += &format!(
        "\n/encode, 16 candidate texts per request, 8 clients: **{:.0} texts/s** (p50 {:.1} ms).\n",
        enc.rps * 16.0,
        enc.p50_ms
    );
    md += &format!(
        "\nCached candidate storage: {} bytes per candidate in fp32, {} in fp16 (`fp16_candidates`); fp16 max score error on 20,000 random candidates: {fp16_err:.2e} (target ≤ 1e-3).\n",
        d * 4,
        d * 2
    );
    println!("{md}");
    std::fs::write(o.out.join("results.md"), &md).unwrap();
    let all = json!({"cpu": cpu(), "sgemm_gflops": gflops, "encode_ms": encode_ms, "rank": rows, "precision": precision_rows, "fp16_max_err": fp16_err, "ready_100k_s": ready_100k});
    std::fs::write(o.out.join("results.json"), serde_json::to_string_pretty(&all).unwrap()).unwrap();
    let py = std::env::var("POLYRANK_PYTHON").unwrap_or_else(|_| root().join(".venv/bin/python").display().to_string());
    let ok = Command::new(py).arg(root().join("scripts/plot_bench.py")).arg(o.out.join("results.json")).arg(o.out.join("latency.png")).status();
    eprintln!("plot: {ok:?}");
}

/// Filtered ranking: a filter that keeps 1 % of the pool against the unfiltered ranking,
/// end to end over HTTP (1 client) and in the scoring stage alone (in process, the same
/// model maths: all N rows against the 1 % rows, taken through the meta index).
fn filter_bench(dir: &Path, model: &Path, n: usize, d: i64, seconds: f64) -> String {
    use polyrank::pool::filter::Filter;
    use polyrank::pool::live::LivePool;
    use polyrank::pool::store::Candidate;
    let pool = dir.join(format!("meta-{n}.jsonl"));
    let cands: Vec<Candidate> =
        (0..n).map(|i| Candidate { id: format!("f{i}"), text: format!("candidate {i}"), meta: Some(json!({"bucket": i % 100})) }).collect();
    std::fs::write(&pool, cands.iter().map(|c| serde_json::to_string(c).unwrap() + "\n").collect::<String>()).unwrap();
    let settings = polyrank::model::format::PolySettings::load(model).unwrap();
    let cache = polyrank::pool::cache::PoolCache::new(&dir.join("cache"), model, &settings, std::slice::from_ref(&pool), polyrank::config::Dtype::Float32).unwrap();
    tch::manual_seed(7);
    let v = Tensor::randn([n as i64, d], (Kind::Float, Device::Cpu));
    let v = &v / v.norm_scalaropt_dim(2.0, [-1], true);
    cache.store(&v).unwrap();
    let store = dir.join(format!("meta-store-{n}"));
    let s = Server::start(&Setup::new(model, &pool, &dir.join("cache")).arg("--store-dir", store.to_str().unwrap()));
    s.wait_ready();
    let url = s.url("/rank");
    let body = |i: usize, f: bool| {
        let mut b = json!({"context": CONTEXTS[i % CONTEXTS.len()], "top_k": 10});
        if f {
            b["filter"] = json!({"bucket": 7});
        }
        b
    };
    let (_, probe) = s.post("/rank", &json!({"context": "hi", "top_k": 1000, "filter": {"bucket": 7}}));
    assert_eq!(probe["results"].as_array().unwrap().len(), n / 100);
    load(&url, 1, 1.0, |i| body(i, false));
    let (mut full, mut filtered) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        full.push(load(&url, 1, seconds / 2.0, |i| body(i, false)).p50_ms);
        filtered.push(load(&url, 1, seconds / 2.0, |i| body(i, true)).p50_ms);
    }
    drop(s);
    let (full, filtered) = (median(&mut full), median(&mut filtered));
    // The scoring stage alone.
    let ranker = Ranker::load(model, Device::Cpu).unwrap();
    let live = LivePool::new(cands, v.shallow_clone(), polyrank::pool::meta::MetaLimits::default(), 256 << 20);
    let f = Filter::parse(&json!({"bucket": 7})).unwrap();
    let e = ranker.tokenize(&["what do you do for fun?".to_string()], TextKind::Context).unwrap();
    let codes = ranker.context_codes(&e, 1);
    let time = |g: &dyn Fn()| {
        let mut t: Vec<f64> = (0..15)
            .map(|_| {
                let t0 = Instant::now();
                g();
                t0.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        median(&mut t)
    };
    let all = time(&|| drop(ranker.model.rank_pool(&codes, &live.vectors(), &[10])));
    let some = time(&|| drop(ranker.model.rank_rows(&codes, &live.vectors(), &live.filter_rows(&f), 10)));
    format!(
        "\nFiltered ranking, N = {n}, a filter keeping 1 % (`{{\"bucket\": 7}}`, 1,000 rows), median of 3 rounds' p50 (1 client): end to end **{full:.1} ms → {filtered:.1} ms ({:.1}×)**; scoring stage alone (index lookup + exact scoring of the matching rows vs all rows, in process) **{all:.2} ms → {some:.2} ms ({:.1}×)**. End to end, the context encoding (above) is the floor.\n",
        full / filtered,
        all / some
    )
}

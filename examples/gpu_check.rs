//! The Rust half of `scripts/gpu-check.sh` (carried in the device bundle beside `polyrank`):
//!
//! - `cuda-info`: what libtorch sees (CUDA devices, cuDNN); exit 3 when no CUDA device.
//! - `write-model --template DIR --out DIR [--seed S]`: a random-weight model of the template's
//!   shape (its config.json, polyrank.json, tokenizer.json, candidate_encoder/config.json).
//! - `parity --model DIR --pool FILE --device cuda [--n 1000] [--contexts 32] [--dtypes LIST]`:
//!   markdown rows, device vs CPU fp32: context codes, candidate vectors, scores (max abs
//!   diff) and top-10 rankings.
//! - `synthetic-pool --model DIR --dir DIR --n N`: N placeholder texts whose pool cache holds
//!   random unit vectors (the bench's `synthetic_pool`); prints the pool file's path.
//! - `load --url URL [--seconds 5] [--clients 1]`: closed-loop /rank load; prints JSON.
//! - `http GET|POST URL [JSON]`: the status code on one line, the body on the next (where the
//!   GPU machine has no curl).
//!
//! `cargo run --release --example gpu_check -- <command> ...`
#[path = "../benches/common/mod.rs"]
mod common;

use polyrank::infer::ranker::Ranker;
use polyrank::model::bert::{Bert, BertConfig};
use polyrank::model::format::PolySettings;
use polyrank::model::poly::PolyHead;
use polyrank::model::scoring::top_k;
use polyrank::text::TextKind;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{nn::VarStore, Device, Kind, Tensor};

fn arg(args: &[String], k: &str) -> Option<String> {
    args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).cloned()
}

fn req(args: &[String], k: &str) -> String {
    arg(args, k).unwrap_or_else(|| panic!("{k} is required"))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let _g = tch::no_grad_guard();
    match args.first().map(String::as_str) {
        Some("cuda-info") => cuda_info(),
        Some("write-model") => write_model(
            Path::new(&req(&args, "--template")),
            Path::new(&req(&args, "--out")),
            arg(&args, "--seed").map_or(0, |s| s.parse().expect("--seed")),
        ),
        Some("parity") => parity(&args),
        Some("synthetic-pool") => {
            let model = PathBuf::from(req(&args, "--model"));
            let dir = PathBuf::from(req(&args, "--dir"));
            let n: usize = req(&args, "--n").parse().expect("--n");
            std::fs::create_dir_all(&dir).unwrap();
            let d = BertConfig::load(&model).unwrap().hidden_size;
            let (pool, _, _) = common::synthetic_pool(&dir, &model, n, d);
            println!("{}", pool.display());
        }
        Some("load") => {
            let url = req(&args, "--url");
            let seconds: f64 = arg(&args, "--seconds").map_or(5.0, |s| s.parse().expect("--seconds"));
            let clients: usize = arg(&args, "--clients").map_or(1, |s| s.parse().expect("--clients"));
            let body = |i: usize| serde_json::json!({"context": common::CONTEXTS[i % common::CONTEXTS.len()], "top_k": 10});
            // A few requests first: the first ones on CUDA pay for kernel selection.
            common::load(&url, 1, 0.5, body);
            println!("{}", serde_json::to_string(&common::load(&url, clients, seconds, body)).unwrap());
        }
        Some("http") => {
            let (method, url) = (args.get(1).expect("GET or POST"), args.get(2).expect("URL"));
            let client = reqwest::blocking::Client::builder().timeout(std::time::Duration::from_secs(120)).build().unwrap();
            let r = match method.as_str() {
                "GET" => client.get(url),
                _ => client.post(url).header("content-type", "application/json").body(args.get(3).cloned().unwrap_or_default()),
            }
            .send();
            match r {
                Ok(r) => println!("{}\n{}", r.status().as_u16(), r.text().unwrap_or_default()),
                Err(e) => println!("000\n{e}"),
            }
        }
        _ => {
            eprintln!("usage: gpu_check cuda-info | write-model | parity | synthetic-pool | load | http (see examples/gpu_check.rs)");
            std::process::exit(2);
        }
    }
}

fn cuda_info() {
    let n = tch::Cuda::device_count();
    println!("cuda_device_count={n}");
    println!("cudnn_available={}", tch::Cuda::cudnn_is_available());
    if n == 0 {
        eprintln!("libtorch sees no CUDA device (no driver, no GPU, or a CPU-only libtorch)");
        std::process::exit(3);
    }
    let t = Tensor::ones([2, 2], (Kind::Float, Device::Cuda(0)));
    println!("cuda_tensor_sum={}", t.sum(Kind::Float).double_value(&[]));
}

/// Random weights (tch's initialisers, LayerNorm parameters jittered as in the testkit) in
/// the template's shape; the tokenizer and settings are the template's.
fn write_model(template: &Path, out: &Path, seed: i64) {
    let mut settings = PolySettings::load(template).expect("template polyrank.json");
    settings.trained = false;
    settings.description = "random weights in the default model's shape (scripts/gpu-check.sh)".into();
    let mut encoders = vec![(template.to_path_buf(), out.to_path_buf())];
    if !settings.share_encoders {
        encoders.push((template.join("candidate_encoder"), out.join("candidate_encoder")));
    }
    let mut d = 0;
    for (i, (from, to)) in encoders.iter().enumerate() {
        std::fs::create_dir_all(to).unwrap();
        std::fs::copy(from.join("config.json"), to.join("config.json")).expect("template config.json");
        let config = BertConfig::load(from).unwrap();
        d = config.hidden_size;
        tch::manual_seed(seed + i as i64);
        let vs = VarStore::new(Device::Cpu);
        let _bert = Bert::new(vs.root(), &config);
        // In name order, so a seed always gives the same weights.
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, mut t) in vars {
            if name.contains("LayerNorm") {
                let noise = Tensor::randn_like(&t) * 0.1;
                t.copy_(&(&t + noise));
            }
        }
        save(&vs, &to.join("model.safetensors"));
    }
    std::fs::copy(template.join("tokenizer.json"), out.join("tokenizer.json")).expect("template tokenizer.json");
    tch::manual_seed(seed + 100);
    let vs = VarStore::new(Device::Cpu);
    let _head = PolyHead::new(&vs.root(), &settings, d);
    save(&vs, &out.join("poly_head.safetensors"));
    settings.save(out).unwrap();
    eprintln!("wrote a random-weight model to {}", out.display());
}

fn save(vs: &VarStore, path: &Path) {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(k, v)| (k, v.detach().contiguous())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&vars, path).unwrap();
}

fn pool_texts(path: &Path, n: usize) -> Vec<String> {
    let pool = polyrank::pool::Pool::load(&[path]).unwrap();
    pool.texts.into_iter().take(n).collect()
}

struct Outputs {
    codes: Tensor,
    cands: Tensor,
    scores: Tensor,
    top: Vec<Vec<i64>>,
    encode_ms: f64,
}

fn run(ranker: &Ranker, contexts: &[String], candidates: &[String]) -> Outputs {
    let device = ranker.model.device;
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let enc_x = ranker.tokenize(contexts, TextKind::Context).unwrap();
    let enc_c = ranker.tokenize(candidates, TextKind::Candidate).unwrap();
    // Once untimed (CUDA's first kernels pick their algorithms), once timed.
    let _ = ranker.candidate_vectors(&enc_c[..enc_c.len().min(64)], 64);
    sync();
    let t = Instant::now();
    let cands = ranker.candidate_vectors(&enc_c, 64);
    sync();
    let encode_ms = t.elapsed().as_secs_f64() * 1e3;
    let codes = ranker.context_codes(&enc_x, 16);
    let scores = ranker.model.score(&codes, &cands);
    let top = (0..contexts.len() as i64).map(|b| top_k(&scores.get(b), 10).into_iter().map(|(i, _)| i).collect()).collect();
    let cpu = |t: &Tensor| t.to_device(Device::Cpu).to_kind(Kind::Float);
    Outputs { codes: cpu(&codes.y), cands: cpu(&cands), scores: cpu(&scores), top, encode_ms }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn parse_device(s: &str) -> Device {
    match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        s => Device::Cuda(s.strip_prefix("cuda:").and_then(|i| i.parse().ok()).expect("--device cpu | cuda | cuda:N")),
    }
}

fn kind(dtype: &str) -> Kind {
    match dtype {
        "float32" => Kind::Float,
        "float16" => Kind::Half,
        "bfloat16" => Kind::BFloat16,
        other => panic!("dtype `{other}`: float32, float16 or bfloat16"),
    }
}

fn parity(args: &[String]) {
    let model = PathBuf::from(req(args, "--model"));
    let device_name = req(args, "--device");
    let device = parse_device(&device_name);
    let n: usize = arg(args, "--n").map_or(1000, |s| s.parse().expect("--n"));
    let k: usize = arg(args, "--contexts").map_or(32, |s| s.parse().expect("--contexts"));
    let dtypes = arg(args, "--dtypes").unwrap_or_else(|| "float32".into());
    let texts = pool_texts(Path::new(&req(args, "--pool")), n + k);
    assert!(texts.len() > k, "the pool holds {} texts, fewer than --contexts {k}", texts.len());
    let (contexts, candidates) = texts.split_at(k);
    let cpu = Ranker::load(&model, Device::Cpu).unwrap();
    let reference = run(&cpu, contexts, candidates);
    drop(cpu);
    println!("| compute | candidates encoded (ms) | context codes: max abs diff | candidate vectors: max abs diff | scores: max abs diff | top-10 identical (order too) | top-10 overlap | top-1 identical |");
    println!("|---|---|---|---|---|---|---|---|");
    println!("| CPU float32 (reference) | {:.0} | — | — | — | — | — | — |", reference.encode_ms);
    for dtype in dtypes.split(',') {
        let row = std::panic::catch_unwind(|| {
            // As `serve --dtype` loads it.
            let ranker = Ranker::load_in(&model, device, kind(dtype)).unwrap();
            let o = run(&ranker, contexts, candidates);
            let same10 = o.top.iter().zip(&reference.top).filter(|(a, b)| a == b).count();
            let same1 = o.top.iter().zip(&reference.top).filter(|(a, b)| a[0] == b[0]).count();
            let shared: usize = o.top.iter().zip(&reference.top).map(|(a, b)| a.iter().filter(|i| b.contains(i)).count()).sum();
            let overlap = 100.0 * shared as f64 / reference.top.iter().map(Vec::len).sum::<usize>() as f64;
            format!(
                "| {device_name} {dtype} | {:.0} | {:.2e} | {:.2e} | {:.2e} | {same10}/{k} | {overlap:.1} % | {same1}/{k} |",
                o.encode_ms,
                max_diff(&o.codes, &reference.codes),
                max_diff(&o.cands, &reference.cands),
                max_diff(&o.scores, &reference.scores),
            )
        });
        match row {
            Ok(r) => println!("{r}"),
            Err(e) => {
                let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                let first = msg.lines().next().unwrap_or("panicked").replace('|', "/");
                println!("| {device_name} {dtype} | FAILED: {first} | | | | | | |");
            }
        }
    }
    let sc = &reference.scores;
    println!(
        "\n{} candidates and {k} contexts from the pool file; CPU float32 scores span [{:.3}, {:.3}] (std {:.3}); model {}.",
        candidates.len(),
        sc.min().double_value(&[]),
        sc.max().double_value(&[]),
        sc.std(true).double_value(&[]),
        model.display()
    );
}

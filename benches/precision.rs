//! `cargo bench --bench precision` (`make bench-precision`): the scoring stage in each
//! precision on the same rows, in one run: median ms of one top-10 ranking, the ratio to
//! float32, the rows re-scored in fp32, and whether the answer equals float32's; plus the
//! context encoder in fp32 and bf16. Writes bench/precision.md.
//!
//! Pools: random unit vectors (as `bench serve`) at 10k, 100k, 1M, and the default model's
//! own vectors of the first 4,000 chitchat pool texts. Options: `--sizes 10000,100000`.

mod common;

use common::{median, root, CONTEXTS};
use polyrank::infer::ranker::Ranker;
use polyrank::model::rows::{CandidateRows, Precision};
use polyrank::model::scoring::ContextVectors;
use polyrank::text::TextKind;
use std::fmt::Write;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const PRECISIONS: [Precision; 3] = [Precision::Float32, Precision::Int8, Precision::Bfloat16];

fn time(reps: usize, f: &mut dyn FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    median(&mut t)
}

/// One row of the table per precision over `pool`.
/// `slow`: precisions over 3× float32's time on a smaller pool are not timed again (bf16
/// where the CPU only emulates it took 33× — a minute per size at 100k).
fn measure(out: &mut String, label: &str, ranker: &Ranker, codes: &ContextVectors, pool: &Tensor, reps: usize, slow: &mut Vec<Precision>) {
    let contexts = codes.y.size()[0];
    let want: Vec<Vec<(i64, f32)>> = (0..contexts).map(|c| ranker.model.rank(&codes.select(c), pool, &[10]).swap_remove(0)).collect();
    let mut fp32_ms = 0.0;
    for p in PRECISIONS {
        if slow.contains(&p) {
            writeln!(out, "| {label} | {} | not timed (over 3× float32 on a smaller pool) | | | | |", p.name()).unwrap();
            continue;
        }
        let rows = CandidateRows::encode(pool, p, Kind::Float);
        let mut same = 0;
        let mut rescored = Vec::new();
        for c in 0..contexts {
            let (got, effort) = polyrank::model::lowp::rank(&codes.select(c), &rows, &ranker.model.head.candidate_attention, &[10]);
            rescored.push(effort.rescored as f64);
            let ids = |v: &[(i64, f32)]| v.iter().map(|h| h.0).collect::<Vec<_>>();
            same += (ids(&got[0]) == ids(&want[c as usize])) as usize;
        }
        let mut i = 0;
        let ms = time(reps, &mut || {
            let c = codes.select(i % contexts);
            i += 1;
            drop(ranker.model.rank_pool(&c, &rows, &[10]));
        });
        if p == Precision::Float32 {
            fp32_ms = ms;
        }
        if ms > 3.0 * fp32_ms {
            slow.push(p);
        }
        let resc = if p == Precision::Float32 { "—".to_string() } else { format!("{:.0}", median(&mut rescored)) };
        writeln!(
            out,
            "| {label} | {} | {ms:.2} | {:.2}× | {resc} | {same}/{contexts} | {} |",
            p.name(),
            ms / fp32_ms,
            rows.bytes_per_row()
        )
        .unwrap();
        eprintln!("{label} {}: {ms:.2} ms", p.name());
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sizes: Vec<i64> = args
        .iter()
        .position(|a| a == "--sizes")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').map(|x| x.parse().expect("--sizes")).collect())
        .unwrap_or_else(|| vec![10_000, 100_000, 1_000_000]);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    tch::set_num_threads(threads as i32);
    let _g = tch::no_grad_guard();
    let model = root().join("models/default");
    let ranker = Ranker::load(&model, Device::Cpu).expect("the default model (make model)");
    let pool_texts: Vec<String> = std::fs::read_to_string(root().join("data/chitchat-pool.jsonl"))
        .expect("data/chitchat-pool.jsonl (make model)")
        .lines()
        .take(4_000)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["text"].as_str().unwrap().to_string())
        .collect();
    // Contexts: the serve bench's four and twelve pool lines not in the 4,000.
    let mut contexts: Vec<String> = CONTEXTS.iter().map(|s| s.to_string()).collect();
    contexts.extend(std::fs::read_to_string(root().join("data/chitchat-pool.jsonl")).unwrap().lines().skip(5_000).step_by(97).take(12).map(|l| {
        serde_json::from_str::<serde_json::Value>(l).unwrap()["text"].as_str().unwrap().to_string()
    }));
    let enc = ranker.tokenize(&contexts, TextKind::Context).unwrap();
    let codes = ranker.context_codes(&enc, 16);

    let mut out = String::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let name = cpu.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).unwrap_or("?").trim().to_string();
    let flags: Vec<&str> = cpu
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().filter(|f| ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16"].contains(f)).collect())
        .unwrap_or_default();
    writeln!(out, "CPU: {name} ({threads} threads; flags: {}). Scoring stage only (no HTTP, no context encoding): one context, top 10, median of the repetitions; {} contexts (4 questions, 12 chitchat lines).\n", flags.join(" "), contexts.len()).unwrap();
    writeln!(out, "| pool | precision | ms | vs float32 | rows re-scored (median) | top-10 = float32's | bytes/candidate |\n|---|---|---|---|---|---|---|").unwrap();

    let t0 = Instant::now();
    let real = ranker.candidate_vectors(&ranker.tokenize(&pool_texts, TextKind::Candidate).unwrap(), 64);
    eprintln!("encoded {} pool texts in {:.1} s", pool_texts.len(), t0.elapsed().as_secs_f64());
    let mut slow = Vec::new();
    measure(&mut out, "chitchat 4,000 (real vectors)", &ranker, &codes, &real, 30, &mut slow);
    for &n in &sizes {
        tch::manual_seed(n);
        let v = Tensor::randn([n, ranker.model.dim()], (Kind::Float, Device::Cpu));
        let v = &v / v.norm_scalaropt_dim(2.0, [-1], true);
        measure(&mut out, &format!("random {n}"), &ranker, &codes, &v, if n >= 1_000_000 { 7 } else { 21 }, &mut slow);
    }

    // The context encoder: fp32 weights, and the same weights computing in bf16.
    let bf16 = Ranker::load_in(&model, Device::Cpu, Kind::BFloat16).unwrap();
    let one = ranker.tokenize(&contexts[..1], TextKind::Context).unwrap();
    let f32_ms = time(30, &mut || drop(ranker.context_codes(&one, 1)));
    let bf_ms = time(30, &mut || drop(bf16.context_codes(&one, 1)));
    writeln!(out, "\nContext encoder, one context (`{}`): float32 **{f32_ms:.2} ms**, bfloat16 **{bf_ms:.2} ms** ({:.2}×).", contexts[0], bf_ms / f32_ms).unwrap();
    std::fs::create_dir_all(root().join("bench")).unwrap();
    std::fs::write(root().join("bench/precision.md"), &out).unwrap();
    println!("{out}");
}

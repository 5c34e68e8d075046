//! Which precision the scoring GEMM runs in: the `scoring_precision` setting, or for `auto`
//! the fastest on this CPU by a measurement at start over the real shapes (the pool's own
//! rows, contexts made of its own texts), so nobody has to know which CPUs do int8 or bf16
//! natively. Every precision gives the same answer (`model::lowp`); only speed differs.

use super::ranker::Ranker;
use crate::config::ScoringPrecision;
use crate::model::attention::Attention;
use crate::model::rows::{CandidateRows, Precision};
use crate::pool::live::LivePool;
use crate::text::TextKind;
use std::time::Instant;
use tch::{Kind, Tensor};

/// Most rows the measurement ranks: the pool's own size up to this (which precision wins
/// depends on it: int8 lost to float32 at 4k rows and won at 100k on the AVX2 machine, see
/// bench/precision.md), few enough that it takes well under a second.
const SAMPLE_ROWS: i64 = 16_384;
/// Fewest rows measured: a pool that starts small is measured at a size it may grow to.
const MIN_SAMPLE_ROWS: i64 = 4_096;
/// Rankings timed per precision (after one warm-up); the median counts.
const ROUNDS: usize = 3;
/// A low precision must beat float32 by this factor to be picked: a tie keeps the plain path.
const MARGIN: f64 = 0.9;
/// Pools over `LARGE_FROM` rows are measured again on this many of their rows: a sample that
/// fits in the CPU's caches favours compute over bytes. On an Intel Xeon with AMX (105 MiB L3)
/// bf16 beat int8 on 16k rows (7.3 vs 6.9 ms was the closest case) yet served a 1M pool at
/// 503 ms p50 against int8's 219 ms (`make bench`, bench/results.md), the bf16 rows being twice
/// int8's bytes. 196k rows of bf16 are 150 MB, past that cache.
const LARGE_SAMPLE_ROWS: i64 = 196_608;
const LARGE_FROM: i64 = 4 * SAMPLE_ROWS;

/// What runs, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Choice {
    pub precision: Precision,
    pub requested: ScoringPrecision,
    pub reason: String,
    /// `auto` only: median ms of one top-10 ranking over the sample, per precision.
    pub measured_ms: Vec<(Precision, f64)>,
    pub sample_rows: i64,
}

pub fn choose(ranker: &Ranker, pool: &LivePool, requested: ScoringPrecision) -> Choice {
    let model = &ranker.model;
    let choice = |precision, reason: String| Choice { precision, requested, reason, measured_ms: Vec::new(), sample_rows: 0 };
    if model.device != tch::Device::Cpu {
        return choice(Precision::Float32, "low-precision scoring is implemented for CPUs; this device scores in float32".into());
    }
    if matches!(model.head.candidate_attention, Attention::Multihead(_)) {
        return choice(Precision::Float32, "multihead candidate attention has no low-precision bound; it scores in float32".into());
    }
    let small = (pool.len() as i64) < MIN_SAMPLE_ROWS;
    // Loading the int8 module costs ~0.1 s: only when int8 may run.
    let int8 = match requested.fixed() {
        Some(Precision::Int8) => crate::model::int8::available(),
        None if !small => crate::model::int8::available(),
        _ => Err("not asked for".into()),
    };
    match (requested.fixed(), &int8) {
        (Some(Precision::Int8), Err(e)) => choice(Precision::Float32, format!("int8 was asked for but cannot run here ({e}); scoring in float32")),
        (Some(p), _) => choice(p, "set by scoring_precision".into()),
        // A small pool scores in a few ms whatever runs; measuring it would let timing noise
        // pick, and scores differ in the 7th digit between the two paths (the rebuilt
        // vectors): the same pool would rank with other last digits after a restart.
        (None, _) if small => choice(
            Precision::Float32,
            format!("the pool has under {MIN_SAMPLE_ROWS} candidates at start: float32 (measured again at the next start)"),
        ),
        (None, _) => {
            let mut c = measure(ranker, pool, requested, int8.is_ok());
            if let Err(e) = int8 {
                c.reason = format!("{}; int8 not measured: {e}", c.reason);
            }
            c
        }
    }
}

fn measure(ranker: &Ranker, pool: &LivePool, requested: ScoringPrecision, int8: bool) -> Choice {
    let sample = sample_rows(pool, ranker.model.dim(), SAMPLE_ROWS);
    let contexts = contexts(ranker, pool);
    let time = |rows: &CandidateRows, runs: usize| {
        // `runs` timed after one warm-up; 0: the first ranking, warm-up included, is the time.
        let mut times: Vec<f64> = (0..=runs)
            .map(|i| {
                let t = Instant::now();
                let ctx = contexts.select((i % contexts.y.size()[0] as usize) as i64);
                drop(ranker.model.rank_pool(&ctx, rows, &[10]));
                t.elapsed().as_secs_f64() * 1e3
            })
            .skip(runs.min(1))
            .collect();
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    // A precision this CPU only emulates (bf16 without AVX512-BF16 or AMX: 23–33× float32
    // here) is dropped after one ranking of the first rows: timing it on the whole sample
    // took 1.6 s of a 100k store's start.
    let head = sample.narrow(0, 0, MIN_SAMPLE_ROWS.min(sample.size()[0]));
    let fp32_head = time(&CandidateRows::encode(&head, Precision::Float32, Kind::Float), 1);
    let mut dropped = Vec::new();
    let mut measured = Vec::new();
    for p in [Precision::Float32, Precision::Int8, Precision::Bfloat16] {
        if p == Precision::Int8 && !int8 {
            continue;
        }
        if p == Precision::Bfloat16 && !native_bf16() {
            dropped.push("bfloat16 (this CPU has no native bf16: AVX512-BF16 or AMX)".to_string());
            continue;
        }
        if p != Precision::Float32 {
            // One warm-up first: a path's first ranking builds its oneDNN kernels and runs
            // TorchScript's profiling pass (int8 measured 2× float32 that way, and was dropped
            // at half the starts of a 100k pool where it runs at 0.65× float32).
            let quick = time(&CandidateRows::encode(&head, p, Kind::Float), 1);
            if quick > 2.0 * fp32_head {
                dropped.push(format!("{} {:.0}× float32 on {} rows", p.name(), quick / fp32_head, head.size()[0]));
                continue;
            }
        }
        measured.push((p, time(&CandidateRows::encode(&sample, p, Kind::Float), ROUNDS)));
    }
    let show = |m: &[(Precision, f64)], rows: i64| {
        m.iter().map(|(p, ms)| format!("{} {ms:.2} ms", p.name())).collect::<Vec<_>>().join(", ") + &format!(" per ranking of {rows} rows")
    };
    let mut table = show(&measured, sample.size()[0]);
    let mut sample_rows_used = sample.size()[0];
    // A large pool, and more than one precision still in the running: measure those again on
    // a sample past the caches, float32 included, and decide on that alone.
    let fast: Vec<Precision> = measured.iter().filter(|(p, ms)| *p == Precision::Float32 || *ms <= MARGIN * measured[0].1).map(|(p, _)| *p).collect();
    if pool.len() as i64 > LARGE_FROM && fast.len() > 2 {
        let large = sample_rows(pool, ranker.model.dim(), LARGE_SAMPLE_ROWS);
        measured = fast.iter().map(|&p| (p, time(&CandidateRows::encode(&large, p, Kind::Float), 2))).collect();
        sample_rows_used = large.size()[0];
        table = format!("{}; first {table}", show(&measured, sample_rows_used));
    }
    if !dropped.is_empty() {
        table += &format!(" (not measured further: {})", dropped.join(", "));
    }
    let fp32_ms = measured[0].1;
    let (best, best_ms) = measured.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1)).expect("float32 is measured");
    let (precision, reason) = if best != Precision::Float32 && best_ms <= MARGIN * fp32_ms {
        (best, format!("fastest on this CPU: {table}"))
    } else {
        (Precision::Float32, format!("no low precision was 10% faster than float32 on this CPU: {table}"))
    };
    Choice { precision, requested, reason, measured_ms: measured, sample_rows: sample_rows_used }
}

/// Whether the CPU multiplies bf16 natively; elsewhere bf16 was 23–33× slower than fp32, and
/// even one probe of it cost 0.25 s of the start. Other architectures are measured.
fn native_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
            || std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.split_whitespace().any(|f| f == "amx_bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}

/// Up to `most` of the pool's rows, spread over it; a pool under `MIN_SAMPLE_ROWS` is
/// topped up with random vectors of its rows' mean norm.
fn sample_rows(pool: &LivePool, d: i64, most: i64) -> Tensor {
    let n = pool.len() as i64;
    let want = n.clamp(MIN_SAMPLE_ROWS, most);
    let real = if n > most {
        let idx = Tensor::arange_start_step(0, n, n / most, (Kind::Int64, tch::Device::Cpu)).narrow(0, 0, most);
        pool.vectors().select(&idx.to_device(pool.vectors().device())).exact().to_device(tch::Device::Cpu)
    } else {
        pool.exact_vectors().to_device(tch::Device::Cpu)
    };
    if n >= want {
        return real;
    }
    let norm = if n > 0 { real.norm_scalaropt_dim(2.0, [1], false).mean(Kind::Float).double_value(&[]) } else { 1.0 };
    let fill = Tensor::randn([want - n, d], (Kind::Float, tch::Device::Cpu));
    let fill = &fill / fill.norm_scalaropt_dim(2.0, [1], true) * norm;
    Tensor::cat(&[real, fill], 0)
}

/// Three contexts made of pool texts (or of fixed lines for an empty pool).
fn contexts(ranker: &Ranker, pool: &LivePool) -> crate::model::scoring::ContextVectors {
    let n = pool.len();
    let texts: Vec<String> = if n == 0 {
        ["hi, how are you today?", "what do you do for fun?", "i just got back from a trip"].map(String::from).to_vec()
    } else {
        [0, n / 2, n - 1].iter().map(|&r| pool.candidate(r).text.clone()).collect()
    };
    match ranker.tokenize(&texts, TextKind::Context) {
        Ok(enc) => ranker.context_codes(&enc, enc.len()),
        // Pool texts always tokenize (they were encoded as candidates); keep the start going.
        Err(_) => {
            let enc = ranker.tokenize(&["hello".to_string()], TextKind::Context).unwrap_or_default();
            ranker.context_codes(&enc, 1)
        }
    }
}

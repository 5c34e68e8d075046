//! In-process timing of one /rank's pieces at N = 100k (no HTTP): the context encoding, the
//! scoring kernel, top-k, and the bare GEMM they are compared against.
//! `cargo run --release --example kernel_timing [N]`
use polyrank::model::scoring::top_k;
use polyrank::infer::ranker::Ranker;
use polyrank::text::TextKind;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    median((0..reps).map(|_| { let t = Instant::now(); f(); t.elapsed().as_secs_f64() * 1e3 }).collect())
}

fn main() {
    if std::env::args().any(|a| a == "--only-thread") {
        // Nothing touches libtorch on the main thread, as in the server after startup.
        return std::thread::spawn(run).join().unwrap();
    }
    run()
}

fn run() {
    let n: i64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    tch::set_num_threads(std::thread::available_parallelism().unwrap().get() as i32);
    let _g = tch::no_grad_guard();
    let r = Ranker::load(std::path::Path::new("models/default"), Device::Cpu).unwrap();
    let d = r.model.dim();
    let pool = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
    let pool = &pool / pool.norm_scalaropt_dim(2.0, [-1], true);
    let enc = r.tokenize(&["what is your favourite food?".to_string()], TextKind::Context).unwrap();
    let codes = r.context_codes(&enc, 1);
    let y = codes.y.get(0);
    println!("N = {n}");
    println!("tokenize      {:.2} ms", time(20, || { let _ = r.tokenize(&["what is your favourite food?".to_string()], TextKind::Context); }));
    println!("context codes {:.2} ms", time(20, || { let _ = r.context_codes(&enc, 1); }));
    println!("bare GEMM     {:.2} ms", time(20, || { let _ = pool.matmul(&y.transpose(0, 1)); }));
    println!("score kernel  {:.2} ms", time(20, || { let _ = r.model.score(&codes, &pool); }));
    let s = r.model.score(&codes, &pool).squeeze_dim(0);
    println!("top-10        {:.2} ms", time(20, || { let _ = top_k(&s, 10); }));
    // The server's pool comes from the cache file, and runs on its own thread.
    let dir = tempfile::tempdir().unwrap();
    let cache = polyrank::pool::cache::PoolCache::new(dir.path(), std::path::Path::new("models/default"), &r.model.settings, &[], polyrank::config::Dtype::Float32).unwrap();
    cache.store(&pool).unwrap();
    let loaded = cache.load(n as usize, d as usize).unwrap();
    println!("kernel, pool from cache {:.2} ms", time(20, || { let _ = r.model.score(&codes, &loaded); }));
    let path = cache.path.clone();
    drop((r, loaded, codes));
    std::thread::spawn(move || {
        let _g = tch::no_grad_guard();
        if std::env::args().any(|a| a == "--set-threads") {
            tch::set_num_threads(std::thread::available_parallelism().unwrap().get() as i32);
        }
        let r = Ranker::load(std::path::Path::new("models/default"), Device::Cpu).unwrap();
        let loaded = cache.load(n as usize, d as usize).unwrap();
        let codes = r.context_codes(&enc, 1);
        println!("kernel, other thread {:.2} ms", time(20, || { let _ = r.model.score(&codes, &loaded); }));
        println!("codes, other thread {:.2} ms", time(20, || { let _ = r.context_codes(&enc, 1); }));
        let _ = path;
    })
    .join()
    .unwrap();
}

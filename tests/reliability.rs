//! Reliability checks with real tools: schemathesis against openapi.yaml, a bounded wrk load
//! at saturation (statuses and resident memory), the Dockerfile linted, and the runtime
//! image's contents staged and run without the build tree as a non-root user.

mod common;
use common::server::{tiny_setup, Server};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// These checks load the machine (a load generator, a fuzzer, a 500 MB copy); run them one at
/// a time so each measures the server, not its neighbours.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn tiny_server(dir: &Path, pool_size: usize, extra: &[(&str, &str)]) -> Server {
    let mut setup = tiny_setup(dir, pool_size, 31);
    for (k, v) in extra {
        setup = setup.arg(k, v);
    }
    let s = Server::start(&setup);
    s.wait_ready();
    s
}

fn venv_tool(name: &str) -> std::path::PathBuf {
    let p = common::python().parent().unwrap().join(name);
    assert!(p.exists(), "{p:?} missing: run `make venv`");
    p
}

#[test]
fn schemathesis_finds_no_server_error_and_no_contract_violation() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let s = tiny_server(dir.path(), 200, &[]);
    // Every check except positive_data_acceptance: a schema-valid request may still be
    // refused by design (an id that is not in the pool is a documented 422, and so is a JSON
    // string holding a lone UTF-16 surrogate, which is not valid Unicode).
    let out = Command::new(venv_tool("schemathesis"))
        .args(["run", &s.url("/openapi.yaml"), "--url", &s.base, "--checks", "all", "--exclude-checks", "positive_data_acceptance"])
        .args(["--max-examples", "60", "--seed", "7"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let summary: Vec<&str> = text.lines().filter(|l| l.contains("generated") || l.contains("Selected") || l.contains("Tested")).collect();
    eprintln!("schemathesis: {summary:?}");
    assert!(out.status.success(), "schemathesis failed:\n{text}");
    // Every operation of the document was selected and tested (the document lists 7 paths;
    // schemathesis skips /openapi.yaml, whose body is the document itself).
    let field = |k: &str| text.lines().find_map(|l| l.trim().strip_prefix(k)).map(|v| v.trim().to_string());
    let selected = field("Selected:").expect("a Selected line");
    let tested = field("Tested:").expect("a Tested line");
    let (sel, total) = selected.split_once('/').unwrap();
    assert!(sel == total && sel == tested && tested.parse::<u32>().unwrap() >= 6, "not every operation tested:\n{text}");
    // And the server is still fine.
    assert_eq!(s.get("/health/live").0, 200);
    assert_eq!(s.post("/rank", &serde_json::json!({"context": "hi"})).0, 200);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").trim().parse().unwrap()
}

#[test]
fn wrk_at_saturation_gives_no_unexpected_errors_and_flat_memory() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let s = tiny_server(dir.path(), 2000, &[("--queue-capacity", "64")]);
    let script = dir.path().join("rank.lua");
    std::fs::write(
        &script,
        r#"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {
  '{"context": "i like pizza", "top_k": 5}',
  '{"context": ["hello", "do you like cats?"], "top_k": 20, "return_text": true}',
  '{"context": "music", "candidates": ["i like music", "rain today", "books"]}',
}
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, "/rank", nil, bodies[(n % #bodies) + 1])
end
local counts = {}
response = function(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end
done = function(summary, latency, requests)
  io.write(string.format("REQUESTS %d\n", summary.requests))
  io.write(string.format("P50_US %d\n", latency:percentile(50)))
end
"#,
    )
    .unwrap();
    let pid = s.child.id();
    let start_rss = rss_kib(pid);
    // A short warm-up first: allocator arenas and libtorch's buffers grow once under the
    // first concurrent load; the measured run then shows whether anything keeps growing.
    let warm = Command::new("wrk").args(["-t", "2", "-c", "32", "-d", "3s", "-s"]).arg(&script).arg(&s.base).output().unwrap();
    assert!(warm.status.success());
    let seconds = 12;
    let wrk = Command::new("wrk")
        .args(["-t", "2", "-c", "32", "-d", &format!("{seconds}s"), "--timeout", "10s", "-s"])
        .arg(&script)
        .arg(&s.base)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("wrk (make test installs it)");
    let mut samples = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(seconds) {
        samples.push(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(250));
    }
    let out = wrk.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    let requests: u64 = text.lines().find_map(|l| l.strip_prefix("REQUESTS ")).unwrap().trim().parse().unwrap();
    // wrk counts every non-2xx/3xx response; /metrics tells which statuses those were.
    let (_, metrics) = s.get("/metrics");
    let mut by_status = std::collections::BTreeMap::new();
    for l in metrics.lines().filter(|l| l.starts_with("polyrank_requests_total{route=\"/rank\"")) {
        let status = l.split("status=\"").nth(1).unwrap()[..3].to_string();
        let n: f64 = l.rsplit(' ').next().unwrap().parse().unwrap();
        by_status.insert(status, n as u64);
    }
    let third = samples.len() / 3;
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len() as f64;
    let (first, last) = (mean(&samples[..third]), mean(&samples[samples.len() - third..]));
    eprintln!(
        "wrk: {requests} requests in {seconds} s (after a 3 s warm-up), statuses over both runs {by_status:?}; RSS before any load {start_rss} KiB, first third {first:.0} KiB, last third {last:.0} KiB"
    );
    assert!(requests > 100, "{text}");
    for (status, n) in &by_status {
        assert!(status == "200" || status == "429" || status == "503", "unexpected {n} × {status}");
    }
    assert!(by_status.get("200").copied().unwrap_or(0) > 100);
    assert!((last - first).abs() / first <= 0.10, "resident memory grew: {first:.0} → {last:.0} KiB");
    assert_eq!(s.get("/health/live").0, 200);
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let _serial = serial();
    let out = Command::new(venv_tool("hadolint")).arg(common::root().join("Dockerfile")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// What `docker build` puts in the runtime image, staged by the same script, run alone.
#[test]
fn the_runtime_image_contents_run_without_the_build_tree_as_non_root() {
    let _serial = serial();
    let _ = common::default_model();
    let dir = tempfile::tempdir().unwrap();
    let stage = dir.path().join("stage");
    let st = Command::new("bash").arg(common::root().join("scripts/stage-runtime.sh")).arg(&stage).status().unwrap();
    assert!(st.success());
    // Every library resolves inside the stage, none from the venv.
    let ldd = Command::new("ldd").arg(stage.join("polyrank")).env("LD_LIBRARY_PATH", stage.join("lib")).output().unwrap();
    let ldd = String::from_utf8_lossy(&ldd.stdout).to_string();
    assert!(!ldd.contains("not found"), "{ldd}");
    assert!(!ldd.contains(".venv"), "a library still comes from the venv:\n{ldd}");
    assert!(ldd.contains(&format!("{}/lib/libtorch_cpu.so", stage.display())), "{ldd}");
    // Run it as uid 10001 (the image's user), from the stage, like the image's ENV does.
    let pool = dir.path().join("pool.txt");
    std::fs::write(&pool, "I love pizza.\nThe train is late.\nI have two cats.\n").unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    for p in [dir.path(), &stage, &cache] {
        Command::new("chmod").args(["-R", "a+rwX"]).arg(p).status().unwrap();
    }
    let mut child = Command::new("setpriv")
        .args(["--reuid=10001", "--regid=10001", "--clear-groups", "--"])
        .arg(stage.join("polyrank"))
        .arg("serve")
        .current_dir(&stage)
        .env("LD_LIBRARY_PATH", stage.join("lib"))
        .env("POLYRANK_MODEL_DIR", stage.join("models/default"))
        .env("POLYRANK_CANDIDATES", &pool)
        .env("POLYRANK_CACHE_DIR", &cache)
        .env("POLYRANK_HOST", "127.0.0.1")
        .env("POLYRANK_PORT", "18089")
        .spawn()
        .unwrap();
    let client = reqwest::blocking::Client::new();
    let t0 = Instant::now();
    let ok = loop {
        if let Ok(r) = client.get("http://127.0.0.1:18089/health/ready").send() {
            if r.status() == 200 {
                break true;
            }
        }
        if t0.elapsed() > Duration::from_secs(60) || child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let rank = ok.then(|| {
        client
            .post("http://127.0.0.1:18089/rank")
            .json(&serde_json::json!({"context": "what food do you like?", "top_k": 1, "return_text": true}))
            .send()
            .unwrap()
            .json::<serde_json::Value>()
            .unwrap()
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "the staged server did not become ready");
    assert_eq!(rank.unwrap()["results"][0]["text"], "I love pizza.");
}

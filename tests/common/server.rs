#![allow(dead_code)]
//! Starts the real `polyrank serve` binary on a loopback port and talks to it over TCP.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub base: String,
    logs: Arc<Mutex<Vec<String>>>,
    pub client: reqwest::blocking::Client,
}

#[derive(Clone)]
pub struct Setup {
    pub model: PathBuf,
    pub pool: PathBuf,
    pub cache: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Another polyrank binary (benchmarks compare builds); this build's by default.
    pub bin: Option<PathBuf>,
    /// The server's open-file limit (`ulimit -n`, soft and hard), when set.
    pub nofile: Option<u32>,
}

impl Setup {
    pub fn new(model: &Path, pool: &Path, cache: &Path) -> Self {
        Setup { model: model.into(), pool: pool.into(), cache: cache.into(), args: vec![], env: vec![], bin: None, nofile: None }
    }
    pub fn arg(mut self, a: &str, v: &str) -> Self {
        self.args.push(a.into());
        self.args.push(v.into());
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    /// The live pool's store directory (otherwise `<cache>-store`).
    pub fn store(self, dir: &Path) -> Self {
        self.arg("--store-dir", dir.to_str().expect("a UTF-8 path"))
    }
    /// Runs the server under `ulimit -n n` (through bash, which then execs it: same pid).
    pub fn nofile(mut self, n: u32) -> Self {
        self.nofile = Some(n);
        self
    }
    pub fn binary(mut self, bin: &Path) -> Self {
        self.bin = Some(bin.into());
        self
    }
}

impl Server {
    pub fn start(s: &Setup) -> Server {
        let bin = s.bin.clone().unwrap_or_else(|| env!("CARGO_BIN_EXE_polyrank").into());
        let mut cmd = match s.nofile {
            Some(n) => {
                let mut c = Command::new("bash");
                c.arg("-c").arg(format!("ulimit -n {n} && exec \"$0\" \"$@\"")).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("serve")
            .args(["--host", "127.0.0.1", "--port", "0"])
            .arg("--model-dir")
            .arg(&s.model)
            .arg("--candidates")
            .arg(&s.pool)
            .arg("--cache-dir")
            .arg(&s.cache)
            .args(&s.args)
            .env("RUST_LOG", "info")
            .env_remove("POLYRANK_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // The live pool's store beside the cache, unless the test sets it. A baseline binary
        // gets it through the environment: one from before the store knows no such flag (and
        // ignores the variable), and one with a store must not share the settings file's
        // `store_dir` between pools (a store seeded by a 100k pool kept serving 100k rows when
        // a later run asked for 10k).
        let store_given = s.args.iter().any(|a| a == "--store-dir") || s.env.iter().any(|(k, _)| k == "POLYRANK_STORE_DIR");
        if !store_given {
            let mut store = s.cache.clone().into_os_string();
            store.push("-store");
            match s.bin {
                None => cmd.arg("--store-dir").arg(store),
                Some(_) => cmd.env("POLYRANK_STORE_DIR", store),
            };
        }
        for (k, v) in &s.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting polyrank serve");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let t0 = Instant::now();
        let addr = loop {
            if let Some(a) = logs.lock().unwrap().iter().find_map(|l| l.split("listening on ").nth(1).map(str::to_string)) {
                break a.trim().to_string();
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("server exited early ({status}):\n{}", logs.lock().unwrap().join("\n"));
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "server did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        };
        // Pooled connections are dropped before the server's keep-alive timeout (5 s by
        // default) closes them: a request sent as the server closes would fail.
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(120))
            .pool_idle_timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        Server { child, base: format!("http://{addr}"), logs, client }
    }

    pub fn wait_ready(&self) {
        let t0 = Instant::now();
        loop {
            if let Ok(r) = self.client.get(self.url("/health/ready")).send() {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(300), "not ready:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.client.post(self.url(path)).json(body).send().expect("request");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    /// Any method with an optional JSON body; status 0 when the connection failed (a server
    /// that died mid-request).
    pub fn send(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let req = match method {
            "post" => self.client.post(self.url(path)),
            "delete" => self.client.delete(self.url(path)),
            _ => self.client.get(self.url(path)),
        };
        let req = if let Some(b) = body { req.json(b) } else { req };
        match req.send() {
            Ok(r) => {
                let st = r.status().as_u16();
                (st, r.json().unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let r = self.client.get(self.url(path)).send().expect("request");
        (r.status().as_u16(), r.text().unwrap())
    }

    /// A sample's value from /metrics (first line whose name and labels start with `prefix`).
    pub fn metric(&self, prefix: &str) -> Option<f64> {
        let (_, text) = self.get("/metrics");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// SIGTERM, then the exit status and everything the server logged.
    pub fn terminate_with_logs(self) -> (std::process::ExitStatus, String) {
        let logs = self.logs.clone();
        let status = self.terminate();
        std::thread::sleep(Duration::from_millis(100)); // the reader thread drains stderr
        let text = logs.lock().unwrap().join("\n");
        (status, text)
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        unsafe_kill(pid, "TERM");
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "server ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn unsafe_kill(pid: i32, signal: &str) {
    let ok = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap().success();
    assert!(ok, "kill -{signal} {pid}");
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny generated model (m = 8, seeded) and a pool of `pool_size` candidates in `dir`.
pub fn tiny_setup(dir: &Path, pool_size: usize, seed: i64) -> Setup {
    let model = dir.join("model");
    polyrank::testkit::write_tiny_model(&model, &polyrank::testkit::tiny_settings(8), seed).unwrap();
    let pool = dir.join("pool.jsonl");
    write_pool(&pool, pool_size);
    Setup::new(&model, &pool, &dir.join("cache"))
}

/// A pool file of `n` generated candidates for tiny models.
pub fn write_pool(path: &Path, n: usize) {
    let words = ["pizza", "cats", "dogs", "rain", "music", "guitar", "books", "paris", "sun", "food"];
    let mut out = String::new();
    for i in 0..n {
        let a = words[i % words.len()];
        let b = words[(i / words.len()) % words.len()];
        out += &serde_json::json!({"id": format!("c{i}"), "text": format!("i like {a} and {b} {i}"), "meta": {"n": i}}).to_string();
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

/// The ids of a /rank response, best first.
pub fn result_ids(v: &Value) -> Vec<String> {
    v["results"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_string()).collect()
}

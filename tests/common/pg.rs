#![allow(dead_code)]
//! A real, throwaway PostgreSQL for the shared-store tests: Debian's server binaries
//! (`/usr/lib/postgresql/<version>/bin`, installed by `make test` when missing), a cluster in
//! a temp dir on a free loopback port, removed afterwards. The server refuses to run as root,
//! so as root the cluster belongs to the `postgres` user. Also a TCP proxy that can cut a
//! replica off from the database.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

fn bin_dir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).filter(|b| b.join("initdb").is_file()).collect())
        .unwrap_or_default();
    found.sort();
    found.pop().expect("PostgreSQL server binaries (Debian's postgresql package; `make test` installs it)")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Postgres {
    /// A new cluster with a database `polyrank`, running.
    pub fn start() -> Postgres {
        let dir = tempfile::Builder::new().prefix("polyrank-pg").tempdir().unwrap();
        if is_root() {
            let ok = Command::new("chown").args(["-R", "postgres"]).arg(dir.path()).status().unwrap().success();
            assert!(ok, "chown of the cluster directory to postgres");
        }
        let pg = Postgres { bin: bin_dir(), port: free_port(), dir };
        let data = pg.data();
        pg.run("initdb", &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "polyrank", "--no-sync", "-E", "UTF8"]);
        pg.start_again();
        pg.run("createdb", &["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "polyrank", "polyrank"]);
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).stdin(Stdio::null()).output().unwrap();
        assert!(out.status.success(), "{tool} {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }

    pub fn url(&self) -> String {
        self.url_via(self.port)
    }

    /// The database's URL through another port (a proxy's).
    pub fn url_via(&self, port: u16) -> String {
        format!("postgres://polyrank@127.0.0.1:{port}/polyrank")
    }

    /// Starts the server (after `stop` or `kill`), waiting until it accepts connections;
    /// after a kill -9 the old server's processes may hold its shared memory a moment.
    pub fn start_again(&self) {
        let opts = format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on", self.port, self.dir.path().display());
        let log = self.dir.path().join("server.log");
        let t0 = Instant::now();
        loop {
            let out = self
                .command("pg_ctl")
                .args(["-D", self.data().to_str().unwrap(), "-o", &opts, "-l", log.to_str().unwrap(), "-w", "-t", "30", "start"])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "pg_ctl start: {}", std::fs::read_to_string(&log).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A clean, fast shutdown (open connections are closed by the server).
    pub fn stop(&self) {
        self.run("pg_ctl", &["-D", self.data().to_str().unwrap(), "-m", "fast", "-w", "stop"]);
    }

    /// `kill -9` of the postmaster and its processes: a crash; the next start recovers from
    /// the write-ahead log.
    pub fn kill(&self) {
        let pid_file = std::fs::read_to_string(self.data().join("postmaster.pid")).expect("a running server");
        let pid = pid_file.lines().next().unwrap().trim().to_string();
        let _ = Command::new("kill").args(["-9", &pid]).status();
        // Its backends notice the postmaster's death and exit; kill them as well.
        let _ = Command::new("pkill").args(["-9", "-P", &pid]).status();
        let t0 = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs SQL in the test database with psql; its output rows.
    pub fn sql(&self, query: &str) -> String {
        let out = self
            .command("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "polyrank", "-d", "polyrank", "-At", "-c", query])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "psql {query}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-D", self.data().to_str().unwrap(), "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A TCP proxy on a loopback port in front of the database. `cut` drops every connection
/// through it and refuses new ones (as a network partition would); `restore` lets them in.
pub struct Proxy {
    pub port: u16,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(to: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let (open, conns, stop) = (Arc::new(AtomicBool::new(true)), Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (o, c, s) = (open.clone(), conns.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if !o.load(Ordering::Acquire) {
                            let _ = client.shutdown(Shutdown::Both);
                            continue;
                        }
                        let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else { continue };
                        client.set_nonblocking(false).unwrap();
                        c.lock().unwrap().extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                        pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                        pipe(server, client);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy { port, open, conns, stop }
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::Release);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::Release);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.cut();
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

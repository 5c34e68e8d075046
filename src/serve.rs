//! `polyrank serve`: settings → inference thread → HTTP server, with graceful shutdown.
//! `polyrank warm-cache`: the same start, up to ready, to write the pool cache ahead of time.

use crate::config::{Config, ServeArgs};
use crate::http::conn::{self, Bounds};
use crate::http::{router, shutdown_signal, AppState};
use crate::pool::cache::PoolCache;
use crate::pool::store::{Durable, FileStore, PgStore};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub fn serve(args: ServeArgs) -> Result<()> {
    let config = Config::resolve(&args)?;
    tracing::info!(config = %config.for_log(), "settings");
    let metrics = crate::metrics::install()?;
    let (infer, inference) = crate::infer::start(&config, open_store(&config)?)?;
    let state = Arc::new(AppState { infer, config: config.clone(), metrics });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let served = runtime.block_on(async move {
        let addr = format!("{}:{}", config.host, config.port);
        let listener = listen(&addr).await.with_context(|| format!("binding {addr}"))?;
        tracing::info!("listening on {}", listener.local_addr()?);
        let bounds = Bounds {
            max_connections: config.max_connections,
            header_read: Duration::from_millis(config.header_read_timeout_ms),
            keep_alive: Duration::from_millis(config.keep_alive_timeout_ms),
            // In-flight requests end by their deadline; a half-sent header by its timer.
            drain: Duration::from_millis(config.request_timeout_ms + config.header_read_timeout_ms + 1000),
        };
        conn::serve(listener, router(state), bounds, shutdown_signal()).await;
        anyhow::Ok(())
    });
    // Drained (or failed to start, perhaps mid pool encoding): stop the inference thread at
    // its next chunk and wait for it, so the process never exits under running libtorch work.
    inference.shutdown();
    served?;
    tracing::info!("stopped");
    Ok(())
}

/// The listening socket, with a backlog of `BACKLOG` (tokio's `TcpListener::bind` gets
/// 128). Measured: 1,100 connections opened at once on a fresh server overflowed the 128 three
/// times (`TcpExtListenOverflows`), and each of those clients waited 1 s for its SYN to be
/// sent again — a probe among them would have too.
async fn listen(addr: &str) -> Result<tokio::net::TcpListener> {
    const BACKLOG: u32 = 1024;
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.map(anyhow::Error::from).unwrap_or_else(|| anyhow::anyhow!("{addr} resolves to no address")))
}

/// Starts as `serve` does, without HTTP, until the pool is ready (encoded and cached, or read
/// from the cache), then stops and prints the cache file's path. The Dockerfile runs it at
/// build time so that the image starts ready.
pub fn warm_cache(args: ServeArgs) -> Result<()> {
    let config = Config::resolve(&args)?;
    let (infer, inference) = crate::infer::start(&config, open_store(&config)?)?;
    while !infer.status().is_ready() {
        if let Some(f) = infer.status().failure() {
            anyhow::bail!("pool encoding failed: {f}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    inference.shutdown();
    println!("{}", cache_file(&config)?.display());
    Ok(())
}

/// The live pool's store, chosen here and only here: PostgreSQL shared by every replica when
/// `store_url` is set, else this replica's own files in `store_dir`.
fn open_store(config: &Config) -> Result<Box<dyn Durable>> {
    if config.store_url.is_empty() {
        Ok(Box::new(FileStore::open_dir(&config.store_dir, config.store_compact_bytes)?))
    } else {
        Ok(Box::new(PgStore::new(&config.store_url)?))
    }
}

/// This model's and pool's cache file in `cache_dir` (its name is the content key).
fn cache_file(config: &Config) -> Result<PathBuf> {
    let settings = crate::model::format::PolySettings::load(config.model_dir())?;
    Ok(PoolCache::new(&config.cache_dir, config.model_dir(), &settings, &config.candidates, config.dtype)?.path)
}

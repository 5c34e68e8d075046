//! `polyrank serve`: settings → inference thread → HTTP server, with graceful shutdown.

use crate::config::{Config, ServeArgs};
use crate::http::{router, shutdown_signal, AppState};
use anyhow::{Context, Result};
use std::sync::Arc;

pub fn serve(args: ServeArgs) -> Result<()> {
    let config = Config::resolve(&args)?;
    tracing::info!(config = %serde_json::to_string(&config).unwrap_or_default(), "settings");
    let metrics = crate::metrics::install()?;
    let (infer, inference) = crate::infer::start(&config)?;
    let state = Arc::new(AppState { infer, config: config.clone(), metrics });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let served = runtime.block_on(async move {
        let addr = format!("{}:{}", config.host, config.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
        tracing::info!("listening on {}", listener.local_addr()?);
        axum::serve(listener, router(state)).with_graceful_shutdown(shutdown_signal()).await?;
        anyhow::Ok(())
    });
    // Drained (or failed to start, perhaps mid pool encoding): stop the inference thread at
    // its next chunk and wait for it, so the process never exits under running libtorch work.
    inference.shutdown();
    served?;
    tracing::info!("stopped");
    Ok(())
}

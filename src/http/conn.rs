//! Serving connections: hyper's HTTP/1 server under three bounds that `axum::serve` does not
//! expose, and a graceful drain on shutdown.
//!
//! - **Header-read timeout** (`header_read_timeout_ms`): hyper's own timer; a client that has
//!   not sent a whole request head in time (counted from the connection's opening, or from
//!   the previous response) is disconnected.
//! - **Idle timeout** (`keep_alive_timeout_ms`): a connection with nothing in flight and no
//!   bytes moving is closed (`idle.rs`).
//! - **Connection cap** (`max_connections`, a semaphore): past it, connections are still
//!   accepted into a small reserve (`PROBE_RESERVE`) that answers only `/health/live` and
//!   `/health/ready` (anything else: 503 `overloaded`), one request each, and a new arrival
//!   closes the oldest of them. The cap plus the reserve fit the open-file limit (checked at
//!   start), so accepting never fails for want of descriptors and a probe always gets a slot.
//!
//! Why not stop accepting at the cap: connections then wait in the kernel's backlog, probes
//! among them, behind sockets that may hold their slot until a timeout — a liveness probe
//! would time out and restart a pod that is only busy. Before these bounds, 1,100 sockets that
//! sent half a header under `ulimit -n 1024` exhausted the descriptors (`accept error: Too many
//! open files`) and /health/live timed out, 3 of 3; one such socket was still open after 95 s.

use super::error::ApiError;
use super::idle::{Activity, Tracked};
use crate::config::PROBE_RESERVE;
use crate::metrics as m;
use axum::body::Body;
use axum::response::IntoResponse;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;
use tower::ServiceExt;

/// A connection in the probes' reserve sends its one request at once (a kubelet or a load
/// balancer's health check does) or is closed.
const RESERVE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct Bounds {
    pub(crate) max_connections: usize,
    pub(crate) header_read: Duration,
    pub(crate) keep_alive: Duration,
    /// How long the drain on shutdown may wait for open connections.
    pub(crate) drain: Duration,
}

/// Accepts and serves until `shutdown` resolves, then stops accepting and drains: in-flight
/// requests finish, idle connections close.
pub(crate) async fn serve(listener: TcpListener, router: Router, b: Bounds, shutdown: impl Future<Output = ()>) {
    let permits = Arc::new(Semaphore::new(b.max_connections));
    let graceful = GracefulShutdown::new();
    let mut reserve: VecDeque<AbortHandle> = VecDeque::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                accept_error(e).await;
                continue;
            }
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let conn = served(stream, router.clone(), &b, &graceful);
                tokio::spawn(async move {
                    conn.await;
                    drop(permit);
                });
            }
            Err(_) => {
                reserve.retain(|h| !h.is_finished());
                if reserve.len() >= PROBE_RESERVE {
                    if let Some(oldest) = reserve.pop_front() {
                        oldest.abort();
                        metrics::counter!(m::CONNECTIONS_CLOSED, "why" => "reserve_evicted").increment(1);
                    }
                }
                reserve.push_back(tokio::spawn(probes_only(stream, router.clone(), &graceful)).abort_handle());
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(b.drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(secs = b.drain.as_secs(), "connections still open after the drain; closing them");
    }
}

/// A connection within the cap: every route, kept alive until idle.
fn served(stream: TcpStream, router: Router, b: &Bounds, graceful: &GracefulShutdown) -> impl Future<Output = ()> + Send + 'static {
    let activity = Activity::new();
    let io = TokioIo::new(Tracked::new(stream, activity.clone()));
    let tracked = activity.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let in_flight = tracked.enter();
        let router = router.clone();
        async move {
            let res = router.oneshot(req.map(Body::new)).await;
            drop(in_flight);
            res
        }
    });
    let conn = graceful.watch(builder(b.header_read, true).serve_connection(io, service));
    let keep_alive = b.keep_alive;
    async move {
        let _open = Open::new("served");
        tokio::select! {
            r = conn => {
                if let Err(e) = r {
                    tracing::debug!("connection ended: {e}");
                }
            }
            _ = activity.idle(keep_alive) => {
                metrics::counter!(m::CONNECTIONS_CLOSED, "why" => "idle").increment(1);
            }
        }
    }
}

/// A connection past the cap: one request, the probes only.
fn probes_only(stream: TcpStream, router: Router, graceful: &GracefulShutdown) -> impl Future<Output = ()> + Send + 'static {
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let router = router.clone();
        async move {
            if matches!(req.uri().path(), "/health/live" | "/health/ready") {
                router.oneshot(req.map(Body::new)).await
            } else {
                Ok(ApiError::ConnectionLimit.into_response())
            }
        }
    });
    let conn = graceful.watch(builder(RESERVE_HEADER_TIMEOUT, false).serve_connection(TokioIo::new(stream), service));
    async move {
        let _open = Open::new("probe_reserve");
        let _ = conn.await;
    }
}

fn builder(header_read: Duration, keep_alive: bool) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new()).header_read_timeout(header_read).keep_alive(keep_alive);
    b
}

/// Counts an open connection in the gauge while it lives (also when its task is aborted).
struct Open(&'static str);

impl Open {
    fn new(kind: &'static str) -> Open {
        metrics::gauge!(m::CONNECTIONS, "kind" => kind).increment(1.0);
        Open(kind)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        metrics::gauge!(m::CONNECTIONS, "kind" => self.0).decrement(1.0);
    }
}

/// A client that gave up before its connection was accepted is no fault of ours; anything else
/// (descriptors run out despite the cap: another part of the process holds them) is logged,
/// and accepting pauses briefly rather than spinning.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(e.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused) {
        return;
    }
    tracing::error!("accept error: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

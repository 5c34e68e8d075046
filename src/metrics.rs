//! Prometheus metrics: names in one place, and the recorder with histogram buckets.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "polyrank_requests_total";
pub(crate) const REQUEST_SECONDS: &str = "polyrank_request_duration_seconds";
/// Per-stage latency, label `stage`: tokenize, queue, inference, score.
pub(crate) const STAGE_SECONDS: &str = "polyrank_stage_duration_seconds";
pub(crate) const BATCH_SIZE: &str = "polyrank_batch_size";
pub(crate) const POOL_SIZE: &str = "polyrank_pool_size";
pub(crate) const POOL_ENCODED: &str = "polyrank_pool_encoded_total";
/// 1 when the pool came from the cache file at startup, 0 when it was encoded.
pub(crate) const CACHE_REUSED: &str = "polyrank_pool_cache_reused";
pub(crate) const REJECTED: &str = "polyrank_queue_rejected_total";
/// Candidates written through the API, label `op`: upsert, delete.
pub(crate) const WRITES: &str = "polyrank_pool_writes_total";
pub(crate) const STORE_LOG_BYTES: &str = "polyrank_store_log_bytes";
pub(crate) const STORE_LAST_COMPACTION: &str = "polyrank_store_last_compaction_timestamp_seconds";
pub(crate) const STORE_COMPACTIONS: &str = "polyrank_store_compactions_total";
/// 1 while the store answers (always for the local store), 0 while a shared store's
/// database cannot be reached.
pub(crate) const STORE_CONNECTED: &str = "polyrank_store_connected";
/// 0 while this replica is caught up with the store, else seconds since it last was.
pub(crate) const STORE_LAG_SECONDS: &str = "polyrank_store_lag_seconds";
/// The meta filter index's estimated size, and the candidates it leaves to direct checks.
pub(crate) const META_INDEX_BYTES: &str = "polyrank_meta_index_bytes";
pub(crate) const META_UNINDEXED: &str = "polyrank_meta_unindexed_candidates";
/// Open client connections, label `kind`: served, probe_reserve.
pub(crate) const CONNECTIONS: &str = "polyrank_open_connections";
/// Connections closed by the server, label `why`: reserve_evicted, idle.
pub(crate) const CONNECTIONS_CLOSED: &str = "polyrank_connections_closed_total";
/// Rows a low-precision ranking re-scored in fp32 (its shortlist and the bound's guard).
pub(crate) const RESCORED_ROWS: &str = "polyrank_rescored_rows";

const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
const RESCORED_BUCKETS: &[f64] = &[64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0];

/// Installs the process-wide recorder; call once.
pub(crate) fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), BATCH_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(RESCORED_ROWS.into()), RESCORED_BUCKETS)?
        .install_recorder()?;
    metrics::describe_counter!(REQUESTS, "HTTP requests by route and status");
    metrics::describe_histogram!(REQUEST_SECONDS, metrics::Unit::Seconds, "HTTP request latency by route");
    metrics::describe_histogram!(STAGE_SECONDS, metrics::Unit::Seconds, "Latency of tokenize / queue / inference / score");
    metrics::describe_histogram!(BATCH_SIZE, "Requests per inference batch");
    metrics::describe_gauge!(POOL_SIZE, "Candidates in the pool");
    metrics::describe_counter!(POOL_ENCODED, "Pool candidates encoded at startup (0 when the cache was reused)");
    metrics::describe_gauge!(CACHE_REUSED, "1 when the pool came from the cache file");
    metrics::describe_counter!(REJECTED, "Requests refused with 429 because the queue was full");
    metrics::describe_counter!(WRITES, "Candidates upserted or deleted through the API, by op");
    metrics::describe_gauge!(STORE_LOG_BYTES, "Bytes in the store's write-ahead log since the last snapshot");
    metrics::describe_gauge!(STORE_LAST_COMPACTION, "When the store last wrote a snapshot (Unix seconds)");
    metrics::describe_counter!(STORE_COMPACTIONS, "Snapshots written by the store");
    metrics::describe_gauge!(STORE_CONNECTED, "1 while the store can be reached");
    metrics::describe_gauge!(STORE_LAG_SECONDS, "Seconds since this replica was last caught up with the store (0 when it is)");
    metrics::describe_gauge!(META_INDEX_BYTES, "Estimated bytes of the meta filter index");
    metrics::describe_gauge!(META_UNINDEXED, "Candidates whose meta is not indexed (over the limits or the index budget); filters check them directly");
    metrics::describe_gauge!(CONNECTIONS, "Open client connections, by kind (served, probe_reserve)");
    metrics::describe_counter!(CONNECTIONS_CLOSED, "Connections closed by the server, by reason (idle, reserve_evicted)");
    metrics::describe_histogram!(RESCORED_ROWS, "Rows a low-precision ranking re-scored in fp32 (shortlist and bound guard)");
    metrics::counter!(POOL_ENCODED).absolute(0);
    Ok(handle)
}

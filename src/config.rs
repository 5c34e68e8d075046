//! Server settings: `config/default.toml`, overridden by `POLYRANK_*` environment variables,
//! overridden by command-line flags (clap reads flag and variable for each setting).

use anyhow::{Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Every setting of `polyrank serve`. Field docs are the `--help` text.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct ServeArgs {
    /// TOML file with the settings below (flags and POLYRANK_* variables override it).
    #[arg(long, env = "POLYRANK_CONFIG", default_value = "config/default.toml")]
    #[serde(skip)]
    pub config: PathBuf,
    /// Model directory (polyrank format: BERT checkpoint + polyrank.json + poly head).
    #[arg(long, env = "POLYRANK_MODEL_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_dir: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "POLYRANK_DEVICE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Precision of the transformer encoders: float32, or float16 / bfloat16 (for CUDA; their
    /// attention softmax, the head and the scoring stay in fp32).
    #[arg(long, env = "POLYRANK_DTYPE", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Dtype>,
    /// Candidate pool files, plain text (one per line) or .jsonl ({"id","text","meta"?});
    /// comma-separated in the environment.
    #[arg(long, env = "POLYRANK_CANDIDATES", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidates: Option<Vec<PathBuf>>,
    /// Directory for the encoded-pool cache files.
    #[arg(long, env = "POLYRANK_CACHE_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// Directory of the live pool's store (snapshot + write-ahead log). The candidate files
    /// seed it on the first start; writes through /candidates are kept here.
    #[arg(long, env = "POLYRANK_STORE_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_dir: Option<PathBuf>,
    /// The live pool's store shared by replicas: a PostgreSQL connection string
    /// (postgres://user:password@host:port/db). Empty: this replica's own files in store_dir.
    #[arg(long, env = "POLYRANK_STORE_URL", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_url: Option<String>,
    /// Write-ahead log size in bytes past which the store writes a new snapshot (in the
    /// background) and starts a new log.
    #[arg(long, env = "POLYRANK_STORE_COMPACT_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_compact_bytes: Option<u64>,
    /// Address to listen on.
    #[arg(long, env = "POLYRANK_HOST")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Port to listen on (0 picks a free one; the bound address is logged).
    #[arg(long, env = "POLYRANK_PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Texts per forward pass while encoding the pool at startup.
    #[arg(long, env = "POLYRANK_ENCODE_BATCH_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encode_batch_size: Option<usize>,
    /// Most tokens one request may cost (context + inline candidates, or /encode's texts,
    /// after truncation); dearer requests get 422 at admission, so no admissible request can
    /// hold the model for long.
    #[arg(long, env = "POLYRANK_MAX_REQUEST_TOKENS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_request_tokens: Option<usize>,
    /// Most requests merged into one inference batch.
    #[arg(long, env = "POLYRANK_MAX_BATCH_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_size: Option<usize>,
    /// Most tokens (padded) in one inference batch.
    #[arg(long, env = "POLYRANK_MAX_BATCH_TOKENS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_tokens: Option<usize>,
    /// How long the batcher waits for more requests after the first, in milliseconds.
    #[arg(long, env = "POLYRANK_MAX_WAIT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_wait_ms: Option<u64>,
    /// Requests waiting for the model before new ones get 429.
    #[arg(long, env = "POLYRANK_QUEUE_CAPACITY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_capacity: Option<usize>,
    /// Time budget of one request in milliseconds; past it the answer is 503.
    #[arg(long, env = "POLYRANK_REQUEST_TIMEOUT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout_ms: Option<u64>,
    /// Largest accepted top_k.
    #[arg(long, env = "POLYRANK_MAX_TOP_K")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_top_k: Option<i64>,
    /// top_k when a request gives none.
    #[arg(long, env = "POLYRANK_DEFAULT_TOP_K")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_top_k: Option<i64>,
    /// Most inline candidates in one /rank request.
    #[arg(long, env = "POLYRANK_MAX_INLINE_CANDIDATES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_inline_candidates: Option<usize>,
    /// Most texts in one /encode request.
    #[arg(long, env = "POLYRANK_MAX_ENCODE_TEXTS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_encode_texts: Option<usize>,
    /// Longest accepted text, in characters (longer texts are refused, not truncated).
    #[arg(long, env = "POLYRANK_MAX_TEXT_CHARS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_text_chars: Option<usize>,
    /// Largest request body in bytes (413 above it).
    #[arg(long, env = "POLYRANK_BODY_LIMIT_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_limit_bytes: Option<usize>,
    /// Most object keys in one candidate's meta, all nesting levels counted (422 above).
    #[arg(long, env = "POLYRANK_MAX_META_KEYS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_meta_keys: Option<usize>,
    /// Deepest nesting of a candidate's meta, the meta object being level 1 (422 deeper).
    #[arg(long, env = "POLYRANK_MAX_META_DEPTH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_meta_depth: Option<usize>,
    /// Largest candidate meta, in bytes of compact JSON (422 above).
    #[arg(long, env = "POLYRANK_MAX_META_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_meta_bytes: Option<usize>,
    /// Longest string in a candidate's meta, key or value, in characters (422 above).
    #[arg(long, env = "POLYRANK_MAX_META_STRING_CHARS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_meta_string_chars: Option<usize>,
    /// Most memory the meta filter index may take, in (estimated) bytes; candidates past it are
    /// not indexed and filters check them one by one (same results, slower).
    #[arg(long, env = "POLYRANK_MAX_META_INDEX_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_meta_index_bytes: Option<usize>,
    /// Most bytes of ids, texts and meta one /rank answer may carry (return_text, return_meta);
    /// a larger answer is refused with 422 (ask for a smaller top_k, or without them).
    #[arg(long, env = "POLYRANK_MAX_RESPONSE_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_response_bytes: Option<usize>,
    /// Most open client connections served; past it, a small reserve answers only the health
    /// probes (the oldest reserved connection is closed for a new one), so the process never
    /// runs out of file descriptors. Must fit the open-file limit (ulimit -n) with headroom.
    #[arg(long, env = "POLYRANK_MAX_CONNECTIONS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Time a client has to send a request's headers, in milliseconds, counted from the
    /// connection's opening (or, on a kept-alive connection, from the previous response);
    /// the connection is closed past it.
    #[arg(long, env = "POLYRANK_HEADER_READ_TIMEOUT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_read_timeout_ms: Option<u64>,
    /// A connection with no request in flight and no bytes moving for this long, in
    /// milliseconds, is closed (at most header_read_timeout_ms).
    #[arg(long, env = "POLYRANK_KEEP_ALIVE_TIMEOUT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_alive_timeout_ms: Option<u64>,
    /// Origins allowed by CORS; "*" allows any, empty disables CORS headers. Comma-separated.
    #[arg(long, env = "POLYRANK_CORS_ORIGINS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cors_origins: Option<Vec<String>>,
    /// When set, every route that reads or changes the model or the pool needs `Authorization:
    /// Bearer KEY` (the scheme in any case) or `x-api-key: KEY`: POST /rank, POST /encode, POST
    /// and DELETE /candidates, GET /candidates/{id}. /health/live, /health/ready, /info,
    /// /metrics and /openapi.yaml stay open.
    #[arg(long, env = "POLYRANK_API_KEY", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// libtorch intra-op threads (0 = one per core).
    #[arg(long, env = "POLYRANK_THREADS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// Pool rows scored exactly by an `"approximate": true` request, after a preselection by
    /// the mean of the context's vectors.
    #[arg(long, env = "POLYRANK_APPROX_PRESELECT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approx_preselect: Option<usize>,
    /// Pool cache files kept in cache_dir (the current one and the newest others); older ones,
    /// and temp files of interrupted writes, are removed at startup.
    #[arg(long, env = "POLYRANK_CACHE_KEEP")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_keep: Option<usize>,
    /// Precision of the scoring GEMM over the pool: auto (measured at start, the fastest on
    /// this CPU), float32, bfloat16 or int8. Low precision re-scores its shortlist in fp32 under
    /// a proven error bound: the top-k and scores are the fp32 model's.
    #[arg(long, env = "POLYRANK_SCORING_PRECISION", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scoring_precision: Option<ScoringPrecision>,
    /// Store pool vectors in fp16 (half the memory; scores computed in fp32). Applies when
    /// scoring runs in float32.
    #[arg(long, env = "POLYRANK_FP16_CANDIDATES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fp16_candidates: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model_dir: PathBuf,
    pub device: String,
    pub dtype: Dtype,
    pub candidates: Vec<PathBuf>,
    pub cache_dir: PathBuf,
    pub store_dir: PathBuf,
    /// Credentials never leave the process: serialised (the startup log) without them.
    #[serde(serialize_with = "redacted_url")]
    pub store_url: String,
    pub store_compact_bytes: u64,
    pub host: String,
    pub port: u16,
    pub encode_batch_size: usize,
    pub max_request_tokens: usize,
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
    pub max_wait_ms: u64,
    pub queue_capacity: usize,
    pub request_timeout_ms: u64,
    pub max_top_k: i64,
    pub default_top_k: i64,
    pub max_inline_candidates: usize,
    pub max_encode_texts: usize,
    pub max_text_chars: usize,
    pub body_limit_bytes: usize,
    pub max_meta_keys: usize,
    pub max_meta_depth: usize,
    pub max_meta_bytes: usize,
    pub max_meta_string_chars: usize,
    pub max_meta_index_bytes: usize,
    pub max_response_bytes: usize,
    pub max_connections: usize,
    pub header_read_timeout_ms: u64,
    pub keep_alive_timeout_ms: u64,
    pub cors_origins: Vec<String>,
    #[serde(default, skip_serializing)]
    pub api_key: Option<String>,
    pub threads: usize,
    pub approx_preselect: usize,
    pub cache_keep: usize,
    /// Config files written before the setting existed mean auto.
    #[serde(default)]
    pub scoring_precision: ScoringPrecision,
    pub fp16_candidates: bool,
}

/// A connection string as the logs may show it: scheme, host, port and database only.
fn redacted_url<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    if url.is_empty() {
        return s.serialize_str("");
    }
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => s.serialize_str(&format!("postgres://{}", crate::pool::store::postgres::describe(&c))),
        Err(_) => s.serialize_str("(unparsable)"),
    }
}

/// Encoder compute precision, parsed once from the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    Float32,
    Float16,
    Bfloat16,
}

impl Dtype {
    /// What the encoders' precision adds to the keys of encoded vectors (pool cache, store).
    pub fn key_bytes(self) -> &'static [u8] {
        match self {
            Dtype::Float32 => b"",
            Dtype::Float16 => b"|dtype=float16",
            Dtype::Bfloat16 => b"|dtype=bfloat16",
        }
    }

    pub fn kind(self) -> tch::Kind {
        match self {
            Dtype::Float32 => tch::Kind::Float,
            Dtype::Float16 => tch::Kind::Half,
            Dtype::Bfloat16 => tch::Kind::BFloat16,
        }
    }
}

/// The `scoring_precision` setting: a precision, or `auto` (decided at start by measurement).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScoringPrecision {
    #[default]
    Auto,
    Float32,
    Bfloat16,
    Int8,
}

impl ScoringPrecision {
    /// The fixed precision asked for; None for auto.
    pub fn fixed(self) -> Option<crate::model::rows::Precision> {
        use crate::model::rows::Precision;
        match self {
            ScoringPrecision::Auto => None,
            ScoringPrecision::Float32 => Some(Precision::Float32),
            ScoringPrecision::Bfloat16 => Some(Precision::Bfloat16),
            ScoringPrecision::Int8 => Some(Precision::Int8),
        }
    }
}

/// Connections past `max_connections` that are still accepted, to answer health probes only.
pub const PROBE_RESERVE: usize = 16;
/// File descriptors the process holds besides client connections: 14 measured in a ready
/// server (stdio, epoll, the listener, the store's log and lock, libtorch); the rest is room
/// for what it opens now and then (a compaction's snapshot, the pool cache, /proc reads).
const FD_HEADROOM: u64 = 128;

/// The soft open-file limit (RLIMIT_NOFILE), when there is one.
fn open_file_limit() -> Option<u64> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given and nothing else.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0;
    (ok && r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur as u64)
}

/// More intra-op threads than this many per core only adds contention (and each costs
/// memory and a slot of the host's thread limit).
const MAX_THREADS_PER_CORE: usize = 4;

impl Config {
    /// File values first, then every flag or variable that was given.
    pub fn resolve(args: &ServeArgs) -> Result<Config> {
        let text = std::fs::read_to_string(&args.config)
            .with_context(|| format!("reading config file {}", args.config.display()))?;
        let mut table: toml::Table =
            toml::from_str(&text).with_context(|| format!("parsing {}", args.config.display()))?;
        let overrides = toml::Table::try_from(args).context("collecting overrides")?;
        table.extend(overrides);
        let c: Config = table
            .try_into()
            .with_context(|| format!("settings from {} and overrides", args.config.display()))?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        anyhow::ensure!(self.max_top_k >= 1, "max_top_k must be at least 1");
        anyhow::ensure!(
            (1..=self.max_top_k).contains(&self.default_top_k),
            "default_top_k must be between 1 and max_top_k"
        );
        for (name, value) in [
            ("max_batch_size", self.max_batch_size),
            ("encode_batch_size", self.encode_batch_size),
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_request_tokens", self.max_request_tokens),
            ("queue_capacity", self.queue_capacity),
            ("approx_preselect", self.approx_preselect),
            ("max_inline_candidates", self.max_inline_candidates),
            ("max_encode_texts", self.max_encode_texts),
            ("max_text_chars", self.max_text_chars),
            ("body_limit_bytes", self.body_limit_bytes),
            ("request_timeout_ms", self.request_timeout_ms as usize),
            ("cache_keep", self.cache_keep),
            ("store_compact_bytes", self.store_compact_bytes as usize),
            ("max_meta_keys", self.max_meta_keys),
            ("max_meta_depth", self.max_meta_depth),
            ("max_meta_bytes", self.max_meta_bytes),
            ("max_meta_string_chars", self.max_meta_string_chars),
            ("max_meta_index_bytes", self.max_meta_index_bytes),
            ("max_response_bytes", self.max_response_bytes),
            ("max_connections", self.max_connections),
            ("header_read_timeout_ms", self.header_read_timeout_ms as usize),
            ("keep_alive_timeout_ms", self.keep_alive_timeout_ms as usize),
        ] {
            anyhow::ensure!(value >= 1, "{name} must be at least 1 (0 would refuse every request or disable the limit)");
        }
        let cores = num_cpus();
        anyhow::ensure!(
            self.threads <= MAX_THREADS_PER_CORE * cores,
            "threads = {} is more than {MAX_THREADS_PER_CORE} per core on this {cores}-core host (0 = one per core)",
            self.threads
        );
        anyhow::ensure!(!self.candidates.is_empty(), "at least one candidates file is needed");
        if !self.store_url.is_empty() {
            anyhow::ensure!(
                self.store_url.starts_with("postgres://") || self.store_url.starts_with("postgresql://"),
                "store_url must be empty (this replica's files in store_dir) or a postgres:// connection string"
            );
            self.store_url
                .parse::<tokio_postgres::Config>()
                .map_err(|e| anyhow::anyhow!("store_url is not a valid PostgreSQL connection string: {e}"))?;
        }
        anyhow::ensure!(
            self.keep_alive_timeout_ms <= self.header_read_timeout_ms,
            "keep_alive_timeout_ms = {} is more than header_read_timeout_ms = {}: hyper's header timer also runs while a kept-alive connection waits for its next request, so the idle time could never reach it",
            self.keep_alive_timeout_ms,
            self.header_read_timeout_ms
        );
        self.check_open_files()?;
        self.device()?;
        Ok(())
    }

    /// Every connection the server may hold is a file descriptor: the cap, the probes'
    /// reserve and what the process itself opens must fit the open-file limit, or accepting
    /// fails with EMFILE and the probes go unanswered.
    fn check_open_files(&self) -> Result<()> {
        let Some(limit) = open_file_limit() else { return Ok(()) };
        let needed = self.max_connections as u64 + PROBE_RESERVE as u64 + FD_HEADROOM;
        anyhow::ensure!(
            needed <= limit,
            "max_connections = {} needs {needed} file descriptors ({PROBE_RESERVE} more for the health probes' reserve and {FD_HEADROOM} for the process), but the open-file limit is {limit} (ulimit -n): lower max_connections or raise the limit",
            self.max_connections
        );
        Ok(())
    }

    pub fn meta_limits(&self) -> crate::pool::meta::MetaLimits {
        crate::pool::meta::MetaLimits {
            keys: self.max_meta_keys,
            depth: self.max_meta_depth,
            bytes: self.max_meta_bytes,
            string_chars: self.max_meta_string_chars,
        }
    }

    /// Checks that need the model's settings: one context and one candidate of the longest
    /// the model reads must fit the per-request budget.
    pub(crate) fn validate_for(&self, s: &crate::model::format::PolySettings) -> Result<()> {
        let least = s.max_context_tokens + s.max_candidate_tokens;
        anyhow::ensure!(
            self.max_request_tokens >= least,
            "max_request_tokens = {} cannot admit one context and one candidate of the model's longest ({least} tokens)",
            self.max_request_tokens
        );
        Ok(())
    }

    pub fn device(&self) -> Result<tch::Device> {
        parse_device(&self.device)
    }

    /// Paths in the config file are relative to the working directory, like flags.
    pub(crate) fn model_dir(&self) -> &Path {
        &self.model_dir
    }
}

/// `cpu`, `cuda` or `cuda:N`, and for CUDA a device this host has.
pub(crate) fn parse_device(s: &str) -> Result<tch::Device> {
    let index = match s {
        "cpu" => return Ok(tch::Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => anyhow::bail!("device `{other}`: expected cpu, cuda or cuda:N"),
        },
    };
    let count = tch::Cuda::device_count() as usize;
    anyhow::ensure!(
        index < count,
        "device `{s}`: this host has {count} CUDA device(s){}",
        if count == 0 { " (no CUDA driver or a CPU-only libtorch); use device = \"cpu\"" } else { "" }
    );
    Ok(tch::Device::Cuda(index))
}

pub(crate) fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

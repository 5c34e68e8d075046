//! Server settings, defined once in `Config`: defaults, overridden by the settings file
//! (`config/default.toml`), overridden by `POLYRANK_*` environment variables and flags
//! (clap reads flag, variable and default of each setting).

use anyhow::{Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Every setting of `polyrank serve`, defined once: the field docs are the `--help` text,
/// `#[arg]` gives each its flag, `POLYRANK_*` variable and default, the field name its key in
/// the TOML file. `config/default.toml` and the README's table are checked against this
/// (`tests/settings_drift.rs`); `validate` holds the rules between settings.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Model directory (polyrank format: BERT checkpoint + polyrank.json + poly head).
    #[arg(long, env = "POLYRANK_MODEL_DIR", default_value = "models/default")]
    pub model_dir: PathBuf,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "POLYRANK_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Precision of the transformer encoders: float32, or float16 / bfloat16 (for CUDA; their
    /// attention softmax, the head and the scoring stay in fp32).
    #[arg(long, env = "POLYRANK_DTYPE", value_enum, default_value_t = Dtype::Float32)]
    pub dtype: Dtype,
    /// Candidate pool files, plain text (one per line) or .jsonl ({"id","text","meta"?});
    /// comma-separated in the environment.
    #[arg(long, env = "POLYRANK_CANDIDATES", value_delimiter = ',', default_value = "data/chitchat-pool.jsonl")]
    pub candidates: Vec<PathBuf>,
    /// Directory for the encoded-pool cache files.
    #[arg(long, env = "POLYRANK_CACHE_DIR", default_value = "data/pool-cache")]
    pub cache_dir: PathBuf,
    /// Directory of the live pool's store (snapshot + write-ahead log). The candidate files
    /// seed it on the first start; writes through /candidates are kept here.
    #[arg(long, env = "POLYRANK_STORE_DIR", default_value = "data/pool-store")]
    pub store_dir: PathBuf,
    /// The live pool's store shared by replicas: a PostgreSQL connection string
    /// (postgres://user:password@host:port/db). Empty: this replica's own files in store_dir.
    #[arg(long, env = "POLYRANK_STORE_URL", hide_env_values = true, default_value = "")]
    pub store_url: String,
    /// Write-ahead log size in bytes past which the store writes a new snapshot (in the
    /// background) and starts a new log.
    #[arg(long, env = "POLYRANK_STORE_COMPACT_BYTES", default_value_t = 64 << 20)]
    pub store_compact_bytes: u64,
    /// Address to listen on.
    #[arg(long, env = "POLYRANK_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the bound address is logged).
    #[arg(long, env = "POLYRANK_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Texts per forward pass while encoding the pool at startup.
    #[arg(long, env = "POLYRANK_ENCODE_BATCH_SIZE", default_value_t = 64)]
    pub encode_batch_size: usize,
    /// Most tokens one request may cost (context + inline candidates, or /encode's texts,
    /// after truncation); dearer requests get 422 at admission, so no admissible request can
    /// hold the model for long.
    #[arg(long, env = "POLYRANK_MAX_REQUEST_TOKENS", default_value_t = 16384)]
    pub max_request_tokens: usize,
    /// Most requests merged into one inference batch.
    #[arg(long, env = "POLYRANK_MAX_BATCH_SIZE", default_value_t = 32)]
    pub max_batch_size: usize,
    /// Most tokens (padded) in one inference batch.
    #[arg(long, env = "POLYRANK_MAX_BATCH_TOKENS", default_value_t = 16384)]
    pub max_batch_tokens: usize,
    /// How long the batcher waits for more requests after the first, in milliseconds.
    #[arg(long, env = "POLYRANK_MAX_WAIT_MS", default_value_t = 0)]
    pub max_wait_ms: u64,
    /// Requests waiting for the model before new ones get 429.
    #[arg(long, env = "POLYRANK_QUEUE_CAPACITY", default_value_t = 256)]
    pub queue_capacity: usize,
    /// Time budget of one request in milliseconds; past it the answer is 503.
    #[arg(long, env = "POLYRANK_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,
    /// Largest accepted top_k.
    #[arg(long, env = "POLYRANK_MAX_TOP_K", default_value_t = 1000)]
    pub max_top_k: i64,
    /// top_k when a request gives none.
    #[arg(long, env = "POLYRANK_DEFAULT_TOP_K", default_value_t = 10)]
    pub default_top_k: i64,
    /// Most inline candidates in one /rank request.
    #[arg(long, env = "POLYRANK_MAX_INLINE_CANDIDATES", default_value_t = 1000)]
    pub max_inline_candidates: usize,
    /// Most texts in one /encode request.
    #[arg(long, env = "POLYRANK_MAX_ENCODE_TEXTS", default_value_t = 256)]
    pub max_encode_texts: usize,
    /// Longest accepted text, in characters (longer texts are refused, not truncated).
    #[arg(long, env = "POLYRANK_MAX_TEXT_CHARS", default_value_t = 20_000)]
    pub max_text_chars: usize,
    /// Largest request body in bytes (413 above it).
    #[arg(long, env = "POLYRANK_BODY_LIMIT_BYTES", default_value_t = 2 << 20)]
    pub body_limit_bytes: usize,
    /// Most object keys in one candidate's meta, all nesting levels counted (422 above).
    #[arg(long, env = "POLYRANK_MAX_META_KEYS", default_value_t = 64)]
    pub max_meta_keys: usize,
    /// Deepest nesting of a candidate's meta, the meta object being level 1 (422 deeper).
    #[arg(long, env = "POLYRANK_MAX_META_DEPTH", default_value_t = 4)]
    pub max_meta_depth: usize,
    /// Largest candidate meta, in bytes of compact JSON (422 above).
    #[arg(long, env = "POLYRANK_MAX_META_BYTES", default_value_t = 8192)]
    pub max_meta_bytes: usize,
    /// Longest string in a candidate's meta, key or value, in characters (422 above).
    #[arg(long, env = "POLYRANK_MAX_META_STRING_CHARS", default_value_t = 1024)]
    pub max_meta_string_chars: usize,
    /// Most memory the meta filter index may take, in (estimated) bytes; candidates past it are
    /// not indexed and filters check them one by one (same results, slower).
    #[arg(long, env = "POLYRANK_MAX_META_INDEX_BYTES", default_value_t = 256 << 20)]
    pub max_meta_index_bytes: usize,
    /// Most bytes of ids, texts and meta one /rank answer may carry (return_text, return_meta);
    /// a larger answer is refused with 422 (ask for a smaller top_k, or without them).
    #[arg(long, env = "POLYRANK_MAX_RESPONSE_BYTES", default_value_t = 4 << 20)]
    pub max_response_bytes: usize,
    /// Most open client connections served; past it, a small reserve answers only the health
    /// probes (the oldest reserved connection is closed for a new one), so the process never
    /// runs out of file descriptors. Must fit the open-file limit (ulimit -n) with headroom.
    #[arg(long, env = "POLYRANK_MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,
    /// Time a client has to send a request's headers, in milliseconds, counted from the
    /// connection's opening (or, on a kept-alive connection, from the previous response);
    /// the connection is closed past it.
    #[arg(long, env = "POLYRANK_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,
    /// A connection with no request in flight and no bytes moving for this long, in
    /// milliseconds, is closed (at most header_read_timeout_ms).
    #[arg(long, env = "POLYRANK_KEEP_ALIVE_TIMEOUT_MS", default_value_t = 5000)]
    pub keep_alive_timeout_ms: u64,
    /// Origins allowed by CORS; "*" allows any, empty disables CORS headers. Comma-separated.
    #[arg(long, env = "POLYRANK_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// When set, every route that reads or changes the model or the pool needs `Authorization:
    /// Bearer KEY` (the scheme in any case) or `x-api-key: KEY`: POST /rank, POST /encode, POST
    /// and DELETE /candidates, GET /candidates/{id}. /health/live, /health/ready, /info,
    /// /metrics and /openapi.yaml stay open.
    #[arg(long, env = "POLYRANK_API_KEY", hide_env_values = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// libtorch intra-op threads (0 = one per core).
    #[arg(long, env = "POLYRANK_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// Pool rows scored exactly by an `"approximate": true` request, after a preselection by
    /// the mean of the context's vectors.
    #[arg(long, env = "POLYRANK_APPROX_PRESELECT", default_value_t = 2000)]
    pub approx_preselect: usize,
    /// Pool cache files kept in cache_dir (the current one and the newest others); older ones,
    /// and temp files of interrupted writes, are removed at startup.
    #[arg(long, env = "POLYRANK_CACHE_KEEP", default_value_t = 3)]
    pub cache_keep: usize,
    /// Precision of the scoring GEMM over the pool: auto (measured at start, the fastest on
    /// this CPU), float32, bfloat16 or int8. Low precision re-scores its shortlist in fp32 under
    /// a proven error bound: the top-k and scores are the fp32 model's.
    #[arg(long, env = "POLYRANK_SCORING_PRECISION", value_enum, default_value_t = ScoringPrecision::Auto)]
    pub scoring_precision: ScoringPrecision,
    /// Store pool vectors in fp16 (half the memory; scores computed in fp32). Applies when
    /// scoring runs in float32.
    #[arg(long, env = "POLYRANK_FP16_CANDIDATES", default_value_t = false, action = clap::ArgAction::Set)]
    pub fp16_candidates: bool,
}

/// `polyrank serve`'s arguments: the settings file, and `Config` from flags, variables and
/// defaults, knowing which values were given (those beat the file).
#[derive(Debug, Clone)]
pub struct ServeArgs {
    pub config: PathBuf,
    pub settings: Config,
    /// Settings given by a flag or a `POLYRANK_*` variable.
    pub given: BTreeSet<String>,
}

/// What clap parses; `ServeArgs` adds which values were given.
#[derive(Args)]
struct Parsed {
    /// TOML file with the settings below (flags and POLYRANK_* variables override it).
    #[arg(long, env = "POLYRANK_CONFIG", default_value = "config/default.toml")]
    config: PathBuf,
    #[command(flatten)]
    settings: Config,
}

impl clap::FromArgMatches for ServeArgs {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        use clap::parser::ValueSource::{CommandLine, EnvVariable};
        let Parsed { config, settings } = Parsed::from_arg_matches(m)?;
        let given = m.ids().filter(|id| matches!(m.value_source(id.as_str()), Some(CommandLine | EnvVariable))).map(|id| id.to_string()).collect();
        Ok(ServeArgs { config, settings, given })
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for ServeArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        Parsed::augment_args(cmd)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Parsed::augment_args_for_update(cmd)
    }
}

/// A connection string as the logs may show it: scheme, host, port and database only.
fn redacted_url(url: &str) -> String {
    if url.is_empty() {
        return String::new();
    }
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => format!("postgres://{}", crate::pool::store::postgres::describe(&c)),
        Err(_) => "(unparsable)".into(),
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
    /// Defaults, then the file's values, then every flag or variable that was given; checked.
    pub fn resolve(args: &ServeArgs) -> Result<Config> {
        let c = Config::layered(args)?;
        c.validate()?;
        Ok(c)
    }

    /// The layering alone, unchecked: the file's values over the defaults, given flags and
    /// variables over both. A key the file has and `Config` lacks is an error.
    pub fn layered(args: &ServeArgs) -> Result<Config> {
        let text = std::fs::read_to_string(&args.config)
            .with_context(|| format!("reading config file {}", args.config.display()))?;
        let file: toml::Table =
            toml::from_str(&text).with_context(|| format!("parsing {}", args.config.display()))?;
        let mut table = toml::Table::try_from(&args.settings).context("collecting the settings")?;
        table.extend(file.into_iter().filter(|(k, _)| !args.given.contains(k)));
        table.try_into().with_context(|| format!("settings from {} and overrides", args.config.display()))
    }

    /// The settings as the startup log shows them: no API key, the store's URL without
    /// credentials.
    pub fn for_log(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.remove("api_key");
            o.insert("store_url".into(), redacted_url(&self.store_url).into());
        }
        v
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

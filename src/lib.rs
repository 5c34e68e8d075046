//! polyrank: a Poly-encoder ranking service on libtorch. Read `docs/architecture.md` first.
//!
//! Layers, dependencies one way: `http` → `infer` → `model` / `text` / `pool` → `model::format`.
//! `offline` (eval, train, the small CLI commands) sits beside `http` and uses `infer::Ranker`.

pub mod config;
pub mod fingerprint;
pub mod http;
pub mod infer;
pub(crate) mod metrics;
pub mod model;
pub mod offline;
pub mod pool;
pub mod serve;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod text;

//! polyrank: a Poly-encoder ranking service on libtorch.

pub mod cache;
pub mod cli;
pub mod config;
pub mod engine;
pub mod fingerprint;
pub mod eval;
pub mod http;
pub mod metrics;
pub mod model;
pub mod pool;
pub mod ranker;
pub mod serve;
pub mod testkit;
pub mod tokenizer;
pub mod train;

//! polyrank: a Poly-encoder ranking service on libtorch.

pub mod model;
pub mod tokenizer;
pub mod cli;
pub mod ranker;
pub mod testkit;

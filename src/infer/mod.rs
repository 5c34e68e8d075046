//! Inference: the typed handle the HTTP layer calls (`Infer::rank`, `encode`, `upsert`,
//! `delete`, `get`, `status`) and the one thread that owns the model and the pool.
//!
//! The handle (`handle.rs`) checks and prices a request (`admission.rs`), tokenizes it off
//! the async workers and queues a typed job (`queue.rs`). The inference thread (`worker.rs`)
//! batches queued jobs; a batch's reads are one function of model and pool (`read.rs`),
//! large work goes on a chunk at a time (`chunked.rs`), writes go through the store and are
//! applied in its order (`writer.rs`). `Ranker` is the same model and tokenizer without
//! threads, for eval, training and the CLI. This file only names the rooms: no module of
//! `infer` imports one that imports it back (`tests/module_graph.rs`).

pub mod admission;
mod chunked;
mod guard;
mod handle;
mod messages;
mod precision;
mod queue;
pub mod ranker;
mod read;
mod startup;
pub mod status;
mod worker;
mod writer;

pub use crate::text::TextKind;
pub use handle::{start, Infer};
pub use messages::{CodeRead, Hit, InferError, RankQuery, Ranking, TokenRead, Vectors, Written};
pub use worker::Inference;

//! Work without a server: evaluation, training, and the small CLI commands.

pub mod cli;
pub mod eval;
pub mod import;
pub mod train;

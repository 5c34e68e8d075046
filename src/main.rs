use anyhow::Result;
use clap::{Parser, Subcommand};
use polyrank::offline::cli;

#[derive(Parser)]
#[command(name = "polyrank", version, about = "A Poly-encoder ranking service on libtorch")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve /rank and /encode over HTTP with the candidate pool cached.
    Serve(polyrank::config::ServeArgs),
    /// Encode the candidate pool into the pool cache (same settings as serve) and exit.
    WarmCache(polyrank::config::ServeArgs),
    /// R@1/5/10 and MRR of a model on examples with fixed candidate lists.
    Eval(cli::EvalArgs),
    /// Train the Poly-encoder head on (context, response) pairs.
    Train(polyrank::offline::train::TrainArgs),
    /// Rank a handful of built-in candidates for a context (a quick check of a model).
    Rank(cli::RankArgs),
    /// Write polyrank.json and a freshly initialised poly head next to a BERT checkpoint.
    InitHead(cli::InitHeadArgs),
    /// Convert a model from another framework into a polyrank model directory.
    Import(polyrank::offline::import::ImportArgs),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Serve(a) => polyrank::serve::serve(a),
        Command::WarmCache(a) => polyrank::serve::warm_cache(a),
        Command::Eval(a) => cli::eval(a),
        Command::Train(a) => polyrank::offline::train::train(a).map(|_| ()),
        Command::Rank(a) => cli::rank(a),
        Command::InitHead(a) => cli::init_head(a),
        Command::Import(a) => polyrank::offline::import::run(a),
    }
}

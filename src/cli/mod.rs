//! Command-line interface (clap derive) — work in progress.
mod locktester;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "sessionlb", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check which lock types the shared storage supports (run on two nodes).
    Locktester(locktester::LocktesterArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let config = sessionlb::config::Config::from_raw(Default::default()).expect("defaults");
    let result = match cli.command {
        Command::Locktester(args) => rt.block_on(locktester::run(args, &config)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! Command-line interface (clap derive): global options, the subcommand
//! list, configuration loading and exit codes. Each command lives in its own
//! file; this is the only place that uses `anyhow`.
mod locktester;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use sessionlb::config::{Config, DEFAULT_CONFIG_PATH};

/// Exit code for configuration errors (sysexits EX_USAGE... EX_CONFIG is 78).
pub const EXIT_CONFIG: u8 = 78;

#[derive(Debug, Parser)]
#[command(name = "sessionlb", version, about = "Session-aware load balancer for web-IDE clusters")]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command accepts.
#[derive(Debug, Args)]
pub struct GlobalOpts {
    /// Native configuration file.
    #[arg(long, global = true, env = "SESSIONLB_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Read an existing Workbench configuration directory (load-balancer,
    /// rserver.conf, database.conf, file-locks, secure-cookie-key) over the
    /// native file.
    #[arg(long, global = true, value_name = "DIR")]
    pub rstudio_config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check which lock types the shared storage supports (run on two nodes).
    Locktester(locktester::LocktesterArgs),
}

impl GlobalOpts {
    /// Load the configuration: `--config`, else the default path if it
    /// exists, else built-in defaults; then `--rstudio-config` over it.
    pub fn load_config(&self) -> Result<Config, sessionlb::config::ConfigError> {
        let default = Path::new(DEFAULT_CONFIG_PATH);
        let file = match &self.config {
            Some(p) => Some(p.as_path()),
            None if default.exists() => Some(default),
            None => None,
        };
        Config::load(file, self.rstudio_config.as_deref())
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.global.load_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result: anyhow::Result<()> = match cli.command {
        Command::Locktester(args) => rt.block_on(locktester::run(args, &config)).context("locktester"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

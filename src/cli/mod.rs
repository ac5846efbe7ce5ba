//! Command-line interface (clap derive): global options, the subcommand
//! list, configuration loading and exit codes. Each command lives in its own
//! file; this is the only place that uses `anyhow`.
mod check_config;
mod encrypt_password;
mod health;
mod locktester;
mod nodes;
mod reload;
mod serve;
mod status;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use sessionlb::config::{Config, ConfigError, DEFAULT_CONFIG_PATH, LoadOptions};

/// Exit code for configuration errors (sysexits `EX_CONFIG`).
pub const EXIT_CONFIG: u8 = 78;

#[derive(Debug, Parser)]
#[command(
    name = "sessionlb",
    version,
    about = "Session-aware load balancer for web-IDE clusters (RStudio/Posit Workbench, Jupyter, code-server)"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command accepts.
#[derive(Debug, Args)]
pub struct GlobalOpts {
    /// Native configuration file [default: /etc/sessionlb/sessionlb.toml if it exists, else built-in defaults].
    #[arg(long, global = true, env = "SESSIONLB_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Also read an existing Workbench configuration directory
    /// (load-balancer, rserver.conf, database.conf, file-locks,
    /// secure-cookie-key); its settings override the native file's.
    /// rserver.conf's www-address/www-port then describe the backend
    /// (rserver, moved to an internal address), not where sessionlb listens.
    #[arg(long, global = true, value_name = "DIR")]
    pub rstudio_config: Option<PathBuf>,
    /// Where sessionlb listens (ADDRESS:PORT, e.g. 0.0.0.0:8787), over
    /// www-address/www-port of the native file.
    #[arg(long, global = true, value_name = "ADDRESS:PORT")]
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run this node: join the cluster and proxy requests.
    Serve(serve::ServeArgs),
    /// List the cluster's nodes (online first), with status, last check-in, version and clock skew.
    ListNodes,
    /// Remove a node from the registry; its sessions are re-placed on their next request.
    DeleteNode(nodes::DeleteNodeArgs),
    /// Clear the cluster record: the next node to start defines key fingerprint and protocol anew.
    ResetCluster,
    /// Put this node (or --node ID) in offline mode: it keeps its sessions and takes no new ones.
    Offline(nodes::ModeArgs),
    /// Take this node (or --node ID) out of offline mode.
    Online(nodes::ModeArgs),
    /// Print this node's status page: every node (load, offline mode, reachability) and its sessions.
    Status(status::StatusArgs),
    /// Validate the configuration and print the effective settings (the key itself is never printed).
    CheckConfig,
    /// Encrypt the database password with the secure cookie key (Workbench's format), for `database-password`.
    EncryptPassword,
    /// Check which lock types the shared storage supports (run on two nodes).
    Locktester(locktester::LocktesterArgs),
    /// Tell the node running with this configuration to reload it (SIGHUP):
    /// settings that can change without a restart do; its log names the
    /// changed keys and those that need a restart.
    Reload,
    /// Ask the node running here for /health; exit 0 only if it is healthy (for container health checks).
    Health,
}

impl GlobalOpts {
    /// The native file to read: `--config`, else the default path if it exists.
    pub fn config_file(&self) -> Option<PathBuf> {
        match &self.config {
            Some(p) => Some(p.clone()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
        }
    }

    /// What to load: `--config` (or the default file), `--rstudio-config`
    /// over it, `--listen` over both; built-in defaults for the rest.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions { config_file: self.config_file(), rstudio_dir: self.rstudio_config.clone(), listen: self.listen }
    }

    /// Load the configuration (see [`load_options`](Self::load_options)).
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        Config::load_with(&self.load_options())
    }
}

/// Print a configuration error and return the config exit code.
fn config_failure(e: &ConfigError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_CONFIG)
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Serve(args) = cli.command {
        return serve::run(args, &cli.global);
    }
    sessionlb::telemetry::init_cli();
    let config = match cli.global.load_config() {
        Ok(c) => c,
        Err(e) => return config_failure(&e),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Command::Serve(_) => unreachable!("handled above"),
            Command::ListNodes => nodes::list_nodes(&config).await,
            Command::DeleteNode(args) => nodes::delete_node(&config, args).await,
            Command::ResetCluster => nodes::reset_cluster(&config).await,
            Command::Offline(args) => nodes::set_offline_mode(&config, args, true).await,
            Command::Online(args) => nodes::set_offline_mode(&config, args, false).await,
            Command::Status(args) => status::run(&config, args).await,
            Command::CheckConfig => check_config::run(&config, &cli.global),
            Command::EncryptPassword => encrypt_password::run(&config),
            Command::Locktester(args) => locktester::run(args, &config).await,
            Command::Health => health::run(&config).await,
            Command::Reload => reload::run(&config),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Display helper for paths in messages.
pub fn show(p: &Path) -> String {
    p.display().to_string()
}

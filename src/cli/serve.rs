//! `sessionlb serve`: run a node, optionally with the quick-start defaults.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use sessionlb::config::{Config, DatabaseUrl, key};

use super::{GlobalOpts, config_failure, show};

/// Options of `sessionlb serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Run a single node with everything local: a SQLite registry, a
    /// secure cookie key generated (mode 0600) if missing, and a local
    /// shared-storage folder, all under --state-dir; listen on
    /// 127.0.0.1:8787 and proxy to a backend on 127.0.0.1:8788 unless the
    /// configuration says otherwise.
    #[arg(long)]
    pub quick_start: bool,
    /// Where --quick-start keeps its registry, key and shared storage.
    #[arg(long, default_value = "sessionlb-quickstart", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Zero-downtime upgrade: take the listening sockets over from the
    /// running sessionlb with the same configuration (found through its pid
    /// file in run-dir, and told with SIGQUIT); the node stays Online, the
    /// old process finishes its open requests for grace-period and exits.
    #[arg(long)]
    pub upgrade: bool,
}

pub fn run(args: ServeArgs, global: &GlobalOpts) -> ExitCode {
    let mut config = match global.load_config() {
        Ok(c) => c,
        Err(e) => return config_failure(&e),
    };
    let options = global.load_options();
    let file = options.config_file.clone();
    if args.quick_start {
        match apply_quick_start(&mut config, &args.state_dir, file.is_some()) {
            Ok(created) => print_quick_start(&config, created),
            Err(message) => {
                eprintln!("error: {message}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Some(diag) = sessionlb::telemetry::init_serve(&config.server) {
        tracing::info!(file = %diag.display(), "node-communication diagnostics are written to this file");
    }
    for warning in &config.warnings {
        tracing::warn!(file = %warning.file.display(), line = warning.line, key = warning.key, "{}", warning.message);
    }
    let quick_start = args.quick_start.then_some(args.state_dir.clone());
    let reload: sessionlb::server::Reload = Box::new(move || {
        let mut config = Config::load_with(&options)?;
        if let Some(dir) = &quick_start {
            // The state files exist already; this re-applies the paths.
            let _ = apply_quick_start(&mut config, dir, file.is_some());
        }
        Ok(config)
    });
    let options = sessionlb::server::ServeOptions { upgrade: args.upgrade };
    match sessionlb::server::serve(config, Some(reload), options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "sessionlb cannot start");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Local single-machine defaults. Settings from a given config file win,
/// except the state paths, which always live under the state dir. Returns
/// whether a key was generated.
fn apply_quick_start(config: &mut Config, state_dir: &Path, has_file: bool) -> Result<bool, String> {
    let dir = std::path::absolute(state_dir).map_err(|e| format!("state dir {}: {e}", show(state_dir)))?;
    std::fs::create_dir_all(dir.join("shared-storage")).map_err(|e| format!("cannot create {}: {e}", show(&dir)))?;
    config.cluster.database = DatabaseUrl::Sqlite(dir.join("registry.db"));
    config.cluster.secure_cookie_key_file = dir.join("secure-cookie-key");
    config.cluster.shared_storage_path = dir.join("shared-storage");
    config.server.run_dir = dir.clone();
    // Without a file: loopback and the demo backend's port, unless a flag
    // (--listen) or a Workbench directory said otherwise.
    if !has_file && !config.sources.contains_key("www-address") {
        config.node.www_address = [127, 0, 0, 1].into();
        config.node.www_address_set = true;
    }
    if !has_file && !config.sources.contains_key("backend") {
        config.node.backend = Some("127.0.0.1:8788".into());
    }
    key::generate_if_missing(&config.cluster.secure_cookie_key_file).map_err(|e| {
        format!("cannot create the secure cookie key {}: {e}", show(&config.cluster.secure_cookie_key_file))
    })
}

fn print_quick_start(config: &Config, created: bool) {
    eprintln!(
        "quick start: registry {}, shared storage {}, secure cookie key {}{}",
        config.cluster.database.redacted(),
        show(&config.cluster.shared_storage_path),
        show(&config.cluster.secure_cookie_key_file),
        if created { " (generated)" } else { "" }
    );
    eprintln!(
        "quick start: listening on http://{}:{}/, backend {}",
        config.node.www_address,
        config.node.www_port,
        config.node.backend.as_deref().unwrap_or("none (router)")
    );
}

//! Logging: a `tracing` subscriber (plain or JSON, filtered by `log-level`),
//! the bridge that carries Pingora's `log` records into it, and the
//! optional node-communication diagnostics (`diagnostics = tmp | stderr`).

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::sync::Arc;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

use crate::config::{Diagnostics, LogFormat, ServerSettings};

/// Target of diagnostic events about node-to-node communication.
pub const DIAGNOSTICS_TARGET: &str = "sessionlb::diagnostics";

/// Install the global subscriber for `serve`. Returns the diagnostics file
/// path when `diagnostics = tmp`.
pub fn init_serve(settings: &ServerSettings) -> Option<std::path::PathBuf> {
    // Pingora logs through `log`; its records below warn are filtered out
    // below anyway, so stop them at the `log` macro instead of bridging
    // every debug!/trace! call of the data path into tracing.
    let _ = tracing_log::LogTracer::builder().with_max_level(log::LevelFilter::Warn).init();
    // Pingora logs every client disconnect as an error; keep its noise at warn.
    let filter = EnvFilter::try_new(format!("{},pingora_core=warn,pingora_proxy=warn", settings.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let main = match settings.log_format {
        LogFormat::Plain => fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .boxed(),
        LogFormat::Json => fmt::layer().json().with_writer(std::io::stderr).boxed(),
    }
    .with_filter(filter);

    let mut diag_path = None;
    let diagnostics = match settings.diagnostics {
        Diagnostics::Off => None,
        Diagnostics::Stderr => {
            Some(fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).boxed())
        }
        Diagnostics::Tmp => {
            let path = std::env::temp_dir().join(format!("sessionlb-diagnostics-{}.log", std::process::id()));
            match OpenOptions::new().create(true).append(true).open(&path) {
                Ok(file) => {
                    diag_path = Some(path);
                    Some(fmt::layer().with_ansi(false).with_writer(Arc::new(file)).boxed())
                }
                Err(e) => {
                    eprintln!("cannot open diagnostics file {}: {e}", path.display());
                    None
                }
            }
        }
    }
    .map(|layer| layer.with_filter(EnvFilter::new(format!("{DIAGNOSTICS_TARGET}=trace"))));

    let _ = tracing_subscriber::registry().with(main).with(diagnostics).try_init();
    diag_path
}

/// Install a quiet subscriber for admin commands: warnings and errors on stderr.
pub fn init_cli() {
    let filter = EnvFilter::try_from_env("SESSIONLB_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::registry()
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false)
                .with_filter(filter),
        )
        .try_init();
}

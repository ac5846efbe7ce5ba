//! Logging: a `tracing` subscriber (plain or JSON, filtered by `log-level`),
//! the bridge that carries Pingora's `log` records into it, and the
//! optional node-communication diagnostics (`diagnostics = tmp | stderr`).

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
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
    if log::set_boxed_logger(Box::new(PingoraLog(tracing_log::LogTracer::new()))).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
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
        Diagnostics::Tmp => match create_diagnostics_file(&std::env::temp_dir()) {
            Ok((path, file)) => {
                diag_path = Some(path);
                Some(fmt::layer().with_ansi(false).with_writer(Arc::new(file)).boxed())
            }
            Err(e) => {
                eprintln!("cannot create a diagnostics file in {}: {e}", std::env::temp_dir().display());
                None
            }
        },
    }
    .map(|layer| layer.with_filter(EnvFilter::new(format!("{DIAGNOSTICS_TARGET}=trace"))));

    let _ = tracing_subscriber::registry().with(main).with(diagnostics).try_init();
    diag_path
}

/// Pingora's `log` records, bridged into tracing, except that a client
/// hanging up while sending its request head (Pingora's ERROR "Fail to proxy:
/// Downstream ConnectionClosed … while reading request headers") is not an
/// error of this node: it is logged at debug.
struct PingoraLog(tracing_log::LogTracer);

/// Whether a Pingora log line reports a client that went away mid-head.
pub fn is_client_hangup(level: log::Level, message: &str) -> bool {
    level == log::Level::Error
        && message.starts_with("Fail to proxy: ")
        && message.contains("Downstream")
        && message.contains("while reading request headers")
}

impl log::Log for PingoraLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if record.level() == log::Level::Error && record.target().starts_with("pingora") {
            let message = record.args().to_string();
            if is_client_hangup(record.level(), &message) {
                tracing::debug!(target: "sessionlb::downstream", "client closed the connection while sending its request head: {message}");
                return;
            }
        }
        self.0.log(record);
    }

    fn flush(&self) {
        self.0.flush();
    }
}

/// Create a new diagnostics file in `dir` (the temp folder, shared with
/// every user): `sessionlb-diagnostics-<pid>-<random>.log`, mode 0600,
/// with `O_EXCL` — the name cannot be guessed in advance, and a file or
/// symbolic link planted there is never opened (the creation fails and
/// another name is tried). Diagnostics name users and session keys.
pub fn create_diagnostics_file(dir: &Path) -> io::Result<(PathBuf, File)> {
    let mut last = None;
    for _ in 0..8 {
        let path = dir.join(format!("sessionlb-diagnostics-{}-{:016x}.log", std::process::id(), rand::random::<u64>()));
        match OpenOptions::new().append(true).create_new(true).mode(0o600).open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free name")))
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_client_hanging_up_mid_head_is_not_an_error() {
        // Pingora 0.9's line for it (pingora-proxy `handle_new_request`).
        let hangup = "Fail to proxy: Downstream ConnectionClosed context: while reading request headers, bytes already read: 17, downstream session type: HTTP/1.1";
        assert!(is_client_hangup(log::Level::Error, hangup));
        let reset = "Fail to proxy: Downstream ReadError context: while reading request headers cause: Connection reset by peer (os error 104), downstream session type: HTTP/1.1";
        assert!(is_client_hangup(log::Level::Error, reset));
        for other in [
            "Fail to proxy: Upstream ConnectRefused context: Peer: addr: 127.0.0.1:1",
            "failed to send error response to downstream: x",
        ] {
            assert!(!is_client_hangup(log::Level::Error, other), "{other}");
        }
    }

    #[test]
    fn diagnostics_files_are_private_new_and_unpredictable() {
        let dir = tempfile::tempdir().unwrap();
        // Whatever the umask, the file is readable by its owner only.
        let (a, _file_a) = create_diagnostics_file(dir.path()).unwrap();
        let (b, _file_b) = create_diagnostics_file(dir.path()).unwrap();
        assert_ne!(a, b, "two files of one process get different names");
        for path in [&a, &b] {
            let meta = std::fs::symlink_metadata(path).unwrap();
            assert!(meta.file_type().is_file());
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{}", path.display());
            let name = path.file_name().unwrap().to_str().unwrap();
            let prefix = format!("sessionlb-diagnostics-{}-", std::process::id());
            let random = name.strip_prefix(&prefix).and_then(|r| r.strip_suffix(".log")).unwrap_or_default();
            assert!(random.len() == 16 && random.bytes().all(|c| c.is_ascii_hexdigit()), "{name}");
        }
        // A symlink planted at the name the old code used is not followed.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"").unwrap();
        let predictable = dir.path().join(format!("sessionlb-diagnostics-{}.log", std::process::id()));
        std::os::unix::fs::symlink(&victim, &predictable).unwrap();
        let (c, mut file_c) = create_diagnostics_file(dir.path()).unwrap();
        assert_ne!(c, predictable);
        io::Write::write_all(&mut file_c, b"diagnostic line\n").unwrap();
        assert!(std::fs::read(&victim).unwrap().is_empty());
    }
}

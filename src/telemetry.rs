//! Logging: a `tracing` subscriber (plain or JSON, filtered by `log-level`),
//! the bridge that carries Pingora's `log` records into it, and the
//! optional node-communication diagnostics (`diagnostics = tmp | stderr`).

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt, reload};

use crate::config::{Diagnostics, LogFormat, ServerSettings};

/// Target of diagnostic events about node-to-node communication.
pub const DIAGNOSTICS_TARGET: &str = "sessionlb::diagnostics";

/// What a configuration reload can change in the logging of `serve`: the
/// main filter (`log-level`) and where diagnostics go (`diagnostics`).
struct LogControl {
    set_level: Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>,
    set_diagnostics_filter: Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>,
    diagnostics: DiagnosticsWriter,
    /// What is in effect: `log-level` and `diagnostics` (with its file).
    current: parking_lot::Mutex<(String, Diagnostics)>,
}

static CONTROL: OnceLock<LogControl> = OnceLock::new();

/// Where diagnostic events are written; swapped on reload.
#[derive(Clone, Default)]
struct DiagnosticsWriter(Arc<parking_lot::RwLock<DiagnosticsTarget>>);

#[derive(Default)]
enum DiagnosticsTarget {
    #[default]
    Off,
    Stderr,
    File(PathBuf, Arc<File>),
}

/// One diagnostic event's writer.
enum DiagnosticsOut {
    Sink,
    Stderr(io::Stderr),
    File(Arc<File>),
}

impl io::Write for DiagnosticsOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            DiagnosticsOut::Sink => Ok(buf.len()),
            DiagnosticsOut::Stderr(e) => e.write(buf),
            DiagnosticsOut::File(f) => (&**f).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            DiagnosticsOut::Sink => Ok(()),
            DiagnosticsOut::Stderr(e) => e.flush(),
            DiagnosticsOut::File(f) => (&**f).flush(),
        }
    }
}

impl<'a> fmt::MakeWriter<'a> for DiagnosticsWriter {
    type Writer = DiagnosticsOut;

    fn make_writer(&'a self) -> DiagnosticsOut {
        match &*self.0.read() {
            DiagnosticsTarget::Off => DiagnosticsOut::Sink,
            DiagnosticsTarget::Stderr => DiagnosticsOut::Stderr(io::stderr()),
            DiagnosticsTarget::File(_, f) => DiagnosticsOut::File(f.clone()),
        }
    }
}

/// The main filter for `log-level`: Pingora logs every client disconnect as
/// an error, so its noise stays at warn.
fn main_filter(log_level: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(format!("{log_level},pingora_core=warn,pingora_proxy=warn")).map_err(|e| e.to_string())
}

fn diagnostics_filter(diagnostics: Diagnostics) -> EnvFilter {
    match diagnostics {
        Diagnostics::Off => EnvFilter::new("off"),
        _ => EnvFilter::new(format!("{DIAGNOSTICS_TARGET}=trace")),
    }
}

/// Point the diagnostics writer at `diagnostics` (a new file for `tmp`
/// unless one is open already). Returns the file when there is one.
fn set_diagnostics_target(writer: &DiagnosticsWriter, diagnostics: Diagnostics) -> io::Result<Option<PathBuf>> {
    let mut target = writer.0.write();
    match (diagnostics, &*target) {
        (Diagnostics::Tmp, DiagnosticsTarget::File(path, _)) => return Ok(Some(path.clone())),
        (Diagnostics::Tmp, _) => {
            let (path, file) = create_diagnostics_file(&std::env::temp_dir())?;
            *target = DiagnosticsTarget::File(path.clone(), Arc::new(file));
            return Ok(Some(path));
        }
        (Diagnostics::Stderr, _) => *target = DiagnosticsTarget::Stderr,
        (Diagnostics::Off, _) => *target = DiagnosticsTarget::Off,
    }
    Ok(None)
}

/// Install the global subscriber for `serve`. Returns the diagnostics file
/// path when `diagnostics = tmp`. The level and the diagnostics can change
/// later with [`reload`].
pub fn init_serve(settings: &ServerSettings) -> Option<std::path::PathBuf> {
    // Pingora logs through `log`; its records below warn are filtered out
    // below anyway, so stop them at the `log` macro instead of bridging
    // every debug!/trace! call of the data path into tracing.
    if log::set_boxed_logger(Box::new(PingoraLog(tracing_log::LogTracer::new()))).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let filter = main_filter(&settings.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, level_handle) = reload::Layer::new(filter);
    let main = match settings.log_format {
        LogFormat::Plain => fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .boxed(),
        LogFormat::Json => fmt::layer().json().with_writer(std::io::stderr).boxed(),
    }
    .with_filter(filter);

    // The diagnostics layer is always installed; with `off` its filter
    // lets nothing through (no event is formatted), and a reload can turn
    // it on.
    let writer = DiagnosticsWriter::default();
    let diag_path = match set_diagnostics_target(&writer, settings.diagnostics) {
        Ok(path) => path,
        Err(e) => {
            eprintln!("cannot create a diagnostics file in {}: {e}", std::env::temp_dir().display());
            None
        }
    };
    let (diag_filter, diag_handle) = reload::Layer::new(diagnostics_filter(settings.diagnostics));
    let diagnostics = fmt::layer().with_ansi(false).with_writer(writer.clone()).with_filter(diag_filter);

    let _ = CONTROL.set(LogControl {
        set_level: Box::new(move |f| level_handle.reload(f).map_err(|e| e.to_string())),
        set_diagnostics_filter: Box::new(move |f| diag_handle.reload(f).map_err(|e| e.to_string())),
        diagnostics: writer,
        current: parking_lot::Mutex::new((settings.log_level.clone(), settings.diagnostics)),
    });
    // Fails on the `log` bridge installed above, after installing the subscriber.
    let _ = tracing_subscriber::registry().with(main).with(diagnostics).try_init();
    diag_path
}

/// Logging changed by a reload.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LogChanges {
    pub level: Option<String>,
    pub diagnostics: Option<Diagnostics>,
    /// The diagnostics file, when `diagnostics = tmp` was turned on.
    pub diagnostics_file: Option<PathBuf>,
}

/// Apply `log-level` and `diagnostics` of `settings` to the running
/// subscriber (installed by [`init_serve`]). A part that cannot be applied
/// keeps its old value and is reported.
pub fn reload(settings: &ServerSettings) -> Result<LogChanges, String> {
    let Some(control) = CONTROL.get() else { return Ok(LogChanges::default()) };
    let mut current = control.current.lock();
    let mut changes = LogChanges::default();
    if current.0 != settings.log_level {
        (control.set_level)(main_filter(&settings.log_level)?)?;
        current.0 = settings.log_level.clone();
        changes.level = Some(settings.log_level.clone());
    }
    if current.1 != settings.diagnostics {
        let file = set_diagnostics_target(&control.diagnostics, settings.diagnostics)
            .map_err(|e| format!("cannot create a diagnostics file in {}: {e}", std::env::temp_dir().display()))?;
        (control.set_diagnostics_filter)(diagnostics_filter(settings.diagnostics))?;
        current.1 = settings.diagnostics;
        changes.diagnostics = Some(settings.diagnostics);
        changes.diagnostics_file = file;
    }
    Ok(changes)
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

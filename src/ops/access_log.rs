//! The access log (`access-log`, `access-log-format`): optional, off by
//! default; one line per request once it has ended.
//!
//! A line holds the time the request ended, the client's address, the
//! method, the path *without its query string*, the status, the response
//! body bytes sent, the duration, the route (`local`, `forwarded`,
//! `served-for-peer`, or `-` for built-in endpoints and refused requests),
//! the node that served it and what it was routed by (`pin`, `user`,
//! `backend-key` or `-`). Never written: query strings, cookie values,
//! header values, session keys and user names (the access log is often kept
//! longer and read by more people than the node's own log).
//!
//! Off the request path: a request hands its fields to a bounded queue
//! (no formatting, no I/O, never a wait) and one writer thread formats and
//! writes them through a buffer, flushed whenever the queue runs empty. When
//! the queue is full (a disk slower than the traffic) lines are dropped and
//! counted in `sessionlb_access_log_dropped_total` rather than slowing
//! requests. A reload reopens the file (log rotation: move the file, then
//! `sessionlb reload` or SIGHUP) and applies a new target or format.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use prometheus::IntCounter;

use crate::config::{AccessLogTarget, LogFormat, ServerSettings};

/// Lines waiting for the writer at most; past it, lines are dropped.
const QUEUE: usize = 16_384;

static DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    let c = IntCounter::new(
        "sessionlb_access_log_dropped_total",
        "Access log lines dropped because the writer could not keep up",
    )
    .expect("metric");
    let _ = crate::metrics::METRICS.registry.register(Box::new(c.clone()));
    c
});

/// How a request was routed, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A built-in endpoint, or a request refused before routing.
    None,
    Local,
    Forwarded,
    ServedForPeer,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::None => "-",
            Route::Local => "local",
            Route::Forwarded => "forwarded",
            Route::ServedForPeer => "served-for-peer",
        }
    }
}

/// What a request was routed by, for the log (never the key or user itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    None,
    Pin,
    User,
    BackendKey,
}

impl SessionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionKind::None => "-",
            SessionKind::Pin => "pin",
            SessionKind::User => "user",
            SessionKind::BackendKey => "backend-key",
        }
    }
}

/// One request, as the log records it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub time: SystemTime,
    pub client: Option<IpAddr>,
    pub method: http::Method,
    /// The path only: the caller leaves the query string out.
    pub path: String,
    /// 0 when no response was written (client gone).
    pub status: u16,
    pub bytes: usize,
    pub duration: Duration,
    pub route: Route,
    /// The node that served the request (this one, or the peer forwarded to).
    pub node: Option<i64>,
    pub session: SessionKind,
}

impl Entry {
    /// The line for `format`, newline included.
    pub fn format(&self, format: LogFormat, out: &mut Vec<u8>) {
        let time =
            chrono::DateTime::<chrono::Utc>::from(self.time).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let client = self.client.map_or_else(|| "-".to_string(), |ip| ip.to_string());
        match format {
            LogFormat::Plain => {
                let node = self.node.map_or_else(|| "-".to_string(), |n| n.to_string());
                // Paths are URI paths: visible ASCII without spaces (the
                // parser refuses the rest), so the line splits on spaces.
                let _ = writeln!(
                    out,
                    "{time} {client} {} {} {} {} {:.6} route={} node={node} session={}",
                    self.method,
                    self.path,
                    self.status,
                    self.bytes,
                    self.duration.as_secs_f64(),
                    self.route.as_str(),
                    self.session.as_str(),
                );
            }
            LogFormat::Json => {
                let line = serde_json::json!({
                    "time": time,
                    "client": client,
                    "method": self.method.as_str(),
                    "path": self.path,
                    "status": self.status,
                    "bytes": self.bytes,
                    "duration_seconds": self.duration.as_secs_f64(),
                    "route": self.route.as_str(),
                    "node": self.node,
                    "session": self.session.as_str(),
                });
                let _ = serde_json::to_writer(&mut *out, &line);
                out.push(b'\n');
            }
        }
    }
}

enum Message {
    Line(Box<Entry>),
    /// A new destination and format (the old one is flushed and closed).
    Switch(Option<Box<dyn Write + Send>>, LogFormat),
}

/// The access log of a node: cheap to clone, shared by every request.
#[derive(Clone, Default)]
pub struct AccessLog {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Checked on every request first: off costs one atomic load.
    enabled: AtomicBool,
    queue: Mutex<Option<SyncSender<Message>>>,
    /// A clone of the sender for requests (no lock on the request path).
    sender: arc_swap::ArcSwapOption<SyncSender<Message>>,
}

impl AccessLog {
    /// Whether lines are being written.
    pub fn enabled(&self) -> bool {
        self.inner.enabled.load(Ordering::Relaxed)
    }

    /// Queue one line; never waits (a full queue drops it, counted).
    pub fn log(&self, entry: Entry) {
        if !self.enabled() {
            return;
        }
        let Some(sender) = self.inner.sender.load_full() else { return };
        match sender.try_send(Message::Line(Box::new(entry))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => DROPPED.inc(),
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Apply `access-log` and `access-log-format` (at start and on every
    /// reload): open the file anew (after a rotation, a new file) and hand
    /// it to the writer. On error (the file cannot be opened) nothing changes.
    pub fn reopen(&self, settings: &ServerSettings) -> Result<(), String> {
        let writer: Option<Box<dyn Write + Send>> = match &settings.access_log {
            AccessLogTarget::Off => None,
            AccessLogTarget::Stdout => Some(Box::new(io::stdout())),
            AccessLogTarget::File(path) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("access-log: cannot open {}: {e}", path.display()))?;
                Some(Box::new(file))
            }
        };
        let on = writer.is_some();
        let mut queue = self.inner.queue.lock();
        if queue.is_none() {
            if !on {
                return Ok(());
            }
            let (tx, rx) = sync_channel(QUEUE);
            std::thread::Builder::new()
                .name("sessionlb-access-log".into())
                .spawn(move || write_lines(rx))
                .map_err(|e| format!("access-log: cannot start its writer thread: {e}"))?;
            LazyLock::force(&DROPPED);
            self.inner.sender.store(Some(Arc::new(tx.clone())));
            *queue = Some(tx);
        }
        if let Some(tx) = queue.as_ref() {
            // Waits if the queue is full: this runs on reload, not per request.
            let _ = tx.send(Message::Switch(writer, settings.access_log_format));
        }
        self.inner.enabled.store(on, Ordering::Relaxed);
        Ok(())
    }
}

/// The writer thread: format and write each line, flush when the queue is empty.
fn write_lines(rx: Receiver<Message>) {
    let mut out: Option<BufWriter<Box<dyn Write + Send>>> = None;
    let mut format = LogFormat::Plain;
    let mut line = Vec::with_capacity(256);
    while let Ok(mut message) = rx.recv() {
        loop {
            match message {
                Message::Line(entry) => {
                    if let Some(w) = out.as_mut() {
                        line.clear();
                        entry.format(format, &mut line);
                        if let Err(e) = w.write_all(&line) {
                            tracing::warn!(error = %e, "cannot write the access log");
                        }
                    }
                }
                Message::Switch(writer, new_format) => {
                    if let Some(mut w) = out.take() {
                        let _ = w.flush();
                    }
                    out = writer.map(|w| BufWriter::with_capacity(64 * 1024, w));
                    format = new_format;
                }
            }
            match rx.try_recv() {
                Ok(next) => message = next,
                Err(_) => break,
            }
        }
        if let Some(w) = out.as_mut()
            && let Err(e) = w.flush()
        {
            tracing::warn!(error = %e, "cannot write the access log");
        }
    }
    if let Some(mut w) = out {
        let _ = w.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_780_000_000_123),
            client: Some("10.1.2.3".parse().unwrap()),
            method: http::Method::GET,
            path: "/s/abc/\"quoted\"".into(),
            status: 200,
            bytes: 1234,
            duration: Duration::from_micros(12_500),
            route: Route::Forwarded,
            node: Some(7),
            session: SessionKind::BackendKey,
        }
    }

    #[test]
    fn json_lines_carry_every_field() {
        let mut out = Vec::new();
        entry().format(LogFormat::Json, &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["time"], "2026-05-28T20:26:40.123Z");
        assert_eq!(v["client"], "10.1.2.3");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/s/abc/\"quoted\"");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes"], 1234);
        assert_eq!(v["duration_seconds"], 0.0125);
        assert_eq!(v["route"], "forwarded");
        assert_eq!(v["node"], 7);
        assert_eq!(v["session"], "backend-key");
    }

    #[test]
    fn plain_lines_split_on_spaces() {
        let mut out = Vec::new();
        Entry { client: None, node: None, session: SessionKind::None, route: Route::None, ..entry() }
            .format(LogFormat::Plain, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "2026-05-28T20:26:40.123Z - GET /s/abc/\"quoted\" 200 1234 0.012500 route=- node=- session=-\n"
        );
    }

    #[test]
    fn lines_reach_the_file_and_a_reopen_follows_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::default();
        log.log(entry());
        assert!(!path.exists(), "off writes nothing");
        let settings = |target| ServerSettings {
            access_log: target,
            access_log_format: LogFormat::Json,
            ..crate::config::Config::from_toml(std::path::Path::new("t.toml"), "").unwrap().server
        };
        log.reopen(&settings(AccessLogTarget::File(path.clone()))).unwrap();
        log.log(entry());
        let rotated = dir.path().join("access.log.1");
        wait_for_lines(&path, 1);
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen(&settings(AccessLogTarget::File(path.clone()))).unwrap();
        log.log(entry());
        wait_for_lines(&path, 1);
        assert_eq!(std::fs::read_to_string(&rotated).unwrap().lines().count(), 1);
        // A file that cannot be opened leaves the log as it was.
        assert!(log.reopen(&settings(AccessLogTarget::File(dir.path().join("no/such/dir")))).is_err());
        assert!(log.enabled());
        log.reopen(&settings(AccessLogTarget::Off)).unwrap();
        assert!(!log.enabled());
        log.log(entry());
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }

    fn wait_for_lines(path: &std::path::Path, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(path).map_or(0, |t| t.lines().count()) < n {
            assert!(std::time::Instant::now() < deadline, "{} never had {n} lines", path.display());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

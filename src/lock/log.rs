//! Lock event logging (`[locks] enable-logging`, `log-file`).
//!
//! With logging on, every acquire, refresh, reap and release (and every lock
//! found lost, and every leftover file cleaned up) becomes one line: appended
//! to `log-file` when it is set, otherwise a `tracing` event at INFO level
//! with structured fields (target `sessionlb::lock`). With logging off
//! nothing is written here; problems are still reported with `tracing::warn!`
//! by the code that meets them.
//!
//! A file line reads:
//! `2026-11-28T08:00:00.123456Z host=node1 pid=4242 type=linkbased event=acquire name="alice" path=/shared/locks/alice-….lock waited=0.4ms`

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, RwLock};

use super::LockError;
use crate::config::{LockSettings, LockType};

/// Where lock events go. Reconfigured in place on a configuration reload
/// ([`LockLog::reconfigure`]).
pub(crate) struct LockLog {
    /// Checked first, without a lock: logging off costs one atomic load.
    enabled: AtomicBool,
    file: RwLock<Option<Arc<Mutex<File>>>>,
    host: String,
    pid: u32,
}

fn open_log_file(settings: &LockSettings) -> Result<Option<Arc<Mutex<File>>>, LockError> {
    match (&settings.log_file, settings.enable_logging) {
        (Some(path), true) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| LockError::io("open the lock log file", path, source))?;
            Ok(Some(Arc::new(Mutex::new(file))))
        }
        _ => Ok(None),
    }
}

impl LockLog {
    /// Logging as configured; opens (creates, appends to) the log file.
    pub(crate) fn new(settings: &LockSettings) -> Result<LockLog, LockError> {
        Ok(LockLog {
            enabled: AtomicBool::new(settings.enable_logging),
            file: RwLock::new(open_log_file(settings)?),
            host: super::fsutil::host_name(),
            pid: std::process::id(),
        })
    }

    /// Apply `enable-logging` and `log-file` anew (the file is reopened, so
    /// a rotated log file is followed). On error the logging stays as it was.
    pub(crate) fn reconfigure(&self, settings: &LockSettings) -> Result<(), LockError> {
        let file = open_log_file(settings)?;
        *self.file.write() = file;
        self.enabled.store(settings.enable_logging, Ordering::Relaxed);
        Ok(())
    }

    /// Record one event (no-op when logging is off).
    pub(crate) fn event(&self, lock_type: LockType, name: &str, path: &Path, event: &str, detail: fmt::Arguments<'_>) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let file = self.file.read().clone();
        match file {
            Some(file) => {
                let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
                let line = format!(
                    "{time} host={} pid={} type={} event={event} name={name:?} path={} {detail}\n",
                    self.host,
                    self.pid,
                    lock_type.as_str(),
                    path.display()
                );
                // One write per line on an O_APPEND file: lines of several
                // processes do not interleave.
                if let Err(e) = file.lock().write_all(line.as_bytes()) {
                    tracing::warn!(error = %e, "cannot write the lock log file");
                }
            }
            None => tracing::info!(
                target: "sessionlb::lock",
                pid = self.pid,
                lock_type = lock_type.as_str(),
                event,
                name,
                path = %path.display(),
                detail = %detail,
                "lock {event}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_go_to_the_log_file_when_enabled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks.log");
        let settings = LockSettings { enable_logging: true, log_file: Some(path.clone()), ..LockSettings::default() };
        let log = LockLog::new(&settings).unwrap();
        log.event(LockType::Advisory, "a\nb", Path::new("/x/y.flock"), "acquire", format_args!("waited={}ms", 3));
        log.event(LockType::LinkBased, "c", Path::new("/x/z.lock"), "release", format_args!(""));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains(&format!(
                "pid={} type=advisory event=acquire name=\"a\\nb\" path=/x/y.flock waited=3ms",
                std::process::id()
            )),
            "{text}"
        );
        assert!(lines[1].contains("type=linkbased event=release name=\"c\""), "{text}");
    }

    #[test]
    fn nothing_is_written_when_disabled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks.log");
        let settings = LockSettings { enable_logging: false, log_file: Some(path.clone()), ..LockSettings::default() };
        let log = LockLog::new(&settings).unwrap();
        log.event(LockType::Advisory, "a", Path::new("/x"), "acquire", format_args!(""));
        assert!(!path.exists());
    }

    #[test]
    fn reconfiguring_turns_logging_on_and_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks.log");
        let log = LockLog::new(&LockSettings::default()).unwrap();
        log.event(LockType::Advisory, "before", Path::new("/x"), "acquire", format_args!(""));
        let on = LockSettings { enable_logging: true, log_file: Some(path.clone()), ..LockSettings::default() };
        log.reconfigure(&on).unwrap();
        log.event(LockType::Advisory, "during", Path::new("/x"), "acquire", format_args!(""));
        // A file that cannot be opened leaves the logging as it was.
        let bad = LockSettings { log_file: Some(dir.path().join("missing/dir/locks.log")), ..on.clone() };
        assert!(log.reconfigure(&bad).is_err());
        log.event(LockType::Advisory, "still", Path::new("/x"), "acquire", format_args!(""));
        log.reconfigure(&LockSettings::default()).unwrap();
        log.event(LockType::Advisory, "after", Path::new("/x"), "acquire", format_args!(""));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("name=\"during\"") && text.contains("name=\"still\""), "{text}");
        assert!(!text.contains("before") && !text.contains("after"), "{text}");
    }
}

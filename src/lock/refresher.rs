//! The refresher of held link-based locks: one background OS thread per
//! link-based lock manager that touches every held lock every
//! `refresh-rate`, notices locks that were lost, and cleans up leftover
//! proxy files.
//!
//! It is a dedicated thread, not an async task, so that a busy or blocked
//! async runtime cannot delay refreshes past `timeout-interval`. It starts
//! with the first lock held, sleeps while none is held, holds no strong
//! reference to the lock table, and exits as soon as its owner (the
//! [`Refresher`], owned by the link-based manager that every guard keeps
//! alive) is dropped. Like every non-main thread it never keeps the process
//! alive.
//!
//! Per lock, a refresh is: (1) if the last successful refresh is older than
//! `timeout-interval`, the lock may have been reaped by now — mark it lost
//! and stop touching it; (2) open the lock path and check that it is still
//! our file (inode and content) — if not, it was reaped: mark it lost; (3) touch it through the
//! descriptor we hold (`UTIME_NOW`, the file system's clock).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use super::LockError;
use super::fsutil::{self, FileId};
use super::log::LockLog;
use crate::config::LockType;

/// One held link-based lock, shared by its guard and the refresher.
pub(crate) struct Entry {
    seq: u64,
    /// The lock's name (the key), for logs.
    pub name: String,
    pub path: PathBuf,
    /// Our lock file's identity: inode and content (with its random token).
    pub id: FileId,
    pub content: Vec<u8>,
    pub state: Mutex<EntryState>,
    lost: AtomicBool,
}

/// The mutable part of an [`Entry`]; its mutex serialises a refresh with the
/// release of the same lock.
pub(crate) struct EntryState {
    /// A descriptor on our lock file (closed at release).
    pub file: Option<File>,
    pub released: bool,
    /// When the last successful refresh (or the acquisition) started.
    pub last_refresh: Instant,
}

impl Entry {
    /// Whether the lock was found reaped or its lease ran out.
    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    pub(crate) fn mark_lost(&self) {
        self.lost.store(true, Ordering::Release);
    }
}

enum Message {
    /// A lock was registered: make sure a refresh is scheduled.
    Registered,
    /// Remove stale leftovers; `fs_now` is the file system's time at `at`.
    Cleanup { fs_now: SystemTime, at: Instant },
}

#[derive(Default)]
struct Table {
    entries: Mutex<HashMap<u64, Arc<Entry>>>,
}

/// What the thread needs besides the table.
#[derive(Clone)]
struct Settings {
    dir: PathBuf,
    refresh_rate: Duration,
    timeout: Duration,
    log: Arc<LockLog>,
    leftover_prefixes: &'static [&'static str],
}

/// Owner of the refresher thread and of the table of held locks.
pub(crate) struct Refresher {
    table: Arc<Table>,
    settings: Settings,
    sender: Mutex<Option<Sender<Message>>>,
    next_seq: AtomicU64,
    last_cleanup: Mutex<Option<Instant>>,
    exited: Arc<AtomicBool>,
}

impl Refresher {
    /// A refresher for locks in `dir`; files there whose name starts with
    /// one of `leftover_prefixes` and that are older than `timeout` are
    /// removed by [`Refresher::request_cleanup`].
    pub(crate) fn new(
        dir: &Path,
        refresh_rate: Duration,
        timeout: Duration,
        log: Arc<LockLog>,
        leftover_prefixes: &'static [&'static str],
    ) -> Refresher {
        Refresher {
            table: Arc::new(Table::default()),
            settings: Settings { dir: dir.to_path_buf(), refresh_rate, timeout, log, leftover_prefixes },
            sender: Mutex::new(None),
            next_seq: AtomicU64::new(0),
            last_cleanup: Mutex::new(None),
            exited: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A new entry for a lock just acquired (not yet refreshed), whose file
    /// was written no earlier than `lease_start`.
    pub(crate) fn entry(
        &self,
        name: &str,
        path: &Path,
        file: File,
        id: FileId,
        content: Vec<u8>,
        lease_start: Instant,
    ) -> Arc<Entry> {
        Arc::new(Entry {
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            path: path.to_path_buf(),
            id,
            content,
            state: Mutex::new(EntryState { file: Some(file), released: false, last_refresh: lease_start }),
            lost: AtomicBool::new(false),
        })
    }

    /// Refresh `entry` from now on; starts the thread if needed.
    pub(crate) fn register(&self, entry: &Arc<Entry>) -> Result<(), LockError> {
        self.table.entries.lock().insert(entry.seq, entry.clone());
        let sent = self.send(Message::Registered);
        if sent.is_err() {
            self.table.entries.lock().remove(&entry.seq);
        }
        sent
    }

    /// Stop refreshing `entry`.
    pub(crate) fn deregister(&self, entry: &Entry) {
        self.table.entries.lock().remove(&entry.seq);
    }

    /// Ask the thread to remove stale leftovers, at most once per
    /// `timeout-interval`. `fs_now` is the file system's current time.
    pub(crate) fn request_cleanup(&self, fs_now: SystemTime) {
        {
            let mut last = self.last_cleanup.lock();
            if last.is_some_and(|t| t.elapsed() < self.settings.timeout) {
                return;
            }
            *last = Some(Instant::now());
        }
        let _ = self.send(Message::Cleanup { fs_now, at: Instant::now() });
    }

    /// Set when the thread has exited (for tests).
    #[cfg(test)]
    pub(crate) fn exited_flag(&self) -> Arc<AtomicBool> {
        self.exited.clone()
    }

    fn send(&self, message: Message) -> Result<(), LockError> {
        let mut sender = self.sender.lock();
        if let Some(tx) = sender.as_ref() {
            match tx.send(message) {
                Ok(()) => return Ok(()),
                // The thread is gone (it cannot exit while we hold the
                // sender, unless it panicked): start a new one.
                Err(mpsc::SendError(m)) => return self.start(&mut sender, m),
            }
        }
        self.start(&mut sender, message)
    }

    fn start(&self, sender: &mut Option<Sender<Message>>, first: Message) -> Result<(), LockError> {
        let (tx, rx) = mpsc::channel();
        let table = Arc::downgrade(&self.table);
        let settings = self.settings.clone();
        let exited = self.exited.clone();
        std::thread::Builder::new()
            .name("sessionlb-lock-refresh".into())
            .spawn(move || {
                run(table, rx, settings);
                exited.store(true, Ordering::Release);
            })
            .map_err(|source| LockError::io("start the lock refresher thread for", &self.settings.dir, source))?;
        // Cannot fail: the receiver is alive in the new thread.
        let _ = tx.send(first);
        *sender = Some(tx);
        Ok(())
    }
}

fn run(table: Weak<Table>, rx: Receiver<Message>, settings: Settings) {
    let mut next_tick: Option<Instant> = None;
    loop {
        let message = match next_tick {
            Some(tick) => rx.recv_timeout(tick.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match message {
            Err(RecvTimeoutError::Disconnected) => return,
            Ok(Message::Registered) => {
                if next_tick.is_none() {
                    next_tick = Some(Instant::now() + settings.refresh_rate);
                }
            }
            Ok(Message::Cleanup { fs_now, at }) => cleanup(&settings, fs_now + at.elapsed()),
            Err(RecvTimeoutError::Timeout) => {
                let entries: Vec<Arc<Entry>> = match table.upgrade() {
                    Some(t) => t.entries.lock().values().cloned().collect(),
                    None => return,
                };
                for entry in &entries {
                    refresh_entry(entry, settings.timeout, &settings.log);
                }
                let empty = match table.upgrade() {
                    Some(t) => t.entries.lock().is_empty(),
                    None => return,
                };
                next_tick = (!empty).then(|| Instant::now() + settings.refresh_rate);
            }
        }
    }
}

/// Refresh one lock (see the module doc); `timeout` is the lease
/// (`timeout-interval`). Returns whether the lock was touched.
pub(crate) fn refresh_entry(entry: &Entry, timeout: Duration, log: &LockLog) -> bool {
    let mut state = entry.state.lock();
    if state.released || entry.is_lost() {
        return false;
    }
    let started = Instant::now();
    let mark_lost = |why: &str| {
        entry.mark_lost();
        tracing::warn!(name = entry.name, path = %entry.path.display(), reason = why, "link-based lock lost");
        log.event(LockType::LinkBased, &entry.name, &entry.path, "lost", format_args!("reason={why:?}"));
    };
    if started.duration_since(state.last_refresh) >= timeout {
        mark_lost("not refreshed within timeout-interval; it may have been reaped");
        return false;
    }
    match fsutil::names_file(&entry.path, entry.id, &entry.content) {
        Ok(true) => {}
        Ok(false) => {
            mark_lost("the lock file was removed or replaced (reaped)");
            return false;
        }
        Err(e) => {
            tracing::warn!(name = entry.name, path = %entry.path.display(), error = %e, "cannot check a held link-based lock");
            return false;
        }
    }
    let Some(file) = state.file.as_ref() else {
        return false;
    };
    match fsutil::touch(file) {
        Ok(()) => {
            state.last_refresh = started;
            log.event(LockType::LinkBased, &entry.name, &entry.path, "refresh", format_args!(""));
            true
        }
        Err(e) => {
            tracing::warn!(name = entry.name, path = %entry.path.display(), error = %e, "cannot refresh a held link-based lock");
            false
        }
    }
}

/// Remove leftovers (crashed attempts' proxy files, interrupted reaps) whose
/// last change is older than `timeout-interval` on the file system's clock.
fn cleanup(settings: &Settings, fs_now: SystemTime) {
    let entries = match std::fs::read_dir(&settings.dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(dir = %settings.dir.display(), error = %e, "cannot list the lock directory for clean-up");
            return;
        }
    };
    for dirent in entries.flatten() {
        let file_name = dirent.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
        if !settings.leftover_prefixes.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let path = dirent.path();
        let Ok(meta) = fsutil::meta_at(&path) else {
            continue;
        };
        // ctime changes on rename and link: a file just moved aside by a
        // reaper in progress is young even if its mtime is old.
        let last_change = meta.mtime.max(meta.ctime);
        if fsutil::age(fs_now, last_change) >= settings.timeout && fsutil::remove_if_present(&path).is_ok() {
            settings.log.event(
                LockType::LinkBased,
                name,
                &path,
                "cleanup",
                format_args!("removed a stale leftover file"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LockSettings;

    #[test]
    fn cleanup_removes_only_old_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(LockLog::new(&LockSettings::default()).unwrap());
        let settings = Settings {
            dir: dir.path().to_path_buf(),
            refresh_rate: Duration::from_secs(1),
            timeout: Duration::from_secs(30),
            log,
            leftover_prefixes: &[".sessionlb-proxy-", ".sessionlb-reaped-"],
        };
        for name in [".sessionlb-proxy-h-1-aa", ".sessionlb-reaped-h-1-bb", "alice-0123.lock", ".other"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let count = || std::fs::read_dir(dir.path()).unwrap().count();
        // Young (their ctime is now, whatever their mtime): kept.
        cleanup(&settings, SystemTime::now() + Duration::from_secs(10));
        assert_eq!(count(), 4);
        // Older than the timeout on the file system's clock: removed.
        cleanup(&settings, SystemTime::now() + Duration::from_secs(31));
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".other", "alice-0123.lock"]);
    }
}

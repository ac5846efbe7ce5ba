//! Cross-node locks on shared storage (NFS, EFS, or a local folder).
//!
//! Nodes serialise work that must happen once cluster-wide — creating a
//! session — with file locks in a directory every node sees. This module
//! owns those locks and knows files only (not the registry, not HTTP).
//!
//! - [`LockManager`] is the one interface: a lock directory plus
//!   [`LockSettings`]; it hands out [`LockGuard`]s by lock *name* (a session
//!   key, a user), asynchronously with a deadline ([`LockManager::acquire`])
//!   or as a single non-blocking try ([`LockManager::try_acquire`]).
//! - Two implementations, one file each: [`linkbased`] (default; hard link +
//!   refresh + staleness, for NFS) and [`advisory`] (`flock`, for EFS and
//!   local disks). The [`linkbased`] module doc explains why its reaping
//!   is safe.
//! - [`names`] maps names to safe, collision-free, bounded file names.
//! - With `enable-logging`, every acquire, refresh, reap and release is
//!   logged (see `log.rs`).
//!
//! Within one manager, tasks contending for one name first queue on an
//! in-process async mutex per name (fair, no file-system polling); across
//! processes and nodes the file lock decides, polled with back-off that
//! starts at 1 ms and grows to 50 ms, so an uncontended acquire costs a few
//! file operations and a briefly contended one a few milliseconds.

pub mod advisory;
mod fsutil;
pub mod linkbased;
mod log;
pub mod names;
mod refresher;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use tokio::sync::OwnedMutexGuard;

pub use crate::config::{LockSettings, LockType};

use self::log::LockLog;

/// Why a lock could not be acquired or released.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// The deadline passed while someone else held the lock.
    #[error("timed out after {}ms waiting for lock {name:?}", waited.as_millis())]
    Timeout {
        /// The lock's name.
        name: String,
        /// How long this caller waited.
        waited: Duration,
    },
    /// A file-system operation failed: permissions, a missing or read-only
    /// directory, no lock support (`ENOLCK` on NFS without a lock daemon),
    /// I/O errors.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "lock" or "create".
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The settings cannot work (e.g. `timeout-interval` not longer than
    /// `refresh-rate`).
    #[error("invalid lock settings: {0}")]
    InvalidSettings(String),
    /// The blocking worker that ran a lock operation did not finish (it
    /// panicked, or the async runtime is shutting down).
    #[error("lock operation on {name:?} did not complete: {reason}")]
    Worker {
        /// The lock's name.
        name: String,
        /// What happened to the worker.
        reason: String,
    },
}

impl LockError {
    pub(crate) fn io(action: &'static str, path: &Path, source: io::Error) -> LockError {
        LockError::Io { action, path: path.to_path_buf(), source }
    }
}

/// What a lock implementation offers the manager.
trait LockImpl: Send + Sync {
    fn lock_type(&self) -> LockType;
    /// The lock file for a name's stem.
    fn lock_path(&self, stem: &str) -> PathBuf;
    /// One attempt that never waits for another holder: `Ok(None)` = busy.
    /// Performs blocking file-system calls.
    fn try_lock(self: Arc<Self>, name: &str, stem: &str) -> Result<Option<Box<dyn HeldLock>>, LockError>;
}

/// A lock held through some implementation; dropping it releases it.
trait HeldLock: Send {
    /// Release now, reporting errors (dropping releases too, logging them).
    fn release(self: Box<Self>) -> Result<(), LockError>;
    /// Whether the lock is known to have been taken away (link-based only).
    fn is_lost(&self) -> bool;
}

/// Hands out cross-process, cross-node locks in one directory.
///
/// Cheap to clone (all clones share state). Every node of a cluster must use
/// the same directory and the same [`LockType`]. Locks are *not* reentrant:
/// acquiring a name this manager already holds waits for its release.
#[derive(Clone)]
pub struct LockManager {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    imp: Arc<dyn LockImpl>,
    log: Arc<LockLog>,
    /// In-process mutex per lock stem, removed when unused.
    local: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl fmt::Debug for LockManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockManager")
            .field("dir", &self.inner.dir)
            .field("lock_type", &self.inner.imp.lock_type())
            .finish()
    }
}

impl LockManager {
    /// A manager for locks in `dir` (created if missing), of the type and
    /// with the timings and logging of `settings`.
    ///
    /// Fails when the directory cannot be created, the log file cannot be
    /// opened, or `timeout_interval` is not longer than a non-zero
    /// `refresh_rate`. For link-based locks a background thread is started
    /// with the first lock held (see [`linkbased`]).
    pub fn new(dir: impl Into<PathBuf>, settings: &LockSettings) -> Result<LockManager, LockError> {
        let dir = dir.into();
        if settings.refresh_rate.is_zero() || settings.timeout_interval <= settings.refresh_rate {
            return Err(LockError::InvalidSettings(format!(
                "timeout-interval ({:?}) must be longer than refresh-rate ({:?}), which must not be zero",
                settings.timeout_interval, settings.refresh_rate
            )));
        }
        std::fs::create_dir_all(&dir).map_err(|e| LockError::io("create the lock directory", &dir, e))?;
        let log = Arc::new(LockLog::new(settings)?);
        let imp: Arc<dyn LockImpl> = match settings.lock_type {
            LockType::LinkBased => {
                Arc::new(linkbased::LinkBased::new(&dir, settings.refresh_rate, settings.timeout_interval, log.clone()))
            }
            LockType::Advisory => Arc::new(advisory::Advisory::new(&dir, log.clone())),
        };
        Ok(LockManager { inner: Arc::new(Inner { dir, imp, log, local: Mutex::new(HashMap::new()) }) })
    }

    /// Apply `enable-logging` and `log-file` anew (configuration reload);
    /// the lock type and timings stay as they were.
    pub fn set_logging(&self, settings: &LockSettings) -> Result<(), LockError> {
        self.inner.log.reconfigure(settings)
    }

    /// The lock directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The lock type in use.
    pub fn lock_type(&self) -> LockType {
        self.inner.imp.lock_type()
    }

    /// The file that represents the lock `name` (whether held or not); always
    /// directly inside [`LockManager::dir`]. For diagnostics.
    pub fn lock_path(&self, name: &str) -> PathBuf {
        self.inner.imp.lock_path(&names::file_stem(name.as_bytes()))
    }

    /// Acquire the lock `name`, waiting until `deadline` at most.
    ///
    /// Waits first on the in-process mutex of the name, then polls the file
    /// lock with back-off (1 ms growing to 50 ms, jittered); at least one
    /// attempt is made even if `deadline` has passed. File operations run on
    /// tokio's blocking pool, so a slow NFS server does not stall the async
    /// workers. Cancel-safe: dropping the future never leaves a lock held.
    ///
    /// Errors: [`LockError::Timeout`] when the deadline passes;
    /// [`LockError::Io`] at once when the file system refuses (no retry).
    pub async fn acquire(&self, name: &str, deadline: Instant) -> Result<LockGuard, LockError> {
        let started = Instant::now();
        let stem = names::file_stem(name.as_bytes());
        let mut slot = LocalSlot::new(self.inner.clone(), stem.clone());
        let mut contended = false;
        if !slot.try_lock() {
            contended = true;
            let wait = slot.lock();
            if tokio::time::timeout_at(deadline.into(), wait).await.is_err() {
                return Err(LockError::Timeout { name: name.to_string(), waited: started.elapsed() });
            }
        }
        let mut backoff = Backoff::new();
        loop {
            let imp = self.inner.imp.clone();
            let (owned_name, owned_stem) = (name.to_string(), stem.clone());
            let attempt = tokio::task::spawn_blocking(move || imp.try_lock(&owned_name, &owned_stem))
                .await
                .map_err(|e| LockError::Worker { name: name.to_string(), reason: e.to_string() })?;
            if let Some(held) = attempt? {
                return Ok(self.guard(name, &stem, held, slot, started, contended));
            }
            contended = true;
            let now = Instant::now();
            if now >= deadline {
                return Err(LockError::Timeout { name: name.to_string(), waited: started.elapsed() });
            }
            tokio::time::sleep(backoff.next_delay().min(deadline - now)).await;
        }
    }

    /// One attempt to acquire the lock `name` without waiting: `Ok(None)`
    /// when it is held (by this process or another).
    ///
    /// Performs blocking file-system calls on the calling thread (a few,
    /// microseconds on a local disk, network round trips on NFS); from async
    /// code prefer [`LockManager::acquire`] with a near deadline.
    pub fn try_acquire(&self, name: &str) -> Result<Option<LockGuard>, LockError> {
        let started = Instant::now();
        let stem = names::file_stem(name.as_bytes());
        let mut slot = LocalSlot::new(self.inner.clone(), stem.clone());
        if !slot.try_lock() {
            return Ok(None);
        }
        let held = self.inner.imp.clone().try_lock(name, &stem)?;
        Ok(held.map(|held| self.guard(name, &stem, held, slot, started, false)))
    }

    fn guard(
        &self,
        name: &str,
        stem: &str,
        held: Box<dyn HeldLock>,
        slot: LocalSlot,
        started: Instant,
        contended: bool,
    ) -> LockGuard {
        let waited = started.elapsed();
        let path = self.inner.imp.lock_path(stem);
        let lock_type = self.lock_type();
        self.inner.log.event(
            lock_type,
            name,
            &path,
            "acquire",
            format_args!("waited={:.3}ms", waited.as_secs_f64() * 1e3),
        );
        LockGuard { held: Some(held), _slot: slot, name: name.to_string(), path, lock_type, waited, contended }
    }
}

/// The in-process mutex of one lock name, as held (or not yet) by one
/// caller. Dropping it unlocks the mutex and forgets the name's mutex when
/// nobody else uses it.
struct LocalSlot {
    inner: Arc<Inner>,
    stem: String,
    mutex: Option<Arc<tokio::sync::Mutex<()>>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl LocalSlot {
    fn new(inner: Arc<Inner>, stem: String) -> LocalSlot {
        let mutex = inner.local.lock().entry(stem.clone()).or_default().clone();
        LocalSlot { inner, stem, mutex: Some(mutex), guard: None }
    }

    fn try_lock(&mut self) -> bool {
        match self.mutex.as_ref().map(|m| m.clone().try_lock_owned()) {
            Some(Ok(guard)) => {
                self.guard = Some(guard);
                true
            }
            _ => false,
        }
    }

    /// Wait for the mutex (cancel-safe: an abandoned wait holds nothing).
    async fn lock(&mut self) {
        if let Some(mutex) = self.mutex.clone() {
            self.guard = Some(mutex.lock_owned().await);
        }
    }
}

impl Drop for LocalSlot {
    fn drop(&mut self) {
        drop(self.guard.take());
        drop(self.mutex.take());
        let mut local = self.inner.local.lock();
        if local.get(&self.stem).is_some_and(|m| Arc::strong_count(m) == 1) {
            local.remove(&self.stem);
        }
    }
}

/// A held lock. Dropping it releases it (synchronously: a few file-system
/// calls); [`LockGuard::release`] does the same off the async workers and
/// reports errors.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard {
    // Field order matters: the file lock is released before the in-process
    // mutex, so a local waiter never finds the file still locked by us.
    held: Option<Box<dyn HeldLock>>,
    _slot: LocalSlot,
    name: String,
    path: PathBuf,
    lock_type: LockType,
    waited: Duration,
    contended: bool,
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("lock_type", &self.lock_type)
            .field("waited", &self.waited)
            .finish()
    }
}

impl LockGuard {
    /// The lock's name, as passed to the manager.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lock type.
    pub fn lock_type(&self) -> LockType {
        self.lock_type
    }

    /// How long acquiring took, from the call to success (queueing in
    /// process, polling the file lock, and the attempts themselves).
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// Whether the lock was not free at the first try (someone else held it,
    /// in this process or elsewhere).
    pub fn contended(&self) -> bool {
        self.contended
    }

    /// Whether the lock is known to have been taken away: a link-based lock
    /// whose refresh found it reaped, or that could not be refreshed for
    /// `timeout-interval` (e.g. the file server was unreachable). Work done
    /// under a lost lock may have overlapped with another holder. Always
    /// `false` for advisory locks.
    pub fn is_lost(&self) -> bool {
        self.held.as_ref().is_some_and(|h| h.is_lost())
    }

    /// Release the lock on tokio's blocking pool and report the outcome.
    /// A lock that was lost is not removed (it is someone else's by now).
    pub async fn release(mut self) -> Result<(), LockError> {
        let Some(held) = self.held.take() else {
            return Ok(());
        };
        let name = self.name.clone();
        tokio::task::spawn_blocking(move || held.release())
            .await
            .map_err(|e| LockError::Worker { name, reason: e.to_string() })?
    }
}

/// Poll delays: 1 ms, growing by half each time up to 50 ms, jittered ±25%
/// so that waiters on several nodes do not poll in lockstep.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(1);
    const MAX: Duration = Duration::from_millis(50);

    fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (base * 3 / 2).min(Self::MAX);
        base.mul_f64(rand::random_range(0.75..1.25))
    }
}

/// The current time as the file system of `dir` sees it: the modification
/// time of a freshly created probe file (on NFS, the server's clock). Lets
/// tools compare file ages without trusting this node's clock.
pub fn filesystem_time(dir: &Path) -> Result<SystemTime, LockError> {
    let probe = dir.join(format!("{}{}-{}", fsutil::CLOCK_PREFIX, std::process::id(), fsutil::random_hex64()));
    // A new file of our own (O_EXCL: never a planted file or link).
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| LockError::io("create a probe file", &probe, e))?;
    let meta = fsutil::meta(&file);
    drop(file);
    let _ = fsutil::remove_if_present(&probe);
    Ok(meta.map_err(|e| LockError::io("check the probe file", &probe, e))?.mtime)
}

#[cfg(test)]
mod tests;

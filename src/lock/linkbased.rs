//! Link-based locks (`lock-type = linkbased`, the default; for NFS).
//!
//! Owns the file protocol: acquiring with a hard link, refreshing (through
//! the refresher thread of `refresher.rs`), reaping stale locks and releasing.
//! A lock `<stem>.lock` in the lock directory is held by whoever's file it
//! is; the file holds `host=`, `pid=` and a random 128-bit `token=`.
//!
//! # Acquire (one attempt, never blocks on another holder)
//!
//! 1. Write a *proxy* file `.sessionlb-proxy-<host>-<pid>-<random>` with our
//!    identity in the lock directory, and read back its metadata: its mtime
//!    is the file system's "now" (on NFS the server's clock), used for every
//!    age below, so staleness does not depend on this node's clock.
//! 2. `link(proxy, lock)`. Its return value is not trusted (an NFS reply can
//!    be lost and the retransmission fail with `EEXIST` after the link was
//!    made): we hold the lock iff the proxy's link count, fetched fresh from
//!    the server, is 2. Where hard links are not supported (`EPERM`,
//!    `EOPNOTSUPP`, `EXDEV`, `ENOSYS`), or where `link()` succeeds but the
//!    link count then is not 2 (file systems that emulate links or do not
//!    keep link counts, so the proof cannot work), the manager undoes the
//!    link and switches for good to an exclusive create (`O_CREAT|O_EXCL`)
//!    of the lock file.
//! 3. On success the proxy name is removed (the lock file is the same inode;
//!    we keep a descriptor on it) and the lock is handed to the refresher,
//!    which touches it every `refresh-rate`.
//! 4. Otherwise the lock file's age is checked; a lock whose mtime is older
//!    than `timeout-interval` is stale and is reaped (below), then the
//!    attempt is repeated at once. A younger lock means "busy".
//!
//! # Reaping, and why it is safe
//!
//! A reaper must never remove a lock that is live at the moment it removes
//! it, nor a different lock incarnation than the one it judged stale. There
//! is no "unlink if still this inode" on NFS, so it works like this:
//!
//! 1. **One reaper at a time per lock**: the reaper first takes the *reap
//!    gate* `<stem>.reap` with the same link protocol (no refresh; held for
//!    a few file operations). Without it, two reapers that both judged lock
//!    A stale could interleave as: R1 removes A, C acquires B, R2 removes B.
//!    A gate older than `timeout-interval` (its reaper crashed) is itself
//!    removed with steps 3–4.
//! 2. **Re-check under the gate**: open the lock, fetch fresh metadata and
//!    content; give up if it is no longer stale.
//! 3. **Move it aside**: `rename(lock, .sessionlb-reaped-<host>-<pid>-<random>)`.
//!    Rename is atomic; from now on nobody can refresh or release it by name.
//! 4. **Verify what was moved**: open the unique name and compare inode,
//!    mtime and content (the random token) with step 2. If all are
//!    unchanged, the file moved is exactly the incarnation judged stale and
//!    it was not refreshed up to a point after it left the lock path (mtime
//!    only moves forward, so it was still stale when moved): delete it. If
//!    anything changed — its owner refreshed it late, or it is a different
//!    lock — it is not deleted: it is put back with an operation that fails
//!    rather than replace a lock created meanwhile (`link()`, else
//!    `renameat2(RENAME_NOREPLACE)`, else rename over a placeholder taken
//!    with an exclusive create). If the path is taken by then, it is not
//!    put back, and its owner finds the lock lost at its next refresh.
//!
//! While a reaper holds the gate, the lock path can change only through its
//! owner (refresh or release), and only a lock whose owner has not refreshed
//! it for `timeout-interval` is touched at all. So the put-back in step 4 is
//! needed only when an owner stalls past its lease, which is the assumption
//! every lease-based lock makes: **no process stays frozen in the middle of a
//! lock operation (or between refreshes) for `timeout-interval`**. Under it
//! the protocol never lets two holders in. An owner also stops refreshing by
//! itself once its own last successful refresh is `timeout-interval` old,
//! and then reports the lock lost ([`LockGuard::is_lost`](super::LockGuard::is_lost)).
//!
//! # Release
//!
//! Only a lock that is still ours is removed: the lock path is opened (NFS
//! revalidates the name) and compared with our inode and content (inode
//! numbers alone are reused at once by file systems; the content carries
//! our random token); if it is ours it is unlinked, otherwise the lock was
//! reaped and is reported lost. Our descriptor is closed just before the
//! unlink so that NFS does not silly-rename the file.
//!
//! # Leftovers
//!
//! Proxy files, moved-aside files and clock probes of crashed processes are
//! removed by the refresher once their last change (mtime or ctime) is
//! older than `timeout-interval`, at most once per `timeout-interval`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use rustix::fs::{CWD, RenameFlags};
use rustix::io::Errno;

use super::fsutil::{self, FileId};
use super::log::LockLog;
use super::refresher::{Entry, Refresher};
use super::{HeldLock, LockError, LockImpl};
use crate::config::LockType;

/// Prefix of proxy files.
pub(crate) const PROXY_PREFIX: &str = ".sessionlb-proxy-";
/// Prefix of files moved aside by a reaper.
pub(crate) const REAPED_PREFIX: &str = ".sessionlb-reaped-";
/// Extension of lock files.
pub(crate) const LOCK_EXTENSION: &str = "lock";
/// Extension of reap gates.
pub(crate) const GATE_EXTENSION: &str = "reap";
/// The lock content read for comparisons and logs is at most this long.
const CONTENT_LIMIT: u64 = 4096;
/// Attempts repeated at once within one `try_lock` (after a reap, or when
/// the lock vanished between the link and the look at it).
const IMMEDIATE_RETRIES: usize = 4;

/// The link-based implementation for one lock directory.
pub(crate) struct LinkBased {
    dir: PathBuf,
    timeout: Duration,
    host: String,
    host_part: String,
    pid: u32,
    /// Cleared for good when `link()` says hard links are not supported, or
    /// when a successful link does not give the link count 2.
    hard_links: AtomicBool,
    /// The link count of an open file, fetched fresh (a parameter so that
    /// tests can play a file system whose link counts cannot be trusted).
    link_count: fn(&File) -> io::Result<u64>,
    log: Arc<LockLog>,
    refresher: Refresher,
}

/// A lock file as seen at one moment.
#[derive(Debug, Clone, PartialEq)]
struct Observed {
    id: FileId,
    mtime: SystemTime,
    content: Vec<u8>,
}

enum Outcome {
    /// The path is free (reaped, released or vanished): try again now.
    Freed,
    /// Someone holds it (or reaping is in progress elsewhere).
    Busy,
}

/// Our per-attempt proxy file; its name is removed on drop.
struct Proxy {
    path: PathBuf,
    file: Option<File>,
    content: Vec<u8>,
    /// The file system's time when the proxy was written.
    fs_now: SystemTime,
    /// Taken before the proxy was created: a lock made from it is no older.
    created: Instant,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = fsutil::remove_if_present(&self.path);
    }
}

fn links_unsupported(e: &io::Error) -> bool {
    [Errno::PERM, Errno::OPNOTSUPP, Errno::XDEV, Errno::NOSYS]
        .iter()
        .any(|errno| e.raw_os_error() == Some(errno.raw_os_error()))
}

fn fresh_link_count(file: &File) -> io::Result<u64> {
    fsutil::meta(file).map(|m| m.nlink)
}

/// `renameat2(RENAME_NOREPLACE)` is not available: the file system does not
/// support the flag (`EINVAL`; NFS, for one), or the kernel lacks the call
/// or a seccomp profile blocks it.
fn noreplace_unsupported(e: Errno) -> bool {
    e == Errno::INVAL || e == Errno::NOSYS || e == Errno::OPNOTSUPP || e == Errno::PERM
}

/// Move `aside` back to `path` unless `path` exists, without
/// `RENAME_NOREPLACE` and without hard links: first take `path` with an
/// exclusive create (a placeholder, which fails if a lock appeared
/// meanwhile), then rename `aside` over our own placeholder. While the
/// placeholder is there nobody else can create `path`, and nobody removes
/// it (it is fresh, so nobody reaps it, and it names no one else's file, so
/// no release removes it), so a lock created in between is never replaced —
/// unlike "`path` is free, so rename", whose check and rename are two
/// steps. Returns whether `aside` was put back.
fn put_back_over_placeholder(aside: &Path, path: &Path, content: &[u8]) -> bool {
    let placeholder = OpenOptions::new().write(true).create_new(true).mode(0o644).open(path);
    let Ok(mut placeholder) = placeholder else {
        return false;
    };
    let id = fsutil::meta(&placeholder).map(|m| m.id);
    let written = placeholder.write_all(content);
    // Closed before the rename: NFS would silly-rename an open file.
    drop(placeholder);
    if written.is_ok() && fs::rename(aside, path).is_ok() {
        return true;
    }
    if let Ok(id) = id
        && fsutil::names_file(path, id, content).unwrap_or(false)
    {
        let _ = fsutil::remove_if_present(path);
    }
    false
}

impl LinkBased {
    pub(crate) fn new(dir: &Path, refresh_rate: Duration, timeout: Duration, log: Arc<LockLog>) -> LinkBased {
        let host = fsutil::host_name();
        LinkBased {
            dir: dir.to_path_buf(),
            timeout,
            host_part: fsutil::file_name_part(&host, 64),
            host,
            pid: std::process::id(),
            hard_links: AtomicBool::new(true),
            link_count: fresh_link_count,
            refresher: Refresher::new(
                dir,
                refresh_rate,
                timeout,
                log.clone(),
                &[PROXY_PREFIX, REAPED_PREFIX, fsutil::CLOCK_PREFIX],
            ),
            log,
        }
    }

    /// Use exclusive create instead of hard links (as after `EPERM`).
    #[cfg(test)]
    pub(crate) fn without_hard_links(self) -> LinkBased {
        self.hard_links.store(false, Ordering::Relaxed);
        self
    }

    /// Take link counts from `link_count` instead of the file system.
    #[cfg(test)]
    pub(crate) fn with_link_count(mut self, link_count: fn(&File) -> io::Result<u64>) -> LinkBased {
        self.link_count = link_count;
        self
    }

    #[cfg(test)]
    pub(crate) fn uses_hard_links(&self) -> bool {
        self.hard_links.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn refresher(&self) -> &Refresher {
        &self.refresher
    }

    fn unique_name(&self, prefix: &str) -> PathBuf {
        self.dir.join(format!("{prefix}{}-{}-{}", self.host_part, self.pid, fsutil::random_hex64()))
    }

    fn create_proxy(&self) -> Result<Proxy, LockError> {
        let created = Instant::now();
        let path = self.unique_name(PROXY_PREFIX);
        let token = format!("{:032x}", rand::random::<u128>());
        let content = format!("host={}\npid={}\ntoken={token}\n", self.host, self.pid).into_bytes();
        let write = || -> io::Result<(File, fsutil::Meta)> {
            let mut file = OpenOptions::new().write(true).create_new(true).mode(0o644).open(&path)?;
            file.write_all(&content)?;
            // Fetching the mtime flushes the write to an NFS server.
            let meta = fsutil::meta(&file)?;
            Ok((file, meta))
        };
        match write() {
            Ok((file, meta)) => Ok(Proxy { path, file: Some(file), content, fs_now: meta.mtime, created }),
            Err(source) => {
                let _ = fsutil::remove_if_present(&path);
                Err(LockError::io("write the proxy file", &path, source))
            }
        }
    }

    /// Try to make `target` ours. `Some(file)` = we hold it (in link mode the
    /// file is the proxy's descriptor and the proxy name is gone).
    fn claim(&self, proxy: &mut Proxy, target: &Path) -> Result<Option<File>, LockError> {
        if !self.hard_links.load(Ordering::Relaxed) {
            return self.claim_exclusive(proxy, target);
        }
        let linked = fs::hard_link(&proxy.path, target);
        if let Err(e) = &linked
            && links_unsupported(e)
        {
            if self.hard_links.swap(false, Ordering::Relaxed) {
                tracing::warn!(dir = %self.dir.display(), error = %e,
                    "hard links are not supported in the lock directory; link-based locks fall back to exclusive create");
            }
            return self.claim_exclusive(proxy, target);
        }
        let Some(file) = proxy.file.as_ref() else {
            return Err(LockError::io("use the proxy file", &proxy.path, io::Error::other("already used")));
        };
        let nlink = (self.link_count)(file).map_err(|e| LockError::io("check the link count of", &proxy.path, e))?;
        if nlink == 2 {
            let file = proxy.file.take();
            if let Err(e) = fsutil::remove_if_present(&proxy.path) {
                // Harmless: a second name of our lock, cleaned up later.
                tracing::warn!(path = %proxy.path.display(), error = %e, "cannot remove a proxy file");
            }
            return Ok(file);
        }
        match linked {
            // Linked, yet the count is not 2: this file system's link counts
            // (or its links) cannot prove ownership. Undo the link and use
            // exclusive create from now on, as where links fail outright.
            Ok(()) => {
                self.undo_link(proxy, target);
                if self.hard_links.swap(false, Ordering::Relaxed) {
                    tracing::warn!(dir = %self.dir.display(), nlink,
                        "hard links in the lock directory do not give the expected link count (2); link-based locks fall back to exclusive create");
                }
                self.claim_exclusive(proxy, target)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(LockError::io("link the proxy file to", target, e)),
        }
    }

    /// Remove the lock path that our link just made. It is recognised by its
    /// content (our random token) rather than its inode, in case the file
    /// system made a copy instead of a link. Nobody else removes it
    /// meanwhile: it is fresh, and it names no other owner's file.
    fn undo_link(&self, proxy: &Proxy, target: &Path) {
        let ours = match fsutil::open_meta(target) {
            Ok(Some((mut file, _))) => {
                fsutil::read_limited(&mut file, proxy.content.len() as u64 + 1).is_ok_and(|c| c == proxy.content)
            }
            _ => false,
        };
        if ours && let Err(e) = fsutil::remove_if_present(target) {
            tracing::warn!(path = %target.display(), error = %e, "cannot undo a link to the lock path");
        }
    }

    fn claim_exclusive(&self, proxy: &Proxy, target: &Path) -> Result<Option<File>, LockError> {
        let mut file = match OpenOptions::new().write(true).create_new(true).mode(0o644).open(target) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(None),
            Err(e) => return Err(LockError::io("create", target, e)),
        };
        let written = file.write_all(&proxy.content).and_then(|()| fsutil::meta(&file).map(drop));
        if let Err(e) = written {
            // An empty lock would still be ours; do not leave it behind.
            drop(file);
            let _ = fsutil::remove_if_present(target);
            return Err(LockError::io("write", target, e));
        }
        Ok(Some(file))
    }

    fn observe(path: &Path) -> Result<Option<Observed>, LockError> {
        let Some((mut file, meta)) = fsutil::open_meta(path).map_err(|e| LockError::io("open", path, e))? else {
            return Ok(None);
        };
        let content = fsutil::read_limited(&mut file, CONTENT_LIMIT).map_err(|e| LockError::io("read", path, e))?;
        Ok(Some(Observed { id: meta.id, mtime: meta.mtime, content }))
    }

    fn is_stale(&self, observed: &Observed, fs_now: SystemTime) -> bool {
        fsutil::age(fs_now, observed.mtime) >= self.timeout
    }

    fn holder(content: &[u8]) -> String {
        String::from_utf8_lossy(content)
            .split_whitespace()
            .filter(|f| !f.starts_with("token="))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Steps 3–4 of reaping (see the module doc): move `path` aside and
    /// delete it only if it is still exactly `observed`; otherwise put it
    /// back without replacing anything. Returns whether it was deleted.
    fn remove_if_unchanged(&self, path: &Path, observed: &Observed) -> Result<Removal, LockError> {
        let aside = self.unique_name(REAPED_PREFIX);
        match fs::rename(path, &aside) {
            Ok(()) => {}
            Err(e) if fsutil::is_not_found(&e) => return Ok(Removal::Vanished),
            Err(e) => return Err(LockError::io("move aside the stale lock", path, e)),
        }
        let moved = Self::observe(&aside)?;
        if moved.as_ref() == Some(observed) {
            fsutil::remove_if_present(&aside).map_err(|e| LockError::io("remove the stale lock", &aside, e))?;
            return Ok(Removal::Removed);
        }
        if moved.is_none() {
            return Ok(Removal::Vanished);
        }
        let restored = self.put_back(&aside, path);
        let _ = fsutil::remove_if_present(&aside);
        Ok(Removal::PutBack { restored })
    }

    /// Put the moved-aside file back at `path`, never replacing a file that
    /// appeared there meanwhile (then its owner finds the lock lost). Returns
    /// whether it was put back. `aside` may still exist afterwards (a link).
    fn put_back(&self, aside: &Path, path: &Path) -> bool {
        if self.hard_links.load(Ordering::Relaxed) {
            match fs::hard_link(aside, path) {
                Ok(()) => return true,
                Err(e) if !links_unsupported(&e) => return false,
                Err(_) => {}
            }
        }
        match rustix::fs::renameat_with(CWD, aside, CWD, path, RenameFlags::NOREPLACE) {
            Ok(()) => true,
            // No `RENAME_NOREPLACE` here (NFS says `EINVAL`). Not putting
            // back at all would cost every late owner its lock; the old
            // "rename if `path` does not exist" could replace a lock created
            // between the check and the rename. A placeholder taken with an
            // exclusive create makes the put-back conditional again.
            Err(e) if noreplace_unsupported(e) => {
                let content = format!("host={}\npid={}\nputback={}\n", self.host, self.pid, fsutil::random_hex64());
                put_back_over_placeholder(aside, path, content.as_bytes())
            }
            // `EEXIST`: a lock was created meanwhile; it stays.
            Err(_) => false,
        }
    }

    /// Take the reap gate `gate` (with a proxy of its own, so that the
    /// attempt's proxy keeps its link count). Returns the gate's identity
    /// when we hold it.
    fn take_gate(&self, name: &str, gate: &Path) -> Result<Option<(FileId, Vec<u8>)>, LockError> {
        for _ in 0..2 {
            let mut proxy = self.create_proxy()?;
            if let Some(file) = self.claim(&mut proxy, gate)? {
                let meta = fsutil::meta(&file).map_err(|e| LockError::io("check", gate, e))?;
                return Ok(Some((meta.id, std::mem::take(&mut proxy.content))));
            }
            // Held by another reaper: wait for it, unless it died mid-reap.
            let Some(observed) = Self::observe(gate)? else {
                continue;
            };
            if !self.is_stale(&observed, proxy.fs_now) {
                return Ok(None);
            }
            if let Removal::Removed = self.remove_if_unchanged(gate, &observed)? {
                let holder = Self::holder(&observed.content);
                self.log.event(LockType::LinkBased, name, gate, "reap", format_args!("stale reap gate of {holder}"));
            }
        }
        Ok(None)
    }

    fn drop_gate(&self, gate: &Path, id: FileId, content: &[u8]) {
        if fsutil::names_file(gate, id, content).unwrap_or(false)
            && let Err(e) = fsutil::remove_if_present(gate)
        {
            tracing::warn!(path = %gate.display(), error = %e, "cannot remove the reap gate");
        }
    }

    /// Reap `lock_path` if it is (still) stale.
    fn reap(&self, name: &str, fs_now: SystemTime, lock_path: &Path) -> Result<Outcome, LockError> {
        let gate = lock_path.with_extension(GATE_EXTENSION);
        let Some((gate_id, gate_content)) = self.take_gate(name, &gate)? else {
            return Ok(Outcome::Busy);
        };
        let result = self.reap_under_gate(name, fs_now, lock_path);
        self.drop_gate(&gate, gate_id, &gate_content);
        result
    }

    fn reap_under_gate(&self, name: &str, fs_now: SystemTime, lock_path: &Path) -> Result<Outcome, LockError> {
        let Some(current) = Self::observe(lock_path)? else {
            return Ok(Outcome::Freed);
        };
        if !self.is_stale(&current, fs_now) {
            return Ok(Outcome::Busy);
        }
        let age = fsutil::age(fs_now, current.mtime);
        match self.remove_if_unchanged(lock_path, &current)? {
            Removal::Removed => {
                tracing::info!(name, path = %lock_path.display(), holder = Self::holder(&current.content), age_ms = age.as_millis() as u64,
                    "reaped a stale link-based lock");
                self.log.event(
                    LockType::LinkBased,
                    name,
                    lock_path,
                    "reap",
                    format_args!("age={}ms holder=\"{}\"", age.as_millis(), Self::holder(&current.content)),
                );
                Ok(Outcome::Freed)
            }
            Removal::Vanished => Ok(Outcome::Freed),
            Removal::PutBack { restored } => {
                tracing::warn!(name, path = %lock_path.display(), restored,
                    "a stale link-based lock changed while being reaped (its owner refreshed it late); it was not removed");
                self.log.event(
                    LockType::LinkBased,
                    name,
                    lock_path,
                    "reap-aborted",
                    format_args!("restored={restored}"),
                );
                Ok(Outcome::Busy)
            }
        }
    }

    fn attempt(self: &Arc<Self>, name: &str, stem: &str) -> Result<Option<Held>, LockError> {
        let lock_path = self.dir.join(format!("{stem}.{LOCK_EXTENSION}"));
        let mut proxy = self.create_proxy()?;
        for _ in 0..IMMEDIATE_RETRIES {
            if let Some(file) = self.claim(&mut proxy, &lock_path)? {
                let content = std::mem::take(&mut proxy.content);
                return self.won(name, &lock_path, file, content, proxy.fs_now, proxy.created).map(Some);
            }
            let outcome = match Self::observe(&lock_path)? {
                None => Outcome::Freed,
                Some(observed) if self.is_stale(&observed, proxy.fs_now) => {
                    self.reap(name, proxy.fs_now, &lock_path)?
                }
                Some(_) => Outcome::Busy,
            };
            if let Outcome::Busy = outcome {
                return Ok(None);
            }
        }
        Ok(None)
    }

    fn won(
        self: &Arc<Self>,
        name: &str,
        lock_path: &Path,
        file: File,
        content: Vec<u8>,
        fs_now: SystemTime,
        lease_start: Instant,
    ) -> Result<Held, LockError> {
        let id = fsutil::meta(&file).map_err(|e| LockError::io("check", lock_path, e))?.id;
        let entry = self.refresher.entry(name, lock_path, file, id, content, lease_start);
        // From here on dropping `held` releases the lock.
        let held = Held { lb: self.clone(), entry, released: false };
        self.refresher.register(&held.entry)?;
        self.refresher.request_cleanup(fs_now);
        Ok(held)
    }
}

enum Removal {
    Removed,
    Vanished,
    PutBack { restored: bool },
}

impl LockImpl for LinkBased {
    fn lock_type(&self) -> LockType {
        LockType::LinkBased
    }

    fn lock_path(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}.{LOCK_EXTENSION}"))
    }

    fn try_lock(self: Arc<Self>, name: &str, stem: &str) -> Result<Option<Box<dyn HeldLock>>, LockError> {
        Ok(self.attempt(name, stem)?.map(|held| Box::new(held) as Box<dyn HeldLock>))
    }
}

/// A held link-based lock; dropping it releases it.
pub(crate) struct Held {
    lb: Arc<LinkBased>,
    entry: Arc<Entry>,
    released: bool,
}

impl Held {
    fn release_now(&mut self) -> Result<(), LockError> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        let entry = &self.entry;
        self.lb.refresher.deregister(entry);
        // Waits for a refresh of this lock in progress.
        let mut state = entry.state.lock();
        state.released = true;
        let log = &self.lb.log;
        if entry.is_lost() {
            drop(state.file.take());
            log.event(
                LockType::LinkBased,
                &entry.name,
                &entry.path,
                "release",
                format_args!("lock had been lost; nothing removed"),
            );
            return Ok(());
        }
        // Checked while our descriptor still pins our inode (its number
        // cannot be reused meanwhile).
        let ours = fsutil::names_file(&entry.path, entry.id, &entry.content);
        // Close before unlinking: NFS would silly-rename an open file.
        drop(state.file.take());
        if !ours.map_err(|e| LockError::io("check", &entry.path, e))? {
            entry.mark_lost();
            tracing::warn!(name = entry.name, path = %entry.path.display(),
                "link-based lock was reaped before its release (not refreshed in time?); nothing removed");
            log.event(
                LockType::LinkBased,
                &entry.name,
                &entry.path,
                "release",
                format_args!("lock had been reaped; nothing removed"),
            );
            return Ok(());
        }
        fsutil::remove_if_present(&entry.path).map_err(|e| LockError::io("remove", &entry.path, e))?;
        log.event(LockType::LinkBased, &entry.name, &entry.path, "release", format_args!(""));
        Ok(())
    }
}

impl HeldLock for Held {
    fn release(mut self: Box<Self>) -> Result<(), LockError> {
        self.release_now()
    }

    fn is_lost(&self) -> bool {
        self.entry.is_lost()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Err(e) = self.release_now() {
            tracing::warn!(name = self.entry.name, error = %e, "cannot release a link-based lock");
        }
    }
}

#[cfg(test)]
#[path = "linkbased_tests.rs"]
mod tests;

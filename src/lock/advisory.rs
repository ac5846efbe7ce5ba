//! Advisory locks (`lock-type = advisory`; for EFS, and fine on local disks).
//!
//! Owns the file protocol of `<stem>.flock`: an exclusive `flock(2)` on the
//! lock file, held through one open file description for as long as the
//! lock is held. `flock` locks belong to the open file description, not to
//! the process (unlike classic `fcntl` record locks, which any `close()` of
//! any descriptor of the file drops and which two tasks of one process would
//! both "hold"), and the kernel — or the NFS server, where Linux emulates
//! `flock` with NLM/NFSv4 byte-range locks — releases them when the holder
//! dies. Nothing needs refreshing. The manager adds an in-process mutex per
//! lock name on top, so tasks of one process queue without touching the
//! file system.
//!
//! Acquire (one non-blocking attempt): open-or-create the lock file,
//! `flock(LOCK_EX|LOCK_NB)`, then check that the path still names the inode
//! we locked — a releaser may have unlinked it between our open and our
//! lock; then we retry with the new file.
//!
//! Release: unlink the lock file *while still holding the lock* (so that no
//! one can lock the old inode and believe it is the current one — they will
//! see the path changed), then close the descriptor, which unlocks it. The
//! file is removed only if the path still names our inode.
//!
//! On NFS mounted with `nolock` or `local_lock=flock|all` these locks are
//! local to one node and do not exclude other nodes: check with
//! `sessionlb locktester` from two nodes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::FlockOperation;
use rustix::io::Errno;

use super::fsutil::{self, FileId};
use super::log::LockLog;
use super::{HeldLock, LockError, LockImpl};
use crate::config::LockType;

/// Extension of advisory lock files.
pub(crate) const LOCK_EXTENSION: &str = "flock";
/// Attempts within one `try_lock` when the locked file was replaced.
const IMMEDIATE_RETRIES: usize = 4;

/// The advisory implementation for one lock directory.
pub(crate) struct Advisory {
    dir: PathBuf,
    log: Arc<LockLog>,
}

impl Advisory {
    pub(crate) fn new(dir: &Path, log: Arc<LockLog>) -> Advisory {
        Advisory { dir: dir.to_path_buf(), log }
    }

    fn attempt(&self, path: &Path) -> Result<Option<(File, FileId)>, LockError> {
        for _ in 0..IMMEDIATE_RETRIES {
            // Read-write: NFS needs a writable descriptor for an exclusive
            // lock. O_NOFOLLOW: a symbolic link planted at the lock path
            // (by anyone who can write the shared folder) must not make us
            // open, create or lock the file it points to, as root perhaps.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .custom_flags(fsutil::NOFOLLOW)
                .open(path)
                .map_err(|e| LockError::io("open", path, e))?;
            match lock_opened(&file, path)? {
                Locked::Yes(id) => return Ok(Some((file, id))),
                Locked::Busy => return Ok(None),
                Locked::Replaced => continue,
            }
        }
        Ok(None)
    }
}

enum Locked {
    Yes(FileId),
    Busy,
    /// We locked an inode that is no longer the file at the path (it was
    /// released and removed between our open and our lock).
    Replaced,
}

fn lock_opened(file: &File, path: &Path) -> Result<Locked, LockError> {
    match rustix::fs::flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(Errno::WOULDBLOCK) => return Ok(Locked::Busy),
        Err(e) => return Err(LockError::io("lock", path, io::Error::from(e))),
    }
    let id = fsutil::meta(file).map_err(|e| LockError::io("check", path, e))?.id;
    match fsutil::open_meta(path).map_err(|e| LockError::io("check", path, e))? {
        Some((_, meta)) if meta.id == id => Ok(Locked::Yes(id)),
        _ => Ok(Locked::Replaced),
    }
}

impl LockImpl for Advisory {
    fn lock_type(&self) -> LockType {
        LockType::Advisory
    }

    fn lock_path(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}.{LOCK_EXTENSION}"))
    }

    fn try_lock(self: Arc<Self>, name: &str, stem: &str) -> Result<Option<Box<dyn HeldLock>>, LockError> {
        let path = self.lock_path(stem);
        Ok(self.attempt(&path)?.map(|(file, id)| {
            Box::new(Held { advisory: self.clone(), name: name.to_string(), path, file: Some(file), id })
                as Box<dyn HeldLock>
        }))
    }
}

/// A held advisory lock; dropping it releases it.
pub(crate) struct Held {
    advisory: Arc<Advisory>,
    name: String,
    path: PathBuf,
    file: Option<File>,
    id: FileId,
}

impl Held {
    fn release_now(&mut self) -> Result<(), LockError> {
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        let log = &self.advisory.log;
        let ours = fsutil::meta_at(&self.path).is_ok_and(|m| m.id == self.id);
        let removed = if ours { fsutil::remove_if_present(&self.path) } else { Ok(()) };
        // Closing the descriptor releases the lock.
        drop(file);
        removed.map_err(|e| LockError::io("remove", &self.path, e))?;
        log.event(LockType::Advisory, &self.name, &self.path, "release", format_args!(""));
        Ok(())
    }
}

impl HeldLock for Held {
    fn release(mut self: Box<Self>) -> Result<(), LockError> {
        self.release_now()
    }

    fn is_lost(&self) -> bool {
        false
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Err(e) = self.release_now() {
            tracing::warn!(name = self.name, error = %e, "cannot release an advisory lock");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LockSettings;

    fn advisory(dir: &Path) -> Arc<Advisory> {
        Arc::new(Advisory::new(dir, Arc::new(LockLog::new(&LockSettings::default()).unwrap())))
    }

    #[test]
    fn a_second_open_file_description_cannot_lock_and_release_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = advisory(dir.path());
        let held = a.clone().try_lock("k", "k-stem").unwrap().expect("free lock");
        let path = dir.path().join("k-stem.flock");
        assert!(path.exists());
        // Same process, another manager (another open file description).
        let b = advisory(dir.path());
        assert!(b.clone().try_lock("k", "k-stem").unwrap().is_none());
        held.release().unwrap();
        assert!(!path.exists());
        let again = b.try_lock("k", "k-stem").unwrap();
        assert!(again.is_some());
    }

    #[test]
    fn a_lock_on_a_replaced_inode_is_not_taken_for_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.flock");
        // A waiter opened the file; then the holder released it (removed
        // it) and a newcomer created the next one.
        std::fs::write(&path, b"").unwrap();
        let old = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(lock_opened(&old, &path).unwrap(), Locked::Replaced));
        let current = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        assert!(matches!(lock_opened(&current, &path).unwrap(), Locked::Yes(_)));
        let other = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        assert!(matches!(lock_opened(&other, &path).unwrap(), Locked::Busy));
    }

    #[test]
    fn a_symlink_planted_at_the_lock_path_is_neither_followed_nor_locked() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let victim = elsewhere.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let missing = elsewhere.path().join("would-be-created");
        std::os::unix::fs::symlink(&victim, dir.path().join("a.flock")).unwrap();
        std::os::unix::fs::symlink(&missing, dir.path().join("b.flock")).unwrap();
        let a = advisory(dir.path());
        let err = a.clone().try_lock("a", "a").err().expect("a symlink at the lock path is an error");
        assert!(matches!(&err, LockError::Io { action: "open", .. }), "{err}");
        assert!(err.to_string().contains("a.flock"), "{err}");
        // The file it points to was not locked (another description can
        // take it) and not changed.
        let f = OpenOptions::new().read(true).write(true).open(&victim).unwrap();
        rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive).expect("the victim is not locked");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // A dangling link does not make us create its target.
        assert!(a.try_lock("b", "b").is_err());
        assert!(!missing.exists(), "the link's target was created");
    }

    #[test]
    fn release_leaves_a_file_that_is_not_ours() {
        let dir = tempfile::tempdir().unwrap();
        let a = advisory(dir.path());
        let held = a.clone().try_lock("k", "x").unwrap().unwrap();
        let path = dir.path().join("x.flock");
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else").unwrap();
        held.release().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else");
    }
}

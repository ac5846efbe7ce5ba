//! File-system helpers shared by the lock implementations: fresh metadata
//! (asking the file server rather than a client cache), file identity, the
//! file server's clock, this host's name, and small read helpers.
//!
//! On NFS a plain `stat` may answer from the client's attribute cache for up
//! to `acregmax` seconds, which would hide another node's refresh. Metadata
//! here comes from `statx(AT_STATX_FORCE_SYNC)`, and paths are checked by
//! opening them (close-to-open consistency revalidates the name lookup).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, StatxFlags, StatxTimestamp};
use rustix::io::Errno;

/// Prefix of the probe files that read the file system's clock.
pub(crate) const CLOCK_PREFIX: &str = ".sessionlb-clock-";

/// `O_NOFOLLOW` for `OpenOptionsExt::custom_flags`: opening a symbolic link
/// fails (`ELOOP`) instead of opening the file it points to.
pub(crate) const NOFOLLOW: i32 = rustix::fs::OFlags::NOFOLLOW.bits() as i32;

/// Identity of a file: device and inode number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
}

/// The metadata the lock code uses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    pub id: FileId,
    pub nlink: u64,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

fn timestamp(ts: StatxTimestamp) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(ts.tv_nsec));
    if ts.tv_sec >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts.tv_sec.unsigned_abs()) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.tv_sec.unsigned_abs()) + nanos
    }
}

fn from_std(m: &fs::Metadata) -> Meta {
    let at = |sec: i64, nsec: i64| {
        let nanos = Duration::from_nanos(nsec.clamp(0, 999_999_999).unsigned_abs());
        if sec >= 0 {
            UNIX_EPOCH + Duration::from_secs(sec.unsigned_abs()) + nanos
        } else {
            UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + nanos
        }
    };
    Meta {
        id: FileId { dev: m.dev(), ino: m.ino() },
        nlink: m.nlink(),
        mtime: at(m.mtime(), m.mtime_nsec()),
        ctime: at(m.ctime(), m.ctime_nsec()),
    }
}

fn from_statx(st: &rustix::fs::Statx) -> Meta {
    let dev = rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor);
    Meta {
        id: FileId { dev, ino: st.stx_ino },
        nlink: u64::from(st.stx_nlink),
        mtime: timestamp(st.stx_mtime),
        ctime: timestamp(st.stx_ctime),
    }
}

/// `statx` is missing on very old kernels and blocked by some seccomp
/// profiles; fall back to `fstat`/`lstat` there.
fn statx_unavailable(e: Errno) -> bool {
    e == Errno::NOSYS || e == Errno::PERM
}

const MASK: StatxFlags = StatxFlags::BASIC_STATS;

/// Fresh metadata of an open file.
pub(crate) fn meta(file: &File) -> io::Result<Meta> {
    match rustix::fs::statx(file, "", AtFlags::EMPTY_PATH | AtFlags::STATX_FORCE_SYNC, MASK) {
        Ok(st) => Ok(from_statx(&st)),
        Err(e) if statx_unavailable(e) => file.metadata().map(|m| from_std(&m)),
        Err(e) => Err(e.into()),
    }
}

/// Fresh metadata of a path (not following a final symlink).
pub(crate) fn meta_at(path: &Path) -> io::Result<Meta> {
    let flags = AtFlags::SYMLINK_NOFOLLOW | AtFlags::STATX_FORCE_SYNC;
    match rustix::fs::statx(rustix::fs::CWD, path, flags, MASK) {
        Ok(st) => Ok(from_statx(&st)),
        Err(e) if statx_unavailable(e) => fs::symlink_metadata(path).map(|m| from_std(&m)),
        Err(e) => Err(e.into()),
    }
}

/// Open `path` read-only (revalidating the name on NFS) and return the file
/// with its fresh metadata; `None` when nothing is there.
pub(crate) fn open_meta(path: &Path) -> io::Result<Option<(File, Meta)>> {
    let file = match OpenOptions::new().read(true).custom_flags(NOFOLLOW).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let m = meta(&file)?;
    Ok(Some((file, m)))
}

/// Whether `path` currently names the file `id` with exactly `content`.
/// The inode number alone is not enough: file systems reuse the number of a
/// deleted file at once, and lock contents carry a random token.
pub(crate) fn names_file(path: &Path, id: FileId, content: &[u8]) -> io::Result<bool> {
    let Some((mut file, meta)) = open_meta(path)? else {
        return Ok(false);
    };
    if meta.id != id {
        return Ok(false);
    }
    Ok(read_limited(&mut file, content.len() as u64 + 1)? == content)
}

/// Read at most `limit` bytes from the start of `file`.
pub(crate) fn read_limited(file: &mut File, limit: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    file.take(limit).read_to_end(&mut out)?;
    Ok(out)
}

/// Touch a file's modification (and access) time to "now" as the file
/// system sees it (`UTIME_NOW`: on NFS the server's clock).
pub(crate) fn touch(file: &File) -> io::Result<()> {
    let now = rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW };
    rustix::fs::futimens(file, &rustix::fs::Timestamps { last_access: now, last_modification: now })
        .map_err(io::Error::from)
}

/// Age of a file time as seen from `fs_now`; zero if it lies in the future.
pub(crate) fn age(fs_now: SystemTime, time: SystemTime) -> Duration {
    fs_now.duration_since(time).unwrap_or(Duration::ZERO)
}

/// This machine's host name (`uname`), as written into lock files.
pub(crate) fn host_name() -> String {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_string_lossy().into_owned();
    if name.is_empty() { "localhost".to_string() } else { name }
}

/// `s` reduced to `[A-Za-z0-9_-]`, at most `max` bytes: for embedding host
/// names into file names.
pub(crate) fn file_name_part(s: &str, max: usize) -> String {
    s.bytes()
        .take(max)
        .map(|b| if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' { char::from(b) } else { '_' })
        .collect()
}

/// A random lower-case hex string of 16 digits (64 bits).
pub(crate) fn random_hex64() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Whether an I/O error means "nothing is there".
pub(crate) fn is_not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

/// Remove a file; a file that is already gone is not an error.
pub(crate) fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if !is_not_found(&e) => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_identifies_files_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        fs::write(&a, b"x").unwrap();
        fs::hard_link(&a, &b).unwrap();
        let ma = meta_at(&a).unwrap();
        let (file, mb) = open_meta(&b).unwrap().unwrap();
        assert_eq!(ma.id, mb.id);
        assert_eq!(meta(&file).unwrap().nlink, 2);
        fs::write(dir.path().join("c"), b"y").unwrap();
        assert_ne!(meta_at(&dir.path().join("c")).unwrap().id, ma.id);
        assert!(open_meta(&dir.path().join("missing")).unwrap().is_none());
    }

    #[test]
    fn touch_moves_mtime_to_now() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = File::create(&p).unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        f.set_modified(old).unwrap();
        assert!(age(SystemTime::now(), meta(&f).unwrap().mtime) >= Duration::from_secs(3599));
        touch(&f).unwrap();
        assert!(age(SystemTime::now(), meta(&f).unwrap().mtime) < Duration::from_secs(60));
    }

    #[test]
    fn host_names_become_safe_file_name_parts() {
        assert_eq!(file_name_part("node-1.example.com", 64), "node-1_example_com");
        assert_eq!(file_name_part("a/../b", 3), "a__");
        assert!(!host_name().is_empty());
    }
}

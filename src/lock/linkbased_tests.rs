//! Unit tests of the link-based protocol: claiming, staleness, safe reaping,
//! release of a lock that is no longer ours, refresh, and the fallback
//! without hard links.

use std::fs;
use std::io;
use std::time::Instant;

use super::*;
use crate::config::LockSettings;

const NAME: &str = "session-1";
const STEM: &str = "session-1-stem";

fn settings(log: Option<&Path>) -> LockSettings {
    LockSettings {
        lock_type: LockType::LinkBased,
        refresh_rate: Duration::from_millis(50),
        timeout_interval: Duration::from_secs(2),
        enable_logging: log.is_some(),
        log_file: log.map(Path::to_path_buf),
    }
}

fn link_based(dir: &Path, log: Option<&Path>) -> Arc<LinkBased> {
    let s = settings(log);
    Arc::new(LinkBased::new(dir, s.refresh_rate, s.timeout_interval, Arc::new(LockLog::new(&s).unwrap())))
}

fn lock_file(dir: &Path) -> PathBuf {
    dir.join(format!("{STEM}.lock"))
}

fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".sessionlb-"))
        .collect()
}

/// A lock file as a crashed process on another host left it, `age` ago.
fn foreign_lock(path: &Path, age: Duration) {
    foreign_lock_with_token(path, age, "00");
}

fn foreign_lock_with_token(path: &Path, age: Duration, token: &str) {
    fs::write(path, format!("host=elsewhere\npid=1\ntoken={token}\n")).unwrap();
    let f = File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
}

fn poll_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_held_lock_excludes_others_and_release_frees_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = link_based(dir.path(), None);
    let b = link_based(dir.path(), None);
    let held = a.clone().try_lock(NAME, STEM).unwrap().expect("free lock");
    let content = fs::read_to_string(lock_file(dir.path())).unwrap();
    assert!(content.contains(&format!("pid={}", std::process::id())), "{content}");
    assert!(content.contains("token="), "{content}");
    assert_eq!(fsutil::meta_at(&lock_file(dir.path())).unwrap().nlink, 1, "proxy name removed");
    assert!(b.clone().try_lock(NAME, STEM).unwrap().is_none());
    assert!(a.clone().try_lock(NAME, STEM).unwrap().is_none(), "not reentrant");
    assert!(leftovers(dir.path()).is_empty(), "proxies of failed attempts are removed: {:?}", leftovers(dir.path()));
    held.release().unwrap();
    assert!(!lock_file(dir.path()).exists());
    assert!(b.try_lock(NAME, STEM).unwrap().is_some());
}

#[test]
fn a_fresh_lock_of_someone_else_is_not_reaped() {
    let dir = tempfile::tempdir().unwrap();
    foreign_lock(&lock_file(dir.path()), Duration::from_millis(1500));
    let a = link_based(dir.path(), None);
    assert!(a.try_lock(NAME, STEM).unwrap().is_none());
    assert!(fs::read_to_string(lock_file(dir.path())).unwrap().contains("host=elsewhere"));
}

#[test]
fn a_stale_lock_is_reaped_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("locks.log");
    foreign_lock(&lock_file(dir.path()), Duration::from_secs(3));
    let a = link_based(dir.path(), Some(&log));
    let held = a.try_lock(NAME, STEM).unwrap().expect("stale lock reaped");
    let content = fs::read_to_string(lock_file(dir.path())).unwrap();
    assert!(content.contains(&format!("pid={}", std::process::id())), "{content}");
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("event=reap name=\"session-1\""), "{text}");
    assert!(text.contains("holder=\"host=elsewhere pid=1\""), "{text}");
    assert!(!lock_file(dir.path()).with_extension(GATE_EXTENSION).exists(), "gate removed");
    drop(held);
    assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
}

#[test]
fn a_lock_that_changed_after_the_staleness_check_is_put_back_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let a = link_based(dir.path(), None);
    let path = lock_file(dir.path());
    foreign_lock(&path, Duration::from_secs(3));
    let observed = LinkBased::observe(&path).unwrap().unwrap();
    // Its owner refreshes it between the check and the move.
    fsutil::touch(&File::open(&path).unwrap()).unwrap();
    match a.remove_if_unchanged(&path, &observed).unwrap() {
        Removal::PutBack { restored } => assert!(restored),
        _ => panic!("a refreshed lock must not be removed"),
    }
    let now = LinkBased::observe(&path).unwrap().expect("lock is back in place");
    assert_eq!(now.id, observed.id);
    assert_eq!(now.content, observed.content);
    // A different incarnation (reaped and re-created meanwhile; the file
    // system may well reuse the inode number) is not removed either.
    fs::remove_file(&path).unwrap();
    foreign_lock_with_token(&path, Duration::from_secs(3), "01");
    let replaced = LinkBased::observe(&path).unwrap().unwrap();
    assert!(matches!(a.remove_if_unchanged(&path, &observed).unwrap(), Removal::PutBack { restored: true }));
    assert!(path.exists());
    // Unchanged: removed.
    assert!(matches!(a.remove_if_unchanged(&path, &replaced).unwrap(), Removal::Removed));
    assert!(!path.exists());
    assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
}

#[test]
fn reaping_waits_for_a_live_reap_gate_but_clears_a_stale_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = lock_file(dir.path());
    let gate = path.with_extension(GATE_EXTENSION);
    foreign_lock(&path, Duration::from_secs(3));
    foreign_lock(&gate, Duration::from_millis(100));
    let a = link_based(dir.path(), None);
    assert!(a.clone().try_lock(NAME, STEM).unwrap().is_none(), "another reaper is at work");
    assert!(path.exists());
    foreign_lock(&gate, Duration::from_secs(3));
    assert!(a.try_lock(NAME, STEM).unwrap().is_some(), "dead reaper's gate cleared, lock reaped");
    assert!(!gate.exists());
}

#[test]
fn release_does_not_remove_a_lock_that_is_no_longer_ours() {
    let dir = tempfile::tempdir().unwrap();
    let a = link_based(dir.path(), None);
    let held = a.try_lock(NAME, STEM).unwrap().unwrap();
    let path = lock_file(dir.path());
    // Reaped, and taken by someone else (maybe with the same inode number).
    fs::remove_file(&path).unwrap();
    foreign_lock(&path, Duration::ZERO);
    assert!(!held.is_lost(), "not noticed before the next refresh");
    held.release().unwrap();
    assert!(fs::read_to_string(&path).unwrap().contains("host=elsewhere"));
}

#[test]
fn the_refresher_keeps_the_lock_fresh_and_notices_its_loss() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("locks.log");
    let a = link_based(dir.path(), Some(&log));
    let held = a.try_lock(NAME, STEM).unwrap().unwrap();
    let path = lock_file(dir.path());
    File::options().write(true).open(&path).unwrap().set_modified(SystemTime::now() - Duration::from_secs(60)).unwrap();
    poll_until("the refresher touches the lock", || {
        fsutil::age(SystemTime::now(), fsutil::meta_at(&path).unwrap().mtime) < Duration::from_secs(30)
    });
    assert!(fs::read_to_string(&log).unwrap().contains("event=refresh name=\"session-1\""));
    fs::remove_file(&path).unwrap();
    poll_until("the loss is noticed", || held.is_lost());
    assert!(fs::read_to_string(&log).unwrap().contains("event=lost"));
    drop(held);
}

#[test]
fn an_owner_whose_lease_ran_out_stops_refreshing_and_reports_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(None);
    let log = LockLog::new(&s).unwrap();
    let file = File::create(dir.path().join("x.lock")).unwrap();
    let id = fsutil::meta(&file).unwrap().id;
    let a = link_based(dir.path(), None);
    let entry = a.refresher().entry(NAME, &dir.path().join("x.lock"), file, id, Vec::new(), Instant::now());
    assert!(super::super::refresher::refresh_entry(&entry, s.timeout_interval, &log), "fresh lease: touched");
    assert!(!entry.is_lost());
    // The last successful refresh is `timeout_interval` old.
    let past = Instant::now()
        .checked_sub(s.timeout_interval)
        .expect("cannot set up the test: the monotonic clock started less than timeout_interval ago");
    entry.state.lock().last_refresh = past;
    let old = SystemTime::now() - Duration::from_secs(3600);
    File::options().write(true).open(dir.path().join("x.lock")).unwrap().set_modified(old).unwrap();
    assert!(!super::super::refresher::refresh_entry(&entry, s.timeout_interval, &log), "lease ran out: not touched");
    assert!(entry.is_lost(), "a lease that ran out is reported lost");
    assert_eq!(fsutil::meta_at(&dir.path().join("x.lock")).unwrap().mtime, old, "the lock was not touched");
    assert!(!super::super::refresher::refresh_entry(&entry, s.timeout_interval, &log), "a lost lock stays lost");
}

#[test]
fn without_hard_links_exclusive_create_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let a = Arc::new(Arc::into_inner(link_based(dir.path(), None)).unwrap().without_hard_links());
    let b = Arc::new(Arc::into_inner(link_based(dir.path(), None)).unwrap().without_hard_links());
    let held = a.clone().try_lock(NAME, STEM).unwrap().expect("free lock");
    assert!(fs::read_to_string(lock_file(dir.path())).unwrap().contains("token="));
    assert!(b.clone().try_lock(NAME, STEM).unwrap().is_none());
    drop(held);
    assert!(!lock_file(dir.path()).exists());
    foreign_lock(&lock_file(dir.path()), Duration::from_secs(3));
    assert!(b.try_lock(NAME, STEM).unwrap().is_some(), "stale lock reaped without hard links too");
    assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
}

/// A file system on which `link()` succeeds but the link count cannot be
/// trusted (here: it reads `n`).
fn with_link_count_reading(dir: &Path, n: fn(&File) -> io::Result<u64>) -> Arc<LinkBased> {
    Arc::new(Arc::into_inner(link_based(dir, None)).unwrap().with_link_count(n))
}

#[test]
fn a_link_without_the_link_count_2_falls_back_to_exclusive_create() {
    let counts: [fn(&File) -> io::Result<u64>; 2] = [|_| Ok(1), |_| Ok(3)];
    for count in counts {
        let dir = tempfile::tempdir().unwrap();
        let a = with_link_count_reading(dir.path(), count);
        assert!(a.uses_hard_links());
        let held = a.clone().try_lock(NAME, STEM).unwrap().expect("a free lock is taken by exclusive create");
        assert!(!a.uses_hard_links(), "switched to exclusive create for good");
        let content = fs::read_to_string(lock_file(dir.path())).unwrap();
        assert!(content.contains(&format!("pid={}", std::process::id())) && content.contains("token="), "{content}");
        assert_eq!(fsutil::meta_at(&lock_file(dir.path())).unwrap().nlink, 1, "the link was undone");
        assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
        // It excludes others (of either mode) and is released as usual.
        assert!(link_based(dir.path(), None).try_lock(NAME, STEM).unwrap().is_none());
        assert!(a.clone().try_lock(NAME, STEM).unwrap().is_none());
        held.release().unwrap();
        assert!(!lock_file(dir.path()).exists());
        drop(a.clone().try_lock(NAME, STEM).unwrap().expect("free again"));
        assert!(!lock_file(dir.path()).exists());
    }
}

/// Puts `aside` back at `path` with `put_back`, first when a new lock has
/// taken `path` meanwhile (it must stay), then when `path` is free.
fn check_put_back(dir: &Path, put_back: impl Fn(&Path, &Path) -> bool) {
    let path = lock_file(dir);
    let aside = dir.join(format!("{REAPED_PREFIX}test"));
    foreign_lock_with_token(&aside, Duration::from_secs(3), "0a");
    let moved = LinkBased::observe(&aside).unwrap().unwrap();
    foreign_lock_with_token(&path, Duration::ZERO, "0b");
    let newer = LinkBased::observe(&path).unwrap().unwrap();
    assert!(!put_back(&aside, &path), "a lock created meanwhile is not replaced");
    assert_eq!(LinkBased::observe(&path).unwrap().as_ref(), Some(&newer));
    assert_eq!(LinkBased::observe(&aside).unwrap().as_ref(), Some(&moved), "left for the caller");
    fs::remove_file(&path).unwrap();
    assert!(put_back(&aside, &path), "a free path gets the lock back");
    assert_eq!(LinkBased::observe(&path).unwrap().as_ref(), Some(&moved), "the very same file");
    let _ = fs::remove_file(&aside);
    fs::remove_file(&path).unwrap();
    assert_eq!(fs::read_dir(dir).unwrap().count(), 0, "no placeholder or other file left");
}

#[test]
fn put_back_never_replaces_a_lock_created_meanwhile() {
    // With hard links (link()), without (renameat2 RENAME_NOREPLACE), and
    // where that flag is not supported either (placeholder, then rename).
    let dir = tempfile::tempdir().unwrap();
    let a = link_based(dir.path(), None);
    check_put_back(dir.path(), |aside, path| a.put_back(aside, path));
    let b = Arc::into_inner(link_based(dir.path(), None)).unwrap().without_hard_links();
    check_put_back(dir.path(), |aside, path| b.put_back(aside, path));
    check_put_back(dir.path(), |aside, path| put_back_over_placeholder(aside, path, b"host=h\npid=1\nputback=1\n"));
}

#[test]
fn without_hard_links_a_refreshed_lock_is_put_back_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let a = Arc::into_inner(link_based(dir.path(), None)).unwrap().without_hard_links();
    let path = lock_file(dir.path());
    foreign_lock(&path, Duration::from_secs(3));
    let observed = LinkBased::observe(&path).unwrap().unwrap();
    fsutil::touch(&File::open(&path).unwrap()).unwrap();
    assert!(matches!(a.remove_if_unchanged(&path, &observed).unwrap(), Removal::PutBack { restored: true }));
    let now = LinkBased::observe(&path).unwrap().expect("lock is back in place");
    assert_eq!((now.id, &now.content), (observed.id, &observed.content));
    assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
}

#[test]
fn the_refresher_thread_ends_with_its_manager() {
    let dir = tempfile::tempdir().unwrap();
    let a = link_based(dir.path(), None);
    let exited = a.refresher().exited_flag();
    let held = a.clone().try_lock(NAME, STEM).unwrap().unwrap();
    drop(a);
    assert!(!exited.load(Ordering::Acquire), "the guard keeps it alive");
    drop(held);
    poll_until("the refresher thread exits", || exited.load(Ordering::Acquire));
}

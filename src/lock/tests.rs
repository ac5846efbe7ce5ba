//! Unit tests of the manager: waiting, deadlines, the in-process mutex,
//! cancellation, logging, settings checks — for both lock types.

use std::time::{Duration, Instant, SystemTime};

use super::*;

const TYPES: [LockType; 2] = [LockType::LinkBased, LockType::Advisory];

fn settings(lock_type: LockType) -> LockSettings {
    LockSettings {
        lock_type,
        refresh_rate: Duration::from_millis(100),
        timeout_interval: Duration::from_secs(5),
        ..LockSettings::default()
    }
}

fn in_secs(s: u64) -> Instant {
    Instant::now() + Duration::from_secs(s)
}

/// How many share the in-process mutex of `name` (the map counts as one).
fn local_users(m: &LockManager, name: &str) -> usize {
    m.inner.local.lock().get(&names::file_stem(name.as_bytes())).map_or(0, Arc::strong_count)
}

#[tokio::test]
async fn uncontended_acquire_is_immediate_and_not_contended() {
    for t in TYPES {
        let dir = tempfile::tempdir().unwrap();
        let m = LockManager::new(dir.path(), &settings(t)).unwrap();
        let g = m.acquire("alice", in_secs(5)).await.unwrap();
        assert!(!g.contended(), "{t:?}");
        assert!(g.waited() < Duration::from_secs(1), "{t:?}: {:?}", g.waited());
        assert_eq!(g.lock_type(), t);
        assert_eq!(g.name(), "alice");
        assert_eq!(g.path(), m.lock_path("alice"));
        assert!(g.path().exists(), "{t:?}");
        assert!(!g.is_lost());
        g.release().await.unwrap();
        assert!(!m.lock_path("alice").exists(), "{t:?}: release removes the lock file");
    }
}

#[tokio::test]
async fn a_waiter_gets_the_lock_soon_after_release_and_sees_its_wait() {
    for t in TYPES {
        let dir = tempfile::tempdir().unwrap();
        // Two managers: the second polls the file lock like another process.
        let a = LockManager::new(dir.path(), &settings(t)).unwrap();
        let b = LockManager::new(dir.path(), &settings(t)).unwrap();
        let held = a.acquire("k", in_secs(5)).await.unwrap();
        let waiter = tokio::spawn(async move { b.acquire("k", in_secs(20)).await });
        // Let the waiter poll a few times before releasing.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "{t:?}: waiter must wait while the lock is held");
        let released = Instant::now();
        held.release().await.unwrap();
        let got = waiter.await.unwrap().unwrap();
        assert!(got.contended(), "{t:?}");
        assert!(got.waited() >= Duration::from_millis(100), "{t:?}: {:?}", got.waited());
        // Back-off is capped at 50 ms (+25% jitter): pick-up is quick.
        assert!(released.elapsed() < Duration::from_secs(2), "{t:?}: {:?}", released.elapsed());
    }
}

#[tokio::test]
async fn acquire_times_out_at_the_deadline() {
    for t in TYPES {
        let dir = tempfile::tempdir().unwrap();
        let a = LockManager::new(dir.path(), &settings(t)).unwrap();
        let b = LockManager::new(dir.path(), &settings(t)).unwrap();
        let _held = a.acquire("k", in_secs(5)).await.unwrap();
        let start = Instant::now();
        match b.acquire("k", start + Duration::from_millis(200)).await {
            Err(LockError::Timeout { name, waited }) => {
                assert_eq!(name, "k");
                assert!(waited >= Duration::from_millis(190), "{t:?}: {waited:?}");
            }
            other => panic!("{t:?}: expected a timeout, got {other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(3), "{t:?}");
        // Same manager: the in-process mutex times out too.
        assert!(matches!(
            a.acquire("k", Instant::now() + Duration::from_millis(50)).await,
            Err(LockError::Timeout { .. })
        ));
        assert!(a.try_acquire("k").unwrap().is_none(), "{t:?}");
        assert!(b.try_acquire("k").unwrap().is_none(), "{t:?}");
    }
}

#[tokio::test]
async fn a_past_deadline_still_makes_one_attempt() {
    for t in TYPES {
        let dir = tempfile::tempdir().unwrap();
        let m = LockManager::new(dir.path(), &settings(t)).unwrap();
        let g = m.acquire("k", Instant::now()).await.unwrap();
        drop(g);
    }
}

#[tokio::test]
async fn dropping_a_waiting_acquire_leaves_nothing_held() {
    for t in TYPES {
        let dir = tempfile::tempdir().unwrap();
        let m = LockManager::new(dir.path(), &settings(t)).unwrap();
        let held = m.acquire("k", in_secs(5)).await.unwrap();
        let m2 = m.clone();
        let waiter = tokio::spawn(async move { m2.acquire("k", in_secs(60)).await });
        // Wait until the waiter queues on the name's in-process mutex: it
        // then shares it with the map and the holder.
        let deadline = in_secs(10);
        while local_users(&m, "k") < 3 {
            assert!(Instant::now() < deadline, "{t:?}: the waiter never started waiting");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(!waiter.is_finished(), "{t:?}: the lock is held: the waiter must be waiting");
        waiter.abort();
        assert!(waiter.await.unwrap_err().is_cancelled());
        drop(held);
        let again = m.try_acquire("k").unwrap();
        assert!(again.is_some(), "{t:?}");
        drop(again);
        assert!(m.inner.local.lock().is_empty(), "{t:?}: in-process mutexes are forgotten when unused");
    }
}

#[test]
fn settings_that_would_reap_live_locks_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(LockType::LinkBased);
    s.timeout_interval = s.refresh_rate;
    assert!(matches!(LockManager::new(dir.path(), &s), Err(LockError::InvalidSettings(_))));
    s.refresh_rate = Duration::ZERO;
    assert!(matches!(LockManager::new(dir.path(), &s), Err(LockError::InvalidSettings(_))));
}

#[test]
fn a_missing_directory_is_created_and_an_unusable_one_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b/locks");
    LockManager::new(&nested, &settings(LockType::Advisory)).unwrap();
    assert!(nested.is_dir());
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let err = LockManager::new(file.join("locks"), &settings(LockType::Advisory)).unwrap_err();
    assert!(matches!(err, LockError::Io { .. }), "{err}");
    assert!(err.to_string().starts_with("cannot create the lock directory"), "{err}");
}

#[test]
fn hostile_names_stay_inside_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    for t in TYPES {
        let m = LockManager::new(dir.path(), &settings(t)).unwrap();
        let long = "x/".repeat(5000);
        let names = ["../../etc/passwd", "/abs", "..", ".", "a\u{0}b", "\u{1}\u{7f}\n", long.as_str()];
        let mut guards = Vec::new();
        for name in names {
            let path = m.lock_path(name);
            assert_eq!(path.parent(), Some(dir.path()), "{t:?} {name:?}");
            assert!(path.file_name().unwrap().len() <= names::MAX_STEM_LEN + 6);
            guards.push(m.try_acquire(name).unwrap().expect("distinct names do not contend"));
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            names.len(),
            "{t:?}: one file per name, all in the directory"
        );
    }
}

#[tokio::test]
async fn logging_records_acquire_and_release() {
    for t in TYPES {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("locks.log");
        let s = LockSettings { enable_logging: true, log_file: Some(log.clone()), ..settings(t) };
        let m = LockManager::new(dir.path().join("locks"), &s).unwrap();
        m.acquire("bob", in_secs(5)).await.unwrap().release().await.unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        let kind = t.as_str();
        assert!(text.contains(&format!("type={kind} event=acquire name=\"bob\"")), "{text}");
        assert!(text.contains(&format!("type={kind} event=release name=\"bob\"")), "{text}");
    }
}

#[test]
fn filesystem_time_is_close_to_the_local_clock_on_a_local_disk() {
    let dir = tempfile::tempdir().unwrap();
    let fs_now = filesystem_time(dir.path()).unwrap();
    let local = SystemTime::now();
    let skew = local.duration_since(fs_now).unwrap_or_else(|e| e.duration());
    assert!(skew < Duration::from_secs(1), "{skew:?}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "probe removed");
}

#[test]
fn backoff_starts_near_one_millisecond_and_is_capped() {
    let mut b = Backoff::new();
    let first = b.next_delay();
    assert!(first >= Duration::from_micros(750) && first <= Duration::from_micros(1250), "{first:?}");
    let later: Vec<Duration> = (0..30).map(|_| b.next_delay()).collect();
    assert!(later.iter().all(|d| *d <= Backoff::MAX.mul_f64(1.25)));
    assert!(later.last().unwrap() >= &Backoff::MAX.mul_f64(0.75));
}

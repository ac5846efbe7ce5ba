//! Shared-storage locks with real files and real processes: mutual
//! exclusion across processes and tasks, crashed holders (SIGKILL),
//! refresh, name mapping, and `sessionlb locktester` as operators run it.
//!
//! Processes are the `sessionlb` binary (`locktester` holds locks until
//! interrupted; `locktester --stress` contends). Every child is killed when
//! its guard drops. Waiting is polling with a deadline; the only sleeps are
//! poll intervals and the intervals during which something must *not*
//! happen.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use rustix::process::{Pid, Signal, kill_process};
use sessionlb::config::{LockSettings, LockType};
use sessionlb::lock::{LockManager, names};

const BIN: &str = env!("CARGO_BIN_EXE_sessionlb");
/// The lock name `locktester` holds in test mode.
const TESTER_LOCK: &str = "locktester";
/// Generous: the machine may be busy with other tests.
const STARTUP: Duration = Duration::from_secs(60);

/// A child process whose output is collected line by line; killed on drop.
struct Proc {
    name: String,
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

fn collect(stream: impl Read + Send + 'static, into: Arc<Mutex<Vec<String>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            into.lock().unwrap().push(line);
        }
    })
}

impl Proc {
    fn spawn(name: &str, args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("SESSIONLB_CONFIG")
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), stdout.clone()),
            collect(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Proc { name: name.to_string(), child, stdout, stderr, readers }
    }

    fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    fn output(&self) -> String {
        format!(
            "--- {} stdout:\n{}\n--- stderr:\n{}",
            self.name,
            self.stdout().join("\n"),
            self.stderr.lock().unwrap().join("\n")
        )
    }

    fn has_line(&self, line: &str) -> bool {
        self.stdout().iter().any(|l| l == line)
    }

    /// Poll until stdout has exactly `line`.
    fn wait_for_line(&mut self, line: &str) {
        let deadline = Instant::now() + STARTUP;
        while !self.has_line(line) {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.join_readers();
                assert!(
                    self.has_line(line),
                    "{} exited ({status}) without printing {line:?}\n{}",
                    self.name,
                    self.output()
                );
                return;
            }
            assert!(Instant::now() < deadline, "{} did not print {line:?} in time\n{}", self.name, self.output());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, signal: Signal) {
        kill_process(Pid::from_child(&self.child), signal).expect("signal the child");
    }

    /// Poll until the process exits; all its output is collected then.
    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the child") {
                self.join_readers();
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit in time\n{}", self.name, self.output());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL and reap: the process is gone when this returns.
    fn kill_hard(&mut self) {
        self.signal(Signal::KILL);
        self.child.wait().expect("reap the child");
    }

    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory with a shared folder and a config file.
struct Setup {
    tmp: tempfile::TempDir,
    shared: PathBuf,
    config: PathBuf,
}

impl Setup {
    /// `[locks]` with the given type and timings; `log` enables logging to
    /// `<tmp>/locks.log`.
    fn new(lock_type: &str, refresh: &str, timeout: &str, log: bool) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        fs::create_dir(&shared).unwrap();
        let config = tmp.path().join("sessionlb.toml");
        let mut text = format!(
            "server-shared-storage-path = {:?}\n\n[locks]\nlock-type = \"{lock_type}\"\nrefresh-rate = \"{refresh}\"\ntimeout-interval = \"{timeout}\"\n",
            shared.to_str().unwrap()
        );
        if log {
            text.push_str(&format!(
                "enable-logging = true\nlog-file = {:?}\n",
                tmp.path().join("locks.log").to_str().unwrap()
            ));
        }
        fs::write(&config, text).unwrap();
        Setup { tmp, shared, config }
    }

    fn shared(&self) -> &str {
        self.shared.to_str().unwrap()
    }

    fn config(&self) -> &str {
        self.config.to_str().unwrap()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.tmp.path().join("locks.log")).unwrap_or_default()
    }

    /// A manager in this test process, as another node would have.
    fn manager(&self, lock_type: LockType, refresh: Duration, timeout: Duration, log: &str) -> LockManager {
        let settings = LockSettings {
            lock_type,
            refresh_rate: refresh,
            timeout_interval: timeout,
            enable_logging: true,
            log_file: Some(self.tmp.path().join(log)),
        };
        LockManager::new(&self.shared, &settings).unwrap()
    }

    /// Start `sessionlb locktester` holding `lock_type` and wait until it holds.
    fn holder(&self, lock_type: &str, line: &str) -> Proc {
        let mut holder = Proc::spawn(
            "holder",
            &["--config", self.config(), "locktester", "--path", self.shared(), "--lock-type", lock_type],
        );
        holder.wait_for_line(line);
        holder
    }
}

fn mtime(path: &Path) -> SystemTime {
    fs::metadata(path).unwrap().modified().unwrap()
}

// ------------------------------------------------------------ across processes

/// N processes × M rounds increment one counter under the lock.
fn contention_across_processes(lock_type: &str) {
    const PROCESSES: usize = 4;
    const ROUNDS: u64 = 250;
    let setup = Setup::new(lock_type, "500ms", "10s", false);
    let rounds = ROUNDS.to_string();
    let mut procs: Vec<Proc> = (0..PROCESSES)
        .map(|i| {
            Proc::spawn(
                &format!("stress-{i}"),
                &[
                    "--config",
                    setup.config(),
                    "locktester",
                    "--path",
                    setup.shared(),
                    "--lock-type",
                    lock_type,
                    "--stress",
                    &rounds,
                    "--hold-ms",
                    "1",
                ],
            )
        })
        .collect();
    let mut contended = 0u64;
    for p in &mut procs {
        let status = p.wait_exit(Duration::from_secs(300));
        assert!(status.success(), "{status}\n{}", p.output());
        let summary = p.stdout().into_iter().find(|l| l.contains("acquisitions/s")).expect("summary line");
        assert!(summary.starts_with(&format!("stress: {ROUNDS} rounds in ")), "{summary}");
        assert!(summary.ends_with("overlaps seen 0"), "{summary}");
        let n = summary.split("contended ").nth(1).and_then(|s| s.split(';').next()).expect("contended count");
        contended += n.parse::<u64>().unwrap();
    }
    let count = fs::read_to_string(setup.shared.join("locktester-stress.counter")).unwrap();
    assert_eq!(count.trim(), (PROCESSES as u64 * ROUNDS).to_string(), "lost updates: the lock let two writers in");
    assert!(!setup.shared.join("locktester-stress.inside").exists());
    assert!(contended > 0, "the processes never contended: the test proves nothing");
    let left: Vec<String> = fs::read_dir(&setup.shared)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "locktester-stress.counter")
        .collect();
    assert!(left.is_empty(), "locks, proxies or markers left behind: {left:?}");
}

#[test]
fn linkbased_excludes_across_processes() {
    contention_across_processes("linkbased");
}

#[test]
fn advisory_excludes_across_processes() {
    contention_across_processes("advisory");
}

// ------------------------------------------------------------ crashed holders

#[test]
fn linkbased_lock_of_a_killed_holder_is_reaped_after_the_timeout_and_not_before() {
    let (refresh, timeout) = (Duration::from_millis(250), Duration::from_secs(2));
    let setup = Setup::new("linkbased", "250ms", "2s", false);
    let mut holder = setup.holder("linkbased", "* Acquired link-based lock");
    let contender = setup.manager(LockType::LinkBased, refresh, timeout, "contender.log");
    assert!(contender.try_acquire(TESTER_LOCK).unwrap().is_none(), "the holder holds it");
    let lock = contender.lock_path(TESTER_LOCK);

    holder.kill_hard();
    let killed = Instant::now();
    // The holder's last refresh: staleness counts from here.
    let last_refresh = mtime(&lock);
    let mut failed_polls = 0;
    let (taken_at, taken_wall, guard) = loop {
        if let Some(guard) = contender.try_acquire(TESTER_LOCK).unwrap() {
            break (killed.elapsed(), SystemTime::now(), guard);
        }
        failed_polls += 1;
        assert!(killed.elapsed() < timeout + Duration::from_secs(10), "the dead holder's lock was never reaped");
        std::thread::sleep(Duration::from_millis(10));
    };
    // Not before: never earlier than last refresh + timeout-interval...
    let earliest = last_refresh + timeout;
    assert!(taken_wall >= earliest, "reaped {:?} too early", earliest.duration_since(taken_wall).unwrap_or_default());
    // ...so the lock resisted for about timeout - refresh-rate (1.75 s) after
    // the kill; with a wide margin for a holder whose refresher ran late.
    assert!(taken_at >= timeout / 2, "taken {taken_at:?} after the kill");
    assert!(failed_polls >= 20, "the contender kept trying: {failed_polls}");
    // After: within the timeout (plus a margin for a busy machine).
    assert!(taken_at <= timeout + Duration::from_millis(1500), "taken only {taken_at:?} after the kill");
    let log = fs::read_to_string(setup.tmp.path().join("contender.log")).unwrap();
    let pid = format!("pid={}", holder.child.id());
    assert!(log.lines().any(|l| l.contains("event=reap") && l.contains(&pid)), "reap not logged:\n{log}");
    drop(guard);
}

#[test]
fn advisory_lock_of_a_killed_holder_is_free_at_once() {
    let setup = Setup::new("advisory", "20s", "30s", false);
    let mut holder = setup.holder("advisory", "* Acquired advisory lock");
    let contender =
        setup.manager(LockType::Advisory, Duration::from_secs(20), Duration::from_secs(30), "contender.log");
    assert!(contender.try_acquire(TESTER_LOCK).unwrap().is_none(), "the holder holds it");
    holder.kill_hard();
    let killed = Instant::now();
    let guard = loop {
        if let Some(guard) = contender.try_acquire(TESTER_LOCK).unwrap() {
            break guard;
        }
        assert!(killed.elapsed() < Duration::from_secs(10), "the dead holder's advisory lock was not released");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(killed.elapsed() < Duration::from_secs(1), "took {:?}", killed.elapsed());
    drop(guard);
}

#[test]
fn a_refreshed_lock_survives_three_timeouts_then_its_killed_holder_loses_it_within_the_bound() {
    let (refresh, timeout) = (Duration::from_millis(500), Duration::from_secs(2));
    let setup = Setup::new("linkbased", "500ms", "2s", true);
    let mut holder = setup.holder("linkbased", "* Acquired link-based lock");
    let contender = setup.manager(LockType::LinkBased, refresh, timeout, "contender.log");
    let lock = contender.lock_path(TESTER_LOCK);
    let first_mtime = mtime(&lock);

    let start = Instant::now();
    let mut polls = 0;
    while start.elapsed() < timeout * 3 {
        assert!(
            contender.try_acquire(TESTER_LOCK).unwrap().is_none(),
            "a live, refreshed lock was taken after {:?}",
            start.elapsed()
        );
        polls += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(polls >= 50, "{polls}");
    let refreshed_for = mtime(&lock).duration_since(first_mtime).unwrap_or_default();
    assert!(refreshed_for >= timeout * 2, "the holder's refreshes only moved mtime by {refreshed_for:?}");
    let holder_log = setup.log();
    let pid = format!("pid={}", holder.child.id());
    assert!(holder_log.lines().any(|l| l.contains(&pid) && l.contains("event=acquire")), "{holder_log}");
    assert!(
        holder_log.lines().filter(|l| l.contains(&pid) && l.contains("event=refresh")).count() >= 6,
        "{holder_log}"
    );

    holder.kill_hard();
    let killed = Instant::now();
    let guard = loop {
        if let Some(guard) = contender.try_acquire(TESTER_LOCK).unwrap() {
            break guard;
        }
        assert!(killed.elapsed() < timeout + refresh + Duration::from_secs(10), "never reaped");
        std::thread::sleep(Duration::from_millis(10));
    };
    let bound = timeout + refresh + Duration::from_secs(1);
    assert!(killed.elapsed() <= bound, "took {:?}, bound {bound:?}", killed.elapsed());
    drop(guard);
}

// ------------------------------------------------------------ within one process

/// Tasks of one process contend for one name: through one manager (the
/// in-process mutex) and through separate managers (the file lock alone).
async fn tasks_never_overlap(lock_type: LockType, shared_manager: bool) {
    const TASKS: usize = 4;
    const ROUNDS: u64 = 100;
    let dir = tempfile::tempdir().unwrap();
    let settings = LockSettings {
        lock_type,
        refresh_rate: Duration::from_millis(200),
        timeout_interval: Duration::from_secs(10),
        ..LockSettings::default()
    };
    let one = LockManager::new(dir.path(), &settings).unwrap();
    let inside = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let contended = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let manager = if shared_manager { one.clone() } else { LockManager::new(dir.path(), &settings).unwrap() };
        let (inside, count, contended) = (inside.clone(), count.clone(), contended.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let guard = manager.acquire("same-name", Instant::now() + Duration::from_secs(60)).await.unwrap();
                assert!(!inside.swap(true, Ordering::SeqCst), "two tasks inside the {lock_type:?} lock");
                contended.fetch_add(u64::from(guard.contended()), Ordering::Relaxed);
                let seen = count.load(Ordering::SeqCst);
                tokio::task::yield_now().await;
                count.store(seen + 1, Ordering::SeqCst);
                inside.store(false, Ordering::SeqCst);
                guard.release().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(count.load(Ordering::SeqCst), TASKS as u64 * ROUNDS);
    assert!(contended.load(Ordering::Relaxed) > 0, "the tasks never contended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_of_one_process_never_overlap_linkbased() {
    tasks_never_overlap(LockType::LinkBased, true).await;
    tasks_never_overlap(LockType::LinkBased, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_of_one_process_never_overlap_advisory() {
    tasks_never_overlap(LockType::Advisory, true).await;
    tasks_never_overlap(LockType::Advisory, false).await;
}

// ------------------------------------------------------------ names

#[test]
fn hostile_lock_names_map_to_distinct_bounded_files_inside_the_directory() {
    let outer = tempfile::tempdir().unwrap();
    let dir = outer.path().join("locks");
    let long_a = "k".repeat(100_000);
    let long_b = format!("{}j", "k".repeat(99_999));
    let keys = [
        "../escape",
        "../../../../tmp/escape",
        "/absolute/path",
        "a/b/c",
        "a_b_c",
        "..",
        ".",
        "",
        "-leading-dash",
        ".hidden",
        "\u{1}\u{2}\u{1b}[31m\r\n\t",
        "sp ace?*[]{}$`'\"\\",
        "ünï/çødé/会话",
        long_a.as_str(),
        long_b.as_str(),
    ];
    for lock_type in [LockType::LinkBased, LockType::Advisory] {
        let m = LockManager::new(&dir, &LockSettings { lock_type, ..LockSettings::default() }).unwrap();
        let mut files = HashSet::new();
        let guards: Vec<_> = keys
            .iter()
            .map(|key| {
                let path = m.lock_path(key);
                assert_eq!(path.parent(), Some(dir.as_path()), "{key:?} escapes the directory");
                let file = path.file_name().unwrap().to_str().unwrap().to_string();
                assert!(file.len() <= names::MAX_STEM_LEN + ".flock".len(), "{file}");
                assert!(!file.starts_with('.') && !file.starts_with('-'), "{file}");
                assert!(files.insert(file.clone()), "two keys share {file}");
                m.try_acquire(key).unwrap().unwrap_or_else(|| panic!("{key:?} contends with another key"))
            })
            .collect();
        let listed: HashSet<String> =
            fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(listed, files, "{lock_type:?}: exactly one file per key, all inside the directory");
        assert_eq!(fs::read_dir(outer.path()).unwrap().count(), 1, "nothing created outside the directory");
        drop(guards);
    }
}

// ------------------------------------------------------------ locktester

#[test]
fn locktester_first_instance_holds_second_reports_support_and_interrupt_releases() {
    let setup = Setup::new("linkbased", "500ms", "5s", false);
    // First instance: shared folder from the configuration (no --path).
    let mut first = Proc::spawn("first", &["--config", setup.config(), "locktester"]);
    first.wait_for_line("* Acquired advisory lock");
    first.wait_for_line("* Acquired link-based lock");
    first.wait_for_line("Press Ctrl+C to release.");

    let mut second = Proc::spawn("second", &["locktester", "--path", setup.shared(), "--config", setup.config()]);
    let status = second.wait_exit(STARTUP);
    assert!(status.success(), "{}", second.output());
    // Exactly the lines of Workbench's admin guide, in its order, each
    // detail on a later line of its own.
    let guide: Vec<String> =
        second.stdout().into_iter().filter(|l| l.starts_with('*') || l.starts_with("Your ")).collect();
    assert_eq!(
        guide,
        [
            "* Unable to acquire advisory lock",
            "* Unable to acquire link-based lock",
            "Your filesystem appears to support advisory locks.",
            "Your filesystem appears to support link-based locks.",
        ],
        "{}",
        second.output()
    );

    first.signal(Signal::INT);
    let status = first.wait_exit(STARTUP);
    assert!(status.success(), "{status}\n{}", first.output());
    for line in [
        "Received SIGINT: releasing.",
        "* Released advisory lock",
        "* Released link-based lock",
        "Locks released cleanly.",
    ] {
        assert!(first.has_line(line), "missing {line:?}\n{}", first.output());
    }
    let left: Vec<_> = fs::read_dir(&setup.shared).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "released cleanly means nothing left: {left:?}");

    // Free again: a new instance is a first instance; SIGTERM releases too.
    let mut third = Proc::spawn("third", &["--config", setup.config(), "locktester", "--lock-type", "advisory"]);
    third.wait_for_line("* Acquired advisory lock");
    third.signal(Signal::TERM);
    assert!(third.wait_exit(STARTUP).success(), "{}", third.output());
    assert!(third.has_line("* Released advisory lock"), "{}", third.output());
    assert!(!third.stdout().iter().any(|l| l.contains("link-based")), "--lock-type restricts: {}", third.output());
}

#[test]
fn locktester_says_when_both_instances_could_take_a_lock() {
    let setup = Setup::new("linkbased", "500ms", "5s", false);
    // A live first instance on a node whose locks this one cannot see (as
    // with two different local folders behind one record).
    fs::write(setup.shared.join("locktester.instance"), "host=elsewhere\npid=1\nheld=advisory,linkbased\n").unwrap();
    let mut second = Proc::spawn("second", &["--config", setup.config(), "locktester"]);
    let status = second.wait_exit(STARTUP);
    assert!(!status.success(), "locking is broken: must fail\n{}", second.output());
    let out = second.stdout();
    assert!(
        out.iter().any(|l| l.starts_with("Another locktester instance (host elsewhere, pid 1)")),
        "{}",
        second.output()
    );
    assert!(second.has_line("* Acquired advisory lock"), "{}", second.output());
    assert!(second.has_line("  although the other instance holds it"), "{}", second.output());
    assert!(
        out.iter()
            .any(|l| l
                .starts_with("Both instances could take the link-based lock: link-based locking does NOT work here")),
        "{}",
        second.output()
    );
    assert!(out.iter().any(|l| l.contains("appears to support no lock type")), "{}", second.output());
}

#[test]
fn locktester_does_not_take_a_lock_held_by_an_unknown_process_as_proof() {
    let setup = Setup::new("linkbased", "1s", "60s", false);
    // Some other process (not a locktester) holds the link-based lock.
    let foreign = setup.manager(LockType::LinkBased, Duration::from_secs(1), Duration::from_secs(60), "foreign.log");
    let foreign_guard = foreign.try_acquire(TESTER_LOCK).unwrap().expect("free lock");
    let unknown = "  held by an unknown process, not by a locktester instance: not tested";
    let supports_linkbased = "Your filesystem appears to support link-based locks.";

    // Only that type, no instance record: nothing tested, nothing concluded.
    let mut only = Proc::spawn("only", &["--config", setup.config(), "locktester", "--lock-type", "linkbased"]);
    let status = only.wait_exit(STARTUP);
    assert!(!status.success(), "nothing was tested: must fail\n{}", only.output());
    assert!(only.has_line("* Unable to acquire link-based lock") && only.has_line(unknown), "{}", only.output());
    assert!(!only.has_line(supports_linkbased), "{}", only.output());
    assert!(!only.stdout().iter().any(|l| l.contains("held by the other locktester instance")), "{}", only.output());

    // Both types: the first instance holds what it could take...
    let mut first = Proc::spawn("first", &["--config", setup.config(), "locktester"]);
    first.wait_for_line("* Acquired advisory lock");
    first.wait_for_line(unknown);
    first.wait_for_line("Press Ctrl+C to release.");
    assert!(!first.has_line(supports_linkbased), "{}", first.output());
    // ...and the second proves only that type.
    let mut second = Proc::spawn("second", &["--config", setup.config(), "locktester"]);
    let status = second.wait_exit(STARTUP);
    assert!(status.success(), "{}", second.output());
    for line in [
        "* Unable to acquire advisory lock",
        "  held by the other locktester instance, as it should be",
        "* Unable to acquire link-based lock",
        unknown,
    ] {
        assert!(second.has_line(line), "missing {line:?}\n{}", second.output());
    }
    assert!(second.has_line("Your filesystem appears to support advisory locks."), "{}", second.output());
    assert!(!second.has_line(supports_linkbased), "{}", second.output());
    first.signal(Signal::INT);
    assert!(first.wait_exit(STARTUP).success(), "{}", first.output());
    assert!(!foreign_guard.is_lost(), "the foreign lock was left alone");
    drop(foreign_guard);
}

#[test]
fn locktester_stress_reads_the_workbench_file_locks_file() {
    let tmp = tempfile::tempdir().unwrap();
    let rstudio = tmp.path().join("rstudio");
    fs::create_dir(&rstudio).unwrap();
    fs::write(
        rstudio.join("file-locks"),
        "lock-type=advisory\nenable-logging=1\nlog-file=".to_string()
            + tmp.path().join("wb.log").to_str().unwrap()
            + "\n",
    )
    .unwrap();
    let shared = tmp.path().join("shared");
    let mut p = Proc::spawn(
        "stress",
        &[
            "--rstudio-config",
            rstudio.to_str().unwrap(),
            "locktester",
            "--path",
            shared.to_str().unwrap(),
            "--stress",
            "5",
        ],
    );
    assert!(p.wait_exit(STARTUP).success(), "{}", p.output());
    assert!(p.stdout().iter().any(|l| l.starts_with("stress: 5 rounds with the advisory lock in")), "{}", p.output());
    let log = fs::read_to_string(tmp.path().join("wb.log")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("type=advisory event=acquire")).count(), 5, "{log}");
    assert_eq!(log.lines().filter(|l| l.contains("type=advisory event=release")).count(), 5, "{log}");
}

#[test]
fn locktester_stress_stops_between_rounds_when_interrupted() {
    let setup = Setup::new("linkbased", "500ms", "5s", false);
    let mut p =
        Proc::spawn("stress", &["--config", setup.config(), "locktester", "--stress", "1000000", "--hold-ms", "2"]);
    p.wait_for_line(&format!(
        "stress: 1000000 rounds with the linkbased lock in {} (pid {})",
        setup.shared(),
        p.child.id()
    ));
    let counter = setup.shared.join("locktester-stress.counter");
    let deadline = Instant::now() + STARTUP;
    while fs::read_to_string(&counter).map_or(0, |c| c.trim().parse::<u64>().unwrap_or(0)) < 3 {
        assert!(Instant::now() < deadline, "no progress\n{}", p.output());
        std::thread::sleep(Duration::from_millis(10));
    }
    p.signal(Signal::INT);
    let status = p.wait_exit(STARTUP);
    assert!(!status.success(), "an interrupted run is not a success\n{}", p.output());
    let done: u64 = fs::read_to_string(&counter).unwrap().trim().parse().unwrap();
    assert!(p.has_line(&format!("stress: interrupted by SIGINT after {done} of 1000000 rounds")), "{}", p.output());
    let left: Vec<_> = fs::read_dir(&setup.shared)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "locktester-stress.counter")
        .collect();
    assert!(left.is_empty(), "lock or marker left behind: {left:?}");
}

//! `sessionlb locktester`: checks which lock types a shared folder supports
//! (run it on two nodes, as the same user), and `--stress` proves mutual
//! exclusion under contention (run it in several processes or on several
//! nodes at once).
//!
//! Test mode: the first instance takes a lock of each type, says which it
//! could take in the lines of Workbench's admin guide (`* Acquired advisory
//! lock`, `* Acquired link-based lock`, `* Unable to acquire advisory lock`,
//! `* Unable to acquire link-based lock`; any detail follows on its own
//! indented line, so that scripts written against the guide keep working),
//! records itself in `DIR/locktester.instance` and holds the locks until
//! SIGINT/SIGTERM. A later instance sees that record, tries each type, and
//! concludes: a type it could *not* take while the first instance holds it
//! works on this file system; a type both could take does not.
//!
//! A lock that is busy although no locktester instance records holding it
//! is held by some unknown process (a leftover lock file, another program,
//! or a file system that only pretends to lock): that proves nothing, so it
//! is reported as such and never counts as evidence that the type works.
//!
//! Anyone who can write the shared folder can plant a symbolic link at one
//! of the fixed names used here, and locktester may run as root: its files
//! are read without following links (`O_NOFOLLOW`, size-limited) and written
//! only as new files of its own renamed into place (a rename replaces a link
//! itself, never the file it points to), so it never writes through a link
//! or truncates somebody else's file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};

use sessionlb::config::{Config, LockSettings, LockType};
use sessionlb::lock::{LockError, LockGuard, LockManager, filesystem_time};

/// Options of `sessionlb locktester`.
#[derive(Debug, Args)]
pub struct LocktesterArgs {
    /// Folder on the shared storage to test (default: server-shared-storage-path).
    #[arg(long, value_name = "DIR")]
    pub path: Option<PathBuf>,
    /// Test only this lock type (default: both). With --stress, the lock
    /// type to use (default: `[locks] lock-type`).
    #[arg(long, value_name = "TYPE")]
    pub lock_type: Option<LockTypeArg>,
    /// Stress mode: ROUNDS times take the lock, check-and-create the marker
    /// DIR/locktester-stress.inside (it existing means two holders overlap),
    /// increment the counter in DIR/locktester-stress.counter, remove the
    /// marker, release. Exits non-zero if any overlap was seen. SIGINT or
    /// SIGTERM stops it between rounds.
    #[arg(long, value_name = "ROUNDS")]
    pub stress: Option<u64>,
    /// Stress mode: milliseconds to stay inside the lock each round.
    #[arg(long, value_name = "MS", default_value_t = 0, requires = "stress")]
    pub hold_ms: u64,
    /// Stress mode: give up when one acquisition waits longer than this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 120, requires = "stress")]
    pub wait_secs: u64,
}

/// A lock type on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LockTypeArg {
    Linkbased,
    Advisory,
}

impl From<LockTypeArg> for LockType {
    fn from(arg: LockTypeArg) -> LockType {
        match arg {
            LockTypeArg::Linkbased => LockType::LinkBased,
            LockTypeArg::Advisory => LockType::Advisory,
        }
    }
}

/// The lock held by test mode.
const TEST_LOCK: &str = "locktester";
/// The lock used by stress mode.
const STRESS_LOCK: &str = "locktester-stress";
const STRESS_COUNTER: &str = "locktester-stress.counter";
const STRESS_MARKER: &str = "locktester-stress.inside";
/// The first instance's record.
const INSTANCE_FILE: &str = "locktester.instance";
/// A record older than this (on the file system's clock) is left over.
const INSTANCE_FRESH: Duration = Duration::from_secs(10);
/// How often the first instance touches its record.
const INSTANCE_TOUCH: Duration = Duration::from_secs(1);

fn label(t: LockType) -> &'static str {
    match t {
        LockType::Advisory => "advisory",
        LockType::LinkBased => "link-based",
    }
}

pub async fn run(args: LocktesterArgs, config: &Config) -> anyhow::Result<()> {
    let dir = args.path.clone().unwrap_or_else(|| config.cluster.shared_storage_path.clone());
    if config.locks.enable_logging && config.locks.log_file.is_none() {
        // Lock events go to the normal log: make it visible on stderr.
        let _ = tracing_subscriber::fmt().with_writer(io::stderr).try_init();
    }
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    match args.stress {
        Some(rounds) => {
            let lock_type = args.lock_type.map_or(config.locks.lock_type, LockType::from);
            let stress = Stress {
                dir,
                rounds,
                hold: Duration::from_millis(args.hold_ms),
                wait: Duration::from_secs(args.wait_secs),
                settings: LockSettings { lock_type, ..config.locks.clone() },
            };
            stress.run().await
        }
        None => {
            let types = match args.lock_type {
                Some(t) => vec![LockType::from(t)],
                None => vec![LockType::Advisory, LockType::LinkBased],
            };
            test(&dir, &types, &config.locks).await
        }
    }
}

/// What one lock type did in this instance.
enum Attempt {
    Acquired(LockGuard),
    Busy,
    Failed(LockError),
}

/// The first instance, as recorded in its instance file.
#[derive(Debug, Default, PartialEq)]
struct OtherInstance {
    host: String,
    pid: String,
    held: Vec<String>,
}

impl OtherInstance {
    fn parse(text: &str) -> OtherInstance {
        let mut other = OtherInstance::default();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("host", v)) => other.host = v.to_string(),
                Some(("pid", v)) => other.pid = v.to_string(),
                Some(("held", v)) => other.held = v.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect(),
                _ => {}
            }
        }
        other
    }

    fn holds(&self, t: LockType) -> bool {
        self.held.iter().any(|h| h == t.as_str())
    }
}

/// Longest instance record or counter read (they hold a few short lines).
const READ_LIMIT: u64 = 4096;

/// Open `path` read-only without following a symbolic link at it (`ELOOP`).
fn open_no_follow(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32).open(path)
}

/// At most `READ_LIMIT` bytes of an open file, as text.
fn read_limited(file: &File, path: &Path) -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    file.take(READ_LIMIT).read_to_end(&mut bytes).with_context(|| format!("cannot read {}", path.display()))?;
    String::from_utf8(bytes).with_context(|| format!("{} is not text", path.display()))
}

/// Device and inode of a file locktester wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
}

impl FileIdentity {
    fn of(meta: &fs::Metadata) -> FileIdentity {
        FileIdentity { dev: meta.dev(), ino: meta.ino() }
    }
}

/// Put `contents` at `path` as a new file of our own: written to a fresh
/// name beside it (`O_EXCL`: never an existing file or link), then renamed
/// over `path`. Whatever was at `path` — a link, someone else's file — is
/// replaced as a name, never written through or truncated.
fn replace_file(path: &Path, contents: &[u8]) -> io::Result<FileIdentity> {
    let name = path.file_name().map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let temp = path.with_file_name(format!(".{name}.{}-{:016x}", std::process::id(), rand::random::<u64>()));
    let written = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o644).open(&temp)?;
        file.write_all(contents)?;
        let id = FileIdentity::of(&file.metadata()?);
        drop(file);
        fs::rename(&temp, path)?;
        Ok(id)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

/// This instance's record in the shared folder.
struct InstanceRecord {
    path: PathBuf,
    id: FileIdentity,
}

impl InstanceRecord {
    fn write(dir: &Path, text: &str) -> anyhow::Result<InstanceRecord> {
        let path = dir.join(INSTANCE_FILE);
        let id = replace_file(&path, text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(InstanceRecord { path, id })
    }

    /// Whether the record's name still names the file we wrote.
    fn is_ours(&self, file: &File) -> bool {
        file.metadata().is_ok_and(|m| FileIdentity::of(&m) == self.id)
    }

    /// Keep the record fresh (file-system clock) for later instances; a
    /// file that is no longer ours is left alone.
    fn touch(&self) {
        if let Ok(f) = open_no_follow(&self.path)
            && self.is_ours(&f)
        {
            let now = rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW };
            let _ = rustix::fs::futimens(&f, &rustix::fs::Timestamps { last_access: now, last_modification: now });
        }
    }

    /// Remove the record if it is still ours.
    fn remove(self) {
        if fs::symlink_metadata(&self.path).is_ok_and(|m| FileIdentity::of(&m) == self.id) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A fresh record of another instance in `dir`, if any.
fn other_instance(dir: &Path) -> anyhow::Result<Option<OtherInstance>> {
    let path = dir.join(INSTANCE_FILE);
    let file = match open_no_follow(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let modified =
        file.metadata().and_then(|m| m.modified()).with_context(|| format!("cannot read {}", path.display()))?;
    let now = filesystem_time(dir)?;
    if now.duration_since(modified).unwrap_or(Duration::ZERO) >= INSTANCE_FRESH {
        return Ok(None);
    }
    let text = read_limited(&file, &path)?;
    Ok(Some(OtherInstance::parse(&text)))
}

async fn test(dir: &Path, types: &[LockType], settings: &LockSettings) -> anyhow::Result<()> {
    // Handle the signals before holding anything, so that an interrupt at
    // any point releases cleanly.
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
    println!("Testing lock types in {} (host {host}, pid {})", dir.display(), std::process::id());
    let other = other_instance(dir)?;
    if let Some(o) = &other {
        println!("Another locktester instance (host {}, pid {}) holds: {}", o.host, o.pid, o.held.join(", "));
    }
    let mut attempts = Vec::new();
    for &t in types {
        let manager = LockManager::new(dir, &LockSettings { lock_type: t, ..settings.clone() })?;
        let attempt = match manager.try_acquire(TEST_LOCK) {
            Ok(Some(guard)) => Attempt::Acquired(guard),
            Ok(None) => Attempt::Busy,
            Err(e) => Attempt::Failed(e),
        };
        attempts.push((t, attempt));
    }
    // Without a record this is the first instance, even if a lock is busy:
    // only a recorded instance's locks make a busy lock meaningful.
    match &other {
        None => first_instance(dir, attempts, &mut interrupt, &mut terminate).await,
        Some(other) => later_instance(dir, attempts, other).await,
    }
}

/// Why a lock was busy although no locktester instance records holding it.
const HELD_BY_UNKNOWN: &str = "held by an unknown process, not by a locktester instance: not tested";

async fn first_instance(
    dir: &Path,
    attempts: Vec<(LockType, Attempt)>,
    interrupt: &mut tokio::signal::unix::Signal,
    terminate: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    let mut held = Vec::new();
    let mut failed = Vec::new();
    let mut busy_unknown = false;
    for (t, attempt) in attempts {
        match attempt {
            Attempt::Acquired(guard) => held.push((t, guard)),
            Attempt::Failed(e) => failed.push((t, e.to_string())),
            Attempt::Busy => {
                busy_unknown = true;
                failed.push((t, HELD_BY_UNKNOWN.to_string()));
            }
        }
    }
    if held.is_empty() {
        for (t, why) in &failed {
            println!("{}", unable(*t));
            println!("  {why}");
        }
        if busy_unknown {
            println!(
                "No lock type could be acquired in {}, and none was tested: remove leftover lock files (or stop the process holding them) and try again.",
                dir.display()
            );
            bail!("the locks in {} are held by an unknown process", dir.display());
        }
        println!("No lock type could be acquired in {}: locking does not work there.", dir.display());
        bail!("no lock type works in {}", dir.display());
    }
    let held_names: Vec<&str> = held.iter().map(|(t, _)| t.as_str()).collect();
    let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
    let record = InstanceRecord::write(
        dir,
        &format!("host={host}\npid={}\nheld={}\n", std::process::id(), held_names.join(",")),
    )?;
    for (t, _) in &held {
        println!("{}", acquired(*t));
    }
    for (t, why) in &failed {
        println!("{}", unable(*t));
        println!("  {why}");
    }
    println!(
        "Holding the lock{}. Now run `sessionlb locktester --path {}` on another node, as the same user.",
        if held.len() == 1 { "" } else { "s" },
        dir.display()
    );
    println!("Press Ctrl+C to release.");

    let mut touch = tokio::time::interval(INSTANCE_TOUCH);
    let signal_name = loop {
        tokio::select! {
            _ = interrupt.recv() => break "SIGINT",
            _ = terminate.recv() => break "SIGTERM",
            _ = touch.tick() => record.touch(),
        }
    };
    println!("Received {signal_name}: releasing.");
    record.remove();
    let mut clean = true;
    for (t, guard) in held {
        let lost = guard.is_lost();
        match guard.release().await {
            Ok(()) if !lost => println!("* Released {} lock", label(t)),
            Ok(()) => {
                clean = false;
                println!("* The {} lock had been lost while held (it was not refreshed in time)", label(t));
            }
            Err(e) => {
                clean = false;
                println!("* Could not release {} lock: {e}", label(t));
            }
        }
    }
    if !clean {
        bail!("the locks were not released cleanly");
    }
    println!("Locks released cleanly.");
    Ok(())
}

/// The conclusion lines of a later instance, and whether any type works.
fn conclude(results: &[(LockType, Outcome)]) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let works: Vec<LockType> = results.iter().filter(|(_, o)| *o == Outcome::Excluded).map(|(t, _)| *t).collect();
    let broken: Vec<LockType> = results.iter().filter(|(_, o)| *o == Outcome::BothAcquired).map(|(t, _)| *t).collect();
    for t in &works {
        lines.push(format!("Your filesystem appears to support {} locks.", label(*t)));
    }
    for t in &broken {
        lines.push(format!(
            "Both instances could take the {} lock: {} locking does NOT work here (or the two instances do not see the same folder).",
            label(*t),
            label(*t)
        ));
    }
    if works.is_empty() {
        lines.push(
            "Your filesystem appears to support no lock type: sessionlb cannot serialise session creation here.".into(),
        );
    }
    (lines, !works.is_empty())
}

/// What a later instance learned about one lock type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Held by the other instance, and we could not take it: it works.
    Excluded,
    /// Held by the other instance, yet we took it too: broken.
    BothAcquired,
    /// The other instance does not hold it, so nothing was tested.
    Untested,
    /// Busy, but the other instance does not hold it: some unknown process
    /// does, which proves nothing.
    HeldByUnknown,
    /// Taking it failed with an error: not supported.
    Error,
}

/// `* Acquired advisory lock`, as in Workbench's admin guide.
fn acquired(t: LockType) -> String {
    format!("* Acquired {} lock", label(t))
}

/// `* Unable to acquire link-based lock`, as in Workbench's admin guide.
fn unable(t: LockType) -> String {
    format!("* Unable to acquire {} lock", label(t))
}

/// What one attempt of a later instance means, and the lines it prints:
/// the admin guide's line, then any detail indented on the next.
fn judge(t: LockType, attempt: &Attempt, other: &OtherInstance) -> (Vec<String>, Outcome) {
    let other_holds = other.holds(t);
    let (line, detail, outcome) = match attempt {
        Attempt::Busy if other_holds => {
            (unable(t), "held by the other locktester instance, as it should be".to_string(), Outcome::Excluded)
        }
        // Busy, but not by the recorded instance: proves nothing.
        Attempt::Busy => (unable(t), HELD_BY_UNKNOWN.to_string(), Outcome::HeldByUnknown),
        Attempt::Failed(e) => (unable(t), e.to_string(), Outcome::Error),
        Attempt::Acquired(_) if other_holds => {
            (acquired(t), "although the other instance holds it".to_string(), Outcome::BothAcquired)
        }
        Attempt::Acquired(_) => {
            (acquired(t), "the other instance does not hold one: not tested".to_string(), Outcome::Untested)
        }
    };
    (vec![line, format!("  {detail}")], outcome)
}

async fn later_instance(dir: &Path, attempts: Vec<(LockType, Attempt)>, other: &OtherInstance) -> anyhow::Result<()> {
    let mut results = Vec::new();
    for (t, attempt) in attempts {
        let (lines, outcome) = judge(t, &attempt, other);
        for line in lines {
            println!("{line}");
        }
        if let Attempt::Acquired(guard) = attempt {
            guard.release().await?;
        }
        results.push((t, outcome));
    }
    let (lines, any_works) = conclude(&results);
    for line in &lines {
        println!("{line}");
    }
    if !any_works {
        bail!("no lock type works in {}", dir.display());
    }
    Ok(())
}

/// `--stress`: rounds of lock, check marker, increment, unlock.
struct Stress {
    dir: PathBuf,
    rounds: u64,
    hold: Duration,
    wait: Duration,
    settings: LockSettings,
}

impl Stress {
    async fn run(&self) -> anyhow::Result<()> {
        let manager = LockManager::new(&self.dir, &self.settings)?;
        let counter = self.dir.join(STRESS_COUNTER);
        let marker = self.dir.join(STRESS_MARKER);
        let kind = self.settings.lock_type.as_str();
        println!(
            "stress: {} rounds with the {kind} lock in {} (pid {})",
            self.rounds,
            self.dir.display(),
            std::process::id()
        );
        // An interrupt ends the run between rounds, never inside the lock.
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut interrupted = None;
        let mut done = 0u64;
        let start = Instant::now();
        let (mut overlaps, mut contended, mut total_wait, mut max_wait) = (0u64, 0u64, Duration::ZERO, Duration::ZERO);
        for round in 1..=self.rounds {
            let acquire = manager.acquire(STRESS_LOCK, Instant::now() + self.wait);
            let guard = tokio::select! {
                biased;
                _ = interrupt.recv() => { interrupted = Some("SIGINT"); break }
                _ = terminate.recv() => { interrupted = Some("SIGTERM"); break }
                acquired = acquire => acquired.with_context(|| format!("round {round}"))?,
            };
            contended += u64::from(guard.contended());
            total_wait += guard.waited();
            max_wait = max_wait.max(guard.waited());
            let entered = match OpenOptions::new().write(true).create_new(true).open(&marker) {
                Ok(_) => true,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    overlaps += 1;
                    eprintln!(
                        "stress: OVERLAP in round {round}: {} exists: another holder is inside the lock",
                        marker.display()
                    );
                    false
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", marker.display()));
                }
            };
            let value = read_counter(&counter)?;
            replace_file(&counter, format!("{}\n", value + 1).as_bytes())
                .with_context(|| format!("cannot write {}", counter.display()))?;
            if !self.hold.is_zero() {
                tokio::time::sleep(self.hold).await;
            }
            if entered {
                match fs::remove_file(&marker) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        overlaps += 1;
                        eprintln!(
                            "stress: OVERLAP in round {round}: {} vanished: another holder was inside the lock",
                            marker.display()
                        );
                    }
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot remove {}", marker.display()));
                    }
                }
            }
            if guard.is_lost() {
                eprintln!("stress: round {round}: the lock was lost while held");
            }
            guard.release().await.with_context(|| format!("round {round}"))?;
            done = round;
        }
        let elapsed = start.elapsed();
        let rate = done as f64 / elapsed.as_secs_f64().max(f64::EPSILON);
        let mean_ms = if done == 0 { 0.0 } else { total_wait.as_secs_f64() * 1e3 / done as f64 };
        if let Some(signal) = interrupted {
            println!("stress: interrupted by {signal} after {done} of {} rounds", self.rounds);
        }
        println!(
            "stress: {done} rounds in {:.3} s: {rate:.1} acquisitions/s; wait mean {mean_ms:.3} ms, max {:.3} ms; contended {contended}; overlaps seen {overlaps}",
            elapsed.as_secs_f64(),
            max_wait.as_secs_f64() * 1e3
        );
        if overlaps > 0 {
            bail!("{overlaps} overlaps: {kind} locks did not exclude each other in {}", self.dir.display());
        }
        if let Some(signal) = interrupted {
            bail!("interrupted by {signal}");
        }
        Ok(())
    }
}

fn read_counter(path: &Path) -> anyhow::Result<u64> {
    let text = match open_no_follow(path) {
        Ok(file) => read_limited(&file, path)?,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    if text.trim().is_empty() {
        return Ok(0);
    }
    text.trim().parse().with_context(|| format!("{} does not hold a number: {text:?}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conclusions_name_working_broken_and_missing_lock_types() {
        let (lines, ok) =
            conclude(&[(LockType::Advisory, Outcome::Excluded), (LockType::LinkBased, Outcome::Excluded)]);
        assert!(ok);
        assert_eq!(
            lines,
            [
                "Your filesystem appears to support advisory locks.",
                "Your filesystem appears to support link-based locks."
            ]
        );
        let (lines, ok) = conclude(&[(LockType::Advisory, Outcome::Error), (LockType::LinkBased, Outcome::Excluded)]);
        assert!(ok);
        assert_eq!(lines, ["Your filesystem appears to support link-based locks."]);
        let (lines, ok) =
            conclude(&[(LockType::Advisory, Outcome::BothAcquired), (LockType::LinkBased, Outcome::Error)]);
        assert!(!ok);
        assert!(
            lines[0].starts_with("Both instances could take the advisory lock: advisory locking does NOT work here"),
            "{lines:?}"
        );
        assert!(lines[1].contains("support no lock type"), "{lines:?}");
        let (lines, ok) = conclude(&[(LockType::Advisory, Outcome::Untested)]);
        assert!(!ok);
        assert_eq!(lines.len(), 1);
    }

    #[test]
    fn only_a_lock_the_other_instance_holds_can_prove_exclusion() {
        let other = OtherInstance::parse("host=n1\npid=42\nheld=advisory\n");
        let (lines, outcome) = judge(LockType::Advisory, &Attempt::Busy, &other);
        assert_eq!(
            lines,
            ["* Unable to acquire advisory lock", "  held by the other locktester instance, as it should be"]
        );
        assert_eq!(outcome, Outcome::Excluded);
        // Busy, but the recorded instance does not hold it: an unknown holder.
        let (lines, outcome) = judge(LockType::LinkBased, &Attempt::Busy, &other);
        assert_eq!(
            lines,
            [
                "* Unable to acquire link-based lock",
                "  held by an unknown process, not by a locktester instance: not tested"
            ]
        );
        assert_eq!(outcome, Outcome::HeldByUnknown);
        let (lines, ok) =
            conclude(&[(LockType::Advisory, Outcome::HeldByUnknown), (LockType::LinkBased, Outcome::HeldByUnknown)]);
        assert!(!ok, "{lines:?}");
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("Your filesystem appears to support no lock type"), "{lines:?}");
    }

    #[test]
    fn instance_records_parse() {
        let o = OtherInstance::parse("host=n1\npid=42\nheld=advisory,linkbased\n");
        assert_eq!(o.host, "n1");
        assert_eq!(o.pid, "42");
        assert!(o.holds(LockType::Advisory) && o.holds(LockType::LinkBased));
        assert!(!OtherInstance::parse("held=advisory\n").holds(LockType::LinkBased));
    }

    /// A file outside the shared folder, and a symlink to it planted at `name` inside it.
    fn plant_link(dir: &Path, name: &str, victim_text: &str) -> (tempfile::TempDir, PathBuf) {
        let elsewhere = tempfile::tempdir().unwrap();
        let victim = elsewhere.path().join("victim");
        fs::write(&victim, victim_text).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join(name)).unwrap();
        (elsewhere, victim)
    }

    #[tokio::test]
    async fn stress_never_writes_through_a_link_planted_at_the_counter() {
        let dir = tempfile::tempdir().unwrap();
        let (_elsewhere, victim) = plant_link(dir.path(), STRESS_COUNTER, "41\n");
        let stress = Stress {
            dir: dir.path().to_path_buf(),
            rounds: 2,
            hold: Duration::ZERO,
            wait: Duration::from_secs(5),
            settings: LockSettings { lock_type: LockType::Advisory, ..LockSettings::default() },
        };
        let err = stress.run().await.expect_err("a link at the counter is refused");
        assert!(format!("{err:#}").contains(STRESS_COUNTER), "{err:#}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "41\n", "the link's target was written");
    }

    #[test]
    fn replacing_a_file_replaces_a_planted_link_not_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let (_elsewhere, victim) = plant_link(dir.path(), STRESS_COUNTER, "precious");
        let path = dir.path().join(STRESS_COUNTER);
        replace_file(&path, b"1\n").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_file());
        assert_eq!(read_counter(&path).unwrap(), 1);
        // No temporary file is left beside it.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn the_instance_record_never_follows_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let forged = "host=evil\npid=1\nheld=advisory,linkbased\n";
        let (_elsewhere, victim) = plant_link(dir.path(), INSTANCE_FILE, forged);
        // A later instance does not read through the link (as root it could
        // read any file); it reports it.
        let err = other_instance(dir.path()).expect_err("a link at the record is refused");
        assert!(format!("{err:#}").contains(INSTANCE_FILE), "{err:#}");
        // The first instance replaces the link with its own record.
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        File::options().write(true).open(&victim).unwrap().set_modified(old).unwrap();
        let record = InstanceRecord::write(dir.path(), "host=n1\npid=2\nheld=advisory\n").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), forged);
        record.touch();
        assert_eq!(fs::metadata(&victim).unwrap().modified().unwrap(), old, "the link's target was touched");
        assert_eq!(other_instance(dir.path()).unwrap().unwrap().pid, "2");
        // A record that is no longer ours (replaced by a link again) is
        // neither touched through nor removed.
        let path = dir.path().join(INSTANCE_FILE);
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        record.touch();
        assert_eq!(fs::metadata(&victim).unwrap().modified().unwrap(), old);
        record.remove();
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
        assert_eq!(fs::read_to_string(&victim).unwrap(), forged);
    }

    #[test]
    fn counters_read_missing_and_empty_as_zero() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        assert_eq!(read_counter(&p).unwrap(), 0);
        fs::write(&p, "").unwrap();
        assert_eq!(read_counter(&p).unwrap(), 0);
        fs::write(&p, "41\n").unwrap();
        assert_eq!(read_counter(&p).unwrap(), 41);
        fs::write(&p, "x").unwrap();
        assert!(read_counter(&p).is_err());
    }
}

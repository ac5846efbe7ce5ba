//! The `custom` balancer: runs an external plug-in program and falls back
//! to `sessions` when the plug-in cannot answer.
//!
//! The protocol (documented for plug-in authors in `plugins/README.md`):
//! - the program is `custom-balancer-command` (default
//!   `/usr/lib/rstudio-server/bin/rserver-balancer`), run without arguments
//!   in its own process group, with sessionlb's environment plus
//!   `RSTUDIO_USERNAME` (the user, empty when anonymous) and `RSTUDIO_NODES`
//!   (the candidates' `host:port`, comma-separated, in id order);
//! - its stdin gets one line of JSON ([`PluginInput`]), then end of file;
//! - it prints the chosen node's id or `host:port` on the first non-blank
//!   line of stdout (surrounding whitespace ignored) and exits 0;
//! - a timeout (`custom-balancer-timeout`), a failure to start, a non-zero
//!   exit, a crash, no answer or an answer naming no candidate make the
//!   balancer use `sessions` instead and say why in [`Choice::fallback`].
//!
//! It runs only for registry placements (a verified user, or a session whose
//! node failed): an anonymous pin, or a user pinned from memory while the
//! registry is down, is chosen by `sessions`'s rule without a process
//! ([`Balancer::choose_now`]). At most `custom-balancer-max-running`
//! plug-ins run at once per node; a placement past that uses `sessions`
//! (counted in `sessionlb_custom_balancer_cap_reached_total`). The plug-in's
//! environment is sessionlb's without the secrets sessionlb reads
//! ([`SCRUBBED_ENV`]).
//!
//! Guard rails: stdin is written while stdout and stderr are read, so a
//! plug-in that ignores its input or writes before reading cannot deadlock
//! us; at most [`STDOUT_LIMIT`] bytes of stdout and [`STDERR_LIMIT`] of
//! stderr are kept (the rest is read and dropped); when the plug-in exits,
//! times out or the call is abandoned, its whole process group is killed,
//! so a forked background process can neither hold the pipes open nor
//! outlive the placement.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::Semaphore;

use super::{Balancer, Candidate, Choice, PlacementRequest, SessionsBalancer};
use crate::cluster::NodeId;
use crate::metrics::METRICS;

/// Environment variables removed from the plug-in's environment: the
/// secrets sessionlb (or its PostgreSQL driver) reads.
pub const SCRUBBED_ENV: &[&str] = &[crate::config::PASSWORD_ENV, "PGPASSWORD", "PGPASSFILE"];

/// The version of the stdin JSON this build writes (`"version"`).
pub const PROTOCOL_VERSION: u32 = 1;

/// Bytes of the plug-in's stdout that are kept; more is read and dropped.
pub const STDOUT_LIMIT: usize = 64 * 1024;

/// Bytes of the plug-in's stderr that are kept for the log; more is read and dropped.
pub const STDERR_LIMIT: usize = 4 * 1024;

/// Longest answer quoted back in [`PluginError::UnknownNode`].
const QUOTED_ANSWER_LIMIT: usize = 100;

/// How often a spawn that fails with "text file busy" (the executable is
/// being replaced, or another thread briefly holds it open for writing) is
/// retried, and the first pause between tries (doubling).
const BUSY_RETRIES: u32 = 5;
const BUSY_PAUSE: Duration = Duration::from_millis(5);

/// The JSON document a plug-in reads on stdin (one line, then end of file).
#[derive(Debug, Serialize)]
pub struct PluginInput<'a> {
    /// [`PROTOCOL_VERSION`]; fields may be added without changing it.
    pub version: u32,
    /// The session key being placed.
    pub session: &'a str,
    /// The user, or `null` when anonymous.
    pub user: Option<&'a str>,
    /// The candidates, sorted by id; never empty.
    pub nodes: Vec<PluginNode<'a>>,
}

/// One candidate node as a plug-in sees it.
#[derive(Debug, Serialize)]
pub struct PluginNode<'a> {
    /// The node's registry id; printing it chooses the node.
    pub id: NodeId,
    /// `host:port`, as in `RSTUDIO_NODES`; printing it chooses the node.
    pub address: &'a str,
    /// Active sessions on the node, cluster-wide.
    pub sessions: usize,
    /// 1, 5 and 15 minute load averages; `null` where not a finite number.
    pub load: [f64; 3],
    /// CPUs of the node.
    pub cpus: u32,
}

impl<'a> PluginInput<'a> {
    /// The input for `req`.
    pub fn new(req: &PlacementRequest<'a>) -> PluginInput<'a> {
        PluginInput {
            version: PROTOCOL_VERSION,
            session: req.key,
            user: req.user,
            nodes: req
                .candidates
                .iter()
                .map(|c| PluginNode { id: c.id, address: &c.address, sessions: c.sessions, load: c.load, cpus: c.cpus })
                .collect(),
        }
    }
}

/// Why the plug-in gave no usable answer. Its `Display` is the fallback
/// reason put in [`Choice::fallback`].
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The program could not be started (missing, not executable, …).
    #[error("plug-in could not be started: {0}")]
    Spawn(#[source] io::Error),
    /// It did not finish within the configured timeout; it was killed.
    #[error("plug-in timed out after {} ms", .0.as_millis())]
    Timeout(Duration),
    /// It exited with a non-zero status.
    #[error("plug-in exited with status {code}")]
    Exited {
        /// The exit status.
        code: i32,
        /// What it wrote on stderr (see [`PluginError::stderr`]).
        stderr: String,
    },
    /// It was ended by a signal.
    #[error("plug-in was killed by signal {signal}")]
    Crashed {
        /// The signal number (0 when the status says neither code nor signal).
        signal: i32,
        /// What it wrote on stderr.
        stderr: String,
    },
    /// It exited 0 but printed nothing but whitespace.
    #[error("plug-in printed no answer")]
    NoAnswer {
        /// What it wrote on stderr.
        stderr: String,
    },
    /// Its answer is neither the id nor the `host:port` of a candidate.
    #[error("plug-in answered {answer:?}, which names no candidate")]
    UnknownNode {
        /// The answer line, trimmed, at most 100 characters.
        answer: String,
        /// What it wrote on stderr.
        stderr: String,
    },
    /// Talking to it failed (reading its output).
    #[error("plug-in output could not be read: {0}")]
    Io(#[source] io::Error),
}

impl PluginError {
    /// A short, fixed name for the kind of failure (for metrics labels).
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Spawn(_) => "spawn",
            PluginError::Timeout(_) => "timeout",
            PluginError::Exited { .. } => "exit-status",
            PluginError::Crashed { .. } => "signal",
            PluginError::NoAnswer { .. } => "no-answer",
            PluginError::UnknownNode { .. } => "unknown-node",
            PluginError::Io(_) => "io",
        }
    }

    /// What the plug-in wrote on stderr (at most [`STDERR_LIMIT`] bytes,
    /// lossily decoded), when it ran to the end.
    pub fn stderr(&self) -> &str {
        match self {
            PluginError::Exited { stderr, .. }
            | PluginError::Crashed { stderr, .. }
            | PluginError::NoAnswer { stderr }
            | PluginError::UnknownNode { stderr, .. } => stderr,
            PluginError::Spawn(_) | PluginError::Timeout(_) | PluginError::Io(_) => "",
        }
    }
}

/// Runs the plug-in at `command` for every placement (see the module doc);
/// falls back to [`SessionsBalancer`] when it fails.
#[derive(Debug, Clone)]
pub struct CustomBalancer {
    command: PathBuf,
    timeout: Duration,
    /// Plug-ins that may still start (`custom-balancer-max-running` in all).
    running: Arc<Semaphore>,
    max_running: usize,
}

impl CustomBalancer {
    /// A balancer running `command`, allowing it `timeout` per placement and
    /// at most `max_running` (at least 1) plug-ins at once.
    pub fn new(command: PathBuf, timeout: Duration, max_running: usize) -> CustomBalancer {
        let max_running = max_running.max(1);
        CustomBalancer { command, timeout, running: Arc::new(Semaphore::new(max_running)), max_running }
    }

    /// The plug-in's path.
    pub fn command(&self) -> &Path {
        &self.command
    }

    /// Run the plug-in once for `req` and return the candidate it names.
    /// Never panics on plug-in behaviour; every failure is a [`PluginError`].
    pub async fn ask(&self, req: &PlacementRequest<'_>) -> Result<NodeId, PluginError> {
        // Serialising plain data with string keys cannot fail.
        let mut input = serde_json::to_vec(&PluginInput::new(req)).unwrap_or_default();
        input.push(b'\n');
        let nodes = req.candidates.iter().map(|c| &*c.address).collect::<Vec<_>>().join(",");
        let mut command = Command::new(&self.command);
        for name in SCRUBBED_ENV {
            command.env_remove(name);
        }
        command
            .env("RSTUDIO_USERNAME", req.user.unwrap_or(""))
            .env("RSTUDIO_NODES", nodes)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);

        let mut group = ProcessGroup(None);
        let run = run_plugin(&mut command, &input, &mut group);
        let output = match tokio::time::timeout(self.timeout, run).await {
            Ok(output) => output?,
            Err(_) => return Err(PluginError::Timeout(self.timeout)),
        };
        // `group` is dropped on every path out of here, killing what is left.

        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if let Some(signal) = output.status.signal() {
            return Err(PluginError::Crashed { signal, stderr });
        }
        match output.status.code() {
            Some(0) => {}
            Some(code) => return Err(PluginError::Exited { code, stderr }),
            None => return Err(PluginError::Crashed { signal: 0, stderr }),
        }
        find_answer(&output.stdout, req.candidates, stderr).map(|c| c.id)
    }
}

#[async_trait]
impl Balancer for CustomBalancer {
    fn name(&self) -> &'static str {
        "custom"
    }

    async fn choose(&self, req: &PlacementRequest<'_>) -> Option<Choice> {
        if req.candidates.is_empty() {
            return None;
        }
        let Ok(_running) = self.running.try_acquire() else {
            METRICS.custom_balancer_cap_reached.inc();
            let fallback = SessionsBalancer::pick(req.candidates)?;
            let reason = format!("{} plug-ins already running (custom-balancer-max-running)", self.max_running);
            tracing::debug!(
                balancer = "custom",
                session = req.key,
                node_id = fallback.id,
                reason,
                "placed by sessions"
            );
            return Some(Choice { node: fallback.id, fallback: Some(reason) });
        };
        let started = Instant::now();
        match self.ask(req).await {
            Ok(node) => {
                tracing::debug!(
                    balancer = "custom",
                    session = req.key,
                    node_id = node,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "plug-in chose a node"
                );
                Some(Choice { node, fallback: None })
            }
            Err(error) => {
                let fallback = SessionsBalancer::pick(req.candidates)?;
                tracing::warn!(
                    balancer = "custom",
                    command = %self.command.display(),
                    session = req.key,
                    user = req.user.unwrap_or(""),
                    failure = error.kind(),
                    reason = %error,
                    stderr = error.stderr(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    fallback = "sessions",
                    node_id = fallback.id,
                    "custom balancer failed; placed by sessions instead"
                );
                Some(Choice { node: fallback.id, fallback: Some(error.to_string()) })
            }
        }
    }

    fn choose_now(&self, req: &PlacementRequest<'_>) -> Option<NodeId> {
        SessionsBalancer::pick_now(req)
    }
}

/// What a plug-in run produced.
struct PluginOutput {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// The plug-in's process group (its pid: it leads the group). Killed with
/// SIGKILL by [`ProcessGroup::kill`] or on drop, whichever comes first.
struct ProcessGroup(Option<rustix::process::Pid>);

impl ProcessGroup {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // ESRCH (nobody left in the group) is the normal case after a clean exit.
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Start the plug-in, feed it `input` while reading its output, wait for it
/// to exit, then kill its group so that descendants release the pipes.
async fn run_plugin(
    command: &mut Command,
    input: &[u8],
    group: &mut ProcessGroup,
) -> Result<PluginOutput, PluginError> {
    let mut child = spawn(command).await.map_err(PluginError::Spawn)?;
    // `Pid::from_raw` refuses 0; 1 would make kill(-1) signal everything, so refuse it too.
    group.0 = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .filter(|pid| *pid > 1)
        .and_then(rustix::process::Pid::from_raw);
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();

    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A plug-in may exit without reading its input: EPIPE is fine.
            if let Err(error) = stdin.write_all(input).await {
                tracing::debug!(%error, "plug-in did not take all of its input");
            }
        }
    };
    let wait = async {
        let status = child.wait().await;
        // The plug-in is gone; anything it left behind in its group goes too,
        // so that the pipes reach end of file. (The group id outlives the
        // reaped leader only while members remain, so this cannot hit a
        // stranger short of a full pid wrap-around within this instant.)
        group.kill();
        status
    };
    let (_, stdout, stderr, status) =
        tokio::join!(feed, read_limited(stdout, STDOUT_LIMIT), read_limited(stderr, STDERR_LIMIT), wait);
    Ok(PluginOutput {
        status: status.map_err(PluginError::Io)?,
        stdout: stdout.map_err(PluginError::Io)?,
        stderr: stderr.unwrap_or_default(),
    })
}

/// Spawn, retrying a few times while the executable is busy being written.
async fn spawn(command: &mut Command) -> io::Result<tokio::process::Child> {
    let mut pause = BUSY_PAUSE;
    for _ in 0..BUSY_RETRIES {
        match command.spawn() {
            Err(error) if error.kind() == io::ErrorKind::ExecutableFileBusy => {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            result => return result,
        }
    }
    command.spawn()
}

/// Read `pipe` to end of file, keeping the first `limit` bytes.
async fn read_limited<R: AsyncRead + Unpin>(pipe: Option<R>, limit: usize) -> io::Result<Vec<u8>> {
    let Some(mut pipe) = pipe else {
        return Ok(Vec::new());
    };
    let mut kept = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let read = pipe.read(&mut chunk).await?;
        if read == 0 {
            return Ok(kept);
        }
        let room = limit.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..read.min(room)]);
    }
}

/// The candidate named by the first non-blank line of `stdout`: a node id,
/// else a `host:port`, surrounding whitespace ignored.
fn find_answer<'c>(stdout: &[u8], candidates: &'c [Candidate], stderr: String) -> Result<&'c Candidate, PluginError> {
    let text = String::from_utf8_lossy(stdout);
    let answer = text.trim().lines().next().unwrap_or("").trim();
    if answer.is_empty() {
        return Err(PluginError::NoAnswer { stderr });
    }
    let found = match answer.parse::<NodeId>() {
        Ok(id) => candidates.iter().find(|c| c.id == id),
        Err(_) => candidates.iter().find(|c| &*c.address == answer),
    };
    found.ok_or_else(|| PluginError::UnknownNode { answer: answer.chars().take(QUOTED_ANSWER_LIMIT).collect(), stderr })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::balancer::test_support::candidate;

    /// Room for a plug-in to start on a loaded machine, in the tests that
    /// are not about the timeout.
    const GENEROUS: Duration = Duration::from_secs(30);

    /// Three nodes where `sessions` picks node 2 (fewest sessions), the
    /// least load per CPU is node 3 and node 1 is first.
    fn three_nodes() -> Vec<Candidate> {
        let mut nodes = vec![candidate(1, 5), candidate(2, 1), candidate(3, 7)];
        nodes[0].load = [2.0, 2.0, 2.0];
        nodes[1].load = [3.0, 3.0, 3.0];
        nodes[2].load = [0.1, 0.2, 0.3];
        nodes
    }

    fn request<'a>(user: Option<&'a str>, candidates: &'a [Candidate]) -> PlacementRequest<'a> {
        PlacementRequest { key: "3f2a9c1e", user, candidates }
    }

    fn example(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins").join(name)
    }

    /// Writes an executable script `name` with `body` into `dir`.
    fn script(dir: &tempfile::TempDir, name: &str, body: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Runs `command` for `req`; returns the choice and how long it took.
    async fn choose_with(command: PathBuf, timeout: Duration, req: &PlacementRequest<'_>) -> (Choice, Duration) {
        let balancer = CustomBalancer::new(command, timeout, 8);
        let started = Instant::now();
        let choice = balancer.choose(req).await.expect("candidates given");
        (choice, started.elapsed())
    }

    /// Asserts the plug-in `body` makes the balancer fall back to
    /// `sessions` (node 2) with `reason`.
    async fn assert_falls_back(body: &str, reason: &str) {
        let dir = tempfile::tempdir().unwrap();
        let nodes = three_nodes();
        let (choice, _) = choose_with(script(&dir, "plugin", body), GENEROUS, &request(Some("ann"), &nodes)).await;
        assert_eq!(choice, Choice { node: 2, fallback: Some(reason.to_string()) });
    }

    /// Polls until process `pid` is gone (or a zombie), for up to 10 s.
    async fn assert_process_ends(pid: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Field 3, after the parenthesised command name, is the state.
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            if stat.is_empty() || state.starts_with('Z') || state.starts_with('X') {
                return;
            }
            assert!(Instant::now() < deadline, "process {pid} still running: {stat}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn environment_and_stdin_reach_the_plugin() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().display().to_string();
        // Answers the last of RSTUDIO_NODES (node 3; `sessions` would say 2).
        let body = format!(
            "#!/bin/sh\ncat > '{out}/stdin.json'\n\
             printf '%s' \"$RSTUDIO_USERNAME\" > '{out}/user'\n\
             printf '%s' \"$RSTUDIO_NODES\" > '{out}/nodes'\n\
             printf '%s\\n' \"${{RSTUDIO_NODES##*,}}\"\n"
        );
        let plugin = script(&dir, "echo-back", &body);
        let mut nodes = three_nodes();
        nodes[2].load[2] = f64::NAN;

        let (choice, _) = choose_with(plugin.clone(), GENEROUS, &request(Some("ann"), &nodes)).await;
        assert_eq!(choice, Choice { node: 3, fallback: None });
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert_eq!(read("user"), "ann");
        assert_eq!(read("nodes"), "10.0.0.11:8787,10.0.0.12:8787,10.0.0.13:8787");
        let stdin = read("stdin.json");
        assert!(stdin.ends_with('\n') && stdin.lines().count() == 1, "{stdin:?}");
        let json: serde_json::Value = serde_json::from_str(&stdin).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "version": 1,
                "session": "3f2a9c1e",
                "user": "ann",
                "nodes": [
                    {"id": 1, "address": "10.0.0.11:8787", "sessions": 5, "load": [2.0, 2.0, 2.0], "cpus": 4},
                    {"id": 2, "address": "10.0.0.12:8787", "sessions": 1, "load": [3.0, 3.0, 3.0], "cpus": 4},
                    {"id": 3, "address": "10.0.0.13:8787", "sessions": 7, "load": [0.1, 0.2, null], "cpus": 4},
                ]
            })
        );

        // Anonymous: an empty RSTUDIO_USERNAME and `"user": null`.
        choose_with(plugin, GENEROUS, &request(None, &nodes)).await;
        assert_eq!(read("user"), "");
        let json: serde_json::Value = serde_json::from_str(&read("stdin.json")).unwrap();
        assert_eq!(json["user"], serde_json::Value::Null);
    }

    #[tokio::test]
    async fn answers_by_id_or_host_port_first_line_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = three_nodes();
        let req = request(Some("ann"), &nodes);
        for (body, node) in [
            ("#!/bin/sh\necho 3\n", 3),
            ("#!/bin/sh\nprintf '\\n  \\t1  \\r\\n2\\n'\n", 1),
            ("#!/bin/sh\nprintf '  10.0.0.13:8787 \\n10.0.0.11:8787\\n'\n", 3),
            ("#!/bin/sh\nprintf '10.0.0.11:8787'\n", 1),
        ] {
            let (choice, _) = choose_with(script(&dir, "answer", body), GENEROUS, &req).await;
            assert_eq!(choice, Choice { node, fallback: None }, "{body}");
        }
    }

    #[tokio::test]
    async fn least_loaded_example_picks_lowest_load_per_cpu() {
        let mut nodes = three_nodes();
        let (choice, _) = choose_with(example("least-loaded.py"), GENEROUS, &request(Some("ann"), &nodes)).await;
        assert_eq!(choice, Choice { node: 3, fallback: None });

        // Per CPU: node 1 has 2.0 / 16 CPUs = 0.125 < node 3's 0.2 / 1.
        nodes[0].cpus = 16;
        nodes[2].cpus = 1;
        let (choice, _) = choose_with(example("least-loaded.py"), GENEROUS, &request(None, &nodes)).await;
        assert_eq!(choice, Choice { node: 1, fallback: None });

        // Equal load per CPU: fewer sessions (node 2), then a missing
        // (null) load counts as the worst.
        for c in &mut nodes {
            c.load = [1.0, 1.0, 1.0];
            c.cpus = 4;
        }
        nodes[1].load[1] = f64::NAN;
        let (choice, _) = choose_with(example("least-loaded.py"), GENEROUS, &request(None, &nodes)).await;
        assert_eq!(choice, Choice { node: 1, fallback: None });
        nodes[1].load[1] = 1.0;
        let (choice, _) = choose_with(example("least-loaded.py"), GENEROUS, &request(None, &nodes)).await;
        assert_eq!(choice, Choice { node: 2, fallback: None });
    }

    #[tokio::test]
    async fn pin_users_example_pins_listed_users_else_first_node() {
        let nodes = three_nodes();
        let pin = |user, candidates| async move {
            choose_with(example("pin-users.sh"), GENEROUS, &request(user, candidates)).await.0
        };
        // The example pins alice to 10.0.0.13:8787 and bob to 10.0.0.12:8787.
        assert_eq!(pin(Some("alice"), &nodes).await, Choice { node: 3, fallback: None });
        assert_eq!(pin(Some("bob"), &nodes).await, Choice { node: 2, fallback: None });
        assert_eq!(pin(Some("carol"), &nodes).await, Choice { node: 1, fallback: None });
        assert_eq!(pin(None, &nodes).await, Choice { node: 1, fallback: None });
        // alice's node is not a candidate: the first one is taken.
        let without_3 = &nodes[..2];
        assert_eq!(pin(Some("alice"), without_3).await, Choice { node: 1, fallback: None });
        let only_3 = &nodes[2..];
        assert_eq!(pin(Some("bob"), only_3).await, Choice { node: 3, fallback: None });
    }

    #[tokio::test]
    async fn a_plugin_past_its_timeout_is_killed_and_sessions_used() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let body = format!("#!/bin/sh\necho $$ > '{}'\nexec sleep 30\n", pid_file.display());
        let nodes = three_nodes();
        let sleeper = script(&dir, "sleeper", &body);
        // On a very loaded machine the script may be killed before it wrote
        // its pid: then the same case again with twice the timeout, until it
        // did (it must, well before 20 s). The pid is then read for certain.
        let mut timeout = Duration::from_millis(300);
        let pid: u32 = loop {
            let _ = std::fs::remove_file(&pid_file);
            let (choice, elapsed) = choose_with(sleeper.clone(), timeout, &request(Some("ann"), &nodes)).await;
            let expected = format!("plug-in timed out after {} ms", timeout.as_millis());
            assert_eq!(choice, Choice { node: 2, fallback: Some(expected) });
            assert!(elapsed < timeout + Duration::from_secs(10), "took {elapsed:?}");
            if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse().ok()) {
                break pid;
            }
            assert!(timeout < Duration::from_secs(20), "the plug-in never got as far as writing its pid");
            timeout *= 2;
        };
        // The process that outlived its timeout (a `sleep 30` by now) is gone.
        assert_process_ends(pid).await;
    }

    #[tokio::test]
    async fn a_forked_sleeper_holding_stdout_neither_hangs_us_nor_survives() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        // The background sleep inherits stdout; waiting for end of file
        // would take 30 s (and so hit the 20 s timeout).
        let body = format!("#!/bin/sh\nsleep 30 &\necho $! > '{}'\necho 3\n", pid_file.display());
        let nodes = three_nodes();
        let (choice, elapsed) =
            choose_with(script(&dir, "forker", &body), Duration::from_secs(20), &request(Some("ann"), &nodes)).await;
        assert_eq!(choice, Choice { node: 3, fallback: None });
        assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        assert_process_ends(pid.trim().parse().unwrap()).await;
    }

    #[tokio::test]
    async fn large_input_and_output_do_not_deadlock() {
        let dir = tempfile::tempdir().unwrap();
        // 3000 candidates: ~250 KB of JSON, more than a pipe holds.
        let nodes: Vec<Candidate> = (1..=3000).map(|id| candidate(id, 10)).collect();
        let req = request(Some("ann"), &nodes);
        // Writes far more than a pipe holds to stdout and stderr before
        // reading its input.
        let chatty = "#!/bin/sh\necho 2999\ni=0\nwhile [ $i -lt 3000 ]; do\n\
             echo 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'\n\
             echo 'yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy' >&2\n\
             i=$((i+1))\ndone\ncat > /dev/null\n";
        let (choice, _) = choose_with(script(&dir, "chatty", chatty), GENEROUS, &req).await;
        assert_eq!(choice, Choice { node: 2999, fallback: None });
        // Never reads its input at all.
        let deaf = "#!/bin/sh\necho 17\n";
        let (choice, _) = choose_with(script(&dir, "deaf", deaf), GENEROUS, &req).await;
        assert_eq!(choice, Choice { node: 17, fallback: None });
    }

    #[tokio::test]
    async fn non_zero_exit_falls_back_even_with_an_answer() {
        assert_falls_back("#!/bin/sh\necho 3\nexit 1\n", "plug-in exited with status 1").await;
    }

    #[tokio::test]
    async fn a_crash_falls_back() {
        assert_falls_back("#!/bin/sh\necho 3\nkill -KILL $$\n", "plug-in was killed by signal 9").await;
    }

    #[tokio::test]
    async fn nonsense_falls_back() {
        assert_falls_back(
            "#!/bin/sh\necho 'node three, please'\n",
            "plug-in answered \"node three, please\", which names no candidate",
        )
        .await;
    }

    #[tokio::test]
    async fn an_address_or_id_not_among_the_candidates_falls_back() {
        assert_falls_back(
            "#!/bin/sh\necho 10.0.0.99:8787\n",
            "plug-in answered \"10.0.0.99:8787\", which names no candidate",
        )
        .await;
        assert_falls_back("#!/bin/sh\necho 4\n", "plug-in answered \"4\", which names no candidate").await;
    }

    #[tokio::test]
    async fn no_output_falls_back() {
        assert_falls_back("#!/bin/sh\nprintf ' \\n\\n'\n", "plug-in printed no answer").await;
    }

    #[tokio::test]
    async fn a_missing_plugin_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = three_nodes();
        let (choice, _) = choose_with(dir.path().join("rserver-balancer"), GENEROUS, &request(None, &nodes)).await;
        assert_eq!(choice.node, 2);
        let reason = choice.fallback.unwrap();
        assert!(reason.starts_with("plug-in could not be started: "), "{reason}");
    }

    #[tokio::test]
    async fn failures_keep_stderr_and_a_kind() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = three_nodes();
        let balancer = CustomBalancer::new(
            script(&dir, "plugin", "#!/bin/sh\necho 'no nodes for you' >&2\nexit 3\n"),
            GENEROUS,
            1,
        );
        let error = balancer.ask(&request(None, &nodes)).await.unwrap_err();
        assert_eq!(error.kind(), "exit-status");
        assert_eq!(error.stderr(), "no nodes for you\n");
    }

    #[tokio::test]
    async fn no_candidates_no_choice() {
        let balancer = CustomBalancer::new(example("pin-users.sh"), GENEROUS, 1);
        assert_eq!(balancer.choose(&request(None, &[])).await, None);
    }

    #[tokio::test]
    async fn past_the_cap_placements_fall_back_without_starting_a_plugin() {
        let dir = tempfile::tempdir().unwrap();
        let started = dir.path().join("started");
        // Records its start, then answers node 3 after a moment.
        let body = format!("#!/bin/sh\necho start >> '{}'\nsleep 1\necho 3\n", started.display());
        let balancer = CustomBalancer::new(script(&dir, "slow", &body), GENEROUS, 2);
        let nodes = three_nodes();
        let req = request(Some("ann"), &nodes);
        let choices = futures::future::join_all((0..10).map(|_| balancer.choose(&req))).await;
        let by_plugin = choices.iter().filter(|c| c.as_ref().unwrap().fallback.is_none()).count();
        assert_eq!(by_plugin, 2, "{choices:?}");
        for c in choices.iter().flatten().filter(|c| c.fallback.is_some()) {
            assert_eq!(c.node, 2, "the fallback is `sessions`");
            assert!(c.fallback.as_deref().unwrap().contains("custom-balancer-max-running"), "{c:?}");
        }
        let runs = std::fs::read_to_string(&started).unwrap();
        assert_eq!(runs.lines().count(), 2, "{runs:?}");
        // Once they finished, the plug-in runs again.
        let choice = balancer.choose(&request(Some("ann"), &nodes)).await.unwrap();
        assert_eq!(choice, Choice { node: 3, fallback: None });
    }

    #[test]
    fn choosing_now_never_runs_the_plugin() {
        let balancer = CustomBalancer::new(PathBuf::from("/nonexistent/plugin"), GENEROUS, 1);
        let nodes = three_nodes();
        assert_eq!(balancer.choose_now(&request(Some("ann"), &nodes)), Some(2), "sessions' choice");
        assert!(balancer.choose_now(&request(None, &nodes)).is_some());
    }
}

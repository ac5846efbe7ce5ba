//! Zero-downtime upgrade, as Pingora does it: a new process started with
//! `sessionlb serve --upgrade` takes the listening sockets (public port and
//! metrics) from the running one over a Unix socket in `run-dir`, then
//! serves; the old process, told by SIGQUIT, hands them over, stops
//! accepting, lets its open requests and tunnels run for `grace-period` and
//! exits — without marking the node `Offline`: the row stays `Online` and
//! now describes the new process (its version, its start time).
//!
//! `serve --upgrade` finds the running process through its pid file and
//! sends the SIGQUIT itself once it waits for the sockets. A SIGQUIT with no
//! new process waiting is ignored (Pingora would stop the node).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process, test_kill_process};

use crate::config::Config;

/// Why an upgrade cannot start.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("no running sessionlb for {listen} to upgrade: cannot read its pid file {path}: {source}")]
    NoPidFile {
        listen: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no running sessionlb for {listen} to upgrade: the pid file {path} names process {pid}, which is gone")]
    NotRunning { listen: String, path: String, pid: String },
}

/// `run-dir/sessionlb-<address>-<port>.<ext>`: one per node, like Pingora's files.
fn run_file(config: &Config, ext: &str) -> PathBuf {
    config.server.run_dir.join(format!("sessionlb-{}-{}.{ext}", config.node.www_address, config.node.www_port))
}

/// The pid file of the node `config` describes.
pub fn pid_file(config: &Config) -> PathBuf {
    run_file(config, "pid")
}

/// The socket the listening sockets are handed over on.
pub fn upgrade_socket(config: &Config) -> PathBuf {
    run_file(config, "upgrade.sock")
}

/// The drain marker (see [`super::drain`]).
pub fn drain_marker(config: &Config) -> PathBuf {
    run_file(config, "draining")
}

/// Record this process as the node's running process.
pub fn write_pid_file(path: &Path) {
    if let Err(e) = std::fs::write(path, format!("{}\n", std::process::id())) {
        tracing::warn!(error = %e, file = %path.display(), "cannot write the pid file; `serve --upgrade` will not find this process");
    }
}

/// Remove the pid file if it still names this process (after an upgrade it
/// names the new one).
pub fn remove_pid_file_if_ours(path: &Path) {
    if std::fs::read_to_string(path).is_ok_and(|t| t.trim() == std::process::id().to_string()) {
        let _ = std::fs::remove_file(path);
    }
}

/// The running process named by the pid file.
pub fn running_process(config: &Config) -> Result<Pid, UpgradeError> {
    let path = pid_file(config);
    let listen = format!("{}:{}", config.node.www_address, config.node.www_port);
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(|source| UpgradeError::NoPidFile {
        listen: listen.clone(),
        path: shown.clone(),
        source,
    })?;
    let pid = text.trim().parse::<i32>().ok().and_then(Pid::from_raw);
    match pid {
        Some(pid) if test_kill_process(pid).is_ok() => Ok(pid),
        _ => Err(UpgradeError::NotRunning { listen, path: shown, pid: text.trim().to_string() }),
    }
}

/// For `serve --upgrade`, before Pingora's bootstrap waits for the sockets:
/// remove a stale handover socket, then (on a thread) wait for the new one to
/// appear and send SIGQUIT to `old`.
pub fn request_handover(config: &Config, old: Pid) {
    let socket = upgrade_socket(config);
    let _ = std::fs::remove_file(&socket);
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                tracing::error!(socket = %socket.display(), "the handover socket did not appear");
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::info!(
            old_pid = old.as_raw_nonzero().get(),
            "asking the running process to hand over its sockets (SIGQUIT)"
        );
        if let Err(e) = kill_process(old, Signal::QUIT) {
            tracing::error!(error = %e, "cannot signal the running process");
        }
    });
}

/// Whether a new process waits for the sockets (a SIGQUIT is then a handover).
pub fn successor_waiting(config: &Config) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(upgrade_socket(config)).is_ok_and(|m| m.file_type().is_socket())
}

/// On SIGUSR2: start the program this process was started as (the same
/// path: a binary replaced on disk is the new version) with the same
/// arguments plus `--upgrade`. The new process is this one's child, so it
/// runs in the same systemd unit, which follows it as the main process once
/// it is ready (`MAINPID=`): `systemctl kill -s USR2 --kill-whom=main sessionlb`
/// upgrades a node under systemd without a restart.
pub async fn start_successor_on_sigusr2(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let Ok(mut usr2) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2()) else { return };
    loop {
        tokio::select! {
            _ = usr2.recv() => start_successor(),
            _ = shutdown.changed() => return,
        }
    }
}

fn start_successor() {
    let mut args = std::env::args_os();
    let Some(program) = args.next() else { return };
    let mut args: Vec<std::ffi::OsString> = args.collect();
    if !args.iter().any(|a| a == "--upgrade") {
        args.push("--upgrade".into());
    }
    match std::process::Command::new(&program).args(&args).stdin(std::process::Stdio::null()).spawn() {
        Ok(mut child) => {
            tracing::info!(program = %program.to_string_lossy(), pid = child.id(), "SIGUSR2: started the upgraded process; it takes the sockets over");
            // Reap it if it fails before this process exits (it reports why itself).
            std::thread::spawn(move || {
                if let Ok(status) = child.wait()
                    && !status.success()
                {
                    tracing::error!(%status, "the upgraded process failed; this process keeps serving");
                }
            });
        }
        Err(e) => {
            tracing::error!(error = %e, program = %program.to_string_lossy(), "SIGUSR2: cannot start the upgraded process")
        }
    }
}

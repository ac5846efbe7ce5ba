//! Configuration reload: on SIGHUP (sent by `sessionlb reload`, or by
//! systemd's `ExecReload`) the node reads its configuration again and
//! applies, without a restart and without touching open connections, every
//! setting that can change while it runs; the next request uses them.
//!
//! What reloads ([`merge`] is the one place that says so): the balancer and
//! its options, `timeout` (proxied connects, placement waits, health
//! checks), `forwarding-window`, the session idle timeout, the affinity
//! cookie's max age and `Secure` flag, every `[identity]` setting, the
//! health-check interval, thresholds and backend check, `log-level`,
//! `diagnostics`, lock logging, `drain-timeout` and the access log (which is
//! reopened: a rotated file is followed). Every other key needs a restart; a
//! reload that finds one changed says so in a warning naming the keys.
//!
//! A file that does not load (syntax, invalid value) changes nothing: the
//! error, with its file, line and key, is logged and counted. The outcome is
//! in `sessionlb_config_reloads_total{result}` and
//! `sessionlb_config_last_reload_success_timestamp_seconds`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;
use prometheus::{Gauge, IntCounterVec, IntGauge, Opts};
use rustix::process::{Pid, Signal, kill_process, test_kill_process};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use super::{access_log, systemd, upgrade};
use crate::balancer::{self, Balancer};
use crate::config::{Config, ConfigError};
use crate::lock::LockManager;
use crate::proxy::{Live, LiveSettings};

/// Re-reads the configuration from where it came from.
pub type Load = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

struct ReloadMetrics {
    reloads: IntCounterVec,
    last_success: Gauge,
    last_successful: IntGauge,
}

static METRICS: LazyLock<ReloadMetrics> = LazyLock::new(|| {
    let m = ReloadMetrics {
        reloads: IntCounterVec::new(
            Opts::new("sessionlb_config_reloads_total", "Configuration reloads, by result (ok, error)"),
            &["result"],
        )
        .expect("metric"),
        last_success: Gauge::new(
            "sessionlb_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully (start or reload), in Unix seconds",
        )
        .expect("metric"),
        last_successful: IntGauge::new(
            "sessionlb_config_last_reload_successful",
            "Whether the last configuration reload succeeded (1) or failed (0)",
        )
        .expect("metric"),
    };
    let registry = &crate::metrics::METRICS.registry;
    let _ = registry.register(Box::new(m.reloads.clone()));
    let _ = registry.register(Box::new(m.last_success.clone()));
    let _ = registry.register(Box::new(m.last_successful.clone()));
    for result in ["ok", "error"] {
        m.reloads.with_label_values(&[result]);
    }
    m
});

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Register the reload metrics; the start counts as the first successful load.
pub fn register_metrics() {
    METRICS.last_success.set(now_secs());
    METRICS.last_successful.set(1);
}

/// Every key a reload applies (the README lists them; a test checks that
/// [`merge`] takes exactly these).
pub const RELOADABLE: &[&str] = &[
    "balancer",
    "custom-balancer-command",
    "custom-balancer-timeout",
    "custom-balancer-max-running",
    "user-hash-balance-factor",
    "timeout",
    "forwarding-window",
    "forward-peer-check",
    "backend-key-failover-after",
    "status-page-cidrs",
    "request-body-idle-timeout",
    "health-check-interval",
    "health-check-rise",
    "health-check-fall",
    "health-check-backend",
    "health-check-backend-path",
    "log-level",
    "diagnostics",
    "drain-timeout",
    "access-log",
    "access-log-format",
    "sessions.session-idle-timeout",
    "sessions.affinity-cookie-max-age",
    "sessions.cookie-secure",
    "identity.rstudio-user-cookie",
    "identity.user-cookie-name",
    "identity.trusted-header",
    "identity.trusted-cidrs",
    "locks.enable-logging",
    "locks.log-file",
];

/// The configuration `started` runs with after `new` was read: `started`
/// with every setting that can change without a restart taken from `new`.
/// The keys that still differ from `new` need a restart.
pub fn merge(started: &Config, new: &Config) -> Config {
    let mut c = started.clone();
    c.balancer = new.balancer.clone();
    c.proxy.timeout = new.proxy.timeout;
    c.proxy.forwarding_window = new.proxy.forwarding_window;
    c.proxy.forward_peer_check = new.proxy.forward_peer_check;
    c.cluster.backend_key_failover_after = new.cluster.backend_key_failover_after;
    c.proxy.status_page_cidrs = new.proxy.status_page_cidrs.clone();
    c.server.request_body_idle_timeout = new.server.request_body_idle_timeout;
    c.sessions.idle_timeout = new.sessions.idle_timeout;
    c.sessions.affinity_cookie_max_age = new.sessions.affinity_cookie_max_age;
    c.sessions.cookie_secure = new.sessions.cookie_secure;
    c.identity = new.identity.clone();
    c.cluster.health_check_interval = new.cluster.health_check_interval;
    c.cluster.health_check_rise = new.cluster.health_check_rise;
    c.cluster.health_check_fall = new.cluster.health_check_fall;
    c.cluster.backend_health_check = new.cluster.backend_health_check.clone();
    c.server.log_level = new.server.log_level.clone();
    c.server.diagnostics = new.server.diagnostics;
    c.server.drain_timeout = new.server.drain_timeout;
    c.server.access_log = new.server.access_log.clone();
    c.server.access_log_format = new.server.access_log_format;
    c.locks.enable_logging = new.locks.enable_logging;
    c.locks.log_file = new.locks.log_file.clone();
    c.files = new.files.clone();
    c.sources = new.sources.clone();
    c.warnings = new.warnings.clone();
    c
}

/// The keys whose values differ between `a` and `b`, in rendering order.
pub fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    let before: BTreeMap<String, String> = a.effective_values().into_iter().collect();
    b.effective_values().into_iter().filter(|(k, v)| before.get(k) != Some(v)).map(|(k, _)| k).collect()
}

/// What one reload did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Keys applied now.
    pub applied: Vec<String>,
    /// Keys changed in the files that keep their old value until a restart.
    pub restart_needed: Vec<String>,
}

/// A reload failed; the running configuration is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Apply(String),
}

/// Everything a reload changes in the running node.
pub struct Reloader {
    pub load: Load,
    /// The configuration the node started with.
    pub started: Arc<Config>,
    /// What requests read.
    pub live: Live,
    pub balancer: Arc<RwLock<Arc<dyn Balancer>>>,
    pub locks: LockManager,
    pub access_log: access_log::AccessLog,
    /// The configuration in effect, for the control-plane tasks (health
    /// checks, idle-session expiry, drain).
    pub current: watch::Sender<Arc<Config>>,
}

impl Reloader {
    /// Read the configuration again and apply what can change; log and
    /// count the outcome.
    pub fn reload(&self) -> Result<Outcome, ReloadError> {
        let result = (self.load)().map_err(ReloadError::from).and_then(|new| self.apply(new));
        match &result {
            Ok(outcome) => {
                METRICS.reloads.with_label_values(&["ok"]).inc();
                METRICS.last_success.set(now_secs());
                METRICS.last_successful.set(1);
                let files = self.files();
                tracing::info!(
                    files = %files,
                    changed = %outcome.applied.join(", "),
                    balancer = self.balancer.read().name(),
                    "configuration reloaded{}",
                    if outcome.applied.is_empty() { ": nothing changed" } else { "" }
                );
                if !outcome.restart_needed.is_empty() {
                    tracing::warn!(
                        keys = %outcome.restart_needed.join(", "),
                        "{} changed in {files}: restart needed (the running node keeps the old value)",
                        outcome.restart_needed.join(", ")
                    );
                }
            }
            Err(e) => {
                METRICS.reloads.with_label_values(&["error"]).inc();
                METRICS.last_successful.set(0);
                tracing::error!(error = %e, "configuration reload failed; keeping the running configuration");
            }
        }
        result
    }

    fn files(&self) -> String {
        let files = &self.live.load().config.files;
        if files.is_empty() {
            "the built-in defaults".to_string()
        } else {
            files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
        }
    }

    /// Apply a configuration that loaded. The steps that can fail run first
    /// and are undone if a later one fails: nothing is half applied.
    fn apply(&self, new: Config) -> Result<Outcome, ReloadError> {
        let current = self.live.load().config.clone();
        let merged = Arc::new(merge(&self.started, &new));
        let outcome = Outcome { applied: changed_keys(&current, &merged), restart_needed: changed_keys(&merged, &new) };
        let locks_changed = current.locks != merged.locks;
        if locks_changed {
            self.locks.set_logging(&merged.locks).map_err(|e| ReloadError::Apply(format!("[locks] log-file: {e}")))?;
        }
        let undo_locks = || {
            if locks_changed {
                let _ = self.locks.set_logging(&current.locks);
            }
        };
        if let Err(e) = self.access_log.reopen(&merged.server) {
            undo_locks();
            return Err(ReloadError::Apply(e));
        }
        match crate::telemetry::reload(&merged.server) {
            Ok(changes) => {
                if let Some(file) = changes.diagnostics_file {
                    tracing::info!(file = %file.display(), "node-communication diagnostics are written to this file");
                }
            }
            Err(e) => {
                undo_locks();
                let _ = self.access_log.reopen(&current.server);
                return Err(ReloadError::Apply(format!("log-level / diagnostics: {e}")));
            }
        }
        *self.balancer.write() = balancer::build(&merged.balancer);
        self.live.store(Arc::new(LiveSettings::new(merged.clone())));
        self.current.send_replace(merged);
        Ok(outcome)
    }
}

/// Reload on every SIGHUP until `shutdown`.
pub async fn reload_on_sighup(reloader: Reloader, mut shutdown: watch::Receiver<bool>) {
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot handle SIGHUP; configuration reload is off");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            _ = shutdown.changed() => return,
        }
        systemd::notify("STATUS=reloading the configuration");
        let reloader = &reloader;
        // Reading files (and a Workbench directory) blocks: off the workers.
        let _ = tokio::task::block_in_place(|| reloader.reload());
        systemd::notify("STATUS=running");
    }
}

/// `sessionlb reload` could not signal a node.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error(
        "no sessionlb is running for {listen}: cannot read its pid file {path} ({source}); is the node started with the same configuration (run-dir, www-address, www-port)?"
    )]
    NoPidFile {
        listen: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no sessionlb is running for {listen}: the pid file {path} names process {pid}, which is gone")]
    NotRunning { listen: String, path: PathBuf, pid: String },
    #[error("cannot signal sessionlb (process {pid}): {source}")]
    Signal {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
}

/// Send SIGHUP to the node `config` describes (found through its pid file
/// in `run-dir`, as `serve --upgrade` finds it). Returns its process id.
pub fn signal_running(config: &Config) -> Result<i32, SignalError> {
    let path = upgrade::pid_file(config);
    let listen = config.listen_address().to_string();
    let text = std::fs::read_to_string(&path).map_err(|source| SignalError::NoPidFile {
        listen: listen.clone(),
        path: path.clone(),
        source,
    })?;
    let pid = text.trim().parse::<i32>().ok().and_then(Pid::from_raw).filter(|p| test_kill_process(*p).is_ok());
    let Some(pid) = pid else {
        return Err(SignalError::NotRunning { listen, path, pid: text.trim().to_string() });
    };
    let raw = pid.as_raw_nonzero().get();
    kill_process(pid, Signal::HUP).map_err(|e| SignalError::Signal { pid: raw, source: e.into() })?;
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;

    fn config(toml: &str) -> Config {
        Config::from_toml(Path::new("/etc/sessionlb/sessionlb.toml"), toml).unwrap()
    }

    #[test]
    fn live_keys_apply_and_the_others_need_a_restart() {
        let started = config("www-port = 8787\nbalancer = \"sessions\"\n");
        let new = config(
            "www-port = 9000\nbalancer = \"user-hash\"\nlog-level = \"debug\"\npool-size = 7\n\
             [identity]\ntrusted-cidrs = [\"10.0.0.0/8\"]\ntrusted-header = \"X-User\"\n\
             [sessions]\nsession-idle-timeout = \"5m\"\n",
        );
        let merged = merge(&started, &new);
        let applied = changed_keys(&started, &merged);
        let restart = changed_keys(&merged, &new);
        for key in ["balancer", "log-level", "identity.trusted-cidrs", "identity.trusted-header"] {
            assert!(applied.contains(&key.to_string()), "{key} not applied: {applied:?}");
        }
        assert!(applied.contains(&"sessions.session-idle-timeout".to_string()), "{applied:?}");
        assert_eq!(restart, vec!["www-port".to_string(), "pool-size".to_string()]);
        assert_eq!(merged.sessions.idle_timeout, Duration::from_secs(300));
        assert_eq!(merged.node.www_port, 8787, "the listen port stays until a restart");
    }

    #[test]
    fn merge_takes_exactly_the_reloadable_keys() {
        let started = config("");
        let new = config(
            "balancer = \"custom\"\ncustom-balancer-command = \"/usr/local/bin/place\"\n\
             custom-balancer-timeout = \"3s\"\ncustom-balancer-max-running = 9\nuser-hash-balance-factor = 2.5\n\
             timeout = \"7s\"\nforwarding-window = \"90s\"\nhealth-check-interval = \"9s\"\n\
             forward-peer-check = false\nbackend-key-failover-after = \"5m\"\nstatus-page-cidrs = [\"10.0.0.0/8\"]\nrequest-body-idle-timeout = \"5m\"\n\
             health-check-rise = 4\nhealth-check-fall = 5\nhealth-check-backend = \"http\"\n\
             health-check-backend-path = \"/ping\"\nlog-level = \"debug\"\ndiagnostics = \"stderr\"\n\
             drain-timeout = \"1m\"\naccess-log = \"stdout\"\naccess-log-format = \"json\"\n\
             [sessions]\nsession-idle-timeout = \"1h\"\naffinity-cookie-max-age = \"2h\"\ncookie-secure = true\n\
             [identity]\nrstudio-user-cookie = false\nuser-cookie-name = \"who\"\ntrusted-header = \"X-User\"\n\
             trusted-cidrs = [\"10.0.0.0/8\"]\n\
             [locks]\nenable-logging = true\nlog-file = \"/var/log/sessionlb/locks.log\"\n",
        );
        let mut applied = changed_keys(&started, &merge(&started, &new));
        let mut expected: Vec<String> = RELOADABLE.iter().map(|k| k.to_string()).collect();
        applied.sort();
        expected.sort();
        assert_eq!(applied, expected, "a key changed above is not applied, or RELOADABLE is out of date");
        assert!(changed_keys(&merge(&started, &new), &new).is_empty());
        // Nothing else is taken: every other key changed needs a restart.
        let other = config(
            "www-port = 9\nbackend = \"127.0.0.1:1\"\nthreads = 3\nlog-format = \"json\"\n\
             metrics-address = \"\"\n[sessions]\naffinity-cookie-name = \"x\"\n[locks]\nlock-type = \"advisory\"\n",
        );
        assert!(changed_keys(&started, &merge(&started, &other)).is_empty());
        assert_eq!(changed_keys(&started, &other).len(), 7);
    }
}

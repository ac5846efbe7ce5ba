//! The settings types: what a validated configuration holds, grouped by the
//! part of the program that reads it. Plain data; `schema.rs` fills it in and
//! `render.rs` prints it back.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use super::database::DatabaseUrl;

/// How new sessions are placed (`balancer=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalancerKind {
    Sessions,
    SystemLoad,
    UserHash,
    Custom,
}

impl BalancerKind {
    pub const CHOICES: &[(&str, BalancerKind)] = &[
        ("sessions", BalancerKind::Sessions),
        ("system-load", BalancerKind::SystemLoad),
        ("user-hash", BalancerKind::UserHash),
        ("custom", BalancerKind::Custom),
    ];

    pub fn as_str(self) -> &'static str {
        Self::CHOICES.iter().find(|(_, k)| *k == self).map(|(n, _)| *n).unwrap_or("sessions")
    }
}

/// Where node-communication diagnostics go (`diagnostics=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Diagnostics {
    Off,
    /// A file `sessionlb-diagnostics-<pid>.log` under the temp folder.
    Tmp,
    Stderr,
}

impl Diagnostics {
    pub const CHOICES: &[(&str, Diagnostics)] =
        &[("off", Diagnostics::Off), ("tmp", Diagnostics::Tmp), ("stderr", Diagnostics::Stderr)];

    pub fn as_str(self) -> &'static str {
        Self::CHOICES.iter().find(|(_, d)| *d == self).map(|(n, _)| *n).unwrap_or("off")
    }
}

/// How the local backend is health-checked (`health-check-backend`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendHealthCheck {
    /// A TCP connect.
    Tcp,
    /// `GET <path>`; a 2xx or 3xx answer is up.
    Http { path: String },
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

impl LogFormat {
    pub const CHOICES: &[(&str, LogFormat)] = &[("plain", LogFormat::Plain), ("json", LogFormat::Json)];

    pub fn as_str(self) -> &'static str {
        Self::CHOICES.iter().find(|(_, f)| *f == self).map(|(n, _)| *n).unwrap_or("plain")
    }
}

/// Where the access log goes (`access-log`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// No access log (the default).
    Off,
    /// One line per request on standard output.
    Stdout,
    /// Appended to this file (reopened on reload, for log rotation).
    File(PathBuf),
}

impl AccessLogTarget {
    pub fn as_string(&self) -> String {
        match self {
            AccessLogTarget::Off => String::new(),
            AccessLogTarget::Stdout => "stdout".into(),
            AccessLogTarget::File(p) => p.display().to_string(),
        }
    }
}

/// Shared-storage lock implementation (`[locks] lock-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockType {
    /// Hard-link based lock with refresh and staleness (NFS).
    LinkBased,
    /// Open-file-description `fcntl` / `flock` lock (EFS, local).
    Advisory,
}

impl LockType {
    pub const CHOICES: &[(&str, LockType)] = &[("linkbased", LockType::LinkBased), ("advisory", LockType::Advisory)];

    pub fn as_str(self) -> &'static str {
        match self {
            LockType::LinkBased => "linkbased",
            LockType::Advisory => "advisory",
        }
    }
}

/// Settings of the shared-storage locks (`[locks]`, or Workbench's `file-locks`).
#[derive(Debug, Clone, PartialEq)]
pub struct LockSettings {
    pub lock_type: LockType,
    /// How often a held link-based lock is touched (default 20 s).
    pub refresh_rate: Duration,
    /// Age after which a link-based lock is stale and may be reaped (default 30 s).
    pub timeout_interval: Duration,
    /// Log every acquire, refresh, reap and release.
    pub enable_logging: bool,
    /// Where lock logging goes; `None` = the normal log.
    pub log_file: Option<PathBuf>,
}

impl Default for LockSettings {
    fn default() -> Self {
        LockSettings {
            lock_type: LockType::LinkBased,
            refresh_rate: Duration::from_secs(20),
            timeout_interval: Duration::from_secs(30),
            enable_logging: false,
            log_file: None,
        }
    }
}

/// Where the session key sits in request paths (`[sessions] session-path-pattern`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPathPattern {
    /// Text before `{key}`, e.g. `/s/`.
    pub prefix: String,
    /// Text after `{key}`, e.g. `/`.
    pub suffix: String,
}

impl SessionPathPattern {
    pub fn parse(s: &str) -> Option<SessionPathPattern> {
        let (prefix, suffix) = s.split_once("{key}")?;
        if !prefix.starts_with('/') || suffix.contains("{key}") || prefix.len() < 2 {
            return None;
        }
        Some(SessionPathPattern { prefix: prefix.to_string(), suffix: suffix.to_string() })
    }
}

impl fmt::Display for SessionPathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{{key}}{}", self.prefix, self.suffix)
    }
}

/// This node: its address, where it listens and its local backend.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The address other nodes use to reach this node (`host` or `host:port`).
    pub www_host_name: Option<String>,
    /// The address to listen on (default `0.0.0.0`).
    pub www_address: IpAddr,
    /// Whether `www-address` was written (it is then address strategy 2).
    pub www_address_set: bool,
    /// The port to listen on (default 8787).
    pub www_port: u16,
    /// The local IDE server (`host:port`); `None` makes this node a router.
    pub backend: Option<String>,
    /// Speak TLS to the backend (Workbench's `ssl-enabled` in rserver.conf:
    /// rserver itself serves https). Its certificate is not verified: the
    /// backend runs on this node.
    pub backend_tls: bool,
    /// Where the load average is read from (default `/proc/loadavg`).
    pub loadavg_path: PathBuf,
    /// Remove this node's registry row when it stops (ephemeral nodes).
    pub delete_node_on_exit: bool,
    /// The entries of a legacy Workbench `[nodes]` list, in order: the one
    /// that is an address of this machine is this node's address when
    /// `www-host-name` is absent.
    pub legacy_nodes: Vec<String>,
}

/// The cluster-wide parts: registry, key, shared storage, check-ins.
/// Its `Debug` redacts the database password.
#[derive(Clone)]
pub struct ClusterConfig {
    pub database: DatabaseUrl,
    /// The PostgreSQL password, plain or encrypted with `sessionlb
    /// encrypt-password`; combined with `database` by `Config::registry_url`.
    pub database_password: Option<String>,
    /// The PostgreSQL schema that holds the registry's tables and their
    /// migration bookkeeping (default `sessionlb`).
    pub database_schema: String,
    /// Most connections a node opens to a PostgreSQL registry for its work
    /// (default 3); the change-notification connection comes on top.
    pub pool_size: u32,
    /// How long connecting to the registry (or waiting for a pooled
    /// connection) may take (default 10 s, as Workbench's).
    pub database_connection_timeout: Duration,
    pub secure_cookie_key_file: PathBuf,
    /// Every place the key was looked for, in order (Workbench's lookup with
    /// `--rstudio-config`); empty when the path was simply configured.
    pub secure_cookie_key_tried: Vec<PathBuf>,
    pub shared_storage_path: PathBuf,
    /// How often the node checks in (default 300 s); "Missed check-in" after twice that.
    pub checkin_interval: Duration,
    /// How often the node reports its load (default 5 s).
    pub load_report_interval: Duration,
    /// How often notifications are polled where the database has none (SQLite).
    pub poll_interval: Duration,
    /// How often peers are probed for liveness (default 2 s).
    pub health_check_interval: Duration,
    /// Consecutive successful checks before a peer or the backend counts as up again (default 1).
    pub health_check_rise: usize,
    /// Consecutive failed checks before a peer or the backend counts as down (default 2).
    pub health_check_fall: usize,
    pub backend_health_check: BackendHealthCheck,
    /// How long a registered backend key whose node cannot serve it (down,
    /// unreachable, stopped, its backend down) keeps its placement, answered
    /// 503 with `Retry-After`, before it is re-placed (default 60 s; zero =
    /// never). A deleted node's keys are re-placed at once.
    pub backend_key_failover_after: Duration,
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field cannot be forgotten here.
        let ClusterConfig {
            database,
            database_password,
            database_schema,
            pool_size,
            database_connection_timeout,
            secure_cookie_key_file,
            secure_cookie_key_tried,
            shared_storage_path,
            checkin_interval,
            load_report_interval,
            poll_interval,
            health_check_interval,
            health_check_rise,
            health_check_fall,
            backend_health_check,
            backend_key_failover_after,
        } = self;
        f.debug_struct("ClusterConfig")
            .field("database", database)
            .field("database_password", &database_password.as_ref().map(|_| "***"))
            .field("database_schema", database_schema)
            .field("pool_size", pool_size)
            .field("database_connection_timeout", database_connection_timeout)
            .field("secure_cookie_key_file", secure_cookie_key_file)
            .field("secure_cookie_key_tried", secure_cookie_key_tried)
            .field("shared_storage_path", shared_storage_path)
            .field("checkin_interval", checkin_interval)
            .field("load_report_interval", load_report_interval)
            .field("poll_interval", poll_interval)
            .field("health_check_interval", health_check_interval)
            .field("health_check_rise", health_check_rise)
            .field("health_check_fall", health_check_fall)
            .field("backend_health_check", backend_health_check)
            .field("backend_key_failover_after", backend_key_failover_after)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct BalancerConfig {
    pub kind: BalancerKind,
    /// The `custom` balancer's executable.
    pub custom_command: PathBuf,
    /// How long the custom balancer may take before falling back to `sessions`.
    pub custom_timeout: Duration,
    /// Most custom plug-in processes running at once on this node; past it, `sessions`.
    pub custom_max_running: usize,
    /// `user-hash` bounded load: no node above this factor of the mean.
    pub user_hash_balance_factor: f64,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Bounds connects and node-to-node control calls; `None` = system default.
    pub timeout: Option<Duration>,
    pub verify_ssl_certs: bool,
    pub ssl_enabled: bool,
    pub ssl_certificate: Option<PathBuf>,
    pub ssl_certificate_key: Option<PathBuf>,
    /// CA bundle (PEM) that peers' certificates must chain to; `None` = the system's roots.
    pub ssl_ca_file: Option<PathBuf>,
    /// Accepted clock difference for signed node-to-node headers; a header
    /// is also accepted only once within it (replay cache).
    pub forwarding_window: Duration,
    /// A node-to-node request must come from its sender's registered
    /// address (off: behind NAT, where peers' connections arrive from
    /// another address).
    pub forward_peer_check: bool,
    /// Who may read `/load-balancer/status` and `/metrics` on the proxy
    /// port, besides the cluster's nodes (default loopback).
    pub status_page_cidrs: Vec<IpNet>,
}

#[derive(Debug, Clone)]
pub struct SessionsConfig {
    pub path_pattern: SessionPathPattern,
    pub idle_timeout: Duration,
    pub affinity_cookie_name: String,
    pub affinity_cookie_max_age: Duration,
    /// Activity is written to the registry in batches at this interval.
    pub touch_interval: Duration,
    /// Mark the affinity cookie `Secure`.
    pub cookie_secure: bool,
    /// Most sessions kept in this node's in-memory view.
    pub max_sessions_in_memory: usize,
}

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// Use Workbench's signed `user-id` cookie.
    pub rstudio_user_cookie: bool,
    pub user_cookie_name: String,
    /// Header naming the user, trusted only from `trusted_cidrs`.
    pub trusted_header: Option<String>,
    pub trusted_cidrs: Vec<IpNet>,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Proxy worker threads (0 = one per CPU).
    pub threads: usize,
    /// After SIGTERM: how long in-flight requests and tunnels may continue.
    pub grace_period: Duration,
    /// After the grace period: how long runtimes get to stop.
    pub shutdown_timeout: Duration,
    pub diagnostics: Diagnostics,
    pub log_level: String,
    pub log_format: LogFormat,
    /// Where Pingora's pid file and upgrade socket live (one per node).
    pub run_dir: PathBuf,
    /// Where `/metrics` is served on its own listener; `None` = not at all.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// After SIGTERM, how long the node drains (offline mode, `/health` 503,
    /// waiting for open tunnels and requests) before it stops; zero = no drain.
    pub drain_timeout: Duration,
    /// One line per request (`access-log`); off by default.
    pub access_log: AccessLogTarget,
    /// `access-log-format`: plain text or JSON lines.
    pub access_log_format: LogFormat,
    /// A client must send a whole request head within this time of
    /// connecting (or, on a kept-alive connection, of its previous answer
    /// plus the 60 s keep-alive), or the connection is closed.
    pub request_header_timeout: Duration,
    /// A request body (never an upgraded tunnel) may be silent this long.
    pub request_body_idle_timeout: Duration,
    /// Most client connections open at once; past it new ones get 503.
    pub max_connections: usize,
}

//! Configuration: the validated settings every other module reads.
//!
//! Owns the native TOML format (`toml_file`), the Workbench-directory reader
//! (`rstudio`), the typed schema with defaults (`schema`) and the secure
//! cookie key file checks (`key`). Loading collects *every* problem — each
//! naming its file, line, key and the allowed values — before failing.
//! [`Config`] is plain data: nobody writes it back.

pub mod key;
pub mod password;
pub mod raw;
pub mod rstudio;
pub mod schema;
pub mod toml_file;

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use self::raw::RawConfig;
use self::schema::{Reader, humanize};

/// Default location of the native configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/sessionlb/sessionlb.toml";

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// Loading the configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration ({} problem{}):\n{}", .0.len(), if .0.len() == 1 { "" } else { "s" },
        .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigProblem>),
}

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

/// Shared-storage lock implementation (`[locks] lock-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockType {
    /// Hard-link based lock with refresh and staleness (NFS).
    LinkBased,
    /// Open-file-description `fcntl` / `flock` lock (EFS, local).
    Advisory,
}

impl LockType {
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

/// The registry database.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite:///path/to/file.db` — the embedded single-machine default.
    Sqlite(PathBuf),
    /// `postgres://user:password@host:port/db?...`
    Postgres(String),
}

impl DatabaseUrl {
    pub fn parse(s: &str) -> Option<DatabaseUrl> {
        if let Some(path) = s.strip_prefix("sqlite://") {
            (!path.is_empty()).then(|| DatabaseUrl::Sqlite(PathBuf::from(path)))
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Some(DatabaseUrl::Postgres(s.to_string()))
        } else {
            None
        }
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        match self {
            DatabaseUrl::Sqlite(p) => format!("sqlite://{}", p.display()),
            DatabaseUrl::Postgres(url) => redact_url_password(url),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Splits `rest` (a URL after `scheme://`) into its authority and the rest
/// (path, query, fragment): the authority ends at the first `/`, `?` or `#`
/// after its user info. A `user:password@` user info ends at the last `@`
/// before the first `/`, so a password written with an unencoded `?` or `#`
/// stays inside it (and is redacted, not printed).
fn split_authority(rest: &str) -> (&str, &str) {
    let first_slash = rest.find('/').unwrap_or(rest.len());
    let host_from = rest[..first_slash]
        .rfind('@')
        .filter(|&at| rest[..at].split_once(':').is_some_and(|(user, _)| !user.contains(['?', '#', '='])))
        .map_or(0, |at| at + 1);
    let end = rest[host_from..].find(['/', '?', '#']).map_or(rest.len(), |i| host_from + i);
    rest.split_at(end)
}

/// The environment variable that overrides the database password, as in
/// Workbench (2024.04+): plain or encrypted like `database-password`.
pub const PASSWORD_ENV: &str = "WORKBENCH_POSTGRES_PASSWORD";

/// `url` with its password replaced by `password` (percent-encoded).
fn with_password(url: &str, password: &str) -> Result<String, String> {
    let (scheme, rest) = url.split_once("://").ok_or("the database URL has no scheme")?;
    let (authority, tail) = split_authority(rest);
    let (userinfo, host) = authority
        .rsplit_once('@')
        .ok_or("the database URL must name a user (postgres://user@host/db) to go with database-password")?;
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    let password = percent_encoding::utf8_percent_encode(password, percent_encoding::NON_ALPHANUMERIC);
    Ok(format!("{scheme}://{user}:{password}@{host}{tail}"))
}

/// `url` with the password of its user info and the value of every query
/// parameter named `password` (any case, percent-encoded or not) replaced by
/// `***`; everything else is kept as written.
pub(crate) fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = split_authority(rest);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let (before_fragment, fragment) = tail.split_at(tail.find('#').unwrap_or(tail.len()));
    let tail = match before_fragment.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((name, _))
                        if percent_encoding::percent_decode_str(name)
                            .decode_utf8_lossy()
                            .eq_ignore_ascii_case("password") =>
                    {
                        format!("{name}=***")
                    }
                    _ => param.to_string(),
                })
                .collect();
            format!("{path}?{}{fragment}", params.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
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

/// Everything sessionlb is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The files this configuration was read from.
    pub files: Vec<PathBuf>,
    pub node: NodeConfig,
    pub cluster: ClusterConfig,
    pub balancer: BalancerConfig,
    pub proxy: ProxyConfig,
    pub sessions: SessionsConfig,
    pub identity: IdentityConfig,
    pub locks: LockSettings,
    pub server: ServerSettings,
}

/// This node: its address and its local backend.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The address other nodes use to reach this node (`host` or `host:port`).
    pub www_host_name: Option<String>,
    /// The address to listen on (default `0.0.0.0`).
    pub www_address: IpAddr,
    /// Whether `www-address` was written (it is then address strategy 2).
    pub www_address_set: bool,
    pub www_port: u16,
    /// The local IDE server (`host:port`); `None` makes this node a router.
    pub backend: Option<String>,
    /// Where the load average is read from (default `/proc/loadavg`).
    pub loadavg_path: PathBuf,
    /// Remove this node's registry row when it stops (ephemeral nodes).
    pub delete_node_on_exit: bool,
}

/// The cluster-wide parts: registry, key, shared storage, check-ins.
/// Its `Debug` redacts the database password.
#[derive(Clone)]
pub struct ClusterConfig {
    pub database: DatabaseUrl,
    /// The PostgreSQL password, plain or encrypted with `sessionlb
    /// encrypt-password`; combined with `database` by [`Config::registry_url`].
    pub database_password: Option<String>,
    pub secure_cookie_key_file: PathBuf,
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
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field cannot be forgotten here.
        let ClusterConfig {
            database,
            database_password,
            secure_cookie_key_file,
            shared_storage_path,
            checkin_interval,
            load_report_interval,
            poll_interval,
            health_check_interval,
            health_check_rise,
            health_check_fall,
            backend_health_check,
        } = self;
        f.debug_struct("ClusterConfig")
            .field("database", database)
            .field("database_password", &database_password.as_ref().map(|_| "***"))
            .field("secure_cookie_key_file", secure_cookie_key_file)
            .field("shared_storage_path", shared_storage_path)
            .field("checkin_interval", checkin_interval)
            .field("load_report_interval", load_report_interval)
            .field("poll_interval", poll_interval)
            .field("health_check_interval", health_check_interval)
            .field("health_check_rise", health_check_rise)
            .field("health_check_fall", health_check_fall)
            .field("backend_health_check", backend_health_check)
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
    /// Accepted clock difference for signed node-to-node headers.
    pub forwarding_window: Duration,
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
}

impl Config {
    /// The protocol this node speaks to its peers; part of the cluster record.
    pub fn protocol(&self) -> &'static str {
        match (self.proxy.ssl_enabled, self.proxy.verify_ssl_certs) {
            (false, _) => "http",
            (true, true) => "https",
            (true, false) => "https-no-verify",
        }
    }

    /// The registry URL with the database password filled in: the
    /// environment's [`PASSWORD_ENV`] (as Workbench reads it) or else
    /// `database-password`; decrypted with the secure cookie key when it was
    /// encrypted.
    pub fn registry_url(&self) -> Result<DatabaseUrl, String> {
        self.registry_url_with(std::env::var(PASSWORD_ENV).ok())
    }

    /// [`registry_url`](Self::registry_url) with the environment's password given.
    pub fn registry_url_with(&self, env_password: Option<String>) -> Result<DatabaseUrl, String> {
        // The variable only concerns a PostgreSQL registry (a node on SQLite
        // may share its environment with a Workbench that uses it).
        let env_password =
            env_password.filter(|p| !p.is_empty() && matches!(self.cluster.database, DatabaseUrl::Postgres(_)));
        let Some(configured) = env_password.as_ref().or(self.cluster.database_password.as_ref()) else {
            return Ok(self.cluster.database.clone());
        };
        let DatabaseUrl::Postgres(url) = &self.cluster.database else {
            return Err("`database-password` goes with a postgres:// database".into());
        };
        let plain = if password::looks_encrypted(configured) {
            // The same checks (existence, mode, length) as when the node starts.
            let key = key::SecureKey::load(&self.cluster.secure_cookie_key_file)
                .map_err(|e| format!("cannot use the secure cookie key to decrypt database-password: {e}"))?;
            password::decrypt(key.bytes(), configured).map_err(|e| format!("database-password: {e}"))?
        } else {
            configured.clone()
        };
        with_password(url, &plain).map(DatabaseUrl::Postgres)
    }

    /// Whether this node is a router (no local backend).
    pub fn is_router(&self) -> bool {
        self.node.backend.is_none()
    }

    /// Load the native TOML file, optionally overlaid by a Workbench directory.
    pub fn load(path: Option<&Path>, rstudio_dir: Option<&Path>) -> Result<Config, ConfigError> {
        let mut raw = RawConfig::default();
        let mut problems = Vec::new();
        if let Some(path) = path {
            let src = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
            match toml_file::parse(path, &src) {
                Ok(r) => raw = r,
                Err(mut errs) => problems.append(&mut errs),
            }
        }
        if let Some(dir) = rstudio_dir {
            match rstudio::read_dir(dir) {
                Ok(r) => raw.overlay(r),
                Err(mut errs) => problems.append(&mut errs),
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Config::from_raw(raw)
    }

    /// Parse TOML text (as if read from `file`).
    pub fn from_toml(file: &Path, src: &str) -> Result<Config, ConfigError> {
        let raw = toml_file::parse(file, src).map_err(ConfigError::Invalid)?;
        Config::from_raw(raw)
    }

    /// Validate raw settings, collecting every problem.
    pub fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
        let files = raw.files.clone();
        let mut r = Reader::new(raw);

        // --- this node
        let www_host_name = r.opt_string("www-host-name");
        let www_address_set = r.is_set("www-address");
        let www_address = r.ip("www-address", IpAddr::from([0, 0, 0, 0]));
        let www_port = r.int("www-port", 8787, 1, 65535) as u16;
        let backend = r.opt_string("backend");
        if let Some(b) = &backend
            && !valid_host_port(b)
        {
            r.problem_at("backend", format!(
                "`backend` must be host:port of the local IDE server, such as 127.0.0.1:8788 (or absent for a router node); found {b:?}"
            ));
        }
        if let Some(h) = &www_host_name
            && !valid_host_or_host_port(h)
        {
            r.problem_at(
                "www-host-name",
                format!("`www-host-name` must be a host name or address, optionally with :port; found {h:?}"),
            );
        }
        let loadavg_path = r.path("loadavg-path", "/proc/loadavg");
        let delete_node_on_exit = r.bool("delete-node-on-exit", false);

        // --- cluster
        let database = r.get("database", DatabaseUrl::Sqlite(PathBuf::from("/var/lib/sessionlb/registry.db")), |v| {
            schema::text(v)
                .and_then(DatabaseUrl::parse)
                .ok_or_else(|| "a database URL: sqlite:///path/to/file.db or postgres://user@host:5432/db".into())
        });
        let database_password = r.opt_string("database-password");
        if database_password.is_some() && !matches!(database, DatabaseUrl::Postgres(_)) {
            r.problem_at(
                "database-password",
                "`database-password` goes with a postgres:// database; SQLite has no password".into(),
            );
        }
        let secure_cookie_key_file = r.path("secure-cookie-key-file", "/etc/sessionlb/secure-cookie-key");
        let shared_storage_path = r.path("server-shared-storage-path", "/var/lib/sessionlb/shared-storage");
        let checkin_interval = r.duration("checkin-interval", Duration::from_secs(300), Duration::from_millis(100));
        let load_report_interval =
            r.duration("load-report-interval", Duration::from_secs(5), Duration::from_millis(100));
        let poll_interval = r.duration("poll-interval", Duration::from_millis(500), Duration::from_millis(10));
        let health_check_interval =
            r.duration("health-check-interval", Duration::from_secs(2), Duration::from_millis(50));
        let health_check_rise = r.int("health-check-rise", 1, 1, 100) as usize;
        let health_check_fall = r.int("health-check-fall", 2, 1, 100) as usize;
        let backend_check_http = r.choice("health-check-backend", false, &[("tcp", false), ("http", true)]);
        let backend_check_path = r.string("health-check-backend-path", "/");
        if !backend_check_path.starts_with('/')
            || http::uri::PathAndQuery::try_from(backend_check_path.as_str()).is_err()
        {
            r.problem_at("health-check-backend-path", format!(
                "`health-check-backend-path` must be a path starting with `/`, such as \"/health-check\"; found {backend_check_path:?}"
            ));
        }
        let backend_health_check = if backend_check_http {
            BackendHealthCheck::Http { path: backend_check_path }
        } else {
            BackendHealthCheck::Tcp
        };

        // --- balancer
        let kind = r.choice("balancer", BalancerKind::Sessions, BalancerKind::CHOICES);
        let custom_command = r.path("custom-balancer-command", "/usr/lib/rstudio-server/bin/rserver-balancer");
        let custom_timeout = r.duration("custom-balancer-timeout", Duration::from_secs(2), Duration::from_millis(1));
        let user_hash_balance_factor = r.float("user-hash-balance-factor", 1.25, 1.0, 100.0);

        // --- proxy
        let timeout = r.duration("timeout", Duration::from_secs(10), Duration::ZERO);
        let verify_ssl_certs = r.bool("verify-ssl-certs", true);
        let ssl_enabled = r.bool("ssl-enabled", false);
        let ssl_certificate = r.opt_string("ssl-certificate").map(PathBuf::from);
        let ssl_certificate_key = r.opt_string("ssl-certificate-key").map(PathBuf::from);
        let ssl_ca_file = r.opt_string("ssl-ca-file").map(PathBuf::from);
        if ssl_enabled && (ssl_certificate.is_none() || ssl_certificate_key.is_none()) {
            r.problem_at(
                "ssl-enabled",
                "`ssl-enabled = true` needs both `ssl-certificate` and `ssl-certificate-key`".into(),
            );
        }
        let forwarding_window = r.duration("forwarding-window", Duration::from_secs(30), Duration::from_secs(1));

        // --- sessions
        let path_pattern = r.get(
            "sessions.session-path-pattern",
            SessionPathPattern { prefix: "/s/".into(), suffix: "/".into() },
            |v| {
                schema::text(v).and_then(SessionPathPattern::parse).ok_or_else(|| {
                    "a path with one `{key}` placeholder starting with `/`, such as \"/s/{key}/\"".into()
                })
            },
        );
        let idle_timeout =
            r.duration("sessions.session-idle-timeout", Duration::from_secs(120 * 60), Duration::from_secs(1));
        let affinity_cookie_name = r.string("sessions.affinity-cookie-name", "sessionlb-affinity");
        if !affinity_cookie_name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || affinity_cookie_name.is_empty()
        {
            r.problem_at("sessions.affinity-cookie-name", format!(
                "`sessions.affinity-cookie-name` must be letters, digits, '-', '_' or '.'; found {affinity_cookie_name:?}"
            ));
        }
        let affinity_cookie_max_age =
            r.duration("sessions.affinity-cookie-max-age", Duration::from_secs(24 * 3600), Duration::from_secs(1));
        let touch_interval = r.duration("sessions.touch-interval", Duration::from_secs(30), Duration::from_millis(50));
        let cookie_secure = r.bool("sessions.cookie-secure", ssl_enabled);

        // --- identity
        let rstudio_user_cookie = r.bool("identity.rstudio-user-cookie", true);
        let user_cookie_name = r.string("identity.user-cookie-name", "user-id");
        let trusted_header = {
            let h = r.string("identity.trusted-header", "X-Forwarded-User");
            if !h.is_empty() && http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                r.problem_at(
                    "identity.trusted-header",
                    format!("`identity.trusted-header` must be a valid HTTP header name; found {h:?}"),
                );
            }
            (!h.is_empty()).then_some(h)
        };
        let trusted_cidrs = r.list(
            "identity.trusted-cidrs",
            |s| s.parse::<IpNet>().ok().or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from)),
            "a list of addresses or CIDR blocks, such as [\"10.0.0.0/8\", \"127.0.0.1\"]",
        );

        // --- locks
        let defaults = LockSettings::default();
        let lock_type = r.choice(
            "locks.lock-type",
            defaults.lock_type,
            &[("linkbased", LockType::LinkBased), ("advisory", LockType::Advisory)],
        );
        let refresh_rate = r.duration("locks.refresh-rate", defaults.refresh_rate, Duration::from_millis(10));
        let timeout_interval =
            r.duration("locks.timeout-interval", defaults.timeout_interval, Duration::from_millis(10));
        if timeout_interval <= refresh_rate {
            r.problem_at("locks.timeout-interval", format!(
                "`locks.timeout-interval` ({}) must be longer than `locks.refresh-rate` ({}), or live locks would be reaped",
                humanize(timeout_interval), humanize(refresh_rate)
            ));
        }
        let enable_logging = r.bool("locks.enable-logging", false);
        let log_file = r.opt_string("locks.log-file").map(PathBuf::from);
        if r.bool("locks.use-symlinks", false) {
            r.problem_at("locks.use-symlinks", "`use-symlinks = 1` is not supported: sessionlb uses hard links (linkbased) or advisory locks; remove the key or set it to 0".into());
        }

        // --- server
        let threads = r.int("threads", 0, 0, 1024) as usize;
        let grace_period = r.whole_seconds("grace-period", Duration::from_secs(5));
        let shutdown_timeout = r.whole_seconds("shutdown-timeout", Duration::from_secs(5));
        let diagnostics = r.choice(
            "diagnostics",
            Diagnostics::Off,
            &[("off", Diagnostics::Off), ("tmp", Diagnostics::Tmp), ("stderr", Diagnostics::Stderr)],
        );
        let log_level = r.string("log-level", "info");
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            r.problem_at("log-level", format!(
                "`log-level` must be a level (error, warn, info, debug, trace) or a filter like \"warn,sessionlb=debug\"; found {log_level:?}"
            ));
        }
        let log_format =
            r.choice("log-format", LogFormat::Plain, &[("plain", LogFormat::Plain), ("json", LogFormat::Json)]);
        let run_dir = r.path("run-dir", "/run/sessionlb");
        let metrics_address =
            r.get("metrics-address", Some(([127, 0, 0, 1], 9787).into()), |v| match schema::text(v) {
                Some("") => Ok(None),
                Some(s) => s.parse().map(Some).map_err(|_| {
                    "an address:port such as \"127.0.0.1:9787\" or \"0.0.0.0:9787\", or \"\" for none".into()
                }),
                None => Err("a string: address:port, or \"\" for none".into()),
            });
        let drain_timeout = r.duration("drain-timeout", Duration::from_secs(300), Duration::ZERO);

        let (_, problems) = r.finish();
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Ok(Config {
            files,
            node: NodeConfig {
                www_host_name,
                www_address,
                www_address_set,
                www_port,
                backend,
                loadavg_path,
                delete_node_on_exit,
            },
            cluster: ClusterConfig {
                database,
                database_password,
                secure_cookie_key_file,
                shared_storage_path,
                checkin_interval,
                load_report_interval,
                poll_interval,
                health_check_interval,
                health_check_rise,
                health_check_fall,
                backend_health_check,
            },
            balancer: BalancerConfig { kind, custom_command, custom_timeout, user_hash_balance_factor },
            proxy: ProxyConfig {
                timeout: (!timeout.is_zero()).then_some(timeout),
                verify_ssl_certs,
                ssl_enabled,
                ssl_certificate,
                ssl_certificate_key,
                ssl_ca_file,
                forwarding_window,
            },
            sessions: SessionsConfig {
                path_pattern,
                idle_timeout,
                affinity_cookie_name,
                affinity_cookie_max_age,
                touch_interval,
                cookie_secure,
            },
            identity: IdentityConfig { rstudio_user_cookie, user_cookie_name, trusted_header, trusted_cidrs },
            locks: LockSettings { lock_type, refresh_rate, timeout_interval, enable_logging, log_file },
            server: ServerSettings {
                threads,
                grace_period,
                shutdown_timeout,
                diagnostics,
                log_level,
                log_format,
                run_dir,
                metrics_address,
                drain_timeout,
            },
        })
    }

    /// The effective configuration as TOML, for `check-config`. The key
    /// itself is never part of the configuration (only its path); database
    /// passwords are redacted.
    pub fn render(&self) -> String {
        fn q(s: &str) -> String {
            format!("{s:?}")
        }
        fn p(p: &Path) -> String {
            q(&p.display().to_string())
        }
        fn d(d: Duration) -> String {
            q(&humanize(d))
        }
        let n = &self.node;
        let c = &self.cluster;
        let s = &self.sessions;
        let i = &self.identity;
        let l = &self.locks;
        let mut out = String::new();
        let mut line = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
        line("www-host-name", q(n.www_host_name.as_deref().unwrap_or("")));
        line("www-address", q(&n.www_address.to_string()));
        line("www-port", n.www_port.to_string());
        line("backend", q(n.backend.as_deref().unwrap_or("")));
        line("loadavg-path", p(&n.loadavg_path));
        line("delete-node-on-exit", n.delete_node_on_exit.to_string());
        line("database", q(&c.database.redacted()));
        line("database-password", q(if c.database_password.is_some() { "***" } else { "" }));
        line("secure-cookie-key-file", p(&c.secure_cookie_key_file));
        line("server-shared-storage-path", p(&c.shared_storage_path));
        line("checkin-interval", d(c.checkin_interval));
        line("load-report-interval", d(c.load_report_interval));
        line("poll-interval", d(c.poll_interval));
        line("health-check-interval", d(c.health_check_interval));
        line("health-check-rise", c.health_check_rise.to_string());
        line("health-check-fall", c.health_check_fall.to_string());
        let (check, path) = match &c.backend_health_check {
            BackendHealthCheck::Tcp => ("tcp", "/"),
            BackendHealthCheck::Http { path } => ("http", path.as_str()),
        };
        line("health-check-backend", q(check));
        line("health-check-backend-path", q(path));
        line("balancer", q(self.balancer.kind.as_str()));
        line("custom-balancer-command", p(&self.balancer.custom_command));
        line("custom-balancer-timeout", d(self.balancer.custom_timeout));
        line("user-hash-balance-factor", self.balancer.user_hash_balance_factor.to_string());
        line("timeout", d(self.proxy.timeout.unwrap_or_default()));
        line("verify-ssl-certs", self.proxy.verify_ssl_certs.to_string());
        line("ssl-enabled", self.proxy.ssl_enabled.to_string());
        line("ssl-certificate", self.proxy.ssl_certificate.as_deref().map_or(q(""), p));
        line("ssl-certificate-key", self.proxy.ssl_certificate_key.as_deref().map_or(q(""), p));
        line("ssl-ca-file", self.proxy.ssl_ca_file.as_deref().map_or(q(""), p));
        line("forwarding-window", d(self.proxy.forwarding_window));
        line("threads", self.server.threads.to_string());
        line("grace-period", d(self.server.grace_period));
        line("shutdown-timeout", d(self.server.shutdown_timeout));
        line(
            "diagnostics",
            q(match self.server.diagnostics {
                Diagnostics::Off => "off",
                Diagnostics::Tmp => "tmp",
                Diagnostics::Stderr => "stderr",
            }),
        );
        line("log-level", q(&self.server.log_level));
        line(
            "log-format",
            q(match self.server.log_format {
                LogFormat::Plain => "plain",
                LogFormat::Json => "json",
            }),
        );
        line("run-dir", p(&self.server.run_dir));
        line("metrics-address", q(&self.server.metrics_address.map_or(String::new(), |a| a.to_string())));
        line("drain-timeout", d(self.server.drain_timeout));
        out.push_str("\n[sessions]\n");
        let mut line = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
        line("session-path-pattern", q(&s.path_pattern.to_string()));
        line("session-idle-timeout", d(s.idle_timeout));
        line("affinity-cookie-name", q(&s.affinity_cookie_name));
        line("affinity-cookie-max-age", d(s.affinity_cookie_max_age));
        line("touch-interval", d(s.touch_interval));
        line("cookie-secure", s.cookie_secure.to_string());
        out.push_str("\n[identity]\n");
        let mut line = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
        line("rstudio-user-cookie", i.rstudio_user_cookie.to_string());
        line("user-cookie-name", q(&i.user_cookie_name));
        line("trusted-header", q(i.trusted_header.as_deref().unwrap_or("")));
        line(
            "trusted-cidrs",
            format!("[{}]", i.trusted_cidrs.iter().map(|c| q(&c.to_string())).collect::<Vec<_>>().join(", ")),
        );
        out.push_str("\n[locks]\n");
        let mut line = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
        line("lock-type", q(l.lock_type.as_str()));
        line("refresh-rate", d(l.refresh_rate));
        line("timeout-interval", d(l.timeout_interval));
        line("enable-logging", l.enable_logging.to_string());
        line("log-file", l.log_file.as_deref().map_or(q(""), p));
        out
    }
}

/// `host:port` with a numeric port.
pub fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) && valid_host(host),
        None => false,
    }
}

fn valid_host_or_host_port(s: &str) -> bool {
    valid_host_port(s) || (valid_host(s) && !s.contains(':'))
}

fn valid_host(h: &str) -> bool {
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h.parse::<IpAddr>().is_ok()
        || (!h.is_empty()
            && h.len() <= 253
            && h.split('.').all(|label| {
                !label.is_empty() && label.len() <= 63 && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            }))
}

#[cfg(test)]
mod tests;

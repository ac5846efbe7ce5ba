//! The key-by-key schema: every key sessionlb reads, with its type, its
//! default and what is allowed, turned into a [`Config`]. Cross-key rules of
//! the drop-in layout are in `layout.rs`; printing it back is `render.rs`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use super::database::{self, DatabaseUrl};
use super::raw::RawConfig;
use super::reader::{self, Reader, humanize};
use super::settings::*;
use super::{Config, ConfigError, layout};

/// The default `pool-size`: an idle node keeps one pooled connection (plus
/// the notification connection), a busy one at most this many.
pub const DEFAULT_POOL_SIZE: u32 = 3;

/// Validate raw settings, collecting every problem.
pub(super) fn read(raw: RawConfig) -> Result<Config, ConfigError> {
    let files = raw.files.clone();
    let warnings = raw.warnings.clone();
    let workbench = raw.workbench.clone();
    let sources = raw.entries.iter().map(|(k, e)| (k.clone(), e.origin.clone())).collect();
    let mut r = Reader::new(raw);
    let mut config = read_keys(&mut r, files, warnings, sources, workbench.as_ref());
    layout::check(&mut config, workbench.as_ref(), &mut r);
    let (_, problems) = r.finish();
    if problems.is_empty() { Ok(config) } else { Err(ConfigError::Invalid(problems)) }
}

/// Every key the schema reads (for tests that keep the rendering, the
/// example file and the documentation complete).
pub fn known_keys() -> Vec<String> {
    let mut r = Reader::new(RawConfig::default());
    read_keys(&mut r, Vec::new(), Vec::new(), Default::default(), None);
    r.known_keys().iter().cloned().collect()
}

fn read_keys(
    r: &mut Reader,
    files: Vec<PathBuf>,
    warnings: Vec<super::ConfigProblem>,
    sources: std::collections::BTreeMap<String, super::raw::Origin>,
    workbench: Option<&super::raw::WorkbenchFacts>,
) -> Config {
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
    let backend_tls = r.bool("backend-tls", false);
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
        reader::text(v)
            .and_then(DatabaseUrl::parse)
            .ok_or_else(|| "a database URL: sqlite:///path/to/file.db or postgres://user@host:5432/db".into())
    });
    let database_password = r.opt_string("database-password");
    if database_password.is_some() && !database.is_postgres() {
        r.problem_at(
            "database-password",
            "`database-password` goes with a postgres:// database; SQLite has no password".into(),
        );
    }
    let database_schema = r.string("database-schema", database::DEFAULT_SCHEMA);
    if !database::valid_schema_name(&database_schema) {
        r.problem_at("database-schema", format!(
            "`database-schema` must be a lower-case name of letters, digits and '_' (not starting with a digit or pg_, at most 48 characters), such as \"sessionlb\"; found {database_schema:?}"
        ));
    }
    let pool_size = r.int("pool-size", i64::from(DEFAULT_POOL_SIZE), 1, 100) as u32;
    let database_connection_timeout =
        r.duration("database-connection-timeout", Duration::from_secs(10), Duration::from_secs(1));
    // (These three concern PostgreSQL only; the SQLite registry ignores them.)
    let secure_cookie_key_file = r.path("secure-cookie-key-file", "/etc/sessionlb/secure-cookie-key");
    let secure_cookie_key_tried = workbench.map(|w| w.key_tried.clone()).unwrap_or_default();
    let shared_storage_path = r.path("server-shared-storage-path", "/var/lib/sessionlb/shared-storage");
    let checkin_interval = r.duration("checkin-interval", Duration::from_secs(300), Duration::from_millis(100));
    let load_report_interval = r.duration("load-report-interval", Duration::from_secs(5), Duration::from_millis(100));
    let poll_interval = r.duration("poll-interval", Duration::from_millis(500), Duration::from_millis(10));
    let health_check_interval = r.duration("health-check-interval", Duration::from_secs(2), Duration::from_millis(50));
    let health_check_rise = r.int("health-check-rise", 1, 1, 100) as usize;
    let health_check_fall = r.int("health-check-fall", 2, 1, 100) as usize;
    let backend_check_http = r.choice("health-check-backend", false, &[("tcp", false), ("http", true)]);
    let backend_check_path = r.string("health-check-backend-path", "/");
    if !backend_check_path.starts_with('/') || http::uri::PathAndQuery::try_from(backend_check_path.as_str()).is_err() {
        r.problem_at("health-check-backend-path", format!(
            "`health-check-backend-path` must be a path starting with `/`, such as \"/health-check\"; found {backend_check_path:?}"
        ));
    }
    let backend_key_failover_after = r.duration("backend-key-failover-after", Duration::from_secs(60), Duration::ZERO);
    let backend_health_check = if backend_check_http {
        BackendHealthCheck::Http { path: backend_check_path }
    } else {
        BackendHealthCheck::Tcp
    };

    // --- balancer
    let kind = r.choice("balancer", BalancerKind::Sessions, BalancerKind::CHOICES);
    let custom_command = r.path("custom-balancer-command", "/usr/lib/rstudio-server/bin/rserver-balancer");
    let custom_timeout = r.duration("custom-balancer-timeout", Duration::from_secs(2), Duration::from_millis(1));
    let custom_max_running = r.int("custom-balancer-max-running", 8, 1, 1024) as usize;
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
    let forwarding_window = r.duration("forwarding-window", Duration::from_secs(10), Duration::from_secs(1));
    let forward_peer_check = r.bool("forward-peer-check", true);
    let status_page_set = r.is_set("status-page-cidrs");
    let status_page_cidrs = r.list(
        "status-page-cidrs",
        parse_cidr,
        "a list of addresses or CIDR blocks, such as [\"127.0.0.1\", \"10.1.0.0/16\"]",
    );
    let status_page_cidrs = if status_page_set { status_page_cidrs } else { default_status_page_cidrs() };

    // --- sessions
    let path_pattern =
        r.get("sessions.session-path-pattern", SessionPathPattern { prefix: "/s/".into(), suffix: "/".into() }, |v| {
            reader::text(v)
                .and_then(SessionPathPattern::parse)
                .ok_or_else(|| "a path with one `{key}` placeholder starting with `/`, such as \"/s/{key}/\"".into())
        });
    let idle_timeout =
        r.duration("sessions.session-idle-timeout", Duration::from_secs(120 * 60), Duration::from_secs(1));
    let affinity_cookie_name = r.string("sessions.affinity-cookie-name", "sessionlb-affinity");
    if !affinity_cookie_name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || affinity_cookie_name.is_empty()
    {
        r.problem_at(
            "sessions.affinity-cookie-name",
            format!(
                "`sessions.affinity-cookie-name` must be letters, digits, '-', '_' or '.'; found {affinity_cookie_name:?}"
            ),
        );
    }
    let affinity_cookie_max_age =
        r.duration("sessions.affinity-cookie-max-age", Duration::from_secs(24 * 3600), Duration::from_secs(1));
    let touch_interval = r.duration("sessions.touch-interval", Duration::from_secs(30), Duration::from_millis(50));
    let cookie_secure = r.bool("sessions.cookie-secure", ssl_enabled);
    let max_sessions_in_memory = r.int(
        "sessions.max-sessions-in-memory",
        crate::cluster::view::DEFAULT_SESSION_CAPACITY as i64,
        1000,
        100_000_000,
    ) as usize;

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
        parse_cidr,
        "a list of addresses or CIDR blocks, such as [\"10.0.0.0/8\", \"127.0.0.1\"]",
    );

    // --- locks
    let defaults = LockSettings::default();
    let lock_type = r.choice("locks.lock-type", defaults.lock_type, LockType::CHOICES);
    let refresh_rate = r.duration("locks.refresh-rate", defaults.refresh_rate, Duration::from_millis(10));
    let timeout_interval = r.duration("locks.timeout-interval", defaults.timeout_interval, Duration::from_millis(10));
    if timeout_interval <= refresh_rate {
        r.problem_at(
            "locks.timeout-interval",
            format!(
                "`locks.timeout-interval` ({}) must be longer than `locks.refresh-rate` ({}), or live locks would be reaped",
                humanize(timeout_interval),
                humanize(refresh_rate)
            ),
        );
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
    let diagnostics = r.choice("diagnostics", Diagnostics::Off, Diagnostics::CHOICES);
    let log_level = r.string("log-level", "info");
    if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        r.problem_at(
            "log-level",
            format!(
                "`log-level` must be a level (error, warn, info, debug, trace) or a filter like \"warn,sessionlb=debug\"; found {log_level:?}"
            ),
        );
    }
    let log_format = r.choice("log-format", LogFormat::Plain, LogFormat::CHOICES);
    let run_dir = r.path("run-dir", "/run/sessionlb");
    let metrics_address = r.get("metrics-address", Some(([127, 0, 0, 1], 9787).into()), |v| match reader::text(v) {
        Some("") => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| "an address:port such as \"127.0.0.1:9787\" or \"0.0.0.0:9787\", or \"\" for none".into()),
        None => Err("a string: address:port, or \"\" for none".into()),
    });
    let drain_timeout = r.duration("drain-timeout", Duration::from_secs(300), Duration::ZERO);
    let access_log = r.get("access-log", AccessLogTarget::Off, |v| match reader::text(v) {
        Some("") => Ok(AccessLogTarget::Off),
        Some("stdout") => Ok(AccessLogTarget::Stdout),
        Some(p) if p.starts_with('/') => Ok(AccessLogTarget::File(PathBuf::from(p))),
        Some(_) => {
            Err("\"\" (off), \"stdout\" or an absolute file path such as \"/var/log/sessionlb/access.log\"".into())
        }
        None => Err("a string: \"\" (off), \"stdout\" or an absolute file path".into()),
    });
    let access_log_format = r.choice("access-log-format", LogFormat::Plain, LogFormat::CHOICES);
    let request_header_timeout =
        r.duration("request-header-timeout", Duration::from_secs(10), Duration::from_millis(100));
    let request_body_idle_timeout =
        r.duration("request-body-idle-timeout", Duration::from_secs(120), Duration::from_secs(1));
    let max_connections = r.int("max-connections", 20_000, 1, 10_000_000) as usize;

    Config {
        files,
        sources,
        warnings,
        node: NodeConfig {
            www_host_name,
            www_address,
            www_address_set,
            www_port,
            backend,
            backend_tls,
            loadavg_path,
            delete_node_on_exit,
            legacy_nodes: workbench.map(|w| w.legacy_nodes.clone()).unwrap_or_default(),
        },
        cluster: ClusterConfig {
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
        },
        balancer: BalancerConfig { kind, custom_command, custom_timeout, custom_max_running, user_hash_balance_factor },
        proxy: ProxyConfig {
            timeout: (!timeout.is_zero()).then_some(timeout),
            verify_ssl_certs,
            ssl_enabled,
            ssl_certificate,
            ssl_certificate_key,
            ssl_ca_file,
            forwarding_window,
            forward_peer_check,
            status_page_cidrs,
        },
        sessions: SessionsConfig {
            path_pattern,
            idle_timeout,
            affinity_cookie_name,
            affinity_cookie_max_age,
            touch_interval,
            cookie_secure,
            max_sessions_in_memory,
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
            access_log,
            access_log_format,
            request_header_timeout,
            request_body_idle_timeout,
            max_connections,
        },
    }
}

/// An address or CIDR block (`10.0.0.0/8`, `127.0.0.1`).
fn parse_cidr(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>().ok().or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// `status-page-cidrs` when unset: loopback.
pub fn default_status_page_cidrs() -> Vec<IpNet> {
    vec!["127.0.0.0/8".parse().expect("a CIDR"), "::1/128".parse().expect("a CIDR")]
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

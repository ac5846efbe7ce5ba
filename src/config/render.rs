//! The effective configuration as TOML: for `check-config` (with where each
//! value came from) and for reload, which decides "needs a restart" by
//! comparing two renderings — so every key the schema reads must appear
//! here (a test checks it). The key itself is never part of the
//! configuration (only its path); database passwords are redacted.

use std::path::Path;
use std::time::Duration;

use super::reader::humanize;
use super::{BackendHealthCheck, Config};

/// A TOML basic string (the toml crate's own escaping: Rust's `{:?}`
/// escapes such as `\u{1}` are not TOML).
fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn p(p: &Path) -> String {
    q(&p.display().to_string())
}

fn d(d: Duration) -> String {
    q(&humanize(d))
}

fn cidrs(list: &[ipnet::IpNet]) -> String {
    format!("[{}]", list.iter().map(|c| q(&c.to_string())).collect::<Vec<_>>().join(", "))
}

fn opt_path(path: Option<&Path>) -> String {
    path.map_or(q(""), p)
}

/// Lines of one rendering, grouped by section.
struct Out<'a> {
    config: &'a Config,
    sources: bool,
    /// (section, `key = value`, source)
    lines: Vec<(&'static str, String, String)>,
    section: &'static str,
}

impl Out<'_> {
    fn section(&mut self, name: &'static str) {
        self.section = name;
    }

    fn line(&mut self, key: &str, value: String) {
        let full = if self.section.is_empty() { key.to_string() } else { format!("{}.{key}", self.section) };
        let source = self.config.sources.get(&full).map_or("default".to_string(), ToString::to_string);
        self.lines.push((self.section, format!("{key} = {value}"), source));
    }

    fn finish(self) -> String {
        let width = self.lines.iter().map(|(_, l, _)| l.chars().count()).max().unwrap_or(0);
        let mut out = String::new();
        let mut current = "";
        for (section, line, source) in &self.lines {
            if *section != current {
                out.push_str(&format!("\n[{section}]\n"));
                current = section;
            }
            if self.sources {
                out.push_str(&format!("{line:<width$}  # {source}\n"));
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Config {
    /// The effective configuration as TOML (a valid configuration with the
    /// same meaning, passwords aside).
    pub fn render(&self) -> String {
        self.render_lines(false)
    }

    /// [`render`](Self::render) with, after each value, where it came from:
    /// a file and line (and the Workbench key it was derived from), a
    /// command-line flag, an environment variable, a lookup, or `default`.
    pub fn render_with_sources(&self) -> String {
        self.render_lines(true)
    }

    /// Every key with its rendered value, named `key` at the top level and
    /// `section.key` in a section: what a reload compares.
    pub fn effective_values(&self) -> Vec<(String, String)> {
        self.render_out(false)
            .lines
            .into_iter()
            .map(|(section, line, _)| {
                let (key, value) = line.split_once(" = ").unwrap_or((line.as_str(), ""));
                let key = if section.is_empty() { key.to_string() } else { format!("{section}.{key}") };
                (key, value.to_string())
            })
            .collect()
    }

    fn render_lines(&self, sources: bool) -> String {
        self.render_out(sources).finish()
    }

    fn render_out(&self, sources: bool) -> Out<'_> {
        let n = &self.node;
        let c = &self.cluster;
        let pr = &self.proxy;
        let s = &self.sessions;
        let i = &self.identity;
        let l = &self.locks;
        let mut o = Out { config: self, sources, lines: Vec::new(), section: "" };
        o.line("www-host-name", q(n.www_host_name.as_deref().unwrap_or("")));
        o.line("www-address", q(&n.www_address.to_string()));
        o.line("www-port", n.www_port.to_string());
        o.line("backend", q(n.backend.as_deref().unwrap_or("")));
        o.line("backend-tls", n.backend_tls.to_string());
        o.line("loadavg-path", p(&n.loadavg_path));
        o.line("delete-node-on-exit", n.delete_node_on_exit.to_string());
        o.line("database", q(&c.database.redacted()));
        let from_env = matches!(self.sources.get("database-password"), Some(super::raw::Origin::Env(_)));
        o.line("database-password", q(if c.database_password.is_some() || from_env { "***" } else { "" }));
        o.line("database-schema", q(&c.database_schema));
        o.line("pool-size", c.pool_size.to_string());
        o.line("database-connection-timeout", d(c.database_connection_timeout));
        o.line("secure-cookie-key-file", p(&c.secure_cookie_key_file));
        o.line("server-shared-storage-path", p(&c.shared_storage_path));
        o.line("checkin-interval", d(c.checkin_interval));
        o.line("load-report-interval", d(c.load_report_interval));
        o.line("poll-interval", d(c.poll_interval));
        o.line("health-check-interval", d(c.health_check_interval));
        o.line("health-check-rise", c.health_check_rise.to_string());
        o.line("health-check-fall", c.health_check_fall.to_string());
        let (check, path) = match &c.backend_health_check {
            BackendHealthCheck::Tcp => ("tcp", "/"),
            BackendHealthCheck::Http { path } => ("http", path.as_str()),
        };
        o.line("health-check-backend", q(check));
        o.line("health-check-backend-path", q(path));
        o.line("backend-key-failover-after", d(c.backend_key_failover_after));
        o.line("balancer", q(self.balancer.kind.as_str()));
        o.line("custom-balancer-command", p(&self.balancer.custom_command));
        o.line("custom-balancer-timeout", d(self.balancer.custom_timeout));
        o.line("custom-balancer-max-running", self.balancer.custom_max_running.to_string());
        o.line("user-hash-balance-factor", self.balancer.user_hash_balance_factor.to_string());
        o.line("timeout", d(pr.timeout.unwrap_or_default()));
        o.line("verify-ssl-certs", pr.verify_ssl_certs.to_string());
        o.line("ssl-enabled", pr.ssl_enabled.to_string());
        o.line("ssl-certificate", opt_path(pr.ssl_certificate.as_deref()));
        o.line("ssl-certificate-key", opt_path(pr.ssl_certificate_key.as_deref()));
        o.line("ssl-ca-file", opt_path(pr.ssl_ca_file.as_deref()));
        o.line("forwarding-window", d(pr.forwarding_window));
        o.line("forward-peer-check", pr.forward_peer_check.to_string());
        o.line("status-page-cidrs", cidrs(&pr.status_page_cidrs));
        o.line("threads", self.server.threads.to_string());
        o.line("grace-period", d(self.server.grace_period));
        o.line("shutdown-timeout", d(self.server.shutdown_timeout));
        o.line("diagnostics", q(self.server.diagnostics.as_str()));
        o.line("log-level", q(&self.server.log_level));
        o.line("log-format", q(self.server.log_format.as_str()));
        o.line("run-dir", p(&self.server.run_dir));
        o.line("metrics-address", q(&self.server.metrics_address.map_or(String::new(), |a| a.to_string())));
        o.line("drain-timeout", d(self.server.drain_timeout));
        o.line("access-log", q(&self.server.access_log.as_string()));
        o.line("access-log-format", q(self.server.access_log_format.as_str()));
        o.line("request-header-timeout", d(self.server.request_header_timeout));
        o.line("request-body-idle-timeout", d(self.server.request_body_idle_timeout));
        o.line("max-connections", self.server.max_connections.to_string());
        o.section("sessions");
        o.line("session-path-pattern", q(&s.path_pattern.to_string()));
        o.line("session-idle-timeout", d(s.idle_timeout));
        o.line("affinity-cookie-name", q(&s.affinity_cookie_name));
        o.line("affinity-cookie-max-age", d(s.affinity_cookie_max_age));
        o.line("touch-interval", d(s.touch_interval));
        o.line("cookie-secure", s.cookie_secure.to_string());
        o.line("max-sessions-in-memory", s.max_sessions_in_memory.to_string());
        o.section("identity");
        o.line("rstudio-user-cookie", i.rstudio_user_cookie.to_string());
        o.line("user-cookie-name", q(&i.user_cookie_name));
        o.line("trusted-header", q(i.trusted_header.as_deref().unwrap_or("")));
        o.line("trusted-cidrs", cidrs(&i.trusted_cidrs));
        o.section("locks");
        o.line("lock-type", q(l.lock_type.as_str()));
        o.line("refresh-rate", d(l.refresh_rate));
        o.line("timeout-interval", d(l.timeout_interval));
        o.line("enable-logging", l.enable_logging.to_string());
        o.line("log-file", opt_path(l.log_file.as_deref()));
        // Only `false` is accepted (see the schema); rendered so that the
        // rendering names every key that is read.
        o.line("use-symlinks", "false".into());
        o
    }
}

//! The Workbench mapping: reads an existing Workbench configuration
//! directory (`--rstudio-config /etc/rstudio`) — `load-balancer` (current
//! and legacy `[config]`/`[nodes]` formats), `rserver.conf`,
//! `database.conf`, `file-locks` and the secure cookie key — as Workbench
//! reads it, and maps each setting to its native key, keeping the Workbench
//! file and line as its origin.
//!
//! The drop-in layout: rserver keeps running on the node at an internal
//! address, so rserver.conf's `www-address`/`www-port` describe the
//! **backend**; sessionlb's own listen address is the native file's (or
//! `--listen`). Workbench files carry many keys sessionlb does not use: each
//! is a warning naming file, line and key, never a refusal; a bad value of a
//! key sessionlb does use is an error.

mod database_conf;

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::ConfigProblem;
use super::raw::{Origin, RawConfig, RawValue, WorkbenchFacts};

/// Workbench's last place for the secure cookie key.
pub const VAR_LIB_KEY_FILE: &str = "/var/lib/rstudio-server/secure-cookie-key";

/// rserver's port when rserver.conf names none.
const RSERVER_DEFAULT_PORT: u16 = 8787;

/// One `key=value` line of a Workbench-style file.
#[derive(Debug, Clone, PartialEq)]
pub struct KvLine {
    pub line: usize,
    /// The `[section]` the line is in, if any (lower-cased).
    pub section: Option<String>,
    pub key: String,
    pub value: String,
}

/// Parse `key=value` text: `#` starts a comment line, blank lines are
/// skipped, `[name]` opens a section. A bare word without `=` is kept with
/// an empty value only inside a `[nodes]` section; elsewhere it is an error.
pub fn parse_kv(file: &Path, src: &str) -> (Vec<KvLine>, Vec<ConfigProblem>) {
    let mut lines = Vec::new();
    let mut problems = Vec::new();
    let mut section: Option<String> = None;
    for (index, text) in src.lines().enumerate() {
        let line = index + 1;
        let text = text.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        if text.starts_with('[') && text.ends_with(']') {
            section = Some(text[1..text.len() - 1].trim().to_ascii_lowercase());
            continue;
        }
        match text.split_once('=') {
            Some((key, value)) => lines.push(KvLine {
                line,
                section: section.clone(),
                key: key.trim().to_string(),
                value: value.trim().to_string(),
            }),
            None if section.as_deref() == Some("nodes") => {
                lines.push(KvLine { line, section: section.clone(), key: text.to_string(), value: String::new() })
            }
            None => problems.push(ConfigProblem {
                file: file.to_path_buf(),
                line: Some(line),
                key: None,
                message: format!("expected `key=value`, found {text:?}"),
            }),
        }
    }
    (lines, problems)
}

/// Keys of the `load-balancer` file and their native names.
const LOAD_BALANCER_KEYS: &[(&str, &str)] = &[
    ("balancer", "balancer"),
    ("www-host-name", "www-host-name"),
    ("delete-node-on-exit", "delete-node-on-exit"),
    ("timeout", "timeout"),
    ("verify-ssl-certs", "verify-ssl-certs"),
    ("diagnostics", "diagnostics"),
];

/// Keys of `rserver.conf` mapped one to one (`www-address`, `www-port`,
/// `ssl-enabled` and `load-balancing-enabled` have rules of their own).
const RSERVER_KEYS: &[(&str, &str)] = &[
    ("ssl-certificate", "ssl-certificate"),
    ("ssl-certificate-key", "ssl-certificate-key"),
    ("secure-cookie-key-file", "secure-cookie-key-file"),
    ("server-shared-storage-path", "server-shared-storage-path"),
];

/// Every rserver.conf key sessionlb reads (for "did you mean" hints).
const RSERVER_READ: &[&str] = &[
    "www-address",
    "www-port",
    "ssl-enabled",
    "load-balancing-enabled",
    "ssl-certificate",
    "ssl-certificate-key",
    "secure-cookie-key-file",
    "server-shared-storage-path",
];

/// Keys of `file-locks` and their native names.
pub const FILE_LOCKS_KEYS: &[(&str, &str)] = &[
    ("lock-type", "locks.lock-type"),
    ("refresh-rate", "locks.refresh-rate"),
    ("timeout-interval", "locks.timeout-interval"),
    ("enable-logging", "locks.enable-logging"),
    ("log-file", "locks.log-file"),
    ("use-symlinks", "locks.use-symlinks"),
];

/// Read whatever of the Workbench files exist in `dir`. A missing directory
/// is an error; missing individual files are not (Workbench defaults apply).
/// `native` is what the native file set (its key file is the fallback of
/// the key lookup).
pub fn read_dir(dir: &Path, native: &RawConfig) -> Result<RawConfig, Vec<ConfigProblem>> {
    read_dir_with(dir, native, Path::new(VAR_LIB_KEY_FILE))
}

/// [`read_dir`] with Workbench's last key location given (for tests).
pub fn read_dir_with(dir: &Path, native: &RawConfig, var_lib_key: &Path) -> Result<RawConfig, Vec<ConfigProblem>> {
    if !dir.is_dir() {
        return Err(vec![ConfigProblem {
            file: dir.to_path_buf(),
            line: None,
            key: None,
            message: "--rstudio-config must name a directory such as /etc/rstudio".into(),
        }]);
    }
    let mut raw = RawConfig::default();
    let mut facts = WorkbenchFacts { dir: dir.to_path_buf(), ..Default::default() };
    let mut problems = Vec::new();

    let mut load_balancer_file = None;
    if let Some((path, src)) = read_optional(dir, "load-balancer", &mut problems) {
        load_balancer(&mut raw, &mut facts, &mut problems, &path, &src);
        load_balancer_file = Some(path.clone());
        raw.files.push(path);
    }
    let mut load_balancing_enabled = None;
    if let Some((path, src)) = read_optional(dir, "rserver.conf", &mut problems) {
        load_balancing_enabled = rserver_conf(&mut raw, &mut problems, &path, &src);
        raw.files.push(path);
    }
    if let Some((path, src)) = read_optional(dir, "file-locks", &mut problems) {
        match file_locks(&path, &src) {
            Ok(locks) => raw.overlay(locks),
            Err(mut errs) => problems.append(&mut errs),
        }
    }
    if let Some((path, src)) = read_optional(dir, "database.conf", &mut problems) {
        database_conf::read(&mut raw, &mut problems, &path, &src);
    }
    facts.cluster = cluster_evidence(load_balancer_file.as_deref(), load_balancing_enabled, &facts);
    key_lookup(&mut raw, &mut facts, dir, native, var_lib_key);
    raw.workbench = Some(facts);
    if problems.is_empty() { Ok(raw) } else { Err(problems) }
}

/// Why this directory describes a cluster, if it does: the load-balancer
/// file (with or without a legacy `[nodes]` list) or
/// `load-balancing-enabled=1`. `load-balancing-enabled=0` turns off
/// Workbench's own load balancing (as docs/workbench.md asks, sessionlb
/// balancing instead), not the cluster: the load-balancer file still counts.
fn cluster_evidence(
    load_balancer_file: Option<&Path>,
    load_balancing_enabled: Option<(bool, Origin)>,
    facts: &WorkbenchFacts,
) -> Option<(Origin, String)> {
    if let Some(file) = load_balancer_file {
        let why = match facts.legacy_nodes.len() {
            n if n > 1 => format!("{} lists {n} nodes in its legacy [nodes] section", file.display()),
            _ => format!("{} exists, which makes this node part of a load-balanced cluster", file.display()),
        };
        return Some((Origin::file(file, 0), why));
    }
    match load_balancing_enabled {
        Some((true, origin)) => Some((origin, "rserver.conf enables load balancing (load-balancing-enabled=1)".into())),
        _ => None,
    }
}

fn load_balancer(
    raw: &mut RawConfig,
    facts: &mut WorkbenchFacts,
    problems: &mut Vec<ConfigProblem>,
    path: &Path,
    src: &str,
) {
    let (lines, mut errs) = parse_kv(path, src);
    problems.append(&mut errs);
    let mut warned_sections = Vec::new();
    for kv in lines {
        match kv.section.as_deref() {
            // Legacy node list: membership lives in the registry now, but
            // the list still tells which address is this node's.
            Some("nodes") => facts.legacy_nodes.push(kv.key.clone()),
            None | Some("config") => map_key(raw, path, &kv, LOAD_BALANCER_KEYS),
            Some(other) => {
                if !warned_sections.contains(&other.to_string()) {
                    warned_sections.push(other.to_string());
                    raw.warnings.push(problem(
                        path,
                        kv.line,
                        None,
                        format!("section [{other}] is not used by sessionlb (it reads [config] and [nodes]); ignored"),
                    ));
                }
            }
        }
    }
}

/// Map rserver.conf; returns `load-balancing-enabled` when it is set.
fn rserver_conf(
    raw: &mut RawConfig,
    problems: &mut Vec<ConfigProblem>,
    path: &Path,
    src: &str,
) -> Option<(bool, Origin)> {
    let (lines, mut errs) = parse_kv(path, src);
    problems.append(&mut errs);
    let mut address: Option<&KvLine> = None;
    let mut port: Option<&KvLine> = None;
    let mut load_balancing = None;
    for kv in &lines {
        match kv.key.as_str() {
            "www-address" => address = Some(kv),
            "www-port" => port = Some(kv),
            "ssl-enabled" => {
                // rserver serves https: so does sessionlb (same certificate),
                // and it speaks TLS to rserver.
                let via = Some("rserver.conf ssl-enabled".to_string());
                for key in ["ssl-enabled", "backend-tls"] {
                    raw.set_from(
                        key,
                        RawValue::Text(kv.value.clone()),
                        Origin::File { file: path.to_path_buf(), line: kv.line, via: via.clone() },
                    );
                }
            }
            "load-balancing-enabled" => match kv.value.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => load_balancing = Some((true, Origin::file(path, kv.line))),
                "0" | "false" | "no" | "off" => load_balancing = Some((false, Origin::file(path, kv.line))),
                other => problems.push(problem(
                    path,
                    kv.line,
                    Some("load-balancing-enabled"),
                    format!("`load-balancing-enabled` must be 1 or 0; found {other:?}"),
                )),
            },
            _ => match RSERVER_KEYS.iter().find(|(name, _)| *name == kv.key) {
                Some((_, native)) => raw.set(*native, RawValue::Text(kv.value.clone()), path, kv.line),
                // rserver.conf is mostly rserver's own settings: say which
                // were not read, without listing ours every time.
                None => raw.warnings.push(unused_key(path, kv.line, &kv.key, RSERVER_READ.iter().copied(), false)),
            },
        }
    }
    backend_from_rserver(raw, problems, path, address, port);
    load_balancing
}

/// rserver.conf's `www-address`/`www-port` describe rserver, the backend:
/// `0.0.0.0`, `::` or empty means the loopback address of that family.
fn backend_from_rserver(
    raw: &mut RawConfig,
    problems: &mut Vec<ConfigProblem>,
    path: &Path,
    address: Option<&KvLine>,
    port: Option<&KvLine>,
) {
    let port_value = match port {
        None => RSERVER_DEFAULT_PORT,
        Some(kv) => match kv.value.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                problems.push(problem(
                    path,
                    kv.line,
                    Some("www-port"),
                    format!("`www-port` must be an integer from 1 to 65535 (rserver's port); found {:?}", kv.value),
                ));
                return;
            }
        },
    };
    let written = address.map_or("", |kv| kv.value.as_str());
    let host = match written.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() && ip.is_ipv6() => "[::1]".to_string(),
        Ok(ip) if ip.is_unspecified() => "127.0.0.1".to_string(),
        Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
        Ok(ip) => ip.to_string(),
        Err(_) if written.is_empty() => "127.0.0.1".to_string(),
        Err(_) => written.to_string(),
    };
    let describe_address = match address {
        Some(kv) => format!("www-address={} (line {})", kv.value, kv.line),
        None => "no www-address: 127.0.0.1".to_string(),
    };
    let describe_port = match port {
        Some(kv) => format!("www-port={} (line {})", kv.value, kv.line),
        None => format!("no www-port: rserver's default {RSERVER_DEFAULT_PORT}"),
    };
    let line = port.or(address).map_or(0, |kv| kv.line);
    raw.set_from(
        "backend",
        RawValue::Text(format!("{host}:{port_value}")),
        Origin::File {
            file: path.to_path_buf(),
            line,
            via: Some(format!("rserver's address: {describe_address}, {describe_port}")),
        },
    );
}

/// Parse a Workbench `file-locks` file into `locks.*` settings.
pub fn file_locks(path: &Path, src: &str) -> Result<RawConfig, Vec<ConfigProblem>> {
    let (lines, problems) = parse_kv(path, src);
    let mut raw = RawConfig::default();
    for kv in lines {
        map_key(&mut raw, path, &kv, FILE_LOCKS_KEYS);
    }
    raw.files.push(path.to_path_buf());
    if problems.is_empty() { Ok(raw) } else { Err(problems) }
}

/// The secure cookie key, looked up as Workbench does: rserver.conf's
/// `secure-cookie-key-file`, else `DIR/secure-cookie-key`, else
/// `/var/lib/rstudio-server/secure-cookie-key`; then the native file's
/// setting. Every place looked at is kept for the error when none exists.
fn key_lookup(raw: &mut RawConfig, facts: &mut WorkbenchFacts, dir: &Path, native: &RawConfig, var_lib_key: &Path) {
    if let Some(entry) = raw.entries.get("secure-cookie-key-file") {
        facts.key_tried = vec![PathBuf::from(super::reader::text(&entry.value).unwrap_or_default())];
        return;
    }
    let candidates = [dir.join("secure-cookie-key"), var_lib_key.to_path_buf()];
    let names: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    for (i, candidate) in candidates.iter().enumerate() {
        if candidate.exists() {
            facts.key_tried = candidates[..=i].to_vec();
            let text = if i == 0 {
                "Workbench's lookup: rserver.conf sets no secure-cookie-key-file".to_string()
            } else {
                format!("Workbench's lookup: rserver.conf sets no secure-cookie-key-file, {} does not exist", names[0])
            };
            raw.set_from("secure-cookie-key-file", RawValue::Text(names[i].clone()), Origin::Lookup(text));
            return;
        }
    }
    facts.key_tried = candidates.to_vec();
    match native.entries.get("secure-cookie-key-file").and_then(|e| super::reader::text(&e.value)) {
        Some(path) => facts.key_tried.push(PathBuf::from(path)),
        None => raw.set_from(
            "secure-cookie-key-file",
            RawValue::Text(names[0].clone()),
            Origin::Lookup(format!("Workbench's lookup found no key ({})", names.join(", "))),
        ),
    }
}

/// Map a key through `table`; a key sessionlb does not use is a warning.
fn map_key(raw: &mut RawConfig, path: &Path, kv: &KvLine, table: &[(&str, &str)]) {
    match table.iter().find(|(name, _)| *name == kv.key) {
        Some((_, native)) => raw.set(*native, RawValue::Text(kv.value.clone()), path, kv.line),
        None => raw.warnings.push(unused_key(path, kv.line, &kv.key, table.iter().map(|(name, _)| *name), true)),
    }
}

/// The warning for a Workbench key sessionlb does not use: it names the
/// file, the line and the key, suggests a near spelling, and (`list`) says
/// which keys of that file sessionlb reads.
pub(super) fn unused_key<'a>(
    path: &Path,
    line: usize,
    key: &str,
    read: impl Iterator<Item = &'a str>,
    list: bool,
) -> ConfigProblem {
    let read: Vec<&str> = read.collect();
    let mut message = format!("`{key}` is not used by sessionlb; ignored");
    if let Some(near) = read.iter().find(|name| edit_distance(key, name) <= 2) {
        message.push_str(&format!(" (did you mean `{near}`?)"));
    }
    if list {
        message.push_str(&format!("; sessionlb reads: {}", read.join(", ")));
    }
    problem(path, line, Some(key), message)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn read_optional(dir: &Path, name: &str, problems: &mut Vec<ConfigProblem>) -> Option<(PathBuf, String)> {
    let path = dir.join(name);
    match fs::read_to_string(&path) {
        Ok(src) => Some((path, src)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            problems.push(problem(&path, 0, None, format!("cannot read: {e}")));
            None
        }
    }
}

fn problem(file: &Path, line: usize, key: Option<&str>, message: String) -> ConfigProblem {
    ConfigProblem { file: file.to_path_buf(), line: (line > 0).then_some(line), key: key.map(str::to_string), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_current_and_legacy_load_balancer_files() {
        let src = "# comment\n[config]\nbalancer = user-hash\n\n[nodes]\n10.0.0.1:8787\n";
        let (lines, problems) = parse_kv(Path::new("lb"), src);
        assert!(problems.is_empty());
        assert_eq!(lines[0].key, "balancer");
        assert_eq!(lines[0].value, "user-hash");
        assert_eq!(lines[0].line, 3);
        assert_eq!(lines[1].section.as_deref(), Some("nodes"));
        assert_eq!(lines[1].key, "10.0.0.1:8787");
    }

    #[test]
    fn bare_word_outside_nodes_is_an_error_with_its_line() {
        let (_, problems) = parse_kv(Path::new("lb"), "balancer=sessions\nnonsense\n");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].line, Some(2));
    }

    #[test]
    fn file_locks_keys_map_to_native_names_and_unknown_keys_are_warnings() {
        let raw = file_locks(Path::new("file-locks"), "lock-type=advisory\nrefresh-rate=5\n").unwrap();
        assert_eq!(raw.entries["locks.lock-type"].value, RawValue::Text("advisory".into()));
        assert_eq!(raw.entries["locks.lock-type"].origin, Origin::file(Path::new("file-locks"), 1));
        let raw = file_locks(Path::new("file-locks"), "lock-typ=advisory\n").unwrap();
        assert!(raw.entries.is_empty());
        let w = raw.warnings[0].to_string();
        assert!(
            w.starts_with("file-locks:1: `lock-typ` is not used by sessionlb; ignored (did you mean `lock-type`?)"),
            "{w}"
        );
        assert!(w.contains("sessionlb reads: lock-type, refresh-rate"), "{w}");
    }
}

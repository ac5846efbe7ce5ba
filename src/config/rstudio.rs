//! Reader for an existing Workbench configuration directory
//! (`--rstudio-config /etc/rstudio`): `load-balancer` (current and legacy
//! `[config]`/`[nodes]` formats), `rserver.conf`, `database.conf`,
//! `file-locks` and `secure-cookie-key`.
//!
//! Each recognised Workbench key is mapped to its native key, keeping the
//! Workbench file and line as its origin, so validation errors point at the
//! file the operator actually wrote. `rserver.conf` carries many options that
//! are not ours and is read selectively; the load-balancer and file-locks
//! files are ours alone, so unknown keys there are errors.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::ConfigProblem;
use super::raw::{RawConfig, RawValue};

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

/// Keys of `rserver.conf` that concern us; all others are Workbench's own.
const RSERVER_KEYS: &[(&str, &str)] = &[
    ("www-address", "www-address"),
    ("www-port", "www-port"),
    ("secure-cookie-key-file", "secure-cookie-key-file"),
    ("server-shared-storage-path", "server-shared-storage-path"),
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
pub fn read_dir(dir: &Path) -> Result<RawConfig, Vec<ConfigProblem>> {
    if !dir.is_dir() {
        return Err(vec![ConfigProblem {
            file: dir.to_path_buf(),
            line: None,
            key: None,
            message: "--rstudio-config must name a directory such as /etc/rstudio".into(),
        }]);
    }
    let mut raw = RawConfig::default();
    let mut problems = Vec::new();

    if let Some((path, src)) = read_optional(dir, "load-balancer", &mut problems) {
        let (lines, mut errs) = parse_kv(&path, &src);
        problems.append(&mut errs);
        for kv in lines {
            match kv.section.as_deref() {
                // Legacy node list: membership now lives in the registry.
                Some("nodes") => tracing::warn!(
                    file = %path.display(), line = kv.line, node = %kv.key,
                    "legacy [nodes] entry ignored: nodes join the cluster through the registry"
                ),
                None | Some("config") => map_key(&mut raw, &mut problems, &path, &kv, LOAD_BALANCER_KEYS, true),
                Some(other) => problems.push(problem(
                    &path,
                    kv.line,
                    None,
                    format!("unknown section [{other}]; allowed: [config], [nodes]"),
                )),
            }
        }
        raw.files.push(path);
    }
    if let Some((path, src)) = read_optional(dir, "rserver.conf", &mut problems) {
        let (lines, mut errs) = parse_kv(&path, &src);
        problems.append(&mut errs);
        for kv in lines {
            map_key(&mut raw, &mut problems, &path, &kv, RSERVER_KEYS, false);
        }
        raw.files.push(path);
    }
    if let Some((path, src)) = read_optional(dir, "file-locks", &mut problems) {
        match file_locks(&path, &src) {
            Ok(locks) => raw.overlay(locks),
            Err(mut errs) => problems.append(&mut errs),
        }
    }
    if let Some((path, src)) = read_optional(dir, "database.conf", &mut problems) {
        database_conf(&mut raw, &mut problems, &path, &src);
    }
    let key_file = dir.join("secure-cookie-key");
    if !raw.entries.contains_key("secure-cookie-key-file") && key_file.exists() {
        raw.set("secure-cookie-key-file", RawValue::Text(key_file.display().to_string()), &key_file, 1);
    }
    if problems.is_empty() { Ok(raw) } else { Err(problems) }
}

/// Parse a Workbench `file-locks` file into `locks.*` settings.
pub fn file_locks(path: &Path, src: &str) -> Result<RawConfig, Vec<ConfigProblem>> {
    let (lines, mut problems) = parse_kv(path, src);
    let mut raw = RawConfig::default();
    for kv in lines {
        map_key(&mut raw, &mut problems, path, &kv, FILE_LOCKS_KEYS, true);
    }
    raw.files.push(path.to_path_buf());
    if problems.is_empty() { Ok(raw) } else { Err(problems) }
}

fn database_conf(raw: &mut RawConfig, problems: &mut Vec<ConfigProblem>, path: &Path, src: &str) {
    let (lines, mut errs) = parse_kv(path, src);
    problems.append(&mut errs);
    let get = |name: &str| lines.iter().find(|kv| kv.key == name);
    let first_line = lines.first().map_or(1, |kv| kv.line);
    let provider = get("provider").map_or("sqlite".to_string(), |kv| kv.value.to_ascii_lowercase());
    let url = match provider.as_str() {
        "sqlite" => {
            let dir = get("directory").map_or("/var/lib/rstudio-server", |kv| kv.value.as_str());
            format!("sqlite://{}/sessionlb.sqlite", dir.trim_end_matches('/'))
        }
        "postgresql" | "postgres" => {
            if let Some(uri) = get("connection-uri") {
                uri.value.clone()
            } else {
                let host = get("host").map_or("localhost", |kv| kv.value.as_str());
                let port = get("port").map_or("5432", |kv| kv.value.as_str());
                let db = get("database").map_or("rstudio", |kv| kv.value.as_str());
                let user = get("username").map_or("postgres", |kv| kv.value.as_str());
                let user = percent_encoding::utf8_percent_encode(user, percent_encoding::NON_ALPHANUMERIC);
                format!("postgres://{user}@{host}:{port}/{db}")
            }
        }
        other => {
            let line = get("provider").map_or(first_line, |kv| kv.line);
            problems.push(problem(
                path,
                line,
                Some("provider"),
                format!("`provider` must be one of sqlite, postgresql; found {other:?}"),
            ));
            return;
        }
    };
    let line = get("provider").map_or(first_line, |kv| kv.line);
    raw.set("database", RawValue::Text(url), path, line);
    // Plain or encrypted (`encrypt-password`): decrypted when connecting.
    if provider != "sqlite"
        && let Some(pw) = get("password").filter(|kv| !kv.value.is_empty())
    {
        raw.set("database-password", RawValue::Text(pw.value.clone()), path, pw.line);
    }
    raw.files.push(path.to_path_buf());
}

fn map_key(
    raw: &mut RawConfig,
    problems: &mut Vec<ConfigProblem>,
    path: &Path,
    kv: &KvLine,
    table: &[(&str, &str)],
    strict: bool,
) {
    match table.iter().find(|(name, _)| *name == kv.key) {
        Some((_, native)) => raw.set(*native, RawValue::Text(kv.value.clone()), path, kv.line),
        None if strict => {
            let allowed: Vec<&str> = table.iter().map(|(name, _)| *name).collect();
            problems.push(problem(
                path,
                kv.line,
                Some(&kv.key),
                format!("unknown key `{}`; allowed: {}", kv.key, allowed.join(", ")),
            ));
        }
        None => {}
    }
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
    fn file_locks_keys_map_to_native_names_and_unknown_keys_fail() {
        let raw = file_locks(Path::new("file-locks"), "lock-type=advisory\nrefresh-rate=5\n").unwrap();
        assert_eq!(raw.entries["locks.lock-type"].value, RawValue::Text("advisory".into()));
        assert_eq!(raw.entries["locks.refresh-rate"].origin.line, 2);
        let errs = file_locks(Path::new("file-locks"), "lock-typ=advisory\n").unwrap_err();
        assert!(errs[0].message.contains("allowed: lock-type"), "{}", errs[0]);
    }
}

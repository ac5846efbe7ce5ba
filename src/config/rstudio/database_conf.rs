//! Workbench's `database.conf`, read as Workbench reads it: `provider`
//! (`sqlite` by default, or `postgresql`), the connection as separate keys
//! (`host` — a name, an IPv4 or IPv6 address, or a socket directory —
//! `port`, `database`, `username`, `password`) or as one `connection-uri`
//! (which then wins, with a warning when other connection keys are set),
//! `pool-size`, and `connection-timeout-seconds` (also under the
//! `connnection-timeout-seconds` spelling that Workbench accepted for years).
//! The file may hold a password: a warning says so when group or others can
//! read it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::{KvLine, parse_kv, problem, unused_key};
use crate::config::ConfigProblem;
use crate::config::database::postgres_url;
use crate::config::raw::{Origin, RawConfig, RawValue};

/// Every key of database.conf that sessionlb reads.
const KEYS: &[&str] = &[
    "provider",
    "directory",
    "host",
    "port",
    "database",
    "username",
    "password",
    "connection-uri",
    "pool-size",
    "connection-timeout-seconds",
    "connnection-timeout-seconds",
];

/// Workbench's defaults of the separate connection keys.
const DEFAULTS: &[(&str, &str)] =
    &[("host", "localhost"), ("port", "5432"), ("database", "rstudio"), ("username", "postgres")];

pub(super) fn read(raw: &mut RawConfig, problems: &mut Vec<ConfigProblem>, path: &Path, src: &str) {
    let (lines, mut errs) = parse_kv(path, src);
    problems.append(&mut errs);
    raw.files.push(path.to_path_buf());
    warn_if_readable_by_others(raw, path);
    // The last of a repeated key wins, as in Workbench's option parser.
    let get = |name: &str| lines.iter().rev().find(|kv| kv.key == name);
    for kv in &lines {
        if !KEYS.contains(&kv.key.as_str()) {
            raw.warnings.push(unused_key(path, kv.line, &kv.key, KEYS.iter().copied(), true));
        }
    }
    let provider_line = get("provider").map_or(0, |kv| kv.line);
    let provider = get("provider").map_or("sqlite".to_string(), |kv| kv.value.to_ascii_lowercase());
    match provider.as_str() {
        "sqlite" => {
            let dir = get("directory").map_or("/var/lib/rstudio-server", |kv| kv.value.as_str());
            let via = match get("provider") {
                Some(_) => "provider=sqlite",
                None => "no provider: Workbench's default sqlite",
            };
            raw.set_from(
                "database",
                RawValue::Text(format!("sqlite://{}/sessionlb.sqlite", dir.trim_end_matches('/'))),
                Origin::File { file: path.to_path_buf(), line: provider_line, via: Some(via.into()) },
            );
        }
        "postgresql" | "postgres" => postgresql(raw, path, provider_line, &lines),
        other => problems.push(problem(
            path,
            provider_line,
            Some("provider"),
            format!("`provider` must be one of sqlite, postgresql; found {other:?}"),
        )),
    }
}

fn postgresql(raw: &mut RawConfig, path: &Path, provider_line: usize, lines: &[KvLine]) {
    let get = |name: &str| lines.iter().rev().find(|kv| kv.key == name);
    if let Some(uri) = get("connection-uri") {
        raw.set("database", RawValue::Text(uri.value.clone()), path, uri.line);
        // As Workbench: only the URI and `password` are used then.
        let ignored: Vec<String> = DEFAULTS
            .iter()
            .filter_map(|(name, default)| get(name).filter(|kv| kv.value != *default))
            .map(|kv| format!("{} (line {})", kv.key, kv.line))
            .collect();
        if !ignored.is_empty() {
            raw.warnings.push(problem(
                path,
                uri.line,
                Some("connection-uri"),
                format!(
                    "`connection-uri` is set, so {} {} ignored, as by Workbench: only the URI and `password` are used",
                    ignored.join(", "),
                    if ignored.len() == 1 { "is" } else { "are" }
                ),
            ));
        }
    } else {
        let value = |name: &str| {
            get(name)
                .map(|kv| kv.value.as_str())
                .unwrap_or_else(|| DEFAULTS.iter().find(|(n, _)| *n == name).map_or("", |(_, d)| d))
        };
        let url = postgres_url(value("host"), value("port"), value("database"), value("username"));
        let written: Vec<String> = ["host", "port", "database", "username"]
            .iter()
            .map(|name| match get(name) {
                Some(kv) => format!("{name} (line {})", kv.line),
                None => format!("{name}: default"),
            })
            .collect();
        raw.set_from(
            "database",
            RawValue::Text(url),
            Origin::File {
                file: path.to_path_buf(),
                line: provider_line,
                via: Some(format!("provider=postgresql, {}", written.join(", "))),
            },
        );
    }
    // Plain or encrypted (`encrypt-password`): decrypted when connecting.
    if let Some(pw) = get("password").filter(|kv| !kv.value.is_empty()) {
        raw.set("database-password", RawValue::Text(pw.value.clone()), path, pw.line);
    }
    // 0 is Workbench's "automatic": sessionlb's default then.
    if let Some(kv) = get("pool-size").filter(|kv| kv.value != "0") {
        raw.set("pool-size", RawValue::Text(kv.value.clone()), path, kv.line);
    }
    let timeout = get("connection-timeout-seconds");
    let misspelt = get("connnection-timeout-seconds");
    if let (Some(kept), Some(other)) = (timeout, misspelt) {
        raw.warnings.push(problem(
            path,
            other.line,
            Some(&other.key),
            format!(
                "both `connection-timeout-seconds` (line {}) and its old spelling `connnection-timeout-seconds` are set; using the first",
                kept.line
            ),
        ));
    }
    if let Some(kv) = timeout.or(misspelt) {
        if kv.value == "0" {
            // libpq's 0 waits forever; a node must not hang at start.
            raw.warnings.push(problem(
                path,
                kv.line,
                Some(&kv.key),
                format!("`{}=0` (wait forever) is not supported; sessionlb waits 10 seconds", kv.key),
            ));
        } else {
            raw.set_from(
                "database-connection-timeout",
                RawValue::Text(kv.value.clone()),
                Origin::File { file: path.to_path_buf(), line: kv.line, via: Some(kv.key.clone()) },
            );
        }
    }
}

/// Workbench wants database.conf at mode 0600 (it may hold a password).
fn warn_if_readable_by_others(raw: &mut RawConfig, path: &Path) {
    let Ok(meta) = std::fs::metadata(path) else { return };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        raw.warnings.push(problem(
            path,
            0,
            None,
            format!(
                "has mode {mode:04o}: group or others can read it, and it may hold the database password; \
                 make it readable by its owner only (chmod 600 {}), as Workbench wants",
                path.display()
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn read_file(text: &str, mode: u32) -> (RawConfig, Vec<ConfigProblem>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("database.conf");
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        let mut raw = RawConfig::default();
        let mut problems = Vec::new();
        read(&mut raw, &mut problems, &path, text);
        (raw, problems)
    }

    fn text(raw: &RawConfig, key: &str) -> String {
        match &raw.entries[key].value {
            RawValue::Text(s) => s.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn separate_keys_become_a_url_with_pool_size_and_either_timeout_spelling() {
        let (raw, problems) = read_file(
            "provider=postgresql\nhost=::1\nport=5433\ndatabase=work bench\nusername=rs@corp\npool-size=6\nconnnection-timeout-seconds=7\n",
            0o600,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert!(raw.warnings.is_empty(), "{:?}", raw.warnings);
        assert_eq!(text(&raw, "database"), "postgres://rs%40corp@[::1]:5433/work%20bench");
        assert_eq!(text(&raw, "pool-size"), "6");
        assert_eq!(raw.entries["pool-size"].origin.to_string().rsplit_once(':').unwrap().1, "6");
        assert_eq!(text(&raw, "database-connection-timeout"), "7");
        let (raw, _) = read_file("provider=postgresql\nconnection-timeout-seconds=3\npool-size=0\n", 0o600);
        assert_eq!(text(&raw, "database-connection-timeout"), "3");
        assert!(!raw.entries.contains_key("pool-size"), "0 is Workbench's automatic size: sessionlb's default");
    }

    #[test]
    fn connection_uri_wins_and_says_what_it_overrides() {
        let (raw, _) = read_file(
            "provider=postgresql\nhost=db2\nconnection-uri=postgresql://rs@db:5432/rstudio?sslmode=require\n",
            0o600,
        );
        assert_eq!(text(&raw, "database"), "postgresql://rs@db:5432/rstudio?sslmode=require");
        assert_eq!(raw.warnings.len(), 1, "{:?}", raw.warnings);
        assert!(raw.warnings[0].message.contains("host (line 2) is ignored"), "{}", raw.warnings[0]);
    }

    #[test]
    fn socket_directory_host_and_unknown_keys_and_loose_permissions() {
        let (raw, problems) =
            read_file("provider=postgresql\nhost=/var/run/postgresql\nauto-create=1\npassword=x\n", 0o644);
        assert!(problems.is_empty());
        assert_eq!(text(&raw, "database"), "postgres://postgres@localhost:5432/rstudio?host=%2Fvar%2Frun%2Fpostgresql");
        let warnings: Vec<String> = raw.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("has mode 0644: group or others can read it"), "{warnings:?}");
        assert!(
            warnings[1].contains("database.conf:3: `auto-create` is not used by sessionlb; ignored"),
            "{warnings:?}"
        );
    }

    #[test]
    fn provider_is_checked_and_sqlite_is_the_default() {
        let (_, problems) = read_file("provider=mysql\n", 0o600);
        assert!(problems[0].to_string().contains(":1: `provider` must be one of sqlite, postgresql"), "{problems:?}");
        let (raw, _) = read_file("directory=/srv/rs\n", 0o600);
        assert_eq!(text(&raw, "database"), "sqlite:///srv/rs/sessionlb.sqlite");
    }
}

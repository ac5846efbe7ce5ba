//! The registry database URL: parsing, redaction (passwords never reach a
//! log, an error or `check-config`), splicing a separately configured
//! password into it, and building a URL from the parts of a Workbench
//! `database.conf` (IPv6 and socket-directory hosts, percent-encoded names).

use std::fmt;
use std::path::PathBuf;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

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

    pub fn is_postgres(&self) -> bool {
        matches!(self, DatabaseUrl::Postgres(_))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// The environment variable that overrides the database password, as in
/// Workbench (2024.04+): plain or encrypted like `database-password`.
pub const PASSWORD_ENV: &str = "WORKBENCH_POSTGRES_PASSWORD";

/// The default PostgreSQL schema of the registry.
pub const DEFAULT_SCHEMA: &str = "sessionlb";

/// Whether `name` can be a registry schema: a lower-case SQL identifier
/// (letters, digits, `_`, not starting with a digit) of at most 48 bytes, so
/// that it never needs quoting and its notification channel fits
/// PostgreSQL's 63-byte identifiers.
pub fn valid_schema_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 48
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
        && !name.starts_with("pg_")
}

/// The LISTEN/NOTIFY channel of the registry in `schema`: `sessionlb` for
/// tables in `public` (where versions before the schema kept them, so that
/// nodes of both versions hear each other during an upgrade), else
/// `sessionlb.<schema>`, so that two registries in one database never hear
/// each other. The notification functions compute the same name (migration
/// 0004).
pub fn notify_channel(schema: &str) -> String {
    if schema == "public" { "sessionlb".to_string() } else { format!("sessionlb.{schema}") }
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

/// Whether the URL's query names the user (`?user=…`, libpq's form).
fn query_names_user(tail: &str) -> bool {
    let before_fragment = tail.split('#').next().unwrap_or("");
    before_fragment.split_once('?').is_some_and(|(_, query)| {
        query.split('&').any(|param| param.split_once('=').is_some_and(|(name, _)| name == "user"))
    })
}

/// `url` with its password set to `password` (percent-encoded): in the user
/// info when the URL has one, else as a `password=` query parameter next to
/// a `?user=` (libpq's other form).
pub(crate) fn with_password(url: &str, password: &str) -> Result<String, String> {
    let (scheme, rest) = url.split_once("://").ok_or("the database URL has no scheme")?;
    let (authority, tail) = split_authority(rest);
    let encoded = utf8_percent_encode(password, NON_ALPHANUMERIC);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            Ok(format!("{scheme}://{user}:{encoded}@{host}{tail}"))
        }
        None if query_names_user(tail) => {
            // Drop any `password=` already in the query: ours replaces it.
            let (before_fragment, fragment) = tail.split_at(tail.find('#').unwrap_or(tail.len()));
            let (path, query) = before_fragment.split_once('?').unwrap_or((before_fragment, ""));
            let mut params: Vec<String> = query
                .split('&')
                .filter(|p| !p.is_empty() && p.split_once('=').is_none_or(|(n, _)| n != "password"))
                .map(str::to_string)
                .collect();
            params.push(format!("password={encoded}"));
            Ok(format!("{scheme}://{authority}{path}?{}{fragment}", params.join("&")))
        }
        None => Err(
            "the database URL must name a user (postgres://user@host/db, or ?user=name) to go with database-password"
                .into(),
        ),
    }
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

/// What a URL component may hold unencoded (RFC 3986 unreserved).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// A PostgreSQL URL from separate parts, as a Workbench `database.conf`
/// gives them. `host` may be a name, an IPv4 or IPv6 address (bracketed or
/// not), or a socket directory (starting with `/`); user and database names
/// are percent-encoded, so any character survives.
pub fn postgres_url(host: &str, port: &str, database: &str, user: &str) -> String {
    let user = utf8_percent_encode(user, COMPONENT);
    let database = utf8_percent_encode(database, COMPONENT);
    let port = port.trim();
    if host.starts_with('/') {
        // libpq's form: the socket directory as the `host` parameter.
        let dir = utf8_percent_encode(host, COMPONENT);
        return format!("postgres://{user}@localhost:{port}/{database}?host={dir}");
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let host = if bare.parse::<std::net::Ipv6Addr>().is_ok() { format!("[{bare}]") } else { host.to_string() };
    format!("postgres://{user}@{host}:{port}/{database}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_from_database_conf_parts_keep_every_character() {
        assert_eq!(postgres_url("db", "5432", "rstudio", "rs"), "postgres://rs@db:5432/rstudio");
        assert_eq!(postgres_url("::1", "5433", "rstudio", "rs"), "postgres://rs@[::1]:5433/rstudio");
        assert_eq!(postgres_url("[fd00::5]", "5432", "rs", "rs"), "postgres://rs@[fd00::5]:5432/rs");
        assert_eq!(
            postgres_url("/var/run/postgresql", "5432", "rstudio", "rs"),
            "postgres://rs@localhost:5432/rstudio?host=%2Fvar%2Frun%2Fpostgresql"
        );
        assert_eq!(
            postgres_url("db", "5432", "work bench/db?", "r@s:x"),
            "postgres://r%40s%3Ax@db:5432/work%20bench%2Fdb%3F"
        );
    }

    #[test]
    fn password_goes_into_user_info_or_next_to_a_query_user() {
        assert_eq!(with_password("postgres://rs@db/x", "p w").unwrap(), "postgres://rs:p%20w@db/x");
        assert_eq!(
            with_password("postgresql:///rstudio?host=/run/pg&user=rs", "p").unwrap(),
            "postgresql:///rstudio?host=/run/pg&user=rs&password=p"
        );
        assert_eq!(
            with_password("postgres://db/x?user=rs&password=old&sslmode=require", "new").unwrap(),
            "postgres://db/x?user=rs&sslmode=require&password=new"
        );
        assert!(with_password("postgres://db/x?sslmode=require", "p").unwrap_err().contains("must name a user"));
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        for ok in ["sessionlb", "lb_2", "_x"] {
            assert!(valid_schema_name(ok), "{ok}");
        }
        for bad in ["", "Sessionlb", "2lb", "lb-x", "lb;drop", "pg_temp", &"x".repeat(49)] {
            assert!(!valid_schema_name(bad), "{bad}");
        }
        assert_eq!(notify_channel("public"), "sessionlb");
        assert_eq!(notify_channel("sessionlb"), "sessionlb.sessionlb");
    }
}

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use super::*;

fn parse(src: &str) -> Result<Config, ConfigError> {
    Config::from_toml(Path::new("/etc/sessionlb/sessionlb.toml"), src)
}

fn problems(src: &str) -> Vec<ConfigProblem> {
    match parse(src) {
        Err(ConfigError::Invalid(p)) => p,
        other => panic!("expected problems, got {other:?}"),
    }
}

#[test]
fn empty_file_gives_documented_defaults() {
    let c = parse("").unwrap();
    assert_eq!(c.node.www_port, 8787);
    assert!(c.is_router());
    assert_eq!(c.balancer.kind, BalancerKind::Sessions);
    assert_eq!(c.cluster.checkin_interval, Duration::from_secs(300));
    assert_eq!(c.proxy.timeout, Some(Duration::from_secs(10)));
    assert_eq!(c.sessions.idle_timeout, Duration::from_secs(7200));
    assert_eq!(c.locks, LockSettings::default());
    assert_eq!(c.protocol(), "http");
}

#[test]
fn every_problem_is_reported_at_once_with_file_line_and_allowed_values() {
    let src = "www-port = \"abc\"\nbalancer = \"round-robin\"\nwww-address = \"300.1.1.1\"\nbalncer = 1\n[locks]\nlock-type = \"nfs\"\n[nonsense]\nx = 1\n";
    let p = problems(src);
    let text: Vec<String> = p.iter().map(|p| p.to_string()).collect();
    let all = text.join("\n");
    assert_eq!(p.len(), 6, "{all}");
    assert!(
        text[0].starts_with("/etc/sessionlb/sessionlb.toml:1: `www-port` must be an integer from 1 to 65535"),
        "{all}"
    );
    assert!(
        text[1]
            .contains(":2: `balancer` must be one of sessions, system-load, user-hash, custom; found \"round-robin\""),
        "{all}"
    );
    assert!(text[2].contains(":3: `www-address` must be an IP address"), "{all}");
    assert!(text[3].contains(":4: unknown key `balncer` (did you mean `balancer`?)"), "{all}");
    assert!(text[4].contains(":6: `locks.lock-type` must be one of linkbased, advisory"), "{all}");
    // the unknown section is reported too, as an unknown key at its line
    assert!(
        text[5].contains(
            ":7: unknown key `nonsense`; allowed top-level keys: access-log, access-log-format, backend, \
             backend-key-failover-after, backend-tls,"
        ),
        "{all}"
    );
}

#[test]
fn wrong_types_name_what_was_found() {
    let p = problems(
        "checkin-interval = true\nverify-ssl-certs = \"yes\"\n[identity]\ntrusted-cidrs = [\"10.0.0.0/8\", \"bogus\"]\n",
    );
    assert_eq!(p.len(), 3);
    assert!(p[0].message.contains("found boolean true"), "{}", p[0]);
    assert!(p[1].message.contains("a boolean"), "{}", p[1]);
    assert!(p[2].message.contains("bad item \"bogus\""), "{}", p[2]);
}

#[test]
fn syntax_errors_carry_lines() {
    let p = problems("www-port = 8787\nbalancer = \n");
    assert_eq!(p[0].line, Some(2), "{}", p[0]);
    assert!(p[0].message.contains("TOML syntax error"));
}

#[test]
fn bad_backend_and_database_are_rejected() {
    let p = problems("backend = \"localhost\"\ndatabase = \"mysql://x\"\n");
    assert_eq!(p.len(), 2);
    assert!(p[0].message.contains("`backend` must be host:port"));
    assert!(p[1].message.contains("sqlite:///path/to/file.db or postgres://"));
}

#[test]
fn lock_timeout_must_exceed_refresh() {
    let p = problems("[locks]\nrefresh-rate = 30\ntimeout-interval = 20\n");
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].line, Some(3));
}

#[test]
fn rendered_config_redacts_database_password_and_reparses() {
    let c = parse("database = \"postgres://lb:s3cret@db:5432/lb\"\nbackend = \"127.0.0.1:8788\"\n").unwrap();
    let out = c.render();
    assert!(!out.contains("s3cret"), "{out}");
    assert!(out.contains("postgres://lb:***@db:5432/lb"), "{out}");
    // The rendering is itself a valid configuration with the same meaning.
    let again = parse(&out.replace("lb:***@", "lb@")).unwrap();
    assert_eq!(again.node.backend.as_deref(), Some("127.0.0.1:8788"));
    assert_eq!(again.render().lines().count(), out.lines().count());
}

#[test]
fn example_config_in_conf_is_valid_and_matches_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/sessionlb.toml");
    let src = std::fs::read_to_string(&path).unwrap();
    let example = Config::from_toml(&path, &src).unwrap();
    let defaults = parse("").unwrap();
    // The example documents every key at its default value, except the backend it shows.
    assert_eq!(example.render().replace("backend = \"127.0.0.1:8788\"", "backend = \"\""), defaults.render());
    // And it mentions every key that check-config prints.
    for line in defaults.render().lines().filter(|l| l.contains(" = ")) {
        let key = line.split(" = ").next().unwrap();
        assert!(src.contains(&format!("{key} =")), "conf/sessionlb.toml does not document `{key}`");
    }
}

/// A Workbench directory with these files (mode 0600), read as
/// `--rstudio-config DIR` would, with `var_lib_key` as Workbench's last key
/// location.
fn workbench(files: &[(&str, &str)]) -> (tempfile::TempDir, Result<Config, ConfigError>) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    }
    let result = load_workbench(dir.path(), None);
    (dir, result)
}

fn load_workbench(dir: &Path, native: Option<&str>) -> Result<Config, ConfigError> {
    let native = match native {
        Some(src) => toml_file::parse(Path::new("/etc/sessionlb/sessionlb.toml"), src).unwrap(),
        None => RawConfig::default(),
    };
    let mut raw = native.clone();
    raw.overlay(
        rstudio::read_dir_with(dir, &native, &dir.join("var-lib-rstudio-server/secure-cookie-key"))
            .map_err(ConfigError::Invalid)?,
    );
    Config::from_raw(raw)
}

fn invalid(result: Result<Config, ConfigError>) -> String {
    match result {
        Err(e @ ConfigError::Invalid(_)) => e.to_string(),
        other => panic!("expected problems, got {other:?}"),
    }
}

#[test]
fn rstudio_directory_overlays_with_workbench_file_origins() {
    let (dir, c) = workbench(&[
        ("load-balancer", "[config]\nbalancer=user-hash\nwww-host-name=10.1.2.3\n"),
        ("rserver.conf", "www-port=8790\nauth-timeout-minutes=60\n"),
        ("file-locks", "lock-type=advisory\ntimeout-interval=60\n"),
        ("database.conf", "provider=postgresql\nhost=db\nusername=rs\npassword=p@ss\npool-size=6\n"),
    ]);
    let c = c.unwrap();
    assert_eq!(c.balancer.kind, BalancerKind::UserHash);
    assert_eq!(c.node.www_host_name.as_deref(), Some("10.1.2.3"));
    // rserver.conf describes the backend; sessionlb listens on its own default.
    assert_eq!(c.node.backend.as_deref(), Some("127.0.0.1:8790"));
    assert_eq!(c.listen_address().to_string(), "0.0.0.0:8787");
    assert_eq!(c.locks.lock_type, LockType::Advisory);
    assert_eq!(c.locks.timeout_interval, Duration::from_secs(60));
    assert_eq!(c.cluster.pool_size, 6);
    assert_eq!(c.cluster.database, DatabaseUrl::Postgres("postgres://rs@db:5432/rstudio".into()));
    assert_eq!(c.registry_url().unwrap(), DatabaseUrl::Postgres("postgres://rs:p%40ss@db:5432/rstudio".into()));
    let rserver = dir.path().join("rserver.conf");
    assert_eq!(
        c.sources["backend"].to_string(),
        format!("{}:1 (rserver's address: no www-address: 127.0.0.1, www-port=8790 (line 1))", rserver.display())
    );
    assert_eq!(c.sources["pool-size"].to_string(), format!("{}:5", dir.path().join("database.conf").display()));
    assert!(!c.sources.contains_key("www-port"), "the listen port is a default");

    fs::write(dir.path().join("load-balancer"), "balancer=fastest\n").unwrap();
    let err = invalid(load_workbench(dir.path(), None));
    assert!(err.contains("load-balancer:1: `balancer` must be one of sessions"), "{err}");
}

#[test]
fn rserver_address_becomes_the_backend_and_the_native_file_says_where_sessionlb_listens() {
    for (address, backend) in [
        ("www-address=0.0.0.0\n", "127.0.0.1:8788"),
        ("", "127.0.0.1:8788"),
        ("www-address=\n", "127.0.0.1:8788"),
        ("www-address=127.0.0.5\n", "127.0.0.5:8788"),
        ("www-address=::\n", "[::1]:8788"),
        ("www-address=::1\n", "[::1]:8788"),
    ] {
        let (dir, _) = workbench(&[("rserver.conf", &format!("{address}www-port=8788\n"))]);
        let c = load_workbench(dir.path(), Some("www-address = \"10.0.0.5\"\nwww-port = 443\n")).unwrap();
        assert_eq!(c.node.backend.as_deref(), Some(backend), "{address:?}");
        assert_eq!(c.listen_address().to_string(), "10.0.0.5:443");
        assert_eq!(c.sources["www-port"].to_string(), "/etc/sessionlb/sessionlb.toml:2");
    }
    // --listen wins over the native file, and says so.
    let (dir, _) = workbench(&[("rserver.conf", "www-address=127.0.0.1\nwww-port=8788\n")]);
    let file = dir.path().join("sessionlb.toml");
    fs::write(&file, "www-port = 9000\n").unwrap();
    let c = Config::load_with(&LoadOptions {
        config_file: Some(file),
        rstudio_dir: Some(dir.path().to_path_buf()),
        listen: Some("127.0.0.9:8800".parse().unwrap()),
    })
    .unwrap();
    assert_eq!(c.listen_address().to_string(), "127.0.0.9:8800");
    assert_eq!(c.sources["www-port"].to_string(), "command line --listen");
    assert!(c.node.www_address_set);
}

#[test]
fn a_backend_on_the_listen_address_is_refused_with_the_layout_explained() {
    // Workbench unchanged: rserver on 8787, sessionlb on its default 8787.
    let (_dir, c) = workbench(&[("rserver.conf", "www-port=8787\n")]);
    let err = invalid(c);
    assert!(err.contains("rserver.conf:1: the backend 127.0.0.1:8787"), "{err}");
    assert!(err.contains("is the address sessionlb itself listens on (0.0.0.0:8787"), "{err}");
    assert!(err.contains("www-address=127.0.0.1 and www-port=8788 in rserver.conf"), "{err}");
    assert!(err.contains("docs/workbench.md"), "{err}");
    // No www-port at all: rserver's default 8787, the same conflict.
    let (_dir, c) = workbench(&[("rserver.conf", "auth-timeout-minutes=60\n")]);
    assert!(invalid(c).contains("the backend 127.0.0.1:8787"));
    // Native: the same rule, with native advice.
    let err = invalid(parse("backend = \"localhost:8787\"\n"));
    assert!(err.contains("sessionlb.toml:1: the backend localhost:8787"), "{err}");
    assert!(err.contains("point `backend` at it"), "{err}");
    // Another address on the same port is a valid layout.
    let c = parse("backend = \"127.0.0.1:8787\"\nwww-address = \"10.0.0.5\"\n").unwrap();
    assert_eq!(c.node.backend.as_deref(), Some("127.0.0.1:8787"));
}

#[test]
fn www_host_name_must_not_name_the_backend_port() {
    let (_dir, c) = workbench(&[
        ("load-balancer", "www-host-name=10.0.0.5:8788\n"),
        ("rserver.conf", "www-address=127.0.0.1\nwww-port=8788\n"),
        ("database.conf", "provider=postgresql\n"),
    ]);
    let err = invalid(c);
    assert!(err.contains("load-balancer:1: `www-host-name` \"10.0.0.5:8788\" names port 8788, the backend's"), "{err}");
    // Another port than the listen port: allowed (a port mapping), with a warning.
    let c = parse("www-host-name = \"10.0.0.5:9443\"\n").unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(c.warnings[0].message.contains("but sessionlb listens on port 8787"), "{}", c.warnings[0]);
}

#[test]
fn workbench_keys_sessionlb_does_not_use_are_warnings_naming_file_line_and_key() {
    let (dir, c) = workbench(&[
        ("load-balancer", "balancer=sessions\nlauncher-local-proxy=1\nbalncer=user-hash\n[extra]\nx=1\n"),
        ("rserver.conf", "www-port=8788\nauth-timeout-minutes=60\nlauncher-sessions-enabled=1\n"),
        ("file-locks", "lock-type=advisory\nlock-timeout=30\n"),
        ("database.conf", "provider=postgresql\nauto-create=1\n"),
    ]);
    let c = c.unwrap();
    let warnings: Vec<String> = c.warnings.iter().map(ToString::to_string).collect();
    let at = |file: &str, line: usize, key: &str| {
        format!("{}:{line}: `{key}` is not used by sessionlb; ignored", dir.path().join(file).display())
    };
    for expected in [
        at("load-balancer", 2, "launcher-local-proxy"),
        at("load-balancer", 3, "balncer") + " (did you mean `balancer`?)",
        at("rserver.conf", 2, "auth-timeout-minutes"),
        at("rserver.conf", 3, "launcher-sessions-enabled"),
        at("file-locks", 2, "lock-timeout"),
        at("database.conf", 2, "auto-create"),
    ] {
        assert!(warnings.iter().any(|w| w.starts_with(&expected)), "missing {expected:?} in {warnings:#?}");
    }
    assert!(warnings.iter().any(|w| w.contains("section [extra] is not used by sessionlb")), "{warnings:#?}");
    assert_eq!(c.balancer.kind, BalancerKind::Sessions, "the misspelt key changed nothing");
}

#[test]
fn a_cluster_on_sqlite_is_refused_as_a_split_brain() {
    // The load-balancer file makes a cluster; no database.conf is Workbench's SQLite.
    let (dir, c) = workbench(&[("load-balancer", "balancer=sessions\n"), ("rserver.conf", "www-port=8788\n")]);
    let err = invalid(c);
    assert!(
        err.contains(&format!(
            "{}: {} exists",
            dir.path().join("load-balancer").display(),
            dir.path().join("load-balancer").display()
        )),
        "{err}"
    );
    assert!(err.contains("split brain"), "{err}");
    assert!(err.contains("in database.conf set provider=postgresql"), "{err}");
    // load-balancing-enabled=1 too. =0 turns Workbench's own balancing off
    // (as sessionlb's drop-in asks), not the cluster the file describes.
    let (_dir, c) = workbench(&[("rserver.conf", "www-port=8788\nload-balancing-enabled=1\n")]);
    assert!(invalid(c).contains("rserver.conf enables load balancing"));
    let (_dir, c) = workbench(&[
        ("load-balancer", "balancer=sessions\n"),
        ("rserver.conf", "www-port=8788\nload-balancing-enabled=0\n"),
    ]);
    assert!(invalid(c).contains("split brain"));
    // No load-balancer file: one machine, and its SQLite is fine.
    let (_dir, c) = workbench(&[("rserver.conf", "www-port=8788\nload-balancing-enabled=0\n")]);
    assert!(!c.unwrap().cluster.database.is_postgres());
    // A legacy [nodes] list of two with provider=sqlite.
    let (_dir, c) = workbench(&[
        ("load-balancer", "[config]\nbalancer=sessions\n[nodes]\n10.0.0.1:8787\n10.0.0.2:8787\n"),
        ("rserver.conf", "www-port=8788\n"),
        ("database.conf", "provider=sqlite\n"),
    ]);
    let err = invalid(c);
    assert!(err.contains("load-balancer lists 2 nodes in its legacy [nodes] section"), "{err}");
    assert!(err.contains("database.conf:1 (provider=sqlite)"), "{err}");
    // With PostgreSQL it is fine, and the list is kept to find this node.
    let (_dir, c) = workbench(&[
        ("load-balancer", "[config]\nbalancer=sessions\n[nodes]\n10.0.0.1:8787\n10.0.0.2:8787\n"),
        ("rserver.conf", "www-port=8788\n"),
        ("database.conf", "provider=postgresql\n"),
    ]);
    assert_eq!(c.unwrap().node.legacy_nodes, ["10.0.0.1:8787", "10.0.0.2:8787"]);
}

#[test]
fn the_key_is_looked_up_as_workbench_does_and_a_missing_one_names_every_place() {
    let key = b"d3161166-e89b-4158-af3b-5980e3056cc6\n";
    let write_key = |path: &Path| {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, key).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    };
    let (dir, c) = workbench(&[("rserver.conf", "www-port=8788\n")]);
    let var_lib = dir.path().join("var-lib-rstudio-server/secure-cookie-key");
    let in_dir = dir.path().join("secure-cookie-key");
    // Nowhere: the error names both places, in order.
    let err = c.unwrap().secure_key().unwrap_err().to_string();
    assert!(err.contains(&format!("looked at, in order: {}, {}", in_dir.display(), var_lib.display())), "{err}");
    // The last place...
    write_key(&var_lib);
    let c = load_workbench(dir.path(), None).unwrap();
    assert_eq!(c.cluster.secure_cookie_key_file, var_lib);
    assert!(c.sources["secure-cookie-key-file"].to_string().contains("does not exist"));
    // ...loses to the directory's...
    write_key(&in_dir);
    assert_eq!(load_workbench(dir.path(), None).unwrap().cluster.secure_cookie_key_file, in_dir);
    // ...which loses to rserver.conf's secure-cookie-key-file, even when that is missing.
    let elsewhere = dir.path().join("elsewhere/key");
    fs::write(
        dir.path().join("rserver.conf"),
        format!("www-port=8788\nsecure-cookie-key-file={}\n", elsewhere.display()),
    )
    .unwrap();
    let c = load_workbench(dir.path(), None).unwrap();
    assert_eq!(c.cluster.secure_cookie_key_file, elsewhere);
    let err = c.secure_key().unwrap_err().to_string();
    assert!(err.starts_with(&format!("secure cookie key file {} does not exist", elsewhere.display())), "{err}");
    write_key(&elsewhere);
    assert_eq!(c.secure_key().unwrap().len(), key.len());
}

#[test]
fn rserver_tls_makes_the_listener_the_protocol_and_the_backend_https() {
    let (_dir, c) = workbench(&[(
        "rserver.conf",
        "www-port=8788\nssl-enabled=1\nssl-certificate=/etc/ssl/node.crt\nssl-certificate-key=/etc/ssl/node.key\n",
    )]);
    let c = c.unwrap();
    assert!(c.proxy.ssl_enabled && c.node.backend_tls);
    assert_eq!(c.protocol(), "https");
    assert_eq!(c.proxy.ssl_certificate.as_deref(), Some(Path::new("/etc/ssl/node.crt")));
    assert!(c.sessions.cookie_secure);
    let (_dir, c) = workbench(&[("rserver.conf", "www-port=8788\nssl-enabled=1\n")]);
    assert!(invalid(c).contains("needs both `ssl-certificate` and `ssl-certificate-key`"));
}

#[test]
fn the_rendering_covers_every_key_that_is_read() {
    // Reload decides "needs a restart" by comparing renderings: a key read
    // but not rendered would change silently.
    let rendered = parse("").unwrap().render();
    let mut section = String::new();
    let mut seen = std::collections::BTreeSet::new();
    for line in rendered.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = format!("{name}.");
        } else if let Some((key, _)) = line.split_once(" = ") {
            seen.insert(format!("{section}{key}"));
        }
    }
    let known: std::collections::BTreeSet<String> = schema::known_keys().into_iter().collect();
    assert!(known.len() > 40, "{known:?}");
    assert_eq!(known, seen, "keys read but not rendered, or rendered but not read");
}

#[test]
fn check_config_rendering_says_where_every_value_came_from() {
    let (dir, c) = workbench(&[
        ("load-balancer", "www-host-name=10.0.0.5\n"),
        ("rserver.conf", "www-address=127.0.0.1\nwww-port=8788\n"),
        ("database.conf", "provider=postgresql\nconnection-timeout-seconds=4\n"),
    ]);
    let out = c.unwrap().render_with_sources();
    let line =
        |key: &str| out.lines().find(|l| l.starts_with(&format!("{key} ="))).unwrap_or_else(|| panic!("{key}: {out}"));
    assert!(line("www-host-name").ends_with(&format!("# {}:1", dir.path().join("load-balancer").display())), "{out}");
    assert!(line("www-port").ends_with("# default"), "{out}");
    assert!(line("backend").contains("# ") && line("backend").contains("rserver.conf:2 (rserver's address"), "{out}");
    assert!(line("database-connection-timeout").contains("database.conf:2 (connection-timeout-seconds)"), "{out}");
    assert!(line("secure-cookie-key-file").contains("Workbench's lookup found no key"), "{out}");
    // Without sources it is still valid TOML with the same meaning.
    let plain = load_workbench(dir.path(), None).unwrap().render();
    assert!(!plain.contains('#'), "{plain}");
}

#[test]
fn encrypted_database_password_is_decrypted_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    let key = b"d3161166-e89b-4158-af3b-5980e3056cc6\n";
    std::fs::write(&key_file, key).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let encrypted = password::encrypt(key, "s3cr:t/pw").unwrap();
    let c = parse(&format!(
        "database = \"postgres://lb@db:5432/lb\"\ndatabase-password = \"{encrypted}\"\nsecure-cookie-key-file = \"{}\"\n",
        key_file.display()
    ))
    .unwrap();
    assert_eq!(c.registry_url().unwrap(), DatabaseUrl::Postgres("postgres://lb:s3cr%3At%2Fpw@db:5432/lb".into()));
    assert!(!c.render().contains(&encrypted), "the rendering hides it");
    // With another key it fails clearly.
    std::fs::write(&key_file, b"ffffffff-e89b-4158-af3b-5980e3056cc6\n").unwrap();
    assert!(c.registry_url().unwrap_err().contains("another secure cookie key"));
    // Only for PostgreSQL, and the URL must name a user.
    assert!(problems("database-password = \"x\"\n")[0].message.contains("goes with a postgres://"));
    let c = parse("database = \"postgres://db/lb\"\ndatabase-password = \"x\"\n").unwrap();
    assert!(c.registry_url().unwrap_err().contains("must name a user"));
}

#[test]
fn decrypting_database_password_applies_the_key_file_checks() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    let key = b"d3161166-e89b-4158-af3b-5980e3056cc6\n";
    std::fs::write(&key_file, key).unwrap();
    let encrypted = password::encrypt(key, "pw").unwrap();
    let c = parse(&format!(
        "database = \"postgres://lb@db:5432/lb\"\ndatabase-password = \"{encrypted}\"\nsecure-cookie-key-file = \"{}\"\n",
        key_file.display()
    ))
    .unwrap();
    // Group- or other-readable: refused, as when the node starts.
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = c.registry_url().unwrap_err();
    assert!(err.contains("must not be readable or writable by group or others"), "{err}");
    // Owner-only (even read-only): accepted.
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o400)).unwrap();
    assert_eq!(c.registry_url().unwrap(), DatabaseUrl::Postgres("postgres://lb:pw@db:5432/lb".into()));
    // Missing and too short: the key module's errors.
    std::fs::remove_file(&key_file).unwrap();
    assert!(c.registry_url().unwrap_err().contains("does not exist"));
    std::fs::write(&key_file, b"short\n").unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(c.registry_url().unwrap_err().contains("at least 16 bytes"));
}

#[test]
fn url_passwords_are_redacted_in_user_info_and_query() {
    for (url, redacted) in [
        ("postgres://lb:s3cret@db:5432/lb", "postgres://lb:***@db:5432/lb"),
        ("postgres://lb@db:5432/lb", "postgres://lb@db:5432/lb"),
        ("postgres://db/lb", "postgres://db/lb"),
        (
            "postgres://lb@db/lb?sslmode=require&password=s3cret&application_name=x",
            "postgres://lb@db/lb?sslmode=require&password=***&application_name=x",
        ),
        ("postgres://lb@db/lb?password=s3cret", "postgres://lb@db/lb?password=***"),
        ("postgresql://db?PassWord=s3cret&user=lb", "postgresql://db?PassWord=***&user=lb"),
        ("postgres://db/lb?user=lb&%70assword=s3cret#frag", "postgres://db/lb?user=lb&%70assword=***#frag"),
        ("postgres://lb:s3cret@db?password=s3cret", "postgres://lb:***@db?password=***"),
        ("postgres://db/lb?password_file=x&mypassword=y", "postgres://db/lb?password_file=x&mypassword=y"),
        // Unencoded `#` or `?` in the password: still redacted.
        ("postgres://lb:ab#cd@db/lb", "postgres://lb:***@db/lb"),
        ("postgres://lb:a?b@db:5432/lb?password=x", "postgres://lb:***@db:5432/lb?password=***"),
        // An `@` in a query without a path is not user info.
        ("postgresql://db?password=s3cret&x=a@b", "postgresql://db?password=***&x=a@b"),
    ] {
        assert_eq!(DatabaseUrl::Postgres(url.into()).redacted(), redacted, "{url}");
    }
    // check-config prints the redacted URL.
    let c = parse("database = \"postgres://lb@db:5432/lb?sslmode=disable&password=s3cret\"\n").unwrap();
    let out = c.render();
    assert!(!out.contains("s3cret"), "{out}");
    assert!(out.contains("database = \"postgres://lb@db:5432/lb?sslmode=disable&password=***\""), "{out}");
    // The password still reaches the connection.
    assert_eq!(
        c.registry_url().unwrap(),
        DatabaseUrl::Postgres("postgres://lb@db:5432/lb?sslmode=disable&password=s3cret".into())
    );
}

#[test]
fn database_password_with_a_query_keeps_the_query() {
    let c = parse("database = \"postgres://lb@db?sslmode=disable\"\ndatabase-password = \"p\"\n").unwrap();
    assert_eq!(c.registry_url().unwrap(), DatabaseUrl::Postgres("postgres://lb:p@db?sslmode=disable".into()));
}

#[test]
fn debug_output_never_shows_database_passwords() {
    let src = "database = \"postgres://lb:urlpw@db/lb?password=querypw\"\ndatabase-password = \"plainpw\"\n";
    let c = parse(src).unwrap();
    for text in [format!("{c:?}"), format!("{:?}", c.cluster), format!("{c:#?}")] {
        for secret in ["urlpw", "querypw", "plainpw"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("database_password: Some(") && text.contains("\"***\""), "{text}");
    }
    let raw = toml_file::parse(Path::new("/etc/sessionlb/sessionlb.toml"), src).unwrap();
    let text = format!("{raw:?}");
    for secret in ["urlpw", "querypw", "plainpw"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
}

#[test]
fn invalid_values_do_not_echo_database_passwords() {
    let p = problems("database = \"mysql://lb:urlpw@db/lb?password=querypw\"\ndatabase-password = 5\n");
    let all = p.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n");
    assert_eq!(p.len(), 2, "{all}");
    assert!(!all.contains("urlpw") && !all.contains("querypw"), "{all}");
    assert!(all.contains("found \"mysql://lb:***@db/lb?password=***\""), "{all}");
}

#[test]
fn workbench_password_variable_overrides_database_password() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    let key = b"d3161166-e89b-4158-af3b-5980e3056cc6\n";
    std::fs::write(&key_file, key).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let c = parse(&format!(
        "database = \"postgres://lb@db:5432/lb\"\ndatabase-password = \"fromfile\"\nsecure-cookie-key-file = \"{}\"\n",
        key_file.display()
    ))
    .unwrap();
    let url = |env: Option<&str>| c.registry_url_with(env.map(str::to_string)).unwrap();
    assert_eq!(url(None), DatabaseUrl::Postgres("postgres://lb:fromfile@db:5432/lb".into()));
    assert_eq!(url(Some("fromenv")), DatabaseUrl::Postgres("postgres://lb:fromenv@db:5432/lb".into()));
    assert_eq!(url(Some("")), DatabaseUrl::Postgres("postgres://lb:fromfile@db:5432/lb".into()), "empty: unset");
    // Encrypted like the file's value.
    let encrypted = password::encrypt(key, "encenv").unwrap();
    assert_eq!(url(Some(&encrypted)), DatabaseUrl::Postgres("postgres://lb:encenv@db:5432/lb".into()));
    // Without database-password in the file, the variable alone is enough.
    let c = parse("database = \"postgres://lb@db/lb\"\n").unwrap();
    assert_eq!(c.registry_url_with(Some("e".into())).unwrap(), DatabaseUrl::Postgres("postgres://lb:e@db/lb".into()));
    // A SQLite registry ignores it.
    let c = parse("database = \"sqlite:///tmp/r.db\"\n").unwrap();
    assert_eq!(c.registry_url_with(Some("e".into())).unwrap(), c.cluster.database);
}

#[test]
fn shutdown_durations_are_whole_seconds() {
    // Pingora counts them in seconds: "500ms" would silently become 0.
    let found = problems("grace-period = \"500ms\"\nshutdown-timeout = 1.5\n");
    assert_eq!(found.len(), 2, "{found:?}");
    for p in &found {
        assert!(p.message.contains("whole number of seconds"), "{p:?}");
    }
    let c = parse("grace-period = \"2m\"\nshutdown-timeout = 0\n").unwrap();
    assert_eq!((c.server.grace_period, c.server.shutdown_timeout), (Duration::from_secs(120), Duration::ZERO));
}

#[test]
fn backend_key_failover_after_has_a_default_zero_means_never_and_is_checked() {
    assert_eq!(parse("").unwrap().cluster.backend_key_failover_after, Duration::from_secs(60));
    let c = parse("backend-key-failover-after = \"2s\"\n").unwrap();
    assert_eq!(c.cluster.backend_key_failover_after, Duration::from_secs(2));
    let c = parse("backend-key-failover-after = 0\n").unwrap();
    assert_eq!(c.cluster.backend_key_failover_after, Duration::ZERO, "0 = never re-placed");
    assert!(c.render().contains("backend-key-failover-after = \"0s\""), "{}", c.render());
    assert_eq!(parse(&c.render()).unwrap().cluster.backend_key_failover_after, Duration::ZERO);
    let found = problems("backend-key-failover-after = \"later\"\n");
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].to_string().contains(":1: `backend-key-failover-after` must be a duration"), "{found:?}");
}

#[test]
fn access_log_is_off_by_default_and_takes_stdout_or_an_absolute_path() {
    let c = parse("").unwrap();
    assert_eq!(c.server.access_log, AccessLogTarget::Off);
    assert_eq!(c.server.access_log_format, LogFormat::Plain);
    let c = parse("access-log = \"stdout\"\naccess-log-format = \"json\"\n").unwrap();
    assert_eq!((c.server.access_log.clone(), c.server.access_log_format), (AccessLogTarget::Stdout, LogFormat::Json));
    assert_eq!(parse(&c.render()).unwrap().render(), c.render());
    let c = parse("access-log = \"/var/log/sessionlb/access.log\"\n").unwrap();
    assert_eq!(c.server.access_log, AccessLogTarget::File("/var/log/sessionlb/access.log".into()));
    assert!(c.render().contains("access-log = \"/var/log/sessionlb/access.log\""));

    let found = problems("access-log = \"logs/access.log\"\naccess-log-format = \"csv\"\n");
    let text: Vec<String> = found.iter().map(|p| p.to_string()).collect();
    assert_eq!(found.len(), 2, "{text:#?}");
    assert!(text[0].contains(":1: `access-log` must be \"\" (off), \"stdout\" or an absolute file path"), "{text:#?}");
    assert!(text[1].contains(":2: `access-log-format` must be one of plain, json"), "{text:#?}");
}

#[test]
fn operations_settings_have_defaults_and_checked_values() {
    let c = parse("").unwrap();
    assert_eq!(c.server.metrics_address, Some("127.0.0.1:9787".parse().unwrap()));
    assert_eq!(c.server.drain_timeout, Duration::from_secs(300));
    assert_eq!((c.cluster.health_check_rise, c.cluster.health_check_fall), (1, 2));
    assert_eq!(c.cluster.backend_health_check, BackendHealthCheck::Tcp);

    let c = parse(
        "metrics-address = \"\"\ndrain-timeout = 0\nhealth-check-rise = 3\nhealth-check-fall = 5\n\
         health-check-backend = \"http\"\nhealth-check-backend-path = \"/health-check?full=1\"\n",
    )
    .unwrap();
    assert_eq!(c.server.metrics_address, None, "empty = no metrics listener");
    assert_eq!(c.server.drain_timeout, Duration::ZERO);
    assert_eq!((c.cluster.health_check_rise, c.cluster.health_check_fall), (3, 5));
    assert_eq!(c.cluster.backend_health_check, BackendHealthCheck::Http { path: "/health-check?full=1".into() });
    // What check-config prints reads back the same.
    assert_eq!(parse(&c.render()).unwrap().render(), c.render());

    let found = problems(
        "metrics-address = \"localhost\"\nhealth-check-fall = 0\nhealth-check-backend = \"icmp\"\n\
         health-check-backend-path = \"health\"\ndrain-timeout = \"soon\"\n",
    );
    let text: Vec<String> = found.iter().map(|p| p.to_string()).collect();
    assert_eq!(found.len(), 5, "{text:#?}");
    assert!(text[0].contains(":1: `metrics-address` must be an address:port such as \"127.0.0.1:9787\""), "{text:#?}");
    assert!(text[1].contains(":2: `health-check-fall` must be an integer from 1 to 100"), "{text:#?}");
    assert!(text[2].contains(":3: `health-check-backend` must be one of tcp, http"), "{text:#?}");
    assert!(text[3].contains(":4: `health-check-backend-path` must be a path starting with `/`"), "{text:#?}");
    assert!(text[4].contains(":5: `drain-timeout` must be a duration"), "{text:#?}");
}

#[test]
fn huge_durations_are_configuration_errors_not_panics() {
    // `Duration::from_secs_f64` panics on these (issue 11, hole 6).
    for (line, value) in [(2, "1e20"), (2, "\"100000000000000000000s\""), (2, "1.8e19")] {
        let p = problems(&format!("# huge\ntimeout = {value}\n"));
        assert_eq!(p.len(), 1, "{p:?}");
        let text = p[0].to_string();
        assert!(text.starts_with(&format!("/etc/sessionlb/sessionlb.toml:{line}: `timeout`")), "{text}");
    }
}

#[test]
fn rendered_strings_with_control_characters_parse_back_as_toml() {
    let c = parse("server-shared-storage-path = \"/srv/shared\\u0001\\u0000\"\n").unwrap();
    let rendered = c.render();
    let parsed: toml::Table = toml::from_str(&rendered).unwrap_or_else(|e| panic!("{e}\n{rendered}"));
    assert_eq!(parsed["server-shared-storage-path"].as_str(), Some("/srv/shared\u{1}\u{0}"));
}

#[test]
fn security_settings_have_defaults_and_checked_values() {
    let c = parse("").unwrap();
    assert_eq!(c.proxy.forwarding_window, Duration::from_secs(10));
    assert!(c.proxy.forward_peer_check);
    let loopback: Vec<ipnet::IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
    assert_eq!(c.proxy.status_page_cidrs, loopback);
    assert_eq!(c.server.request_header_timeout, Duration::from_secs(10));
    assert_eq!(c.server.request_body_idle_timeout, Duration::from_secs(120));
    assert_eq!(c.server.max_connections, 20_000);

    let c = parse(
        "forward-peer-check = false\nstatus-page-cidrs = [\"10.1.0.0/16\", \"127.0.0.9\"]\n\
         request-header-timeout = \"2s\"\nrequest-body-idle-timeout = \"30s\"\nmax-connections = 500\n",
    )
    .unwrap();
    assert!(!c.proxy.forward_peer_check);
    let admins: Vec<ipnet::IpNet> = vec!["10.1.0.0/16".parse().unwrap(), "127.0.0.9/32".parse().unwrap()];
    assert_eq!(c.proxy.status_page_cidrs, admins);
    assert_eq!(c.server.request_header_timeout, Duration::from_secs(2));
    assert_eq!(c.server.request_body_idle_timeout, Duration::from_secs(30));
    assert_eq!(c.server.max_connections, 500);
    assert_eq!(parse(&c.render()).unwrap().render(), c.render());
    // An empty list: only the cluster's nodes.
    assert!(parse("status-page-cidrs = []\n").unwrap().proxy.status_page_cidrs.is_empty());

    let found = problems(
        "status-page-cidrs = [\"10.0.0.0/33\"]\nrequest-header-timeout = \"1ms\"\nmax-connections = 0\n\
         forward-peer-check = \"maybe\"\n",
    );
    let text: Vec<String> = found.iter().map(|p| p.to_string()).collect();
    assert_eq!(found.len(), 4, "{text:#?}");
    assert!(text[0].contains(":1: `status-page-cidrs` must be a list of addresses or CIDR blocks"), "{text:#?}");
    assert!(text[0].contains("bad item \"10.0.0.0/33\""), "{text:#?}");
    assert!(text[1].contains(":2: `request-header-timeout` must be a duration of at least 100ms"), "{text:#?}");
    assert!(text[2].contains(":3: `max-connections` must be an integer from 1 to 10000000"), "{text:#?}");
    assert!(text[3].contains(":4: `forward-peer-check` must be a boolean"), "{text:#?}");
}

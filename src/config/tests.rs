use std::os::unix::fs::PermissionsExt;

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
    assert!(text[5].contains(":7: unknown key `nonsense`; allowed top-level keys: backend, balancer,"), "{all}");
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

#[test]
fn rstudio_directory_overlays_with_workbench_file_origins() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("load-balancer"), "[config]\nbalancer=user-hash\nwww-host-name=10.1.2.3\n").unwrap();
    std::fs::write(dir.path().join("rserver.conf"), "www-port=8790\nauth-timeout-minutes=60\n").unwrap();
    std::fs::write(dir.path().join("file-locks"), "lock-type=advisory\ntimeout-interval=60\n").unwrap();
    std::fs::write(dir.path().join("database.conf"), "provider=postgresql\nhost=db\nusername=rs\npassword=p@ss\n")
        .unwrap();
    let c = Config::load(None, Some(dir.path())).unwrap();
    assert_eq!(c.balancer.kind, BalancerKind::UserHash);
    assert_eq!(c.node.www_host_name.as_deref(), Some("10.1.2.3"));
    assert_eq!(c.node.www_port, 8790);
    assert_eq!(c.locks.lock_type, LockType::Advisory);
    assert_eq!(c.locks.timeout_interval, Duration::from_secs(60));
    assert_eq!(c.cluster.database, DatabaseUrl::Postgres("postgres://rs@db:5432/rstudio".into()));
    assert_eq!(c.registry_url().unwrap(), DatabaseUrl::Postgres("postgres://rs:p%40ss@db:5432/rstudio".into()));

    std::fs::write(dir.path().join("load-balancer"), "balancer=fastest\n").unwrap();
    let err = Config::load(None, Some(dir.path())).unwrap_err().to_string();
    assert!(err.contains("load-balancer:1: `balancer` must be one of sessions"), "{err}");
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

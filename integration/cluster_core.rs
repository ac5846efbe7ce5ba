//! Issue 2: nodes as real processes against real PostgreSQL — cluster
//! definition, key checks, address resolution, offline mode, deletion,
//! missed check-ins, configuration errors.

use std::time::{Duration, Instant};

use rustix::process::Signal;
use sessionlb::cluster::{NewSession, SessionKind};

use crate::common::db::TestDb;
use crate::common::eventually;
use crate::common::node::*;

const KEY2: &[u8] = b"9b2c7d1e-0000-4000-8000-123456789abc\n";

fn status_of(fx: &ClusterFixture, config: &std::path::Path, spec: &NodeSpec) -> Option<String> {
    row_of(&list_nodes(fx, config), spec).map(|r| r.status.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_with_the_same_key_come_online() {
    let db = TestDb::postgres().await;
    let fx = ClusterFixture::new(&db.url);
    let be = Backend::start(fx.path(), "b").await;
    let a = fx.start(&fx.spec("127.0.0.2", Some(be.addr))).await;
    let b = fx.start(&fx.spec("127.0.0.3", Some(be.addr))).await;
    let rows = list_nodes(&fx, &a.config);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r.status == "Online"), "{rows:?}");
    assert_eq!(row_of(&rows, &a.spec).unwrap().address(), a.address());
    assert_eq!(row_of(&rows, &b.spec).unwrap().address(), b.address());
    // Each node knows the other through the registry.
    let h = eventually(Duration::from_secs(5), "a to see both nodes", || async {
        a.health().await.filter(|h| h["cluster_nodes"] == 2)
    })
    .await;
    assert_eq!(h["status"], "ok");
    // And the data path works.
    let resp = reqwest::get(b.url("/anything")).await.unwrap();
    assert_eq!(resp.headers()["x-backend"], "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_another_key_is_refused_until_reset_cluster() {
    let db = TestDb::postgres().await;
    let fx = ClusterFixture::new(&db.url);
    let a = fx.start(&fx.spec("127.0.0.2", None)).await;
    let _b = fx.start(&fx.spec("127.0.0.3", None)).await;

    let other_key = fx.path().join("other-key");
    write_key(&other_key, KEY2, 0o600);
    let mut c_spec = fx.spec("127.0.0.4", None);
    c_spec.key_file = other_key;
    let mut c = fx.spawn(&c_spec);
    let status = c.proc.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    let log = c.proc.log_text();
    assert!(log.contains("refusing to come online") && log.contains(&a.address()), "{log}");
    assert_eq!(status_of(&fx, &a.config, &c_spec).as_deref(), Some("Invalid secure cookie key"));

    let out = fx.admin(&a.config, &["reset-cluster"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Cluster record cleared"));
    let c = fx.start(&c_spec).await;
    assert_eq!(status_of(&fx, &a.config, &c.spec).as_deref(), Some("Online"));
    let listing = String::from_utf8_lossy(&fx.admin(&a.config, &["list-nodes"]).stdout).to_string();
    let fingerprint = sessionlb::config::key::SecureKey::from_bytes(KEY2.to_vec()).fingerprint();
    assert!(listing.contains(&fingerprint), "the new node defined the cluster:\n{listing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_files_are_checked_before_coming_online() {
    let db = TestDb::postgres().await;
    let fx = ClusterFixture::new(&db.url);
    let cases: [(&str, &[u8], u32, &str, &str); 3] = [
        (
            "open",
            b"0123456789abcdef0123456789abcdef\n",
            0o644,
            "Invalid permissions on secure cookie key",
            "has mode 0644",
        ),
        ("short", b"0123456789abcde", 0o600, "Invalid secure cookie key", "holds 15 bytes; at least 16 bytes"),
        ("missing", b"", 0, "Missing secure cookie key", "does not exist"),
    ];
    for (name, content, mode, status, message) in cases {
        let path = fx.path().join(format!("key-{name}"));
        if mode != 0 {
            write_key(&path, content, mode);
        }
        let mut spec = fx.spec("127.0.0.2", None);
        spec.key_file = path;
        let mut node = fx.spawn(&spec);
        assert!(!node.proc.wait_exit(Duration::from_secs(20)).success(), "{name}");
        let log = node.proc.log_text();
        assert!(log.contains(message), "{name}: {log}");
        assert!(!log.contains("0123456789abcde"), "{name}: the key must never be logged");
        assert_eq!(status_of(&fx, &node.config, &spec).as_deref(), Some(status), "{name}");
    }
    // 16 bytes is enough, with a warning.
    let path = fx.path().join("key-16");
    write_key(&path, b"0123456789abcdef", 0o600);
    let mut spec = fx.spec("127.0.0.2", None);
    spec.key_file = path;
    let node = fx.start(&spec).await;
    assert_eq!(status_of(&fx, &node.config, &spec).as_deref(), Some("Online"));
    assert!(node.proc.log_text().contains("shorter than 32 bytes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_cluster_is_redefined_by_the_first_node_with_the_new_key() {
    let db = TestDb::postgres().await;
    let fx = ClusterFixture::new(&db.url);
    let mut a = fx.start(&fx.spec("127.0.0.2", None)).await;
    let mut b = fx.start(&fx.spec("127.0.0.3", None)).await;
    // One node stops and gets a new key while the other is still online
    // with the old one: the new-key node is refused.
    let new_key = fx.path().join("new-key");
    write_key(&new_key, KEY2, 0o600);
    b.proc.signal(Signal::TERM);
    assert!(b.proc.wait_exit(Duration::from_secs(20)).success());
    let mut b_new = b.spec.clone();
    b_new.key_file = new_key;
    let mut refused = fx.spawn(&b_new);
    assert!(!refused.proc.wait_exit(Duration::from_secs(20)).success());
    assert_eq!(status_of(&fx, &a.config, &b.spec).as_deref(), Some("Invalid secure cookie key"));
    let mut b = fx.start(&b.spec).await;
    for n in [&mut a, &mut b] {
        n.proc.signal(Signal::TERM);
        assert!(n.proc.wait_exit(Duration::from_secs(20)).success());
    }
    assert_eq!(status_of(&fx, &a.config, &a.spec).as_deref(), Some("Offline"));
    // The key changes on every node; the first restart redefines the cluster.
    write_key(&fx.key_file, KEY2, 0o600);
    let a = fx.start(&a.spec).await;
    assert!(a.proc.log_text().contains("cluster redefined by this node"));
    let b = fx.start(&b.spec).await;
    assert_eq!(status_of(&fx, &a.config, &b.spec).as_deref(), Some("Online"));

    // While a node with the (now) current key is online, a node with another key is refused.
    let stale_key = fx.path().join("stale");
    write_key(&stale_key, b"3f2504e0-4f89-11d3-9a0c-0305e82c3301\n", 0o600);
    let mut c_spec = fx.spec("127.0.0.4", None);
    c_spec.key_file = stale_key;
    let mut c = fx.spawn(&c_spec);
    assert!(!c.proc.wait_exit(Duration::from_secs(20)).success());
    assert_eq!(status_of(&fx, &a.config, &c_spec).as_deref(), Some("Invalid secure cookie key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresolvable_host_name_records_failed_to_resolve() {
    let db = TestDb::postgres().await;
    let fx = ClusterFixture::new(&db.url);
    let mut spec = fx.spec("127.0.0.2", None);
    spec.extra = "www-host-name = \"no-such-node.invalid\"".into();
    let mut node = fx.spawn(&spec);
    assert!(!node.proc.wait_exit(Duration::from_secs(20)).success());
    let log = node.proc.log_text();
    assert!(log.contains("no-such-node.invalid") && log.contains("does not resolve"), "{log}");
    let rows = list_nodes(&fx, &node.config);
    let row = rows.iter().find(|r| r.host == "no-such-node.invalid").unwrap_or_else(|| panic!("{rows:?}"));
    assert_eq!(row.status, "Failed to resolve");
    assert_eq!(row.port, spec.port);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_mode_is_live_persistent_and_reversible() {
    let db = TestDb::postgres().await;
    let fx = ClusterFixture::new(&db.url);
    let be = Backend::start(fx.path(), "b").await;
    let mut a = fx.start(&fx.spec("127.0.0.2", Some(be.addr))).await;
    let pid = a.proc.pid();

    let out = fx.admin(&a.config, &["offline"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let started = Instant::now();
    eventually(Duration::from_secs(2), "list-nodes to show offline mode", || async {
        let rows = list_nodes(&fx, &a.config);
        row_of(&rows, &a.spec).filter(|r| r.notes.contains("offline mode") && r.status == "Online").map(|_| ())
    })
    .await;
    // The running node learned it without a restart.
    eventually(Duration::from_secs(2), "the node to learn it is in offline mode", || async {
        a.health().await.filter(|h| h["offline_mode"] == true).map(|_| ())
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(a.proc.pid(), pid, "same process");
    assert!(a.proc.is_running());

    // It survives a restart...
    a.proc.signal(Signal::TERM);
    a.proc.wait_exit(Duration::from_secs(20));
    let a = fx.start(&a.spec).await;
    assert_eq!(a.health().await.unwrap()["offline_mode"], true);
    assert!(row_of(&list_nodes(&fx, &a.config), &a.spec).unwrap().notes.contains("offline mode"));
    // ...until `online`.
    assert!(fx.admin(&a.config, &["online"]).status.success());
    eventually(Duration::from_secs(2), "the node to leave offline mode", || async {
        a.health().await.filter(|h| h["offline_mode"] == false).map(|_| ())
    })
    .await;
    assert!(!row_of(&list_nodes(&fx, &a.config), &a.spec).unwrap().notes.contains("offline mode"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_node_removes_stopped_nodes_and_protects_online_ones_with_sessions() {
    let db = TestDb::postgres().await;
    let fx = ClusterFixture::new(&db.url);
    let a = fx.start(&fx.spec("127.0.0.2", None)).await;
    let mut b = fx.start(&fx.spec("127.0.0.3", None)).await;
    let rows = list_nodes(&fx, &a.config);
    let a_id = row_of(&rows, &a.spec).unwrap().id;
    let b_id = row_of(&rows, &b.spec).unwrap().id;

    // A stopped node is removed, and every running node hears of it.
    b.proc.signal(Signal::TERM);
    b.proc.wait_exit(Duration::from_secs(20));
    let out = fx.admin(&a.config, &["delete-node", &b_id.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(row_of(&list_nodes(&fx, &a.config), &b.spec).is_none());
    eventually(Duration::from_secs(5), "a to drop the deleted node", || async {
        a.health().await.filter(|h| h["cluster_nodes"] == 1).map(|_| ())
    })
    .await;
    assert!(a.proc.log_text().contains("node deleted from the cluster"));

    // An online node with a session is protected unless forced.
    let registry = db.registry().await;
    registry
        .place_session(&NewSession { key: "s1", node_id: a_id, user_name: Some("ann"), kind: SessionKind::Backend })
        .await
        .unwrap();
    let out = fx.admin(&a.config, &["delete-node", &a_id.to_string()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is Online with 1 session(s)"));
    assert!(row_of(&list_nodes(&fx, &a.config), &a.spec).is_some());
    let out = fx.admin(&a.config, &["delete-node", &a_id.to_string(), "--force"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 session(s) will be re-placed"));
    assert_eq!(registry.get_session("s1").await.unwrap().unwrap().node_id, None);
    // The deleted node was running: it stops by itself, cleanly, and stays deleted.
    let mut a = a;
    assert!(a.proc.wait_exit(Duration::from_secs(20)).success());
    assert!(a.proc.log_text().contains("node deleted by an admin"), "{}", a.proc.log_text());
    assert!(row_of(&list_nodes(&fx, &a.config), &a.spec).is_none());
    let out = fx.admin(&a.config, &["delete-node", "424242"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node with ID 424242"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_shows_missed_check_in_and_live_node_never_does() {
    let db = TestDb::postgres().await;
    let fx = ClusterFixture::new(&db.url);
    let short = "checkin-interval = \"1s\"".to_string();
    let mut live_spec = fx.spec("127.0.0.2", None);
    live_spec.extra = short.clone();
    let mut doomed_spec = fx.spec("127.0.0.3", None);
    doomed_spec.extra = short;
    let live = fx.start(&live_spec).await;
    let mut doomed = fx.start(&doomed_spec).await;
    doomed.proc.signal(Signal::KILL);
    doomed.proc.wait_exit(Duration::from_secs(5));
    let killed_at = Instant::now();

    // Sample for several intervals: the killed node turns "Missed check-in"
    // (after 2 s), the live one never does.
    let mut missed_seen = None;
    while killed_at.elapsed() < Duration::from_secs(6) {
        let rows = list_nodes(&fx, &live.config);
        assert_eq!(row_of(&rows, &live_spec).unwrap().status, "Online", "{rows:?}");
        if missed_seen.is_none() && row_of(&rows, &doomed_spec).unwrap().status == "Missed check-in" {
            missed_seen = Some(killed_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let at = missed_seen.expect("the killed node was never shown as Missed check-in");
    assert!(at <= Duration::from_secs(4), "shown after {at:?}");
}

#[test]
fn malformed_configuration_reports_every_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "www-port = \"eighty\"\nbalancer = \"fastest\"\nwww-address = \"1.2.3\"\nbackend = \"nohostport\"\nchekin-interval = 5\n[locks]\nlock-type = 3\n",
    )
    .unwrap();
    for command in [&["check-config"][..], &["serve"][..], &["list-nodes"][..]] {
        let out = std::process::Command::new(SESSIONLB).arg("--config").arg(&path).args(command).output().unwrap();
        assert_eq!(out.status.code(), Some(78), "{command:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let file = path.display().to_string();
        for (line, needle) in [
            (1, "`www-port` must be an integer from 1 to 65535; found \"eighty\""),
            (2, "`balancer` must be one of sessions, system-load, user-hash, custom; found \"fastest\""),
            (3, "`www-address` must be an IP address"),
            (4, "`backend` must be host:port"),
            (5, "unknown key `chekin-interval` (did you mean `checkin-interval`?)"),
            (7, "`locks.lock-type` must be one of linkbased, advisory; found integer 3"),
        ] {
            assert!(err.contains(&format!("{file}:{line}: {needle}")), "{command:?} missing line {line}: {err}");
        }
        assert!(err.contains("6 problems"), "{err}");
    }
}

#[test]
fn check_config_prints_effective_settings_without_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    write_key(&key, b"s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t\n", 0o600);
    let path = dir.path().join("ok.toml");
    std::fs::write(
        &path,
        format!("secure-cookie-key-file = \"{}\"\ndatabase = \"postgres://lb:hunter2@db/lb\"\n", key.display()),
    )
    .unwrap();
    let out = std::process::Command::new(SESSIONLB).arg("--config").arg(&path).arg("check-config").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("Configuration OK"));
    assert!(text.contains("balancer = \"sessions\""));
    assert!(text.contains("postgres://lb:***@db/lb"));
    assert!(!text.contains("s3cr3t") && !text.contains("hunter2"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_nodes_orders_online_first_and_flags_versions_and_clock_skew() {
    let db = TestDb::postgres().await;
    let fx = ClusterFixture::new(&db.url);
    let mut first = fx.start(&fx.spec("127.0.0.2", None)).await;
    let second = fx.start(&fx.spec("127.0.0.3", None)).await;
    let third = fx.start(&fx.spec("127.0.0.4", None)).await;
    // The first node (lowest id) stops: online nodes are listed first.
    first.proc.signal(Signal::TERM);
    first.proc.wait_exit(Duration::from_secs(20));
    // Another version on the third node, and a clock 5 s off on the second.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::query("UPDATE sessionlb.sessionlb_nodes SET version = '0.0.9' WHERE port = $1")
        .bind(i32::from(third.spec.port))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE sessionlb.sessionlb_nodes SET clock_skew_ms = 5000 WHERE port = $1")
        .bind(i32::from(second.spec.port))
        .execute(&pool)
        .await
        .unwrap();
    let out = fx.admin(&second.config, &["list-nodes"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let rows = parse_list_nodes(&text);
    let order: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
    assert_eq!(order, vec!["Online", "Online", "Offline"], "{text}");
    assert!(rows[0].id < rows[1].id);
    assert_eq!(row_of(&rows, &first.spec).unwrap().status, "Offline");
    assert!(row_of(&rows, &second.spec).unwrap().notes.contains("CLOCK SKEW over 1s"), "{text}");
    assert!(row_of(&rows, &third.spec).unwrap().notes.contains("VERSION MISMATCH"), "{text}");
    assert!(!row_of(&rows, &second.spec).unwrap().notes.contains("VERSION MISMATCH"), "{text}");
    assert!(text.contains("5000ms"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnostics_go_to_stderr_or_a_temp_file() {
    let db = TestDb::postgres().await;
    let fx = ClusterFixture::new(&db.url);
    let be = Backend::start(fx.path(), "b").await;
    for target in ["stderr", "tmp"] {
        let mut spec = fx.spec("127.0.0.2", Some(be.addr));
        spec.extra = format!("diagnostics = \"{target}\"");
        // Quiet main log: only the diagnostics may mention routing.
        let text = fx.config_text(&spec).replace("log-level = \"info,sessionlb=debug\"", "log-level = \"warn\"");
        std::fs::write(fx.write_config(&spec), text).unwrap();
        let mut cmd = std::process::Command::new(SESSIONLB);
        cmd.arg("--config").arg(fx.path().join(format!("node-{}-{}.toml", spec.ip, spec.port))).arg("serve");
        let mut node = Node {
            proc: Proc::spawn("diag node", cmd, fx.path().join(format!("diag-{target}.log"))),
            config: fx.path().join(format!("node-{}-{}.toml", spec.ip, spec.port)),
            spec: spec.clone(),
        };
        node.wait_healthy().await;
        assert_eq!(reqwest::get(node.url("/x")).await.unwrap().status().as_u16(), 200);
        let pid = node.proc.pid();
        let diag = match target {
            "stderr" => {
                eventually(Duration::from_secs(5), "a routing event on stderr", || async {
                    let log = node.proc.log_text();
                    log.contains("routed").then_some(log)
                })
                .await
            }
            _ => {
                // `sessionlb-diagnostics-<pid>-<random>.log` in the temp folder.
                let prefix = format!("sessionlb-diagnostics-{pid}-");
                let file = eventually(Duration::from_secs(5), "the diagnostics file", || async {
                    std::fs::read_dir(std::env::temp_dir())
                        .ok()?
                        .flatten()
                        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                        .map(|e| e.path())
                })
                .await;
                let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
                assert_eq!(mode & 0o777, 0o600, "the diagnostics file is private: {}", file.display());
                let text = eventually(Duration::from_secs(5), "a routing event in the diagnostics file", || async {
                    std::fs::read_to_string(&file).ok().filter(|t| t.contains("routed"))
                })
                .await;
                assert!(!node.proc.log_text().contains("routed"), "the main log stays quiet");
                let _ = std::fs::remove_file(&file);
                text
            }
        };
        assert!(diag.contains("via=pin="), "an anonymous request is routed by its pin: {diag}");
        node.proc.signal(Signal::TERM);
        node.proc.wait_exit(Duration::from_secs(20));
    }
}

#[test]
fn encrypted_database_password_connects_to_a_password_protected_server() {
    let pg = crate::common::db::ThrowawayPostgres::start_with_password("S3cr:t pw");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    write_key(&key, b"3f2504e0-4f89-11d3-9a0c-0305e82c3301\n", 0o600);
    let encrypt = |key: &std::path::Path, pw: &str| {
        let cfg = dir.path().join("enc.toml");
        std::fs::write(&cfg, format!("secure-cookie-key-file = \"{}\"\n", key.display())).unwrap();
        let mut child = std::process::Command::new(SESSIONLB)
            .arg("--config")
            .arg(&cfg)
            .arg("encrypt-password")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(format!("{pw}\n").as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let list_nodes = |password: &str, key: &std::path::Path| {
        let cfg = dir.path().join("node.toml");
        std::fs::write(
            &cfg,
            format!(
                "database = \"postgres://postgres@127.0.0.1:{}/postgres\"\ndatabase-password = \"{password}\"\nsecure-cookie-key-file = \"{}\"\n",
                pg.port,
                key.display()
            ),
        )
        .unwrap();
        std::process::Command::new(SESSIONLB).arg("--config").arg(&cfg).arg("list-nodes").output().unwrap()
    };

    let good = encrypt(&key, "S3cr:t pw");
    assert!(sessionlb::config::password::looks_encrypted(&good), "{good}");
    assert!(!good.contains("S3cr"));
    let out = list_nodes(&good, &key);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("(no nodes)"));

    // A wrong password is refused by the server...
    let out = list_nodes(&encrypt(&key, "wrong"), &key);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("password authentication failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ...and a value encrypted with another key is refused before connecting.
    let other = dir.path().join("other-key");
    write_key(&other, b"ffffffff-4f89-11d3-9a0c-0305e82c3301\n", 0o600);
    let out = list_nodes(&encrypt(&other, "S3cr:t pw"), &key);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another secure cookie key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A Workbench directory with the encrypted password in database.conf.
    let etc = dir.path().join("etc-rstudio");
    std::fs::create_dir(&etc).unwrap();
    std::fs::copy(&key, etc.join("secure-cookie-key")).unwrap();
    std::fs::write(
        etc.join("database.conf"),
        format!(
            "provider=postgresql\nhost=127.0.0.1\nport={}\ndatabase=postgres\nusername=postgres\npassword={good}\n",
            pg.port
        ),
    )
    .unwrap();
    let out =
        std::process::Command::new(SESSIONLB).arg("--rstudio-config").arg(&etc).arg("list-nodes").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

//! Configuration reload (`sessionlb reload`, SIGHUP) and the access log,
//! with real `sessionlb serve` processes in front of a demo backend.

use std::path::Path;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::common::cluster::{Browser, WebSocket, metric_sum};
use crate::common::db::TestDb;
use crate::common::eventually;
use crate::common::node::{Backend, ClusterFixture, Node};

/// One node (127.0.0.2) in front of backend "A", with `extra` TOML.
async fn one_node(db: &TestDb, extra: &str) -> (ClusterFixture, Backend, Node) {
    let fx = ClusterFixture::new(&db.url);
    let backend = Backend::start(fx.path(), "A").await;
    let mut spec = fx.spec("127.0.0.2", Some(backend.addr));
    spec.extra = extra.to_string();
    let node = fx.start(&spec).await;
    (fx, backend, node)
}

/// Rewrite the node's configuration file with `extra` instead of its old extra lines.
fn rewrite(fx: &ClusterFixture, node: &Node, extra: &str) {
    let mut spec = node.spec.clone();
    spec.extra = extra.to_string();
    std::fs::write(&node.config, fx.config_text(&spec)).unwrap();
}

async fn echo(ws: &mut WebSocket, text: &str) {
    ws.send(Message::Text(text.to_string().into())).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("an echo").unwrap().unwrap();
    assert_eq!(reply, Message::Text(text.to_string().into()));
}

async fn metrics(node: &Node) -> String {
    reqwest::get(node.metrics_url()).await.unwrap().text().await.unwrap()
}

/// What the backend received as the user header, through the node.
async fn forwarded_user(node: &Node) -> Option<String> {
    let reply = Browser::as_user("alice").get(&node.url("/headers")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let v: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    v["headers"]["x-forwarded-user"].as_str().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_applies_balancer_log_level_and_trusted_cidrs_and_keeps_websockets_open() {
    let db = TestDb::postgres().await;
    // At `warn`, the node's own info lines ("node online") are not written.
    let before = "balancer = \"sessions\"\nlog-level = \"warn\"\n";
    let (fx, _backend, node) = one_node(&db, before).await;
    assert!(!node.proc.log_text().contains("node online"), "{}", node.proc.log_text());
    let pid = node.proc.pid();

    let mut ws = Browser::new().websocket(&node).await;
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("hello from A".into()));
    echo(&mut ws, "before the reload").await;
    // No trusted CIDR: the user header from the client is stripped.
    assert_eq!(forwarded_user(&node).await, None);
    assert!(!node.proc.log_text().contains("sessionlb::diagnostics"), "diagnostics are off");
    let health = node.health().await.unwrap();
    assert_eq!(health["balancer"], "sessions");

    rewrite(
        &fx,
        &node,
        "balancer = \"user-hash\"\nlog-level = \"info\"\ndiagnostics = \"stderr\"\n\
         [identity]\ntrusted-cidrs = [\"127.0.0.0/8\"]\n",
    );
    let out = fx.admin(&node.config, &["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("process {pid}")));

    eventually(Duration::from_secs(10), "the node to use user-hash", || async {
        node.health().await.filter(|h| h["balancer"] == "user-hash").map(|_| ())
    })
    .await;
    // Trusted now: the header reaches the backend, and the user is placed.
    assert_eq!(forwarded_user(&node).await.as_deref(), Some("alice"));
    eventually(Duration::from_secs(10), "alice's session to be registered", || async {
        node.health().await.filter(|h| h["sessions"] == 1).map(|_| ())
    })
    .await;
    // The new level applies to the reload's own report (an info line).
    let log = node.proc.log_text();
    let line = log.lines().find(|l| l.contains("configuration reloaded")).unwrap_or_else(|| panic!("{log}"));
    // Diagnostics (routing decisions) are on now.
    assert!(log.contains("sessionlb::diagnostics: routed"), "{log}");
    for key in ["balancer", "log-level", "diagnostics", "identity.trusted-cidrs"] {
        assert!(line.contains(key), "{key} not named: {line}");
    }
    assert!(!log.contains("restart needed"), "{log}");

    // The WebSocket opened before the reload still echoes; same process.
    echo(&mut ws, "after the reload").await;
    assert_eq!(node.proc.pid(), pid);
    let m = metrics(&node).await;
    assert_eq!(metric_sum(&m, "sessionlb_config_reloads_total{result=\"ok\"}"), 1.0, "{m}");
    assert_eq!(metric_sum(&m, "sessionlb_config_reloads_total{result=\"error\"}"), 0.0, "{m}");
    assert!(metric_sum(&m, "sessionlb_config_last_reload_success_timestamp_seconds") > 1.7e9, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_file_keeps_the_running_configuration_and_restart_only_keys_are_named() {
    let db = TestDb::postgres().await;
    let (fx, _backend, node) = one_node(&db, "balancer = \"user-hash\"\n").await;
    let mut ws = Browser::new().websocket(&node).await;
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("hello from A".into()));

    // An invalid value: `sessionlb reload` refuses before disturbing the node.
    let good = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(
        &node.config,
        format!("balancer = \"round-robin\"\n{}", good.replace("balancer = \"user-hash\"\n", "")),
    )
    .unwrap();
    let out = fx.admin(&node.config, &["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains(&format!("{}:1: `balancer` must be one of", node.config.display())), "{stderr}");

    // SIGHUP anyway (as systemd would): the node keeps its configuration,
    // logs why with file, line and key, and counts the error.
    node.proc.signal(rustix::process::Signal::HUP);
    let m = eventually(Duration::from_secs(10), "the failed reload to be counted", || async {
        let m = metrics(&node).await;
        (metric_sum(&m, "sessionlb_config_reloads_total{result=\"error\"}") == 1.0).then_some(m)
    })
    .await;
    assert_eq!(metric_sum(&m, "sessionlb_config_last_reload_successful"), 0.0, "{m}");
    let log = node.proc.log_text();
    assert!(log.contains("configuration reload failed; keeping the running configuration"), "{log}");
    assert!(log.contains(":1: `balancer` must be one of sessions"), "{log}");
    assert_eq!(node.health().await.unwrap()["balancer"], "user-hash");
    echo(&mut ws, "still open").await;

    // A TOML syntax error is refused the same way.
    std::fs::write(&node.config, format!("{good}\nthis is not toml\n")).unwrap();
    node.proc.signal(rustix::process::Signal::HUP);
    eventually(Duration::from_secs(10), "the second failed reload to be counted", || async {
        let m = metrics(&node).await;
        (metric_sum(&m, "sessionlb_config_reloads_total{result=\"error\"}") == 2.0).then_some(())
    })
    .await;
    assert_eq!(node.health().await.unwrap()["balancer"], "user-hash");

    // Restart-only keys are named, and the reloadable ones still apply.
    std::fs::write(
        &node.config,
        good.replace("balancer = \"user-hash\"\n", "balancer = \"sessions\"\npool-size = 7\n"),
    )
    .unwrap();
    let out = fx.admin(&node.config, &["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually(Duration::from_secs(10), "the node to use sessions", || async {
        node.health().await.filter(|h| h["balancer"] == "sessions").map(|_| ())
    })
    .await;
    let log = eventually(Duration::from_secs(10), "the restart warning", || async {
        let log = node.proc.log_text();
        log.contains("restart needed").then_some(log)
    })
    .await;
    let warning = log.lines().find(|l| l.contains("restart needed")).unwrap();
    assert!(warning.contains(&format!("pool-size changed in {}", node.config.display())), "{warning}");
    echo(&mut ws, "still open after all that").await;
}

#[test]
fn reload_without_a_running_node_says_so() {
    let fx = ClusterFixture::new("postgres://127.0.0.1:1/none");
    let spec = fx.spec("127.0.0.2", None);
    let config = fx.write_config(&spec);
    let out = fx.admin(&config, &["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("no sessionlb is running for 127.0.0.2:{}", spec.port)), "{stderr}");
    assert!(stderr.contains("pid file"), "{stderr}");
}

/// The access log's lines, but the readiness probes' `/health`.
fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v| v["path"] != "/health")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn access_log_lines_are_json_without_query_strings_cookies_or_users_and_follow_rotation() {
    let db = TestDb::postgres().await;
    let fx_dir = tempfile::tempdir().unwrap();
    let log_path = fx_dir.path().join("access.log");
    let extra = format!(
        "access-log = \"{}\"\naccess-log-format = \"json\"\n[identity]\ntrusted-cidrs = [\"127.0.0.0/8\"]\n",
        log_path.display()
    );
    let (fx, _backend, node) = one_node(&db, &extra).await;

    let mut browser = Browser::as_user("carol-the-user");
    let reply = browser
        .request(reqwest::Method::GET, &node.url("/headers?token=secret-token-value"))
        .header("cookie", "other=hunter2-cookie-value")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    browser.absorb(&reply.headers().clone());
    let mut anonymous = Browser::new();
    anonymous.get(&node.url("/?q=another-secret")).await;
    // The pin cookie goes back: its value must not appear either.
    anonymous.get(&node.url("/")).await;
    let pin = anonymous.pin().expect("a pin").to_string();

    let lines = eventually(Duration::from_secs(10), "three access log lines", || async {
        let lines = json_lines(&log_path);
        (lines.len() >= 3).then_some(lines)
    })
    .await;
    let first = &lines[0];
    assert_eq!(first["method"], "GET");
    assert_eq!(first["path"], "/headers");
    assert_eq!(first["status"], 200);
    assert_eq!(first["client"], "127.0.0.1");
    assert_eq!(first["route"], "local");
    assert_eq!(first["session"], "user");
    assert!(first["bytes"].as_u64().unwrap() > 0, "{first}");
    assert!(first["duration_seconds"].as_f64().unwrap() >= 0.0, "{first}");
    assert!(first["node"].as_i64().unwrap() > 0, "{first}");
    assert!(first["time"].as_str().unwrap().ends_with('Z'), "{first}");
    assert_eq!(lines[1]["path"], "/");
    assert_eq!(lines[2]["session"], "pin");
    let text = std::fs::read_to_string(&log_path).unwrap();
    let probe = text.lines().find(|l| l.contains("\"/health\"")).expect("the readiness probe is logged too");
    assert!(probe.contains("\"route\":\"-\"") && probe.contains("\"session\":\"-\""), "{probe}");
    for secret in ["secret-token-value", "token=", "another-secret", "hunter2", "carol", pin.as_str()] {
        assert!(!text.contains(secret), "{secret:?} in the access log:\n{text}");
    }

    // Rotation: move the file away, reload, and the node writes a new one.
    let rotated = fx_dir.path().join("access.log.1");
    std::fs::rename(&log_path, &rotated).unwrap();
    let out = fx.admin(&node.config, &["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually(Duration::from_secs(10), "a line in the new access log", || async {
        Browser::new().get(&node.url("/")).await;
        (!json_lines(&log_path).is_empty()).then_some(())
    })
    .await;
    let old = json_lines(&rotated).len();
    anonymous.get(&node.url("/")).await;
    eventually(Duration::from_secs(10), "the next line in the new file", || async {
        (json_lines(&log_path).len() >= 2).then_some(())
    })
    .await;
    assert_eq!(json_lines(&rotated).len(), old, "the rotated file is no longer written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn access_log_is_off_by_default() {
    let db = TestDb::postgres().await;
    let (_fx, _backend, node) = one_node(&db, "").await;
    let mut browser = Browser::new();
    for _ in 0..3 {
        assert_eq!(browser.get(&node.url("/?x=1")).await.status, 200);
    }
    // The plain format's marks, on stdout or anywhere in the node's output.
    let log = node.proc.log_text();
    assert!(!log.contains("route=local") && !log.contains("\"route\""), "{log}");
    let m = metrics(&node).await;
    assert!(!m.contains("sessionlb_access_log_dropped_total"), "the writer never started: {m}");
}

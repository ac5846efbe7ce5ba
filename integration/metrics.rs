//! Metrics on their own listener (`metrics-address`), the public port's rule
//! for `/metrics`, the request/upstream/tunnel/registry/notification metrics,
//! process metrics, and per-node gauges that agree with the status page.

use std::time::Duration;

use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::common::cluster::{Browser, Cluster, ClusterOptions, NAMES, TRUST_LOOPBACK};
use crate::common::eventually;
use crate::common::netns::Netns;
use crate::common::node::{ClusterFixture, free_port};

/// The value of the sample `series` (name and labels, as printed) in Prometheus text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn scrape(url: &str) -> String {
    let resp = reqwest::get(url).await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(resp.status().as_u16(), 200, "{url}");
    resp.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_metrics_listener_serves_requests_upstreams_tunnels_registry_and_process_metrics() {
    let c = Cluster::start(ClusterOptions { extra: TRUST_LOOPBACK.into(), ..Default::default() }).await;
    let a = &c.nodes[0];
    // A signed-in user's session somewhere, used through its own node and through another one.
    let mut b = Browser::new_user();
    let first = b.get(&a.url("/")).await;
    assert_eq!(first.status, 200);
    let owner = NAMES.iter().position(|n| Some(*n) == first.backend()).unwrap();
    let other = (owner + 1) % 3;
    for _ in 0..3 {
        assert_eq!(b.get(&c.nodes[owner].url("/page")).await.status, 200);
        assert_eq!(b.get(&c.nodes[other].url("/page")).await.status, 200);
    }
    let (owner_node, other_node) = (&c.nodes[owner], &c.nodes[other]);

    // A WebSocket through a peer: an open tunnel on both hops, and gone once closed.
    let mut ws = b.websocket(other_node).await;
    assert!(matches!(ws.next().await, Some(Ok(Message::Text(_)))));
    let tunnels = r#"sessionlb_open_tunnels{kind="websocket"}"#;
    for node in [owner_node, other_node] {
        eventually(Duration::from_secs(5), "the tunnel to be counted", || async {
            (sample(&scrape(&node.metrics_url()).await, tunnels) == Some(1.0)).then_some(())
        })
        .await;
    }
    ws.close(None).await.unwrap();
    for node in [owner_node, other_node] {
        eventually(Duration::from_secs(5), "the closed tunnel to be released", || async {
            (sample(&scrape(&node.metrics_url()).await, tunnels) == Some(0.0)).then_some(())
        })
        .await;
    }

    let owner_text = scrape(&owner_node.metrics_url()).await;
    let other_text = scrape(&other_node.metrics_url()).await;
    let positive = |text: &str, series: &str| {
        let v = sample(text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
        assert!(v > 0.0, "{series} = {v}");
    };
    // Requests by route and class (the tunnel is not a request here: 4 = 3 pages + the first GET at most).
    positive(&owner_text, r#"sessionlb_request_duration_seconds_count{class="2xx",route="local"}"#);
    positive(&owner_text, r#"sessionlb_request_duration_seconds_count{class="2xx",route="inbound"}"#);
    positive(&other_text, r#"sessionlb_request_duration_seconds_count{class="2xx",route="forwarded"}"#);
    assert_eq!(
        sample(&other_text, r#"sessionlb_request_duration_seconds_count{class="1xx",route="forwarded"}"#),
        Some(0.0),
        "tunnels are not timed as requests"
    );
    positive(&owner_text, r#"sessionlb_upstream_connect_seconds_count{upstream="backend"}"#);
    positive(&owner_text, r#"sessionlb_upstream_ttfb_seconds_count{upstream="backend"}"#);
    positive(&other_text, r#"sessionlb_upstream_connect_seconds_count{upstream="peer"}"#);
    positive(&other_text, r#"sessionlb_upstream_ttfb_seconds_count{upstream="peer"}"#);
    // The registry: the placing node (A) timed its write; every node its check-ins...
    let a_text = scrape(&a.metrics_url()).await;
    positive(&a_text, r#"sessionlb_registry_seconds_count{op="place_session"}"#);
    positive(&owner_text, r#"sessionlb_registry_seconds_count{op="check_in"}"#);
    // ...and the peers heard of the placement, measuring how long that took.
    let lag = |text: &str| sample(text, "sessionlb_notification_lag_seconds_count").unwrap_or(0.0);
    assert!(lag(&owner_text) + lag(&other_text) > 0.0, "{owner_text}");
    let lag_sum = sample(&other_text, "sessionlb_notification_lag_seconds_sum").unwrap();
    assert!(lag_sum / lag(&other_text).max(1.0) < 5.0, "mean notification lag {lag_sum}");
    assert!(sample(&a_text, "sessionlb_clock_skew_seconds").is_some_and(|s| s.abs() < 1.0), "{a_text}");
    // Build and process.
    assert_eq!(
        sample(&a_text, &format!("sessionlb_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"))),
        Some(1.0)
    );
    positive(&a_text, "process_resident_memory_bytes");
    positive(&a_text, "process_open_fds");
    positive(&a_text, "process_max_fds");
    positive(&a_text, "process_start_time_seconds");
    assert!(sample(&a_text, "process_cpu_seconds_total").is_some(), "{a_text}");
    assert_eq!(sample(&a_text, "sessionlb_offline_mode"), Some(0.0));
    assert_eq!(sample(&a_text, "sessionlb_draining"), Some(0.0));
    // The listener serves nothing else.
    let other_path = reqwest::get(a.metrics_url().replace("/metrics", "/load-balancer/status")).await.unwrap();
    assert_eq!(other_path.status().as_u16(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_gauges_agree_with_the_status_page_at_once_and_forget_deleted_nodes() {
    // Health checks every minute: nothing periodic refreshes the gauges
    // during the test (they used to be set by the health-check loop, and
    // lagged the status page: 97 sessions shown for 201 placed).
    let mut c = Cluster::start(ClusterOptions {
        extra: format!("health-check-interval = \"60s\"\n{TRUST_LOOPBACK}"),
        ..Default::default()
    })
    .await;
    let a = &c.nodes[0];
    // 60 signed-in users, placed at once.
    let placed: Vec<_> = futures::future::join_all((0..60).map(|_| {
        let url = a.url("/");
        async move { Browser::new_user().get(&url).await.status }
    }))
    .await;
    assert!(placed.iter().all(|s| *s == 200), "{placed:?}");
    let text = scrape(&a.metrics_url()).await;
    let status = c.status_json(a).await;
    let mut gauge_total = 0.0;
    for n in status["nodes"].as_array().unwrap() {
        let address = n["address"].as_str().unwrap();
        let listed = n["sessions"].as_array().unwrap().len() as f64;
        let gauge = sample(&text, &format!("sessionlb_node_sessions{{node=\"{address}\"}}")).unwrap();
        assert_eq!(gauge, listed, "{address}: gauge {gauge}, status page {listed}");
        gauge_total += gauge;
    }
    assert_eq!(gauge_total, 60.0);
    let registry_total: u64 = c.counts().await.iter().sum();
    assert_eq!(registry_total, 60);

    // C is stopped and deleted: its series go with it.
    let gone = c.nodes[2].address();
    assert!(text.contains(&format!("node=\"{gone}\"")));
    c.nodes[2].proc.kill();
    let out = c.admin(&["delete-node", &c.node_id(2).await.to_string(), "--force"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let a = &c.nodes[0];
    eventually(Duration::from_secs(10), "A to forget C", || async {
        let text = scrape(&a.metrics_url()).await;
        (!text.contains(&format!("node=\"{gone}\"")) && text.contains(&format!("node=\"{}\"", a.address())))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_port_answers_metrics_only_to_loopback_and_cluster_nodes() {
    let ns = Netns::create();
    let db = crate::common::db::TestDb::postgres().await;
    let fx = ClusterFixture::new(&db.url);
    let port = free_port("0.0.0.0");
    let metrics_port = free_port("0.0.0.0");
    let mut spec = fx.spec("0.0.0.0", None);
    spec.port = port;
    spec.extra = format!("www-host-name = \"127.0.0.2:{port}\"\nmetrics-address = \"0.0.0.0:{metrics_port}\"");
    let node = fx.start(&spec).await;
    // From outside the cluster: refused on the public port, served by the metrics listener.
    let (code, body) = ns.curl(&format!("http://{}:{port}/metrics", ns.host_ip));
    assert_eq!(code, 403, "{body}");
    let (code, body) = ns.curl(&format!("http://{}:{metrics_port}/metrics", ns.host_ip));
    assert_eq!(code, 200);
    assert!(body.contains("sessionlb_build_info"), "{body}");
    // Loopback may read it on the public port.
    let local = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap();
    assert_eq!(local.status().as_u16(), 200);
    drop(node);

    // A metrics address in use stops `serve` before the node comes online, naming it.
    let taken = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let mut spec = fx.spec("127.0.0.2", None);
    spec.extra = format!("metrics-address = \"{taken_addr}\"");
    let mut node = fx.spawn(&spec);
    assert!(!node.proc.wait_exit(Duration::from_secs(30)).success());
    let log = node.proc.log_text();
    assert!(log.contains(&format!("cannot listen on {taken_addr}")), "{log}");
}

/// The metric names (sessionlb's and the process metrics) in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("sessionlb_") || t.starts_with("process_"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_metric_the_dashboard_and_alert_rules_name_exists_on_a_running_node() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("conf/grafana-dashboard.json")).unwrap()).unwrap();
    let mut exprs: Vec<(String, String)> = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push((format!("dashboard panel {:?}", panel["title"]), target["expr"].as_str().unwrap().to_string()));
        }
    }
    assert!(exprs.len() > 20);
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(root.join("conf/prometheus-alerts.yml")).unwrap()).unwrap();
    let mut alerts = Vec::new();
    for rule in rules["groups"][0]["rules"].as_sequence().unwrap() {
        let name = rule["alert"].as_str().expect("an alert name").to_string();
        assert!(rule["labels"]["severity"].is_string() && rule["annotations"]["summary"].is_string(), "{name}");
        exprs.push((format!("alert {name}"), rule["expr"].as_str().unwrap().to_string()));
        alerts.push(name);
    }
    // The issue's list, at least.
    for wanted in [
        "SessionlbNodeDown",
        "SessionlbMissedCheckIn",
        "SessionlbRegistryBreakerOpen",
        "SessionlbPlacementSlow",
        "SessionlbLockFailures",
    ] {
        assert!(alerts.iter().any(|a| a == wanted), "no alert {wanted}");
    }

    // A cluster that has done what every metric counts: placements, a
    // WebSocket, a forged cookie (and the pin that replaces it), a forged
    // node-to-node header, a session whose node's backend died (a move).
    let mut c = Cluster::start(ClusterOptions { extra: TRUST_LOOPBACK.into(), ..Default::default() }).await;
    let mut b = crate::common::cluster::session_on(&c, 2).await;
    let mut ws = b.websocket(&c.nodes[0]).await;
    assert!(matches!(ws.next().await, Some(Ok(Message::Text(_)))));
    ws.close(None).await.unwrap();
    let client = reqwest::Client::new();
    let forged = client.get(c.nodes[0].url("/")).header("cookie", "sessionlb-affinity=v1.forged").send().await.unwrap();
    assert_eq!(forged.status().as_u16(), 200);
    let refused = client.get(c.nodes[0].url("/")).header("x-sessionlb-forward", "garbage").send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    c.backends[2].proc.kill();
    assert_eq!(b.get(&c.nodes[0].url("/after-the-backend-died")).await.status, 200);

    let mut series = std::collections::BTreeSet::new();
    for node in &c.nodes[..2] {
        for line in scrape(&node.metrics_url()).await.lines().filter(|l| !l.starts_with('#')) {
            series.insert(line.split(['{', ' ']).next().unwrap().to_string());
        }
    }
    for (origin, expr) in &exprs {
        for name in metric_names(expr) {
            assert!(series.contains(&name), "{origin} names {name}, which no node exports:\n{expr}");
        }
    }
}

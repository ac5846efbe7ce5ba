//! Promises of the README that had no test of their own (issue 11): the
//! node-to-node `/load-balancer/node-info` refuses what is not signed for
//! it; `/health` is 503 while the local backend is down; a slow request in
//! flight completes across SIGTERM; the pin cookie's attributes and its
//! refresh past half its age.

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use rustix::process::Signal;
use sessionlb::config::key::SecureKey;
use sessionlb::proxy::cookie::Pin;
use sessionlb::proxy::forward::{self, RequestLine};

use crate::common::cluster::{Browser, Cluster, ClusterOptions, NODE_IPS, Reply, TRUST_LOOPBACK, session_on};
use crate::common::eventually;
use crate::common::node::{DEMO_BACKEND, Proc};
use crate::routing::sessionlb_now;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// `/health` of a node: status code and JSON (`None` if it does not answer).
async fn health_of(url: &str) -> Option<(u16, serde_json::Value)> {
    let resp = reqwest::Client::builder().no_proxy().build().unwrap().get(url).send().await.ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.json().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_info_answers_only_a_request_signed_for_it_by_a_peer() {
    let c = Cluster::start(ClusterOptions::default()).await;
    let (a_id, b_id) = (c.node_id(0).await, c.node_id(1).await);
    let a = &c.nodes[0];
    let host = a.address();
    let path = "/load-balancer/node-info";
    let line = RequestLine { method: "GET", host: &host, path_and_query: path };
    let key = c.key();
    let other_key = SecureKey::from_bytes(b"another cluster's key, 32 bytes at least".to_vec());
    // From B's address, as a peer's request would come.
    let client =
        reqwest::Client::builder().no_proxy().local_address(NODE_IPS[1].parse::<IpAddr>().unwrap()).build().unwrap();
    let get = |header: Option<String>| {
        let mut req = client.get(a.url(path));
        if let Some(h) = header {
            req = req.header(forward::HEADER, h);
        }
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    let rejected = || c.metric(a, "sessionlb_rejected_forwards_total");
    let before = rejected().await;
    let refused = [
        ("unsigned", None),
        ("garbage", Some("v1.not-a-header".to_string())),
        ("another key", Some(forward::sign(&other_key, b_id, a_id, now_ms(), "node-info", None, &line))),
        ("signed for B", Some(forward::sign(&key, a_id, b_id, now_ms(), "node-info", None, &line))),
        ("too old", Some(forward::sign(&key, b_id, a_id, now_ms() - 600_000, "node-info", None, &line))),
    ];
    for (what, header) in refused.clone() {
        let (status, body) = get(header).await;
        assert_eq!(status, 403, "{what}: {body}");
        assert!(!body.contains("\"address\""), "{what}: the report leaked: {body}");
    }
    assert_eq!(rejected().await - before, refused.len() as f64, "every refusal counted");
    // A valid forwarding header for a request (another session key) is no node-info request.
    let (status, _) = get(Some(forward::sign(&key, b_id, a_id, now_ms(), "user:ann", None, &line))).await;
    assert_eq!(status, 403);
    // Signed for A by B, for node-info: A's own report.
    let (status, body) = get(Some(forward::sign(&key, b_id, a_id, now_ms(), "node-info", None, &line))).await;
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((report["id"].as_i64(), report["address"].as_str()), (Some(a_id), Some(host.as_str())), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_is_503_while_the_local_backend_is_down_and_200_once_it_is_back() {
    let mut c = Cluster::start(ClusterOptions {
        extra: format!("health-check-interval = \"250ms\"\n{TRUST_LOOPBACK}"),
        ..Default::default()
    })
    .await;
    let a_health = c.nodes[0].url("/health");
    assert_eq!(health_of(&a_health).await.unwrap().0, 200);
    let addr = c.backends[0].addr;
    c.backends[0].proc.kill();
    let (_, health) = eventually(Duration::from_secs(10), "A's /health to say its backend is down", || async {
        health_of(&a_health).await.filter(|(code, _)| *code == 503)
    })
    .await;
    assert_eq!(health["status"], "backend down", "{health}");
    assert!(health.get("draining").is_none_or(|d| d != true), "{health}");
    // Peers take A as unreachable; new users entering through A go elsewhere.
    let a_up = format!("sessionlb_node_up{{node=\"{}\"}}", c.nodes[0].address());
    eventually(Duration::from_secs(10), "B to count A down", || async {
        (c.metric(&c.nodes[1], &a_up).await == 0.0).then_some(())
    })
    .await;
    for _ in 0..6 {
        let reply = Browser::new_user().get(&c.nodes[0].url("/")).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(matches!(reply.backend(), Some("B") | Some("C")), "{reply:?}");
    }
    // The backend comes back on its address: /health says so again.
    let mut cmd = Command::new(DEMO_BACKEND);
    cmd.args(["--listen", &addr.to_string(), "--name", "A"]);
    c.backends[0].proc = Proc::spawn("backend A (again)", cmd, c.fx.path().join("backend-A-again.log"));
    let (_, health) = eventually(Duration::from_secs(15), "A's /health to be 200 again", || async {
        health_of(&a_health).await.filter(|(code, _)| *code == 200)
    })
    .await;
    assert_eq!(health["status"], "ok", "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_request_in_flight_completes_across_sigterm() {
    let mut c = Cluster::start(ClusterOptions { extra: TRUST_LOOPBACK.into(), ..Default::default() }).await;
    let browser = session_on(&c, 0).await;
    // 8 events 300 ms apart from A's backend, through A.
    let mut resp =
        browser.request(reqwest::Method::GET, &c.nodes[0].url("/sse?events=8&interval_ms=300")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("x-backend").unwrap(), "A");
    let mut body = String::from_utf8(resp.chunk().await.unwrap().expect("a first event").to_vec()).unwrap();
    assert!(body.contains("event 0 from A"), "{body}");
    // The request is in flight: A is told to stop.
    c.nodes[0].proc.signal(Signal::TERM);
    while let Some(chunk) = resp.chunk().await.expect("the response was not cut") {
        body.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    for i in 0..8 {
        assert!(body.contains(&format!("event {i} from A")), "event {i} missing: {body}");
    }
    // Then A stops, having drained.
    let status = c.nodes[0].proc.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    let log = c.nodes[0].proc.log_text();
    assert!(log.contains("drained: nothing left in progress"), "{log}");
}

/// The `sessionlb-affinity` Set-Cookie of a reply, if any.
fn pin_set_cookie(reply: &Reply) -> Option<String> {
    reply
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("sessionlb-affinity="))
        .map(str::to_string)
}

/// The pin in a Set-Cookie value, checked against `key`.
fn pin_of(set_cookie: &str, key: &SecureKey) -> Pin {
    let value = set_cookie.split(';').next().unwrap().strip_prefix("sessionlb-affinity=").unwrap();
    let parts: Vec<&str> = value.split('.').collect();
    assert_eq!(parts.len(), 5, "{value}");
    let pin = Pin { id: parts[1].into(), node: parts[2].parse().unwrap(), issued: parts[3].parse().unwrap() };
    assert_eq!(pin.sign(key), value, "a pin signed with the cluster key");
    pin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pin_cookies_carry_their_attributes_and_are_refreshed_past_half_their_age() {
    const MAX_AGE: u64 = 7200;
    let c = Cluster::start(ClusterOptions {
        extra: format!("{TRUST_LOOPBACK}[sessions]\naffinity-cookie-max-age = \"2h\"\n"),
        ..Default::default()
    })
    .await;
    let key = c.key();
    // A new anonymous browser: the pin and its attributes (plain http: no Secure).
    let mut anon = Browser::new();
    let first = anon.get(&c.nodes[0].url("/")).await;
    let set = pin_set_cookie(&first).expect("a new pin");
    let attributes: Vec<&str> = set.split("; ").skip(1).collect();
    assert_eq!(attributes, ["Path=/", &format!("Max-Age={MAX_AGE}"), "HttpOnly", "SameSite=Lax"], "{set}");
    let pin = pin_of(&set, &key);
    // Fresh: not set again.
    let again = anon.get(&c.nodes[1].url("/")).await;
    assert_eq!(pin_set_cookie(&again), None, "a fresh pin is not re-issued");
    assert_eq!(again.backend(), first.backend());
    // Past half its age: refreshed, same id and node, issued now.
    let now = sessionlb_now();
    let old = Pin { issued: now - MAX_AGE / 2 - 60, ..pin.clone() };
    let mut returning = Browser::new();
    returning.cookies.insert("sessionlb-affinity".into(), old.sign(&key));
    let reply = returning.get(&c.nodes[2].url("/")).await;
    assert_eq!(reply.backend(), first.backend(), "still pinned to its node");
    let set = pin_set_cookie(&reply).expect("a refreshed pin");
    assert!(set.ends_with(&format!("; Max-Age={MAX_AGE}; HttpOnly; SameSite=Lax")), "{set}");
    let refreshed = pin_of(&set, &key);
    assert_eq!((refreshed.id.as_str(), refreshed.node), (pin.id.as_str(), pin.node));
    assert!(refreshed.issued >= now, "{refreshed:?}");
    // Younger than half its age: kept as it is.
    let young = Pin { issued: now - MAX_AGE / 2 + 600, ..pin.clone() };
    let mut kept = Browser::new();
    kept.cookies.insert("sessionlb-affinity".into(), young.sign(&key));
    assert_eq!(pin_set_cookie(&kept.get(&c.nodes[0].url("/")).await), None);

    // A signed-in user: pinned to the user's node, refreshed the same way.
    let mut user = Browser::new_user();
    let first = user.get(&c.nodes[0].url("/")).await;
    let pin = pin_of(&pin_set_cookie(&first).expect("the user's pin"), &key);
    let user_node = c.index_of(pin.node).await.unwrap();
    assert_eq!(first.backend(), Some(crate::common::cluster::NAMES[user_node]));
    assert_eq!(pin_set_cookie(&user.get(&c.nodes[1].url("/")).await), None, "fresh and on the user's node");
    let old = Pin { issued: now - MAX_AGE / 2 - 60, ..pin.clone() };
    user.cookies.insert("sessionlb-affinity".into(), old.sign(&key));
    let set = pin_set_cookie(&user.get(&c.nodes[2].url("/")).await).expect("the user's pin refreshed");
    let refreshed = pin_of(&set, &key);
    assert_eq!((refreshed.id.as_str(), refreshed.node), (pin.id.as_str(), pin.node));
    assert!(refreshed.issued >= now);
}

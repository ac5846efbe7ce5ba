//! Issue 4: forged input is never trusted; failed, drained, deleted nodes and
//! a database outage lose no session; the status page and its access rule.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use sessionlb::cluster::{NewSession, SessionKind};
use sessionlb::proxy::{cookie, forward};

use crate::common::cluster::{Browser, Cluster, ClusterOptions, NAMES, TRUST_LOOPBACK, session_on};
use crate::common::db::ThrowawayPostgres;
use crate::common::eventually;
use crate::common::netns::Netns;
use crate::common::node::{ClusterFixture, free_port};
use crate::routing::sessionlb_now;

/// Cluster options trusting the test client's user header.
fn users() -> ClusterOptions {
    ClusterOptions { extra: TRUST_LOOPBACK.into(), ..Default::default() }
}

fn counter(status: &serde_json::Value, name: &str) -> u64 {
    status["counters"][name].as_u64().unwrap_or_else(|| panic!("counter {name} in {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_and_expired_legacy_cookies_are_ignored_replaced_and_counted() {
    let c = Cluster::start(ClusterOptions::default()).await;
    // A session made by an older version: a v1 affinity cookie and its row on B.
    let (legacy, genuine) = cookie::issue_v1(&c.key(), sessionlb_now());
    c.registry
        .place_session(&NewSession {
            key: legacy.session_key(),
            node_id: c.node_id(1).await,
            user_name: None,
            kind: SessionKind::Affinity,
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "A to know the session", || async {
        c.nodes[0].health().await.filter(|h| h["sessions"] == 1).map(|_| ())
    })
    .await;
    // B takes no new sessions or pins now, so only a (wrongly) trusted cookie could reach it.
    assert!(c.fx.admin(&c.nodes[1].config, &["offline"]).status.success());
    c.wait_sees_offline_mode(&c.nodes[0], &c.nodes[1], Duration::from_secs(5), "A to see B draining").await;
    let before = counter(&c.status_json(&c.nodes[0]).await, "rejected_cookies");

    // Wrong MAC, naming B's live session id.
    let mut parts: Vec<String> = genuine.split('.').map(String::from).collect();
    let mac = parts[3].clone();
    parts[3] = format!("{}{}", if mac.starts_with('A') { "B" } else { "A" }, &mac[1..]);
    let forged = parts.join(".");
    // Expired: a valid MAC, issued beyond the maximum age (1 day by default).
    let id = &legacy.id;
    let expired = cookie::sign_v1(&c.key(), id, sessionlb_now() - 2 * 86_400);

    for (what, value) in [("forged", forged), ("expired", expired)] {
        for _ in 0..3 {
            let mut attacker = Browser::new();
            attacker.cookies.insert("sessionlb-affinity".into(), value.clone());
            let reply = attacker.get(&c.nodes[0].url("/")).await;
            assert_eq!(reply.status, 200);
            assert_ne!(reply.backend(), Some("B"), "a {what} cookie reached B's backend");
            let fresh = attacker.pin().unwrap();
            assert_ne!(fresh, value, "a fresh pin replaces the {what} cookie");
            assert!(fresh.starts_with("v2."), "{fresh}");
            assert!(!fresh.contains(id.as_str()));
        }
    }
    let after = counter(&c.status_json(&c.nodes[0]).await, "rejected_cookies");
    assert!(after >= before + 6, "rejections counted: {before} -> {after}");
    // The genuine legacy cookie still reaches B (offline mode keeps existing
    // sessions), and is left as it is.
    let mut victim = Browser::new();
    victim.cookies.insert("sessionlb-affinity".into(), genuine.clone());
    let reply = victim.get(&c.nodes[0].url("/")).await;
    assert_eq!(reply.backend(), Some("B"));
    assert_eq!(reply.sets_pin(), None, "a working legacy cookie is not replaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_or_replayed_forwarding_headers_get_403() {
    let c = Cluster::start(ClusterOptions::default()).await;
    let key = c.key();
    let (a, b, cc) = (c.node_id(0).await, c.node_id(1).await, c.node_id(2).await);
    let host = c.nodes[1].address();
    // From A's address: a header signed by A is only accepted from there
    // (`forward-peer-check`), so the cases below test the header itself.
    let a_address: std::net::IpAddr = c.nodes[0].spec.ip.parse().unwrap();
    let client = reqwest::Client::builder().no_proxy().local_address(a_address).build().unwrap();
    let send = |path: &'static str, header: String| {
        let client = client.clone();
        let url = c.nodes[1].url(path);
        async move { client.get(url).header(forward::HEADER, header).send().await.unwrap() }
    };
    let line = |path: &'static str| forward::RequestLine {
        method: "GET",
        host: Box::leak(host.clone().into_boxed_str()),
        path_and_query: path,
    };
    let before = counter(&c.status_json(&c.nodes[0]).await, "rejected_forwards");

    // A genuine header is accepted: B serves from its own backend.
    let good = forward::sign(&key, a, b, sessionlb_now_ms(), "aff:test", Some("ann"), &line("/x"));
    let ok = send("/x", good.clone()).await;
    assert_eq!((ok.status().as_u16(), ok.headers()["x-backend"].to_str().unwrap()), (200, "B"));
    // Replayed to another path.
    assert_eq!(send("/admin", good).await.status().as_u16(), 403);
    // Replayed with another identity header: the backend sees only the signed user.
    for (claimed, seen) in [(&["admin"][..], None), (&["ann"], Some("ann")), (&["ann", "admin"], None)] {
        let signed = forward::sign(&key, a, b, sessionlb_now_ms(), "aff:test", Some("ann"), &line("/headers"));
        let mut request = client.get(c.nodes[1].url("/headers")).header(forward::HEADER, signed);
        for value in claimed {
            request = request.header("x-forwarded-user", *value);
        }
        let reply = request.send().await.unwrap();
        assert_eq!(reply.status().as_u16(), 200);
        let echoed: serde_json::Value = reply.json().await.unwrap();
        assert_eq!(echoed["headers"]["x-forwarded-user"].as_str(), seen, "claimed {claimed:?}: {echoed}");
    }
    // Forged MAC.
    let forged = forward::sign(
        &sessionlb::config::key::SecureKey::from_bytes(b"not-the-cluster-key-at-all-00000\n".to_vec()),
        a,
        b,
        sessionlb_now_ms(),
        "aff:test",
        None,
        &line("/x"),
    );
    assert_eq!(send("/x", forged).await.status().as_u16(), 403);
    // Meant for another node.
    let misdirected = forward::sign(&key, a, cc, sessionlb_now_ms(), "aff:test", None, &line("/x"));
    assert_eq!(send("/x", misdirected).await.status().as_u16(), 403);
    // Too old.
    let stale = forward::sign(&key, a, b, sessionlb_now_ms() - 120_000, "aff:test", None, &line("/x"));
    assert_eq!(send("/x", stale).await.status().as_u16(), 403);
    // From a node that does not exist.
    let stranger = forward::sign(&key, 99_999, b, sessionlb_now_ms(), "aff:test", None, &line("/x"));
    assert_eq!(send("/x", stranger).await.status().as_u16(), 403);
    // Garbage.
    assert_eq!(send("/x", "v1;garbage".into()).await.status().as_u16(), 403);

    let after = eventually(Duration::from_secs(5), "the refusals to be counted", || async {
        let n = counter(&c.status_json(&c.nodes[0]).await, "rejected_forwards");
        (n >= before + 6).then_some(n)
    })
    .await;
    assert!(after >= before + 6);
    assert!(c.nodes[1].proc.log_text().contains("refused a node-to-node request"));
}

fn sessionlb_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// The key of the one session on node `i` (a user placed there).
async fn only_session_on(c: &Cluster, i: usize) -> String {
    let id = c.node_id(i).await;
    let rows = c.registry.list_sessions().await.unwrap();
    let on: Vec<_> = rows.into_iter().filter(|s| s.node_id == Some(id)).collect();
    assert_eq!(on.len(), 1, "{on:?}");
    on[0].key.clone()
}

/// Whether `viewer` counts node `i` up (`sessionlb_node_up`: Online and not
/// marked unreachable by a probe or a failed connect).
async fn shown_reachable(c: &Cluster, viewer: usize, i: usize) -> bool {
    let name = format!("sessionlb_node_up{{node=\"{}\"}}", c.nodes[i].address());
    c.metric(&c.nodes[viewer], &name).await == 1.0
}

/// After a node failed, the user's next request is served elsewhere, the
/// row has moved, and it stays there through every live node.
async fn assert_moved_off(c: &Cluster, browser: &mut Browser, key: &str, dead: usize) {
    let dead_id = c.node_id(dead).await;
    let reply = browser.get(&c.nodes[0].url("/after-crash")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(matches!(reply.backend(), Some("A") | Some("B")), "{:?}", reply.backend());
    let row = c.registry.get_session(key).await.unwrap().unwrap();
    assert_ne!(row.node_id, Some(dead_id), "the registry row moved");
    let moved_to = NAMES[c.index_of(row.node_id.unwrap()).await.unwrap()];
    assert_eq!(reply.backend(), Some(moved_to));
    for i in 0..10 {
        assert_eq!(browser.get(&c.nodes[i % 2].url("/")).await.backend(), Some(moved_to));
    }
}

/// A cluster probing every `interval`, a session on C, then C killed.
async fn with_c_killed(interval: &str) -> (Cluster, Browser, String) {
    let mut c = Cluster::start(ClusterOptions {
        extra: format!("health-check-interval = \"{interval}\"\n{TRUST_LOOPBACK}"),
        ..Default::default()
    })
    .await;
    let browser = session_on(&c, 2).await;
    let key = only_session_on(&c, 2).await;
    c.nodes[2].proc.signal(Signal::KILL);
    c.nodes[2].proc.wait_exit(Duration::from_secs(5));
    (c, browser, key)
}

/// Passive health alone (probes off: one an hour): the first request that
/// meets the dead node fails to connect, marks it and fails over; the move
/// is counted as a connect failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_node_fails_over_by_the_passive_mark_with_probes_off() {
    let (c, mut browser, key) = with_c_killed("1h").await;
    assert!(shown_reachable(&c, 0, 2).await, "no probe runs: A has not noticed yet");
    assert_moved_off(&c, &mut browser, &key, 2).await;
    assert_eq!(moves_for(&c, 0, "connect_failure").await, 1, "moved by the failed connect");
    assert_eq!(moves_for(&c, 0, "unreachable").await, 0);
    assert!(!shown_reachable(&c, 0, 2).await, "the failed connect marked C");
}

/// Active probes alone (no request meets the dead node before they find
/// it, so no passive mark is possible): the probes mark it, and the next
/// request moves the session with the reason `unreachable`, no connect tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_node_is_found_by_probes_alone_and_its_sessions_move_as_unreachable() {
    let (c, mut browser, key) = with_c_killed("300ms").await;
    eventually(Duration::from_secs(15), "A's probes to find C dead", || async {
        (!shown_reachable(&c, 0, 2).await).then_some(())
    })
    .await;
    let failures_before = c.metric(&c.nodes[0], "sessionlb_connect_failures_total").await;
    assert_moved_off(&c, &mut browser, &key, 2).await;
    assert_eq!(moves_for(&c, 0, "unreachable").await, 1, "moved by the probes' mark");
    assert_eq!(moves_for(&c, 0, "connect_failure").await, 0);
    assert_eq!(
        c.metric(&c.nodes[0], "sessionlb_connect_failures_total").await,
        failures_before,
        "no request tried the dead node"
    );
    // The status page says so.
    let text = reqwest::get(c.nodes[0].url("/load-balancer/status")).await.unwrap().text().await.unwrap();
    assert!(text.contains(&format!("{} (unreachable)", c.nodes[2].address())), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offline_node_drains_new_sessions_but_keeps_its_own() {
    let c = Cluster::start(users()).await;
    let mut on_b = session_on(&c, 1).await;
    let pid = c.nodes[1].proc.pid();
    let out = c.fx.admin(&c.nodes[1].config, &["offline"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let started = Instant::now();
    for node in &c.nodes {
        c.wait_sees_offline_mode(node, &c.nodes[1], Duration::from_secs(2), "every node to learn B is draining").await;
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    for i in 0..30 {
        let reply = Browser::new_user().get(&c.nodes[i % 3].url("/")).await;
        assert_eq!(reply.status, 200);
        assert!(matches!(reply.backend(), Some("A") | Some("C")), "new session {i} landed on {:?}", reply.backend());
        let reply = Browser::new().get(&c.nodes[i % 3].url("/")).await;
        assert!(matches!(reply.backend(), Some("A") | Some("C")), "new pin {i} to {:?}", reply.backend());
    }
    assert_eq!(on_b.get(&c.nodes[0].url("/mine")).await.backend(), Some("B"), "B still serves its session");
    assert_eq!(c.nodes[1].proc.pid(), pid, "same process");
    let text = reqwest::get(c.nodes[2].url("/load-balancer/status")).await.unwrap().text().await.unwrap();
    assert!(text.contains(&format!("{} (offline)", c.nodes[1].address())), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_stopped_node_re_places_its_sessions() {
    let mut c = Cluster::start(users()).await;
    let mut browser = session_on(&c, 2).await;
    let c_id = c.node_id(2).await;
    c.nodes[2].proc.signal(Signal::TERM);
    c.nodes[2].proc.wait_exit(Duration::from_secs(20));
    let out = c.admin(&["delete-node", &c_id.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 session(s) will be re-placed"));
    let key = c
        .registry
        .list_sessions()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.node_id.is_none())
        .expect("released session")
        .key;
    let reply = browser.get(&c.nodes[1].url("/")).await;
    assert_eq!(reply.status, 200);
    let row = c.registry.get_session(&key).await.unwrap().unwrap();
    let node = row.node_id.expect("re-placed");
    assert_eq!(reply.backend(), Some(NAMES[c.index_of(node).await.unwrap()]));
    assert_ne!(reply.backend(), Some("C"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_outage_does_not_stop_known_sessions() {
    let pg = ThrowawayPostgres::start();
    let c = Cluster::start(ClusterOptions { database_url: Some(pg.url()), ..users() }).await;
    let mut browsers = Vec::new();
    for _ in 0..6 {
        let mut b = Browser::new_user();
        let backend = b.get(&c.nodes[0].url("/")).await.backend().unwrap().to_string();
        browsers.push((b, backend));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let urls: Vec<String> = c.nodes.iter().map(|n| n.url("/during-outage")).collect();
    let mut workers = Vec::new();
    for (mut b, backend) in browsers.clone() {
        let (stop, served, urls) = (stop.clone(), served.clone(), urls.clone());
        workers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let reply = b.get(&urls[i % 3]).await;
                assert_eq!(
                    (reply.status, reply.backend()),
                    (200, Some(backend.as_str())),
                    "request {i} during the outage: {}",
                    reply.body
                );
                served.fetch_add(1, Ordering::Relaxed);
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.stop_server();
    let outage_start = served.load(Ordering::Relaxed);
    let outage_end = Instant::now() + Duration::from_secs(10);
    // A key minted during the outage reaches its backend through every node,
    // and no request waits out the registry (its pool alone would hold each
    // lookup and registration for seconds).
    let (mut minting, owner) = browsers[0].clone();
    let minted: serde_json::Value =
        serde_json::from_str(&minting.get(&c.nodes[0].url("/new-session")).await.body).unwrap();
    assert_eq!(minted["backend"].as_str(), Some(owner.as_str()));
    let key = minted["key"].as_str().unwrap().to_string();
    for round in 0..3 {
        for node in &c.nodes {
            let started = Instant::now();
            let reply = minting.get(&node.url(&format!("/s/{key}/"))).await;
            assert_eq!((reply.status, reply.backend()), (200, Some(owner.as_str())), "{}", reply.body);
            let held = started.elapsed();
            assert!(held < Duration::from_secs(2), "round {round} via {}: held {held:?}", node.address());
        }
    }
    tokio::time::sleep(outage_end.saturating_duration_since(Instant::now())).await;
    let during = served.load(Ordering::Relaxed) - outage_start;
    pg.start_server();
    // Once the registry answers again, the key minted meanwhile is registered
    // on its owner by a later answer.
    let registry = c.registry.clone();
    let owner_index = NAMES.iter().position(|n| *n == owner).unwrap();
    let owner_id = c.node_id(owner_index).await;
    eventually(Duration::from_secs(20), "the key minted during the outage to be registered", || {
        let (mut minting, registry, key, url) =
            (minting.clone(), registry.clone(), key.clone(), c.nodes[1].url(&format!("/s/{key}/")));
        async move {
            minting.get(&url).await;
            registry.get_session(&key).await.ok()?.filter(|s| s.node_id == Some(owner_id)).map(|_| ())
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("no request failed during the outage");
    }
    assert!(during > 100, "requests kept flowing during the outage ({during})");
    // Notifications work again: an admin change reaches the running nodes.
    let out = c.fx.admin(&c.nodes[2].config, &["offline"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually(Duration::from_secs(15), "C to learn its offline mode after the outage", || async {
        c.nodes[2].health().await.filter(|h| h["offline_mode"] == true).map(|_| ())
    })
    .await;
    c.wait_sees_offline_mode(&c.nodes[0], &c.nodes[2], Duration::from_secs(15), "A to learn it too").await;
    // And new users are placed in the registry again.
    let mut newcomer = Browser::new_user();
    assert_eq!(newcomer.get(&c.nodes[0].url("/")).await.status, 200);
    let key = newcomer.user_key();
    eventually(Duration::from_secs(10), "the newcomer's session in the registry", || async {
        c.registry.get_session(&key).await.ok().flatten().map(|_| ())
    })
    .await;
}

/// Who may read it: `status_page_is_refused_to_a_client_outside_the_cluster`
/// (below) and `security::status_page_is_restricted_to_status_page_cidrs_…`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_page_lists_nodes_and_sessions() {
    let c = Cluster::start(users()).await;
    let mut ann = Browser::as_user("ann");
    let ann_backend = ann.get(&c.nodes[0].url("/")).await.backend().unwrap().to_string();
    // An anonymous browser: pinned (counted, no session); the key its
    // backend mints is a session without a user.
    let mut anon = Browser::new();
    let minted: serde_json::Value =
        serde_json::from_str(&anon.get(&c.nodes[1].url("/new-session")).await.body).unwrap();
    let anon_key = minted["key"].as_str().unwrap().to_string();
    assert_eq!(anon.get(&c.nodes[1].url(&format!("/s/{anon_key}/"))).await.status, 200);
    assert!(c.fx.admin(&c.nodes[2].config, &["offline"]).status.success());

    let text = eventually(Duration::from_secs(5), "the status page to show C draining and both sessions", || async {
        let t = reqwest::get(c.nodes[1].url("/load-balancer/status")).await.ok()?.text().await.ok()?;
        (t.contains("(offline)") && t.contains(&format!("   {anon_key} - (anonymous)")) && t.contains(" - ann"))
            .then_some(t)
    })
    .await;
    for (i, node) in c.nodes.iter().enumerate() {
        let marker = if i == 2 { " (offline)" } else { "" };
        assert!(text.contains(&format!("{}{marker}  Load: ", node.address())), "{text}");
    }
    let ann_node = &c.nodes[NAMES.iter().position(|n| *n == ann_backend).unwrap()];
    let block = text.split("\n\n").find(|b| b.starts_with(&ann_node.address())).unwrap();
    let ann_key = c
        .registry
        .list_sessions()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.user_name.as_deref() == Some("ann"))
        .unwrap()
        .key;
    assert_eq!(ann_key, "user:ann");
    assert!(block.contains(&format!("   {ann_key} - ann")), "{block}");
    // The anonymous browser's pin is no session, but its node counts it.
    assert!(anon.pinned_node().is_some());
    let b_block = text.split("\n\n").find(|b| b.starts_with(&c.nodes[1].address())).unwrap();
    assert!(b_block.contains("anonymous pins issued recently)"), "B issued the pin: {b_block}");

    let json = c.status_json(&c.nodes[0]).await;
    assert_eq!(json["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(json["balancer"], "sessions");
    for name in ["rejected_cookies", "rejected_forwards", "placements", "session_moves"] {
        counter(&json, name);
    }
    assert!(counter(&json, "placements") >= 1);
    assert!(counter(&json, "backend_keys_registered") >= 1);
    assert!(counter(&json, "pins_issued") >= 1);
    let sessions: usize =
        json["nodes"].as_array().unwrap().iter().map(|n| n["sessions"].as_array().unwrap().len()).sum();
    assert_eq!(sessions, 2);
    let pins: u64 = json["nodes"].as_array().unwrap().iter().map(|n| n["pins_recent"].as_u64().unwrap()).sum();
    assert!(pins >= 1, "{json}");

    // The Prometheus endpoint carries the same counters.
    let metrics = reqwest::get(c.nodes[0].url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("sessionlb_placements_total"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_is_refused_to_a_client_outside_the_cluster() {
    let ns = Netns::create();
    let db = crate::common::db::TestDb::postgres().await;
    let fx = ClusterFixture::new(&db.url);
    let port = free_port("0.0.0.0");
    let mut spec = fx.spec("0.0.0.0", None);
    spec.port = port;
    spec.extra = format!("www-host-name = \"127.0.0.2:{port}\"");
    let _node = fx.start(&spec).await;
    let (code, body) = ns.curl(&format!("http://{}:{port}/load-balancer/status", ns.host_ip));
    assert_eq!(code, 403, "{body}");
    // The same node answers the namespace's other requests (it is reachable from there)...
    let (code, _) = ns.curl(&format!("http://{}:{port}/health", ns.host_ip));
    assert_eq!(code, 200);
    // ...and loopback may read the status page.
    let local = reqwest::get(format!("http://127.0.0.1:{port}/load-balancer/status")).await.unwrap();
    assert_eq!(local.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probes_find_a_frozen_node_and_its_recovery() {
    let c = Cluster::start(ClusterOptions {
        extra: format!("health-check-interval = \"500ms\"\n{TRUST_LOOPBACK}"),
        ..Default::default()
    })
    .await;
    let frozen = c.nodes[2].address();
    let shown = |text: &str| text.lines().find(|l| l.starts_with(&frozen)).unwrap_or("").to_string();
    // Frozen: still `Online` in the registry, but it answers nothing (its
    // kernel even accepts connections). Only the probes can tell.
    let node_up = |text: &str| -> Option<i64> {
        let prefix = format!("sessionlb_node_up{{node=\"{frozen}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
    };
    let metrics = || async { reqwest::get(c.nodes[0].url("/metrics")).await.ok()?.text().await.ok() };
    eventually(Duration::from_secs(5), "A's probes to find C up", || async {
        (node_up(&metrics().await?) == Some(1)).then_some(())
    })
    .await;
    c.nodes[2].proc.signal(Signal::STOP);
    let started = Instant::now();
    eventually(Duration::from_secs(10), "A's probes to find C dead", || async {
        (node_up(&metrics().await?) == Some(0)).then_some(())
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(6), "found after {:?}", started.elapsed());
    let text = reqwest::get(c.nodes[0].url("/load-balancer/status")).await.unwrap().text().await.unwrap();
    assert!(shown(&text).contains("(unreachable)"), "{text}");
    // New sessions and new pins avoid it meanwhile.
    for _ in 0..6 {
        let reply = Browser::new_user().get(&c.nodes[0].url("/")).await;
        assert!(matches!(reply.backend(), Some("A") | Some("B")), "{:?}", reply.backend());
        let reply = Browser::new().get(&c.nodes[0].url("/")).await;
        assert!(matches!(reply.backend(), Some("A") | Some("B")), "{:?}", reply.backend());
    }
    c.nodes[2].proc.signal(Signal::CONT);
    let started = Instant::now();
    eventually(Duration::from_secs(10), "A's probes to find C back", || async {
        (node_up(&metrics().await?) == Some(1)).then_some(())
    })
    .await;
    let text = reqwest::get(c.nodes[0].url("/load-balancer/status")).await.unwrap().text().await.unwrap();
    assert!(!shown(&text).is_empty() && !shown(&text).contains("(unreachable)"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5), "found after {:?}", started.elapsed());
}

/// `sessionlb_session_moves_total{reason="…"}` from a node's /metrics.
async fn moves_for(c: &Cluster, node: usize, reason: &str) -> u64 {
    let text = reqwest::get(c.nodes[node].url("/metrics")).await.unwrap().text().await.unwrap();
    let prefix = format!("sessionlb_session_moves_total{{reason=\"{reason}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_backend_died_tells_the_sender_to_fail_over() {
    // Probes slow enough that only the data path can notice the dead backend.
    let mut c = Cluster::start(ClusterOptions {
        extra: format!("health-check-interval = \"60s\"\n{TRUST_LOOPBACK}"),
        ..Default::default()
    })
    .await;
    let mut browser = session_on(&c, 2).await;
    let c_id = c.node_id(2).await;
    c.backends[2].proc.kill();
    // Through A: A forwards to C, C cannot reach its backend and answers with
    // the marker, A fails over and serves the request elsewhere.
    let reply = browser.get(&c.nodes[0].url("/after-backend-death")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(matches!(reply.backend(), Some("A") | Some("B")), "{:?}", reply.backend());
    assert!(!reply.headers.contains_key(forward::BACKEND_DOWN_HEADER), "the internal marker leaked");
    let rows = c.registry.list_sessions().await.unwrap();
    assert!(rows.iter().all(|s| s.node_id != Some(c_id)), "the session row still names C: {rows:?}");
    assert_eq!(moves_for(&c, 0, "backend_down").await, 1, "the move is counted as backend_down");
    assert_eq!(moves_for(&c, 0, "connect_failure").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_cannot_forge_the_backend_down_marker() {
    let c = Cluster::start(ClusterOptions {
        extra: format!("health-check-interval = \"60s\"\n{TRUST_LOOPBACK}"),
        ..Default::default()
    })
    .await;
    let mut browser = session_on(&c, 2).await;
    let c_id = c.node_id(2).await;
    let placements = || async {
        let rows = c.registry.list_sessions().await.unwrap();
        rows.into_iter().map(|s| (s.key, s.node_id)).collect::<Vec<_>>()
    };
    let before = placements().await;
    // C's backend (an app a user runs, say) answers 503 with the marker; the
    // request comes in through A, so A would fail over if it believed it.
    for _ in 0..3 {
        let reply = browser.get(&c.nodes[0].url("/forged-backend-down")).await;
        assert_eq!((reply.status, reply.backend()), (503, Some("C")), "{}", reply.body);
        assert!(!reply.headers.contains_key(forward::BACKEND_DOWN_HEADER), "the marker reached the client");
    }
    // Nothing moved, C is still reachable from A, and the session still reaches C.
    assert_eq!(placements().await, before);
    assert!(before.iter().any(|(_, node)| *node == Some(c_id)));
    let status = c.status_json(&c.nodes[0]).await;
    assert_eq!(counter(&status, "session_moves"), 0, "{status}");
    let c_status = status["nodes"].as_array().unwrap().iter().find(|n| n["id"] == c_id).unwrap().clone();
    assert_eq!(c_status["reachable"], true, "{c_status}");
    assert_eq!(browser.get(&c.nodes[0].url("/")).await.backend(), Some("C"));
}

/// A peer whose connects hang (its accept queue is full, so SYNs are
/// dropped, as for a node cut off from the network) is given up on after
/// about `health-check-interval`, not `timeout`: the request fails over,
/// the session moves (connect failure) and the peer is marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_whose_connects_hang_is_given_up_on_after_about_a_check_interval() {
    // Probes every second but a peer is only marked by 100 failures in a
    // row: the data path must find out itself; `timeout` is far longer.
    let c = Cluster::start(ClusterOptions {
        extra: format!("health-check-interval = \"1s\"\nhealth-check-fall = 100\ntimeout = \"60s\"\n{TRUST_LOOPBACK}"),
        ..Default::default()
    })
    .await;
    // The hanging "node": a listener that never accepts, its queue filled.
    let listener = std::net::TcpListener::bind("127.0.0.7:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr)).await {
            Ok(stream) => fillers.push(stream.unwrap()),
            Err(_) => break,
        }
        assert!(fillers.len() < 10_000, "the accept queue never filled");
    }
    let id = c
        .registry
        .register_node(&sessionlb::cluster::NodeRegistration {
            host: "127.0.0.7".into(),
            port: addr.port(),
            router: false,
            version: String::new(),
        })
        .await
        .unwrap();
    c.registry.set_node_status(id, sessionlb::cluster::NodeStatus::Online).await.unwrap();
    c.registry
        .place_session(&NewSession {
            key: "user:stuck",
            node_id: id,
            user_name: Some("stuck"),
            kind: SessionKind::User,
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "A to know the session", || async {
        c.nodes[0].health().await.filter(|h| h["sessions"] == 1).map(|_| ())
    })
    .await;
    let started = Instant::now();
    let reply = Browser::as_user("stuck").get(&c.nodes[0].url("/")).await;
    let took = started.elapsed();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.backend().is_some(), "{reply:?}");
    // Well under `timeout` (60 s), even on a loaded machine.
    assert!(took < Duration::from_secs(20), "failed over after {took:?}");
    assert_eq!(moves_for(&c, 0, "connect_failure").await, 1);
    let row = c.registry.get_session("user:stuck").await.unwrap().unwrap();
    assert_ne!(row.node_id, Some(id), "the session moved off the hanging node");
    let up = format!("sessionlb_node_up{{node=\"127.0.0.7:{}\"}}", addr.port());
    assert_eq!(c.metric(&c.nodes[0], &up).await, 0.0, "the hanging node is marked");
    drop(fillers);
}

//! Issue 8: sessions begin with a user or a backend session. Anonymous
//! browsers get a signed pin (no registry row, lock, placement or
//! notification); a signed-in user is placed by the balancer with the user
//! name; a registry outage does not lock new users out; the custom plug-in
//! is capped and sees the user.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use sessionlb::cluster::SessionKind;
use sessionlb::config::key::SecureKey;
use sessionlb::proxy::cookie::Pin;

use crate::common::cluster::{Browser, Cluster, ClusterOptions, NAMES, Reply, TRUST_LOOPBACK, rss_kib};
use crate::common::db::{TestDb, ThrowawayPostgres};
use crate::common::eventually;
use crate::routing::sessionlb_now;

fn executable(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

/// The request a crawler, probe or `curl` loop makes: no cookie at all.
async fn cookieless(url: String) -> Reply {
    Browser::new().get(&url).await
}

// === anonymous traffic creates no state ===

async fn anonymous_traffic_creates_no_state(database_url: Option<String>) {
    let c = Cluster::start(ClusterOptions { sign_in: true, database_url, ..Default::default() }).await;
    // Keys the backends really minted: an anonymous request for one is
    // redirected to the sign-in page (302), which must register nothing.
    let mut minted = Vec::new();
    for node in &c.nodes {
        let reply = cookieless(node.url("/new-session")).await;
        minted
            .push(serde_json::from_str::<serde_json::Value>(&reply.body).unwrap()["key"].as_str().unwrap().to_string());
    }
    let urls = |n: usize, offset: usize| -> Vec<String> {
        (0..n)
            .map(|i| {
                let node = &c.nodes[(i + offset) % 3];
                match (i + offset) % 10 {
                    // Made-up backend keys: the backends answer 404.
                    0..=2 => node.url(&format!("/s/{}/", random_hex(11))),
                    // Real keys: 302 to the sign-in page on their backend, 404 elsewhere.
                    3 => node.url(&format!("/s/{}/rpc/poll", minted[i % 3])),
                    // The sign-in flow's first request: 302 to the sign-in page.
                    4 => node.url("/"),
                    5 => node.url("/auth-sign-in"),
                    _ => node.url(&format!("/favicon-{i}.ico")),
                }
            })
            .collect()
    };
    let send = |urls: Vec<String>| async move {
        let mut replies = Vec::new();
        for chunk in urls.chunks(8) {
            let batch: Vec<_> = chunk.iter().map(|u| tokio::spawn(cookieless(u.clone()))).collect();
            for (url, t) in chunk.iter().zip(batch) {
                replies.push((url.clone(), t.await.unwrap()));
            }
        }
        replies
    };
    // Warm up every code path once, then measure.
    let warm = send(urls(60, 0)).await;
    let rss_before: Vec<u64> = c.nodes.iter().map(|n| rss_kib(n.proc.pid())).collect();

    let requests = urls(1000, 60);
    let random_keys = requests.iter().filter(|u| u.contains("/s/") && !minted.iter().any(|k| u.contains(k))).count();
    assert_eq!(random_keys, 300);
    let replies = send(requests).await;
    for (i, (url, reply)) in replies.iter().chain(&warm).enumerate() {
        assert!(matches!(reply.status, 200 | 302 | 404), "request {i} ({url}) not answered by a backend: {reply:?}");
        assert!(reply.backend().is_some(), "request {i} ({url}): {reply:?}");
        assert!(reply.sets_pin().is_some_and(|p| p.starts_with("v2.")), "request {i} got no pin: {reply:?}");
    }
    // No request carries an identity, and every node has no session: the
    // pins still spread over the nodes.
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, reply) in &replies {
        *per_backend.entry(reply.backend().unwrap()).or_default() += 1;
    }
    assert!(per_backend.len() == 3 && per_backend.values().all(|n| *n >= 250), "{per_backend:?}");
    let redirected_keys = replies.iter().filter(|(u, r)| u.contains("/s/") && r.status == 302).count();
    assert!(redirected_keys > 0, "some real keys were redirected to the sign-in page");
    assert!(replies.iter().any(|(u, r)| u.ends_with('/') && r.status == 404));

    // No registry row, no lock, no placement, no registration — from the database and from /metrics.
    assert_eq!(c.registry.list_sessions().await.unwrap(), Vec::new());
    assert_eq!(c.metric_all("sessionlb_placements_total").await, 0.0);
    assert_eq!(c.metric_all("sessionlb_lock_wait_seconds_count").await, 0.0);
    assert_eq!(c.metric_all("sessionlb_lock_failures_total").await, 0.0);
    assert_eq!(c.metric_all("sessionlb_backend_keys_registered_total").await, 0.0);
    assert_eq!(c.metric_all("sessionlb_rejected_cookies_total").await, 0.0);
    assert_eq!(c.metric_all("sessionlb_pins_issued_total").await, 1063.0, "one pin per cookie-less request");
    for node in &c.nodes {
        assert_eq!(node.health().await.unwrap()["sessions"], 0);
    }
    let rss_after: Vec<u64> = c.nodes.iter().map(|n| rss_kib(n.proc.pid())).collect();
    for (i, (before, after)) in rss_before.iter().zip(&rss_after).enumerate() {
        let grown = after.saturating_sub(*before);
        assert!(grown < 5 * 1024, "node {} grew by {grown} KiB ({before} -> {after})", NAMES[i]);
    }
    // The status page shows no session, and each node's recent pins.
    let status = c.status_json(&c.nodes[0]).await;
    let pins: u64 = status["nodes"].as_array().unwrap().iter().map(|n| n["pins_recent"].as_u64().unwrap()).sum();
    assert_eq!(pins, 1063, "{status}");
    assert!(status["nodes"].as_array().unwrap().iter().all(|n| n["sessions"].as_array().unwrap().is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anonymous_traffic_creates_no_state_on_postgres() {
    anonymous_traffic_creates_no_state(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anonymous_traffic_creates_no_state_on_sqlite() {
    let db = TestDb::sqlite();
    anonymous_traffic_creates_no_state(Some(db.url.clone())).await;
}

// === the Workbench flow ===

/// A fresh browser through `entry`: anonymous first (the sign-in page, on
/// the node it is pinned to), then signed in as `user` by that backend.
/// Returns the browser and the backend that serves the signed-in user.
async fn sign_in(c: &Cluster, user: &str, entry: usize) -> (Browser, String) {
    let node = &c.nodes[entry];
    let mut b = Browser::new();
    let first = b.get(&node.url("/")).await;
    assert_eq!(first.status, 302, "{first:?}");
    assert_eq!(first.headers["location"], "/auth-sign-in");
    let anonymous_on = first.backend().unwrap().to_string();
    let page = b.get(&node.url("/auth-sign-in")).await;
    assert_eq!((page.status, page.backend()), (200, Some(anonymous_on.as_str())), "the pin keeps sign-in on one node");
    let signed = b.post_form(&node.url("/auth-do-sign-in"), &[("username", user), ("password", "pw")]).await;
    assert_eq!((signed.status, signed.backend()), (302, Some(anonymous_on.as_str())));
    assert!(b.cookies.contains_key("user-id"), "the backend signed the user in");
    let home = b.get(&node.url("/")).await;
    assert_eq!(home.status, 200, "{home:?}");
    assert_eq!(home.body.trim_end(), format!("backend {}: home of {user}", home.backend().unwrap()));
    let served_by = home.backend().unwrap().to_string();
    // The pin now points at the user's node: any entry, same node.
    for (other, name) in c.nodes.iter().zip(NAMES) {
        let again = b.get(&other.url("/")).await;
        assert_eq!(again.backend(), Some(served_by.as_str()), "{user} via {name}");
    }
    (b, served_by)
}

/// Switch every node to `balancer` (edit the file, SIGHUP) and wait until they use it.
async fn use_balancer(c: &Cluster, balancer: &str) {
    for node in &c.nodes {
        let text = std::fs::read_to_string(&node.config).unwrap();
        let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("balancer = ")).collect();
        std::fs::write(&node.config, format!("balancer = \"{balancer}\"\n{}\n", kept.join("\n"))).unwrap();
        node.proc.signal(Signal::HUP);
    }
    for node in &c.nodes {
        eventually(Duration::from_secs(10), "the node to use the new balancer", || async {
            node.health().await.filter(|h| h["balancer"] == balancer).map(|_| ())
        })
        .await;
    }
}

/// The registry's node of `user`'s session, as a backend name.
async fn node_of_user(c: &Cluster, user: &str) -> String {
    let row = c.registry.get_session(&format!("user:{user}")).await.unwrap().expect("the user's session");
    assert_eq!(row.kind, SessionKind::User);
    NAMES[c.index_of(row.node_id.unwrap()).await.unwrap()].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_workbench_flow_places_the_user_not_the_browser() {
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    let plugin = dir.path().join("plugin.sh");
    // Records the user and whether a secret reached it; chooses the last node.
    executable(
        &plugin,
        &format!(
            "#!/bin/sh\ncat > /dev/null\nprintf '%s|%s|%s\\n' \"$RSTUDIO_USERNAME\" \"${{WORKBENCH_POSTGRES_PASSWORD-unset}}\" \"${{PGPASSWORD-unset}}\" >> '{}'\n\
             echo \"$RSTUDIO_NODES\" | tr ',' '\\n' | tail -n 1\n",
            seen.display()
        ),
    );
    let c = Cluster::start(ClusterOptions {
        sign_in: true,
        extra: format!(
            "balancer = \"user-hash\"\ncustom-balancer-command = \"{}\"\ncustom-balancer-timeout = \"10s\"",
            plugin.display()
        ),
        // Secrets the node may hold (trust authentication ignores them): never passed on to the plug-in.
        env: vec![
            ("WORKBENCH_POSTGRES_PASSWORD".into(), "wb-secret".into()),
            ("PGPASSWORD".into(), "pg-secret".into()),
        ],
        ..Default::default()
    })
    .await;
    let users = |phase: &str| (0..20).map(|i| format!("{phase}{i:02}")).collect::<Vec<_>>();

    // user-hash: every user's two browsers (entering through different
    // nodes, anonymous first) on one node, the node of the user's session.
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for (i, user) in users("hash").iter().enumerate() {
        let (_, first) = sign_in(&c, user, i % 3).await;
        let (_, second) = sign_in(&c, user, (i + 1) % 3).await;
        assert_eq!(first, second, "{user}'s two browsers");
        assert_eq!(node_of_user(&c, user).await, first);
        *per_node.entry(first).or_default() += 1;
    }
    assert!(per_node.len() >= 2, "users spread over the nodes: {per_node:?}");
    let rows = c.registry.list_sessions().await.unwrap();
    assert_eq!(rows.len(), 20, "only the users' sessions, no anonymous row: {rows:?}");

    // sessions: the second browser reaches the node of the user's session.
    use_balancer(&c, "sessions").await;
    for (i, user) in users("sess").iter().enumerate() {
        let (_, first) = sign_in(&c, user, i % 3).await;
        let session_node = node_of_user(&c, user).await;
        assert_eq!(first, session_node);
        let (_, second) = sign_in(&c, user, (i + 2) % 3).await;
        assert_eq!(second, session_node, "{user}'s second browser");
    }

    // custom: the plug-in is asked with RSTUDIO_USERNAME = the user (never
    // for an anonymous browser), without the node's secrets, and its choice wins.
    use_balancer(&c, "custom").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push((c.node_id(i).await, i));
    }
    let chosen = NAMES[ids.iter().max().unwrap().1];
    for (i, user) in users("cust").iter().enumerate() {
        let (_, first) = sign_in(&c, user, i % 3).await;
        let (_, second) = sign_in(&c, user, (i + 1) % 3).await;
        assert_eq!((first.as_str(), second.as_str()), (chosen, chosen), "{user}");
    }
    let lines = std::fs::read_to_string(&seen).unwrap();
    let asked: BTreeSet<&str> = lines.lines().map(|l| l.split('|').next().unwrap()).collect();
    let expected: BTreeSet<String> = users("cust").into_iter().collect();
    assert_eq!(asked, expected.iter().map(String::as_str).collect(), "the plug-in saw exactly the users: {lines}");
    assert!(lines.lines().all(|l| l.ends_with("|unset|unset")), "a secret reached the plug-in: {lines}");
    assert_eq!(c.registry.list_sessions().await.unwrap().len(), 60);
}

// === pins stick, and move when their node cannot take them ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_anonymous_pin_sticks_and_moves_when_its_node_cannot_take_it() {
    let mut c =
        Cluster::start(ClusterOptions { extra: "health-check-interval = \"500ms\"".into(), ..Default::default() })
            .await;
    let mut b = Browser::new();
    let pinned = b.get(&c.nodes[0].url("/")).await.backend().unwrap().to_string();
    let pin = b.pin().unwrap().to_string();
    let pin_id = pin.split('.').nth(1).unwrap().to_string();
    for i in 0..100 {
        let reply = b.get(&c.nodes[i % 3].url(&format!("/page/{i}"))).await;
        assert_eq!((reply.status, reply.backend()), (200, Some(pinned.as_str())), "request {i}");
        assert_eq!(reply.sets_pin(), None, "request {i}: the pin is kept as it is");
    }
    assert!(c.registry.list_sessions().await.unwrap().is_empty(), "a pin is not a registry row");

    // Offline mode: the pinned browser stays (drain); fresh browsers never land there.
    let p = Cluster::index_of_backend(&pinned);
    let p_id = c.node_id(p).await;
    assert!(c.admin(&["offline", "--node", &p_id.to_string()]).status.success());
    for viewer in &c.nodes {
        c.wait_sees_offline_mode(viewer, &c.nodes[p], Duration::from_secs(5), "every node to see the drain").await;
    }
    for i in 0..30 {
        assert_eq!(b.get(&c.nodes[i % 3].url("/drain")).await.backend(), Some(pinned.as_str()));
        let fresh = cookieless(c.nodes[i % 3].url("/")).await;
        assert_ne!(fresh.backend(), Some(pinned.as_str()), "a fresh browser was pinned to a draining node");
    }
    assert!(c.admin(&["online", "--node", &p_id.to_string()]).status.success());

    // Killed: the next request, through another node, moves the pin (same id).
    c.nodes[p].proc.signal(Signal::KILL);
    c.nodes[p].proc.wait_exit(Duration::from_secs(5));
    let live: Vec<usize> = (0..3).filter(|i| *i != p).collect();
    let moved = b.get(&c.nodes[live[0]].url("/after-kill")).await;
    assert_eq!(moved.status, 200, "{moved:?}");
    let now_on = moved.backend().unwrap().to_string();
    assert_ne!(now_on, pinned);
    let new_pin = moved.sets_pin().expect("the pin is replaced");
    assert_eq!(new_pin.split('.').nth(1), Some(pin_id.as_str()), "the browser keeps its pin id");
    for i in 0..20 {
        let reply = b.get(&c.nodes[live[i % 2]].url("/")).await;
        assert_eq!((reply.backend(), reply.sets_pin()), (Some(now_on.as_str()), None));
    }

    // Deleted (while online, without sessions: it stops itself): moved again, to the last node.
    let r = Cluster::index_of_backend(&now_on);
    let last = *live.iter().find(|i| **i != r).unwrap();
    let out = c.admin(&["delete-node", &c.node_id(r).await.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually(Duration::from_secs(10), "the pin to move off the deleted node", || {
        let mut b = b.clone();
        let url = c.nodes[last].url("/after-delete");
        async move { (b.get(&url).await.backend() == Some(NAMES[last])).then_some(()) }
    })
    .await;
    let reply = b.get(&c.nodes[last].url("/after-delete")).await;
    assert_eq!(reply.backend(), Some(NAMES[last]));
    assert!(c.metric(&c.nodes[last], "sessionlb_pins_issued_total").await >= 1.0);
    assert!(c.registry.list_sessions().await.unwrap().is_empty());
}

// === a registered backend key wins ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registered_backend_key_wins_over_a_pin_and_the_users_other_sessions() {
    let c = Cluster::start(ClusterOptions { extra: TRUST_LOOPBACK.into(), ..Default::default() }).await;
    let mut pinned = Browser::new();
    let x = pinned.get(&c.nodes[0].url("/")).await.backend().unwrap().to_string();
    // A key minted and answered (registered) on another node K.
    let (key, k) = loop {
        let mut minter = Browser::new();
        let minted: serde_json::Value =
            serde_json::from_str(&minter.get(&c.nodes[1].url("/new-session")).await.body).unwrap();
        let k = minted["backend"].as_str().unwrap().to_string();
        if k != x {
            let key = minted["key"].as_str().unwrap().to_string();
            assert_eq!(minter.get(&c.nodes[1].url(&format!("/s/{key}/"))).await.status, 200);
            break (key, k);
        }
    };
    eventually(Duration::from_secs(5), "the key registered", || async {
        c.registry.get_session(&key).await.unwrap().map(|_| ())
    })
    .await;
    for node in &c.nodes {
        let reply = pinned.get(&node.url(&format!("/s/{key}/files"))).await;
        assert_eq!((reply.status, reply.backend()), (200, Some(k.as_str())), "via {}", node.address());
        assert_eq!(reply.sets_pin(), None, "the pin stays where it was");
        assert_eq!(pinned.get(&node.url("/")).await.backend(), Some(x.as_str()));
    }
    // A signed-in user whose session is on another node than K.
    let mut user = loop {
        let mut u = Browser::new_user();
        if u.get(&c.nodes[0].url("/")).await.backend() != Some(k.as_str()) {
            break u;
        }
    };
    let u_node = user.get(&c.nodes[2].url("/")).await.backend().unwrap().to_string();
    for node in &c.nodes {
        let reply = user.get(&node.url(&format!("/s/{key}/"))).await;
        assert_eq!(reply.backend(), Some(k.as_str()), "the key wins over the user's session");
        assert_eq!(user.get(&node.url("/home")).await.backend(), Some(u_node.as_str()));
    }
}

// === forged pins ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_or_tampered_pin_is_ignored_counted_and_never_routes() {
    let db = TestDb::sqlite();
    let c = Cluster::start(ClusterOptions { database_url: Some(db.url.clone()), ..Default::default() }).await;
    let (a_id, b_id) = (c.node_id(0).await, c.node_id(1).await);
    // B takes no new pins: only a (wrongly) trusted pin could reach it.
    assert!(c.admin(&["offline", "--node", &b_id.to_string()]).status.success());
    c.wait_sees_offline_mode(&c.nodes[0], &c.nodes[1], Duration::from_secs(5), "A to see B draining").await;
    let key = c.key();
    let now = sessionlb_now();
    let other_key = SecureKey::from_bytes(b"not-the-cluster-key-at-all-00000\n".to_vec());
    let genuine_to_a = Pin::new(a_id, now).sign(&key);
    let forged = [
        ("another key", Pin::new(b_id, now).sign(&other_key)),
        ("tampered node", genuine_to_a.replacen(&format!(".{a_id}.{now}."), &format!(".{b_id}.{now}."), 1)),
        ("expired", Pin::new(b_id, now - 2 * 86_400).sign(&key)),
        ("garbage", format!("v2.x.{b_id}.{now}.AAAA")),
    ];
    let rejected = || async {
        let text = reqwest::get(c.nodes[0].url("/metrics")).await.unwrap().text().await.unwrap();
        text.lines()
            .filter(|l| l.starts_with("sessionlb_rejected_cookies_total{kind=\"pin\""))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>()
    };
    let before = rejected().await;
    for (what, value) in &forged {
        assert!(value.contains(&format!(".{b_id}.")), "{what} names B");
        for _ in 0..3 {
            let mut attacker = Browser::new();
            attacker.cookies.insert("sessionlb-affinity".into(), value.clone());
            let reply = attacker.get(&c.nodes[0].url("/")).await;
            assert_eq!(reply.status, 200);
            assert_ne!(reply.backend(), Some("B"), "a pin with {what} reached B");
            let fresh = reply.sets_pin().expect("a fresh pin");
            assert_ne!(&fresh, value);
        }
    }
    assert_eq!(rejected().await - before, 12.0, "every forged pin counted");
    // A genuine pin to B still reaches it (offline mode keeps existing pins).
    let mut genuine = Browser::new();
    genuine.cookies.insert("sessionlb-affinity".into(), Pin::new(b_id, now).sign(&key));
    let reply = genuine.get(&c.nodes[0].url("/")).await;
    assert_eq!((reply.backend(), reply.sets_pin()), (Some("B"), None));
}

// === registry outage ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_outage_does_not_lock_new_users_out() {
    let pg = ThrowawayPostgres::start();
    let mut c = Cluster::start(ClusterOptions {
        database_url: Some(pg.url()),
        extra: format!("health-check-interval = \"500ms\"\n{TRUST_LOOPBACK}"),
        ..Default::default()
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push((c.node_id(i).await, i));
    }
    ids.sort();
    // With no sessions anywhere, `sessions` places a user on the lowest id.
    let (lowest, entry, third) = (ids[0].1, ids[1].1, ids[2].1);
    let before = c.metric_all("sessionlb_degraded_placements_total").await;
    pg.stop_server();

    // A user placed on two nodes: through `entry` onto the lowest-id node,
    // which then dies; through the third node, placed elsewhere. Each is
    // answered by a backend at once.
    let mut split = Browser::as_user("split");
    let started = Instant::now();
    let reply = split.get(&c.nodes[entry].url("/")).await;
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!((reply.status, reply.backend()), (200, Some(NAMES[lowest])), "{reply:?}");
    assert_eq!(c.metric_all("sessionlb_degraded_placements_total").await - before, 1.0, "placed from memory");
    c.nodes[lowest].proc.signal(Signal::KILL);
    c.nodes[lowest].proc.wait_exit(Duration::from_secs(5));
    let mut second = Browser::as_user("split");
    let started = Instant::now();
    let reply = second.get(&c.nodes[third].url("/")).await;
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_ne!(reply.backend(), Some(NAMES[lowest]));

    // New signed-in users, through the live nodes, answered by a backend at once.
    let live = [entry, third];
    let mut placed = BTreeMap::new();
    for i in 0..6 {
        let user = format!("outage{i}");
        let mut b = Browser::as_user(&user);
        let started = Instant::now();
        let reply = b.get(&c.nodes[live[i % 2]].url("/")).await;
        let took = started.elapsed();
        assert_eq!(reply.status, 200, "{user}: {reply:?}");
        assert!(took < Duration::from_secs(1), "{user} waited {took:?}");
        let backend = reply.backend().unwrap().to_string();
        // Its next request, through the same node, stays there.
        assert_eq!(b.get(&c.nodes[live[i % 2]].url("/again")).await.backend(), Some(backend.as_str()));
        placed.insert(user, backend);
    }
    let mut degraded = 0.0;
    for i in live {
        degraded += c.metric(&c.nodes[i], "sessionlb_degraded_placements_total").await;
    }
    assert!(degraded >= 8.0, "counted: {degraded}");
    assert!(c.registry.list_sessions().await.is_err(), "the registry really is down");

    // The registry returns: every user's session appears, the split user's once.
    pg.start_server();
    for user in placed.keys().chain(std::iter::once(&"split".to_string())) {
        let key = format!("user:{user}");
        eventually(Duration::from_secs(30), &format!("{user}'s session in the registry"), || async {
            c.registry.get_session(&key).await.ok().flatten().map(|_| ())
        })
        .await;
    }
    for (user, backend) in &placed {
        let row = c.registry.get_session(&format!("user:{user}")).await.unwrap().unwrap();
        let on = row.node_id.map(|id| ids.iter().find(|(i, _)| *i == id).unwrap().1);
        assert_eq!(on.map(|i| NAMES[i]), Some(backend.as_str()), "{user} registered where it was served");
    }
    let rows = c.registry.list_sessions().await.unwrap();
    assert_eq!(rows.iter().filter(|r| r.key == "user:split").count(), 1);
    // Both of the split user's browsers, through both live nodes, end on one node.
    let one = eventually(Duration::from_secs(20), "the split user's browsers to meet", || {
        let (mut a, mut b) = (split.clone(), second.clone());
        let (ua, ub) = (c.nodes[entry].url("/meet"), c.nodes[third].url("/meet"));
        async move {
            let (ra, rb) = (a.get(&ua).await, b.get(&ub).await);
            (ra.status == 200 && ra.backend().is_some() && ra.backend() == rb.backend())
                .then(|| ra.backend().unwrap().to_string())
        }
    })
    .await;
    assert_ne!(one, NAMES[lowest]);
    let row = c.registry.get_session("user:split").await.unwrap().unwrap();
    let row_node = ids.iter().find(|(i, _)| Some(*i) == row.node_id).map(|(_, n)| NAMES[*n]);
    assert_eq!(row_node, Some(one.as_str()), "they meet on the registered node");
}

// === custom plug-in cap ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_custom_plugin_is_capped_and_every_request_answered() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs");
    let plugin = dir.path().join("slow.sh");
    // Logs its start and end, takes its time, chooses the first node.
    executable(
        &plugin,
        &format!(
            "#!/bin/sh\necho \"+ $$\" >> '{log}'\ncat > /dev/null\nsleep 2\necho \"- $$\" >> '{log}'\n\
             echo \"$RSTUDIO_NODES\" | cut -d, -f1\n",
            log = log.display()
        ),
    );
    const CAP: usize = 3;
    let c = Cluster::start(ClusterOptions {
        extra: format!(
            "balancer = \"custom\"\ncustom-balancer-command = \"{}\"\ncustom-balancer-timeout = \"20s\"\n\
             custom-balancer-max-running = {CAP}\n{TRUST_LOOPBACK}",
            plugin.display()
        ),
        ..Default::default()
    })
    .await;
    let entry = c.nodes[0].url("/");
    let requests: Vec<_> = (0..200)
        .map(|i| {
            let url = entry.clone();
            tokio::spawn(async move { Browser::as_user(&format!("capped{i:03}")).get(&url).await })
        })
        .collect();
    for (i, r) in requests.into_iter().enumerate() {
        let reply = r.await.unwrap();
        assert_eq!(reply.status, 200, "request {i}: {reply:?}");
        assert!(reply.backend().is_some());
    }
    let runs = std::fs::read_to_string(&log).unwrap_or_default();
    let (mut running, mut most, mut started) = (0usize, 0usize, 0usize);
    for line in runs.lines() {
        if line.starts_with('+') {
            running += 1;
            started += 1;
            most = most.max(running);
        } else {
            running -= 1;
        }
    }
    assert!(started >= 1, "the plug-in ran: {runs}");
    assert!(most <= CAP, "{most} plug-ins ran at once (cap {CAP}): {runs}");
    let capped = c.metric(&c.nodes[0], "sessionlb_custom_balancer_cap_reached_total").await;
    assert!(capped >= 1.0, "placements past the cap fell back to sessions");
    println!("200 first requests: {started} plug-in runs (at most {most} at once), {capped} past the cap");
}

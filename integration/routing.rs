//! Issue 4: session routing through real nodes and backends — balancers
//! placing signed-in users, stickiness, key registration, WebSockets,
//! concurrent placement.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use sessionlb::balancer::Candidate;
use sessionlb::balancer::user_hash::{HashKey, UserHashBalancer};
use sessionlb::cluster::{NewSession, SessionKind};
use sessionlb::config::LockSettings;
use sessionlb::lock::LockManager;
use tokio_tungstenite::tungstenite::Message;

use crate::common::cluster::{Browser, Cluster, ClusterOptions, NAMES, TRUST_LOOPBACK};
use crate::common::eventually;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_balancer_evens_out_session_counts() {
    let c = Cluster::start(ClusterOptions { router: true, extra: TRUST_LOOPBACK.into(), ..Default::default() }).await;
    let ids = [c.node_id(0).await, c.node_id(1).await, c.node_id(2).await];
    for (node, n) in [(0, 4), (2, 2)] {
        for i in 0..n {
            let key = format!("pre-{node}-{i}");
            c.registry
                .place_session(&NewSession {
                    key: &key,
                    node_id: ids[node],
                    user_name: None,
                    kind: SessionKind::Backend,
                })
                .await
                .unwrap();
        }
    }
    let router = c.router.as_ref().unwrap();
    eventually(Duration::from_secs(5), "the router to see the 6 sessions", || async {
        router.health().await.filter(|h| h["sessions"] == 6).map(|_| ())
    })
    .await;
    for _ in 0..6 {
        let reply = Browser::new_user().get(&router.url("/")).await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(c.counts().await, [4, 4, 4]);
    // Anonymous browsers are pinned, not placed: the counts stay.
    for _ in 0..6 {
        assert_eq!(Browser::new().get(&router.url("/")).await.status, 200);
    }
    assert_eq!(c.counts().await, [4, 4, 4]);

    // The balancer changes without a restart: edit the file, SIGHUP.
    let pid = router.proc.pid();
    let text = std::fs::read_to_string(&router.config).unwrap();
    std::fs::write(&router.config, format!("balancer = \"user-hash\"\n{text}")).unwrap();
    router.proc.signal(rustix::process::Signal::HUP);
    eventually(Duration::from_secs(5), "the router to use user-hash", || async {
        router.health().await.filter(|h| h["balancer"] == "user-hash").map(|_| ())
    })
    .await;
    assert_eq!(router.proc.pid(), pid);
    assert_eq!(Browser::new_user().get(&router.url("/")).await.status, 200);
    let log = router.proc.log_text();
    assert!(log.lines().any(|l| l.contains("configuration reloaded") && l.contains("changed=balancer")), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn system_load_balancer_follows_reported_load() {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<_> = (0..3).map(|i| dir.path().join(format!("loadavg-{i}"))).collect();
    let write = |loads: [f64; 3]| {
        for (f, l) in files.iter().zip(loads) {
            std::fs::write(f, format!("{l} {l} {l} 1/100 1\n")).unwrap();
        }
    };
    write([2.0, 0.1, 1.0]);
    let per_node = [0, 1, 2].map(|i| format!("loadavg-path = \"{}\"", files[i].display()));
    let c = Cluster::start(ClusterOptions {
        extra: format!("balancer = \"system-load\"\nload-report-interval = \"200ms\"\n{TRUST_LOOPBACK}"),
        per_node,
        ..Default::default()
    })
    .await;
    let entry = &c.nodes[0];
    // B is least loaded: new users and new anonymous pins go there.
    eventually(Duration::from_secs(10), "new sessions to land on B", || async {
        (Browser::new_user().get(&entry.url("/")).await.backend() == Some("B")).then_some(())
    })
    .await;
    for _ in 0..5 {
        assert_eq!(Browser::new_user().get(&entry.url("/")).await.backend(), Some("B"));
        assert_eq!(Browser::new().get(&entry.url("/")).await.backend(), Some("B"));
    }
    // The load changes: now C is least loaded.
    write([2.0, 3.0, 0.05]);
    eventually(Duration::from_secs(10), "new sessions to follow the change to C", || async {
        (Browser::new_user().get(&entry.url("/")).await.backend() == Some("C")).then_some(())
    })
    .await;
    for _ in 0..5 {
        assert_eq!(Browser::new_user().get(&entry.url("/")).await.backend(), Some("C"));
        assert_eq!(Browser::new().get(&entry.url("/")).await.backend(), Some("C"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn user_hash_is_stable_and_moves_only_the_removed_nodes_users() {
    let c = Cluster::start(ClusterOptions {
        extra: format!("balancer = \"user-hash\"\n{TRUST_LOOPBACK}"),
        router: true,
        ..Default::default()
    })
    .await;
    let router = c.router.as_ref().unwrap();
    let users: Vec<String> = (0..300).map(|i| format!("user{i:03}")).collect();
    let place_all = || async {
        let mut placed = BTreeMap::new();
        for u in &users {
            let reply = Browser::as_user(u).get(&router.url("/")).await;
            assert_eq!(reply.status, 200, "{u}");
            placed.insert(u.clone(), reply.backend().unwrap().to_string());
        }
        placed
    };
    let clear = || async {
        for s in c.registry.list_sessions().await.unwrap() {
            c.registry.delete_session(&s.key).await.unwrap();
        }
        eventually(Duration::from_secs(5), "the router to forget the sessions", || async {
            router.health().await.filter(|h| h["sessions"] == 0).map(|_| ())
        })
        .await;
    };
    let first = place_all().await;
    let mut per_node: HashMap<&str, usize> = HashMap::new();
    for b in first.values() {
        *per_node.entry(b).or_default() += 1;
    }
    for (node, n) in &per_node {
        assert!(*n as f64 <= 1.25 * 100.0 + 1.0, "{node} took {n} of 300: {per_node:?}");
    }
    // Stable on repeat (sessions forgotten, users hashed again).
    clear().await;
    assert_eq!(place_all().await, first, "the same users land on the same nodes");

    // Remove one node: only its users move. Ports (and so the hash) differ
    // from run to run and the 1.25 bound lets one node hold up to 41.7% of the
    // users, so the node removed is the one with the median share: the "about
    // 1/N move" claim is then checked on a typical node, not a lucky or
    // unlucky one. Which users move is checked exactly.
    let mut shares: Vec<(usize, usize)> = (0..3).map(|i| (per_node.get(NAMES[i]).copied().unwrap_or(0), i)).collect();
    shares.sort();
    let gone = shares[1].1;
    let kept: Vec<usize> = (0..3).filter(|i| *i != gone).collect();
    let mut c = c;
    c.nodes[gone].proc.signal(rustix::process::Signal::TERM);
    c.nodes[gone].proc.wait_exit(Duration::from_secs(20));
    let router = c.router.as_ref().unwrap();
    let gone_address = c.nodes[gone].address();
    eventually(Duration::from_secs(5), "the router to see the node stopped", || async {
        let s = reqwest::get(router.url("/load-balancer/status?format=json"))
            .await
            .ok()?
            .json::<serde_json::Value>()
            .await
            .ok()?;
        let status = s["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["address"].as_str() == Some(&gone_address))
            .map(|n| n["status"].clone());
        (status.is_none() || status == Some("Offline".into())).then_some(())
    })
    .await;
    // Every user comes back: survivors' users keep their sessions, the removed node's are re-placed by the hash.
    let mut after = BTreeMap::new();
    for u in &users {
        let reply = Browser::as_user(u).get(&router.url("/")).await;
        assert_eq!(reply.status, 200, "{u}");
        after.insert(u.clone(), reply.backend().unwrap().to_string());
    }
    let moved: Vec<&String> = users.iter().filter(|u| first[*u] != after[*u]).collect();
    let on_gone: Vec<&String> = users.iter().filter(|u| first[*u] == NAMES[gone]).collect();
    let moved_survivors = moved.iter().filter(|u| first[**u] != NAMES[gone]).count();
    assert_eq!(moved_survivors, 0, "no user of a surviving node moved");
    assert_eq!(moved, on_gone, "exactly the removed node's users move");
    assert!(moved.len() as f64 <= 0.40 * 300.0, "{} of 300 users moved ({per_node:?})", moved.len());
    assert!(!moved.is_empty());
    assert!(after.values().all(|b| b != NAMES[gone]));
    // Consistent hashing: a moved user goes to its next rendezvous choice among the survivors
    // (the loads stay within the 1.25 bound here, so the bound does not intervene).
    let survivors: Vec<Candidate> = kept
        .iter()
        .map(|&i| Candidate {
            id: i as i64,
            address: c.nodes[i].address().into(),
            sessions: 0,
            recent_pins: 0,
            load: [0.0; 3],
            cpus: 1,
        })
        .collect();
    for u in &moved {
        let best = UserHashBalancer::ranking(HashKey::User(u), &survivors)[0];
        assert_eq!(after[*u], NAMES[best.id as usize], "{u} did not follow its hash ranking");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn custom_plugin_choice_wins_and_a_slow_plugin_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    // Chooses the last node of RSTUDIO_NODES (host:port).
    let last = dir.path().join("last.sh");
    std::fs::write(&last, "#!/bin/sh\ncat >/dev/null\necho \"$RSTUDIO_NODES\" | tr ',' '\\n' | tail -n 1\n").unwrap();
    let slow = dir.path().join("slow.sh");
    std::fs::write(&slow, "#!/bin/sh\nsleep 5\necho 1\n").unwrap();
    for f in [&last, &slow] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let c = Cluster::start(ClusterOptions {
        extra: format!(
            "balancer = \"custom\"\ncustom-balancer-command = \"{}\"\ncustom-balancer-timeout = \"1s\"\n{TRUST_LOOPBACK}",
            last.display()
        ),
        ..Default::default()
    })
    .await;
    // RSTUDIO_NODES is in id order; nodes register concurrently, so find the last one.
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push((c.node_id(i).await, i));
    }
    let chosen = NAMES[ids.iter().max().unwrap().1];
    for i in 0..6 {
        let reply = Browser::new_user().get(&c.nodes[i % 3].url("/")).await;
        assert_eq!(reply.backend(), Some(chosen), "the plug-in's choice (the last node) wins");
    }
    // Swap in the slow plug-in (live reload) and place more sessions.
    for node in &c.nodes {
        let text = std::fs::read_to_string(&node.config)
            .unwrap()
            .replace(&last.display().to_string(), &slow.display().to_string());
        std::fs::write(&node.config, text).unwrap();
        node.proc.signal(rustix::process::Signal::HUP);
    }
    let status_before = c.status_json(&c.nodes[0]).await["counters"]["balancer_fallbacks"].as_u64().unwrap();
    let started = std::time::Instant::now();
    let reply = Browser::new_user().get(&c.nodes[0].url("/")).await;
    assert_eq!(reply.status, 200);
    assert!(started.elapsed() < Duration::from_secs(4), "the slow plug-in was not cut off ({:?})", started.elapsed());
    let fallbacks = eventually(Duration::from_secs(5), "the fallback to be counted", || async {
        let n = c.status_json(&c.nodes[0]).await["counters"]["balancer_fallbacks"].as_u64()?;
        (n > status_before).then_some(n)
    })
    .await;
    assert!(fallbacks > status_before);
    // With `sessions` as the fallback, new sessions go to the other two nodes (the chosen one has 6+).
    let mut seen = BTreeSet::new();
    for _ in 0..4 {
        seen.insert(Browser::new_user().get(&c.nodes[0].url("/")).await.backend().unwrap().to_string());
    }
    assert!(!seen.contains(chosen), "{seen:?}");
    assert!(c.nodes[0].proc.log_text().contains("fell back to `sessions`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_user_sticks_to_one_backend_through_every_entry() {
    let c = Cluster::start(ClusterOptions { router: true, extra: TRUST_LOOPBACK.into(), ..Default::default() }).await;
    let mut browser = Browser::as_user("ann");
    let first = browser.get(&c.nodes[0].url("/")).await;
    let backend = first.backend().unwrap().to_string();
    assert!(browser.pin().is_some(), "the first response pins the browser to the user's node");
    let entries = c.entries();
    for i in 0..200 {
        let reply = browser.get(&entries[i % entries.len()].url(&format!("/page/{i}"))).await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.backend(),
            Some(backend.as_str()),
            "request {i} through {}",
            entries[i % entries.len()].address()
        );
    }
    // Exactly one session in the registry: the user's.
    let rows = c.registry.list_sessions().await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].key.as_str(), rows[0].kind), ("user:ann", SessionKind::User));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backend_minted_key_is_registered_where_it_was_answered() {
    let c = Cluster::start(ClusterOptions::default()).await;
    // Drain B and C so that the browser's session lands on A.
    for id in [c.node_id(1).await, c.node_id(2).await] {
        assert!(c.admin(&["offline", "--node", &id.to_string()]).status.success());
    }
    eventually(Duration::from_secs(5), "A to see B and C draining", || async {
        let s = c.status_json(&c.nodes[0]).await;
        (s["nodes"].as_array()?.iter().filter(|n| n["offline_mode"] == true).count() == 2).then_some(())
    })
    .await;
    let mut browser = Browser::new();
    let minted: serde_json::Value =
        serde_json::from_str(&browser.get(&c.nodes[1].url("/new-session")).await.body).unwrap();
    assert_eq!(minted["backend"], "A");
    let key = minted["key"].as_str().unwrap().to_string();
    for id in [c.node_id(1).await, c.node_id(2).await] {
        assert!(c.admin(&["online", "--node", &id.to_string()]).status.success());
    }
    // Next requested through B (with the browser's cookie): reaches A, which registers the key.
    let reply = browser.get(&c.nodes[1].url(&format!("/s/{key}/"))).await;
    assert_eq!((reply.status, reply.backend()), (200, Some("A")));
    let row = c.registry.get_session(&key).await.unwrap().expect("backend key registered");
    assert_eq!(row.node_id, Some(c.node_id(0).await));
    assert_eq!(row.kind, SessionKind::Backend);
    // Any client, through any node, now reaches A by the key alone.
    for node in &c.nodes {
        let reply = Browser::new().get(&node.url(&format!("/s/{key}/files"))).await;
        assert_eq!((reply.status, reply.backend()), (200, Some("A")), "through {}", node.address());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_through_a_non_owning_node_survives_idle_and_echoes() {
    let c = Cluster::start(ClusterOptions { extra: "timeout = \"1s\"".into(), ..Default::default() }).await;
    let mut browser = Browser::new();
    let owner = browser.get(&c.nodes[0].url("/")).await.backend().unwrap().to_string();
    let owner_index = NAMES.iter().position(|n| *n == owner).unwrap();
    let via = &c.nodes[(owner_index + 1) % 3];
    let mut ws = browser.websocket(via).await;
    let hello = ws.next().await.unwrap().unwrap();
    assert_eq!(hello, Message::Text(format!("hello from {owner}").into()));
    // Idle for three times `timeout`: nothing may close the tunnel.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    for text in ["ping after idle", "second"] {
        ws.send(Message::Text(text.into())).await.unwrap();
        let echo =
            tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("echo in time").unwrap().unwrap();
        assert_eq!(echo, Message::Text(text.into()));
    }
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_requests_of_one_user_create_one_session() {
    let c = Cluster::start(ClusterOptions { extra: TRUST_LOOPBACK.into(), ..Default::default() }).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let url = c.nodes[i % 3].url(&format!("/first/{i}"));
        let mut b = Browser::as_user("concurrent-ann");
        tasks.push(tokio::spawn(async move { b.get(&url).await }));
    }
    let mut backends = BTreeSet::new();
    for t in tasks {
        let reply = t.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        backends.insert(reply.backend().unwrap().to_string());
    }
    assert_eq!(backends.len(), 1, "all 50 responses from one backend: {backends:?}");
    let rows: Vec<_> = c.registry.list_sessions().await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].key, "user:concurrent-ann");
    assert_eq!(Some(NAMES[c.index_of(rows[0].node_id.unwrap()).await.unwrap()]), backends.first().map(String::as_str));
    // Each node placed under the cross-node lock (the registry's
    // insert-if-absent alone would give the same row): one placement won,
    // every placement that ran took the lock, none went without it.
    assert_eq!(c.metric_all("sessionlb_placements_total").await, 1.0);
    assert!(c.metric_all("sessionlb_lock_wait_seconds_count").await >= 1.0);
    assert_eq!(c.metric_all("sessionlb_lock_failures_total").await, 0.0);
}

/// The cross-node lock, held by another process (this test, through
/// sessionlb's lock API on the nodes' shared storage), holds a placement
/// back: it waits until the lock is released, or until the lock timeout
/// (`timeout`), after which it goes ahead on the registry's guard, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_placement_waits_for_the_cross_node_lock_held_elsewhere() {
    const LOCK_TIMEOUT: Duration = Duration::from_secs(5);
    let c =
        Cluster::start(ClusterOptions { extra: format!("timeout = \"5s\"\n{TRUST_LOOPBACK}"), ..Default::default() })
            .await;
    let locks = LockManager::new(c.fx.path().join("shared"), &LockSettings::default()).unwrap();
    let hold = |user: &'static str| {
        let locks = locks.clone();
        async move { locks.acquire(&format!("session:user:{user}"), Instant::now() + LOCK_TIMEOUT).await.unwrap() }
    };

    // Released while the placement waits: it places only then, with the lock.
    let held = hold("waiting-bob").await;
    let url = c.nodes[1].url("/");
    let task = tokio::spawn(async move { Browser::as_user("waiting-bob").get(&url).await });
    let watch_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < watch_until {
        assert!(!task.is_finished(), "the request did not wait for the lock: {:?}", task.await);
        let row = c.registry.get_session("user:waiting-bob").await.unwrap();
        assert!(row.is_none(), "placed while another process held the lock: {row:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    held.release().await.unwrap();
    let reply = task.await.unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(c.registry.get_session("user:waiting-bob").await.unwrap().is_some());
    let b = &c.nodes[1];
    assert_eq!(c.metric(b, "sessionlb_lock_failures_total").await, 0.0, "B took the lock once it was released");
    assert_eq!(c.metric(b, "sessionlb_lock_wait_seconds_count").await, 1.0);

    // Held throughout: the placement waits the whole lock timeout, then
    // goes ahead without the lock (counted and logged).
    let held = hold("held-ann").await;
    let started = Instant::now();
    let reply = Browser::as_user("held-ann").get(&c.nodes[0].url("/")).await;
    let waited = started.elapsed();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(waited >= LOCK_TIMEOUT, "answered after {waited:?}, before the lock timeout");
    let a = &c.nodes[0];
    assert_eq!(c.metric(a, "sessionlb_lock_failures_total").await, 1.0);
    assert_eq!(c.metric(a, "sessionlb_lock_wait_seconds_count").await, 0.0, "A never had the lock");
    assert!(a.proc.log_text().contains("placing without the shared-storage lock"));
    held.release().await.unwrap();
}

pub fn sessionlb_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

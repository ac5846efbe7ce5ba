//! The registry suite: every test runs against PostgreSQL and SQLite.

use std::sync::Arc;
use std::time::Duration;

use sessionlb::cluster::*;

use crate::common::db::{Backend, TestDb};
use crate::common::eventually;

/// Generate one `#[tokio::test]` per database for a suite function.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::Backend::Postgres).await } )*
        }
        mod sqlite {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::Backend::Sqlite).await } )*
        }
    };
}

on_both!(
    node_rows_are_keyed_by_host_port_and_keep_offline_mode,
    first_node_defines_cluster_and_matching_nodes_join,
    mismatched_key_is_refused_while_another_node_is_live,
    mismatched_key_redefines_when_no_node_is_live,
    simultaneous_joins_with_different_keys_cannot_both_win,
    check_in_records_clock_skew_and_fails_for_deleted_nodes,
    delete_refuses_online_node_with_sessions_unless_forced,
    placement_is_insert_if_absent_under_concurrency,
    deleted_nodes_sessions_are_claimed_by_next_placement,
    move_is_compare_and_set,
    touch_and_idle_expiry,
    changes_are_announced,
    measurements_are_not_announced,
    reset_cluster_clears_the_record,
    an_upgrade_takes_over_an_online_row_without_leaving_online,
    notifications_carry_the_database_time_of_the_change,
);

fn reg(host: &str, port: u16) -> NodeRegistration {
    NodeRegistration { host: host.into(), port, router: false, version: "1.0.0".into() }
}

const FRESH: Duration = Duration::from_secs(600);

async fn online_node(r: &Arc<dyn Registry>, host: &str, fp: &str) -> NodeId {
    let id = r.register_node(&reg(host, 8787)).await.unwrap();
    let outcome = r.join_cluster(id, fp, "http", FRESH).await.unwrap();
    assert!(matches!(outcome, JoinOutcome::Defined | JoinOutcome::Joined), "{outcome:?}");
    id
}

async fn node_rows_are_keyed_by_host_port_and_keep_offline_mode(b: Backend) {
    let db = TestDb::new(b).await;
    let r = db.registry().await;
    let a = r.register_node(&reg("127.0.0.2", 8787)).await.unwrap();
    let other = r.register_node(&reg("127.0.0.2", 8788)).await.unwrap();
    assert_ne!(a, other);
    r.set_offline_mode(a, true).await.unwrap();
    r.set_node_status(a, NodeStatus::Offline).await.unwrap();
    let again = r.register_node(&reg("127.0.0.2", 8787)).await.unwrap();
    assert_eq!(a, again, "a restarted node reuses its row");
    let node = r.get_node(a).await.unwrap().unwrap();
    assert_eq!(node.status, NodeStatus::Starting);
    assert!(node.offline_mode, "offline mode survives a restart");
    assert_eq!(node.version, "1.0.0");
    assert!(r.find_node("127.0.0.2", 8788).await.unwrap().is_some());
    assert!(matches!(r.set_node_status(9999, NodeStatus::Online).await, Err(RegistryError::NodeNotFound(9999))));
}

async fn first_node_defines_cluster_and_matching_nodes_join(b: Backend) {
    let db = TestDb::new(b).await;
    let r = db.registry().await;
    assert!(r.cluster().await.unwrap().is_none());
    let a = r.register_node(&reg("a", 1)).await.unwrap();
    assert_eq!(r.join_cluster(a, "sha256:aa", "http", FRESH).await.unwrap(), JoinOutcome::Defined);
    let c = r.cluster().await.unwrap().unwrap();
    assert_eq!((c.key_fingerprint.as_str(), c.protocol.as_str(), c.defined_by), ("sha256:aa", "http", Some(a)));
    let bnode = r.register_node(&reg("b", 1)).await.unwrap();
    assert_eq!(r.join_cluster(bnode, "sha256:aa", "http", FRESH).await.unwrap(), JoinOutcome::Joined);
    let nodes = r.list_nodes().await.unwrap();
    assert!(nodes.iter().all(|n| n.status == NodeStatus::Online && n.last_seen.is_some()), "{nodes:?}");
}

async fn mismatched_key_is_refused_while_another_node_is_live(b: Backend) {
    let db = TestDb::new(b).await;
    let r = db.registry().await;
    online_node(&r, "a", "sha256:aa").await;
    let c = r.register_node(&reg("c", 1)).await.unwrap();
    let outcome = r.join_cluster(c, "sha256:bb", "http", FRESH).await.unwrap();
    assert!(
        matches!(&outcome, JoinOutcome::Rejected { live_nodes, .. } if live_nodes == &vec!["a:8787".to_string()]),
        "{outcome:?}"
    );
    assert_eq!(r.get_node(c).await.unwrap().unwrap().status, NodeStatus::InvalidSecureCookieKey);
    // A protocol mismatch is refused the same way.
    let d = r.register_node(&reg("d", 1)).await.unwrap();
    assert!(matches!(r.join_cluster(d, "sha256:aa", "https", FRESH).await.unwrap(), JoinOutcome::Rejected { .. }));
    assert_eq!(r.cluster().await.unwrap().unwrap().key_fingerprint, "sha256:aa", "record unchanged");
}

async fn mismatched_key_redefines_when_no_node_is_live(b: Backend) {
    let db = TestDb::new(b).await;
    let r = db.registry().await;
    let a = online_node(&r, "a", "sha256:aa").await;
    r.set_node_status(a, NodeStatus::Offline).await.unwrap();
    let c = r.register_node(&reg("c", 1)).await.unwrap();
    assert!(matches!(r.join_cluster(c, "sha256:bb", "http", FRESH).await.unwrap(), JoinOutcome::Redefined { .. }));
    assert_eq!(r.cluster().await.unwrap().unwrap().key_fingerprint, "sha256:bb");
    // An Online node that has not been seen within `freshness` does not count as live.
    let db2 = TestDb::new(b).await;
    let r2 = db2.registry().await;
    online_node(&r2, "a", "sha256:aa").await;
    let stale = Duration::from_millis(1);
    let c2 = r2.register_node(&reg("c", 1)).await.unwrap();
    let outcome = crate::common::eventually(Duration::from_secs(5), "a to go stale", || {
        let r2 = r2.clone();
        async move {
            match r2.join_cluster(c2, "sha256:bb", "http", stale).await.unwrap() {
                o @ JoinOutcome::Redefined { .. } => Some(o),
                _ => None,
            }
        }
    })
    .await;
    assert!(matches!(outcome, JoinOutcome::Redefined { .. }));
}

async fn simultaneous_joins_with_different_keys_cannot_both_win(b: Backend) {
    for round in 0..5 {
        let db = TestDb::new(b).await;
        let r = db.registry().await;
        let ids: Vec<NodeId> = futures::future::join_all((0..4).map(|i| {
            let r = r.clone();
            async move { r.register_node(&reg(&format!("n{i}"), 1)).await.unwrap() }
        }))
        .await;
        let outcomes = futures::future::join_all(ids.iter().enumerate().map(|(i, id)| {
            let r = r.clone();
            let id = *id;
            async move { r.join_cluster(id, &format!("sha256:{i}"), "http", FRESH).await.unwrap() }
        }))
        .await;
        let winners = outcomes.iter().filter(|o| !matches!(o, JoinOutcome::Rejected { .. })).count();
        assert_eq!(winners, 1, "round {round}: {outcomes:?}");
        assert!(outcomes.contains(&JoinOutcome::Defined));
    }
}

async fn check_in_records_clock_skew_and_fails_for_deleted_nodes(b: Backend) {
    let db = TestDb::new(b).await;
    let r = db.registry().await;
    let a = online_node(&r, "a", "sha256:aa").await;
    let before = r.get_node(a).await.unwrap().unwrap().last_seen.unwrap();
    eventually(Duration::from_secs(5), "database clock to advance", || {
        let r = r.clone();
        async move { (r.now_ms().await.unwrap() > before).then_some(()) }
    })
    .await;
    r.check_in(a, -1500).await.unwrap();
    let node = r.get_node(a).await.unwrap().unwrap();
    assert!(node.last_seen.unwrap() > before);
    assert_eq!(node.clock_skew_ms, Some(-1500));
    r.report_load(a, [1.5, 1.0, 0.5], 4, 17).await.unwrap();
    let node = r.get_node(a).await.unwrap().unwrap();
    assert_eq!((node.load, node.cpus, node.pins_recent), ([1.5, 1.0, 0.5], 4, 17));
    r.set_node_status(a, NodeStatus::Offline).await.unwrap();
    assert!(matches!(r.delete_node(a, false).await.unwrap(), DeleteOutcome::Deleted { .. }));
    assert!(matches!(r.check_in(a, 0).await, Err(RegistryError::NodeNotFound(_))));
}

async fn delete_refuses_online_node_with_sessions_unless_forced(b: Backend) {
    let db = TestDb::new(b).await;
    let r = db.registry().await;
    let a = online_node(&r, "a", "sha256:aa").await;
    let empty = online_node(&r, "b", "sha256:aa").await;
    r.place_session(&NewSession { key: "k1", node_id: a, user_name: Some("ann"), kind: SessionKind::Backend })
        .await
        .unwrap();
    assert_eq!(r.delete_node(a, false).await.unwrap(), DeleteOutcome::RefusedOnlineWithSessions { sessions: 1 });
    assert!(r.get_node(a).await.unwrap().is_some());
    assert_eq!(r.delete_node(empty, false).await.unwrap(), DeleteOutcome::Deleted { sessions_released: 0 });
    assert_eq!(r.delete_node(a, true).await.unwrap(), DeleteOutcome::Deleted { sessions_released: 1 });
    assert!(r.get_node(a).await.unwrap().is_none());
    assert_eq!(r.get_session("k1").await.unwrap().unwrap().node_id, None, "session kept, node released");
    assert_eq!(r.delete_node(a, true).await.unwrap(), DeleteOutcome::NotFound);
}

async fn placement_is_insert_if_absent_under_concurrency(b: Backend) {
    let db = TestDb::new(b).await;
    let r = db.registry().await;
    let nodes = [
        online_node(&r, "a", "sha256:aa").await,
        online_node(&r, "b", "sha256:aa").await,
        online_node(&r, "c", "sha256:aa").await,
    ];
    let results = futures::future::join_all((0..30).map(|i| {
        let r = r.clone();
        let node = nodes[i % 3];
        async move {
            r.place_session(&NewSession { key: "same", node_id: node, user_name: None, kind: SessionKind::Affinity })
                .await
                .unwrap()
        }
    }))
    .await;
    let winner = results[0].node_id;
    assert!(winner.is_some());
    assert!(results.iter().all(|s| s.node_id == winner), "every placer sees the one winner");
    assert_eq!(r.list_sessions().await.unwrap().len(), 1);
}

async fn deleted_nodes_sessions_are_claimed_by_next_placement(b: Backend) {
    let db = TestDb::new(b).await;
    let r = db.registry().await;
    let a = online_node(&r, "a", "sha256:aa").await;
    let bn = online_node(&r, "b", "sha256:aa").await;
    r.place_session(&NewSession { key: "k", node_id: a, user_name: None, kind: SessionKind::Backend }).await.unwrap();
    r.set_node_status(a, NodeStatus::Offline).await.unwrap();
    r.delete_node(a, false).await.unwrap();
    let s = r
        .place_session(&NewSession { key: "k", node_id: bn, user_name: Some("ann"), kind: SessionKind::Backend })
        .await
        .unwrap();
    assert_eq!(s.node_id, Some(bn));
    assert_eq!(s.user_name.as_deref(), Some("ann"));
}

async fn move_is_compare_and_set(b: Backend) {
    let db = TestDb::new(b).await;
    let r = db.registry().await;
    let a = online_node(&r, "a", "sha256:aa").await;
    let bn = online_node(&r, "b", "sha256:aa").await;
    let c = online_node(&r, "c", "sha256:aa").await;
    r.place_session(&NewSession { key: "k", node_id: a, user_name: None, kind: SessionKind::Backend }).await.unwrap();
    assert_eq!(r.move_session("k", Some(a), bn).await.unwrap().node_id, Some(bn));
    // A second mover who still thinks it is on `a` loses and learns where it is.
    assert_eq!(r.move_session("k", Some(a), c).await.unwrap().node_id, Some(bn));
    assert!(matches!(r.move_session("nope", None, c).await, Err(RegistryError::SessionNotFound(_))));
}

async fn touch_and_idle_expiry(b: Backend) {
    let db = TestDb::new(b).await;
    let r = db.registry().await;
    let a = online_node(&r, "a", "sha256:aa").await;
    for k in ["old", "active"] {
        r.place_session(&NewSession { key: k, node_id: a, user_name: None, kind: SessionKind::Affinity })
            .await
            .unwrap();
    }
    let created = r.get_session("active").await.unwrap().unwrap().last_active;
    // Wait until 300 ms have passed on the database clock, touch one, expire with 200 ms idle.
    eventually(Duration::from_secs(5), "300 ms on the database clock", || {
        let r = r.clone();
        async move { (r.now_ms().await.unwrap() > created + 300).then_some(()) }
    })
    .await;
    assert_eq!(r.touch_sessions(&["active".to_string(), "unknown".to_string()]).await.unwrap(), 1);
    assert!(r.get_session("active").await.unwrap().unwrap().last_active > created);
    assert_eq!(r.expire_idle_sessions(Duration::from_millis(200)).await.unwrap(), 1);
    let left: Vec<String> = r.list_sessions().await.unwrap().into_iter().map(|s| s.key).collect();
    assert_eq!(left, vec!["active".to_string()]);
}

async fn changes_are_announced(b: Backend) {
    let db = TestDb::new(b).await;
    let r = db.registry().await;
    let mut rx = r.subscribe().await.unwrap();
    let a = online_node(&r, "a", "sha256:aa").await;
    let bn = online_node(&r, "b", "sha256:aa").await;
    r.place_session(&NewSession { key: "k", node_id: a, user_name: Some("ann"), kind: SessionKind::Backend })
        .await
        .unwrap();
    r.touch_sessions(&["k".to_string()]).await.unwrap();
    r.move_session("k", Some(a), bn).await.unwrap();
    r.delete_session("k").await.unwrap();
    r.reset_cluster().await.unwrap();

    let mut seen = Vec::new();
    let wanted = |seen: &Vec<ChangeEvent>| {
        seen.iter().any(|e| matches!(e, ChangeEvent::Node { id } if *id == a))
            && seen.iter().any(|e| matches!(e, ChangeEvent::Session(s) if s.key == "k" && s.node_id == Some(a) && s.user_name.as_deref() == Some("ann")))
            && seen.iter().any(|e| matches!(e, ChangeEvent::Session(s) if s.key == "k" && s.node_id == Some(bn)))
            && seen.iter().any(|e| matches!(e, ChangeEvent::SessionDelete { key } if key == "k"))
            && seen.iter().any(|e| matches!(e, ChangeEvent::Cluster))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !wanted(&seen) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ev)) => seen.push(ev),
            other => panic!("missing notifications ({other:?}); saw {seen:?}"),
        }
    }
    // Touches alone are not announced: exactly two session upserts (insert, move).
    let upserts = seen.iter().filter(|e| matches!(e, ChangeEvent::Session(_))).count();
    assert_eq!(upserts, 2, "{seen:?}");
}

async fn measurements_are_not_announced(b: Backend) {
    let db = TestDb::new(b).await;
    let r = db.registry().await;
    let a = online_node(&r, "a", "sha256:aa").await;
    let bn = online_node(&r, "b", "sha256:aa").await;
    let mut rx = r.subscribe().await.unwrap();
    // Load reports and check-ins of A, then a change that matters: B offline.
    for i in 0..5 {
        r.report_load(a, [i as f64, 1.0, 1.0], 4, i as u64).await.unwrap();
        r.check_in(a, i).await.unwrap();
    }
    r.set_offline_mode(bn, true).await.unwrap();
    // Notifications arrive in commit order: everything before B's is A's.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut before = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ChangeEvent::Node { id })) if id == bn => break,
            Ok(Some(ev)) => before.push(ev),
            other => panic!("B's offline mode was not announced ({other:?}); saw {before:?}"),
        }
    }
    assert!(before.is_empty(), "measurements were announced: {before:?}");
    // The figures are in the registry all the same.
    let row = r.list_nodes().await.unwrap().into_iter().find(|n| n.id == a).unwrap();
    assert_eq!(row.load[0], 4.0, "{row:?}");
}

async fn reset_cluster_clears_the_record(b: Backend) {
    let db = TestDb::new(b).await;
    let r = db.registry().await;
    online_node(&r, "a", "sha256:aa").await;
    assert!(r.reset_cluster().await.unwrap());
    assert!(r.cluster().await.unwrap().is_none());
    assert!(!r.reset_cluster().await.unwrap());
    let c = r.register_node(&reg("c", 1)).await.unwrap();
    assert_eq!(r.join_cluster(c, "sha256:bb", "http", FRESH).await.unwrap(), JoinOutcome::Defined);
}

async fn an_upgrade_takes_over_an_online_row_without_leaving_online(b: Backend) {
    let db = TestDb::new(b).await;
    let r = db.registry().await;
    let new_version = NodeRegistration { version: "2.0.0".into(), ..reg("127.0.0.2", 8787) };
    assert_eq!(r.take_over_node(&new_version).await.unwrap(), None, "no row: nothing to take over");
    let id = online_node(&r, "127.0.0.2", "sha256:aa").await;
    let before = r.get_node(id).await.unwrap().unwrap();
    r.set_offline_mode(id, true).await.unwrap();
    let mut changes = r.subscribe().await.unwrap();
    assert_eq!(r.take_over_node(&new_version).await.unwrap(), Some(id));
    let after = r.get_node(id).await.unwrap().unwrap();
    assert_eq!(after.status, NodeStatus::Online, "the row never leaves Online");
    assert_eq!(after.version, "2.0.0");
    assert!(after.offline_mode, "offline mode is kept");
    assert!(after.started_at >= before.started_at);
    // Peers hear of it (the version changed).
    let event = tokio::time::timeout(Duration::from_secs(5), changes.recv()).await.unwrap().unwrap();
    assert_eq!(event, ChangeEvent::Node { id });
    r.set_node_status(id, NodeStatus::Offline).await.unwrap();
    assert_eq!(r.take_over_node(&new_version).await.unwrap(), None, "a stopped node is not taken over");
    assert_eq!(r.get_node(id).await.unwrap().unwrap().status, NodeStatus::Offline);
}

async fn notifications_carry_the_database_time_of_the_change(b: Backend) {
    use sessionlb::metrics::METRICS;
    let db = TestDb::new(b).await;
    let r = db.registry().await;
    let a = online_node(&r, "a", "sha256:aa").await;
    let mut rx = r.subscribe().await.unwrap();
    let (count, sum) = (METRICS.notification_lag.get_sample_count(), METRICS.notification_lag.get_sample_sum());
    for key in ["k1", "k2", "k3"] {
        r.place_session(&NewSession { key, node_id: a, user_name: None, kind: SessionKind::Affinity }).await.unwrap();
    }
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    }
    // Each arrival was measured against the time of its change (one machine: no clock skew).
    let observed = METRICS.notification_lag.get_sample_count() - count;
    assert!(observed >= 3, "{observed} notifications measured");
    let mean = (METRICS.notification_lag.get_sample_sum() - sum) / observed as f64;
    assert!((0.0..5.0).contains(&mean), "mean lag {mean}s");
}

/// Issue 12: an idle node must not keep its pool open. A burst of work
/// (three cluster checks queued behind the cluster lock, which a test
/// connection holds) opens three pooled connections; once the work is done
/// the pool closes them again, down to the LISTEN connection and at most
/// one pooled connection. (sqlx hands idle connections out first in, first
/// out, so with a long idle timeout they all stayed open.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pool_closes_the_connections_a_burst_opened() {
    use sqlx::Connection;
    let db = TestDb::postgres().await;
    let app = format!("pooltest_{}", hex::encode(rand::random::<[u8; 4]>()));
    let url = sessionlb::config::DatabaseUrl::parse(&format!("{}?application_name={app}", db.url)).unwrap();
    let r = sessionlb::cluster::connect(&url, Duration::from_millis(50)).await.unwrap();
    let _changes = r.subscribe().await.unwrap();
    let mut admin = sqlx::PgConnection::connect(&db.url).await.unwrap();
    // The cluster lock (`slb1`, see postgres.rs) held from outside: each join waits on its own connection.
    sqlx::query("SELECT pg_advisory_lock(1936482865)").execute(&mut admin).await.unwrap();
    let ids: Vec<NodeId> =
        futures::future::join_all(["a", "b", "c"].map(|h| async { r.register_node(&reg(h, 8787)).await.unwrap() }))
            .await;
    let joins: Vec<_> = ids
        .iter()
        .map(|&id| {
            let r = r.clone();
            tokio::spawn(async move { r.join_cluster(id, "sha256:aa", "http", FRESH).await.unwrap() })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while connections_of(&mut admin, &app).await < 4 {
        assert!(tokio::time::Instant::now() < deadline, "the three joins never held three connections");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sqlx::query("SELECT pg_advisory_unlock(1936482865)").execute(&mut admin).await.unwrap();
    for j in joins {
        j.await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let n = connections_of(&mut admin, &app).await;
        if n <= 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{n} connections still open 40 s after the burst");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn connections_of(admin: &mut sqlx::PgConnection, app: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
        .bind(app)
        .fetch_one(admin)
        .await
        .unwrap()
}

/// Issue 12: a statement that changes many sessions is announced in a few
/// batched notifications (migration 0006), not one per row; one-row
/// statements keep the payload earlier versions know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_rows_changed_by_one_statement_are_announced_in_batches() {
    let db = TestDb::postgres().await;
    let r = db.registry().await;
    let a = online_node(&r, "a", "sha256:aa").await;
    online_node(&r, "b", "sha256:aa").await;
    let keys: Vec<String> = (0..300).map(|i| format!("batch-{i:03}")).collect();
    for key in &keys {
        r.place_session(&NewSession { key, node_id: a, user_name: Some("ann"), kind: SessionKind::Affinity })
            .await
            .unwrap();
    }
    let mut rx = r.subscribe().await.unwrap();
    // One statement releases all 300 (node deleted), one row is placed again, then all expire.
    assert!(matches!(r.delete_node(a, true).await.unwrap(), DeleteOutcome::Deleted { sessions_released: 300 }));
    r.place_session(&NewSession { key: "single", node_id: 2, user_name: None, kind: SessionKind::Affinity })
        .await
        .unwrap();
    let mut released = Vec::new();
    let mut notifications = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ChangeEvent::Sessions { s })) => {
                notifications += 1;
                released.extend(s.into_iter().map(|s| (s.key, s.node_id)));
            }
            Ok(Some(ChangeEvent::Session(s))) if s.key == "single" => break,
            Ok(Some(ChangeEvent::Node { .. })) => {}
            other => panic!("unexpected ({other:?}) after {notifications} batches"),
        }
    }
    released.sort();
    assert_eq!(released, keys.iter().map(|k| (k.clone(), None)).collect::<Vec<_>>());
    assert!(notifications <= 10, "300 released sessions took {notifications} notifications");
    // Deleting them all at once: batches of keys.
    let now = r.now_ms().await.unwrap();
    eventually(Duration::from_secs(5), "a millisecond on the database clock", || {
        let r = r.clone();
        async move { (r.now_ms().await.unwrap() > now).then_some(()) }
    })
    .await;
    assert_eq!(r.expire_idle_sessions(Duration::ZERO).await.unwrap(), 301);
    let mut ended = Vec::new();
    while ended.len() < 301 {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ChangeEvent::SessionDeletes { keys })) => ended.extend(keys),
            other => panic!("unexpected ({other:?}) after {} ended", ended.len()),
        }
    }
    assert!(ended.contains(&"single".to_string()) && ended.contains(&"batch-299".to_string()));
}

/// Issue 12 (migration 0007): expiry runs once per period for the whole
/// cluster (a second node's call within the period does nothing), and
/// activity writes are HOT updates (no index holds `last_active`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_runs_once_per_period_for_the_cluster_and_activity_writes_are_hot() {
    use sqlx::Connection;
    let db = TestDb::postgres().await;
    let (r1, r2) = (db.registry().await, db.registry().await);
    let a = online_node(&r1, "a", "sha256:aa").await;
    let mut admin = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let stale = |key: &'static str| {
        sqlx::query(
            "INSERT INTO sessionlb.sessionlb_sessions (key, node_id, kind, created, last_active) \
             VALUES ($1, $2, 'affinity', 0, 0)",
        )
        .bind(key)
        .bind(a)
    };
    let idle = Duration::from_secs(40); // period 10 s: the second call below is within it
    stale("idle-1").execute(&mut admin).await.unwrap();
    assert_eq!(r1.expire_idle_sessions(idle).await.unwrap(), 1);
    stale("idle-2").execute(&mut admin).await.unwrap();
    assert_eq!(r2.expire_idle_sessions(idle).await.unwrap(), 0, "another node expired within the period");
    assert!(r2.get_session("idle-2").await.unwrap().is_some());
    // A period later (moved back by hand), the next call does it.
    sqlx::query("UPDATE sessionlb.sessionlb_housekeeping SET last_run = last_run - 10000 WHERE task = 'expiry'")
        .execute(&mut admin)
        .await
        .unwrap();
    assert_eq!(r2.expire_idle_sessions(idle).await.unwrap(), 1);

    // Activity writes: every update of the table is HOT.
    r1.place_session(&NewSession { key: "busy", node_id: a, user_name: Some("ann"), kind: SessionKind::User })
        .await
        .unwrap();
    for _ in 0..10 {
        assert_eq!(r1.touch_sessions(&["busy".to_string()]).await.unwrap(), 1);
    }
    let (updates, hot) = eventually(Duration::from_secs(20), "the table's update statistics", || {
        let url = db.url.clone();
        async move {
            let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
            let (u, h): (i64, i64) = sqlx::query_as(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'sessionlb_sessions'",
            )
            .fetch_one(&mut c)
            .await
            .unwrap();
            (u >= 10).then_some((u, h))
        }
    })
    .await;
    assert_eq!(hot, updates, "{hot} of {updates} updates were HOT");
}

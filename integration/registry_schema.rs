//! The PostgreSQL registry in its own schema: two registries in one
//! database never hear each other, and a registry that an earlier version
//! left in `public` keeps working while its nodes run and moves into the
//! schema when none is online.

use std::sync::Arc;
use std::time::Duration;

use sessionlb::cluster::registry::ChangeStream;
use sessionlb::cluster::*;
use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgListener};

use crate::common::db::TestDb;

fn options(schema: &str) -> RegistryOptions {
    RegistryOptions { schema: schema.into(), poll_interval: Duration::from_millis(50), ..RegistryOptions::default() }
}

async fn registry(db: &TestDb, schema: &str) -> Arc<dyn Registry> {
    connect_with(&db.database_url(), &options(schema)).await.unwrap()
}

fn reg(host: &str) -> NodeRegistration {
    NodeRegistration { host: host.into(), port: 8787, router: false, version: "1.0.0".into() }
}

/// `schema.table` names of this registry's tables, everywhere in the database.
async fn registry_tables(conn: &mut PgConnection) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT table_schema::text || '.' || table_name::text FROM information_schema.tables \
         WHERE table_name LIKE 'sessionlb%' OR table_name = '_sqlx_migrations' ORDER BY 1",
    )
    .fetch_all(conn)
    .await
    .unwrap()
}

async fn next_event(rx: &mut ChangeStream) -> ChangeEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("a notification").expect("an open stream")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schemas_in_one_database_are_two_registries_that_never_hear_each_other() {
    let db = TestDb::postgres().await;
    let (a, b) = (registry(&db, "lb_a").await, registry(&db, "lb_b").await);
    // Ids are per registry: a's next node gets id 2, b's first gets id 1.
    a.register_node(&reg("10.0.0.9")).await.unwrap();
    let mut rx = a.subscribe().await.unwrap();
    // b's change commits first: if a heard b's channel, it would come first.
    assert_eq!(b.register_node(&reg("10.0.0.2")).await.unwrap(), 1);
    let mine = a.register_node(&reg("10.0.0.1")).await.unwrap();
    assert_eq!(mine, 2);
    match next_event(&mut rx).await {
        ChangeEvent::Node { id } => assert_eq!(id, mine),
        other => panic!("a heard {other:?} first"),
    }
    let hosts = |nodes: Vec<NodeRecord>| nodes.into_iter().map(|n| n.host).collect::<Vec<_>>();
    assert_eq!(hosts(a.list_nodes().await.unwrap()), ["10.0.0.9", "10.0.0.1"]);
    assert_eq!(hosts(b.list_nodes().await.unwrap()), ["10.0.0.2"]);
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let tables = registry_tables(&mut conn).await;
    for schema in ["lb_a", "lb_b"] {
        for table in ["_sqlx_migrations", "sessionlb_cluster", "sessionlb_nodes", "sessionlb_sessions"] {
            assert!(tables.contains(&format!("{schema}.{table}")), "{schema}.{table} in {tables:?}");
        }
    }
    assert!(!tables.iter().any(|t| t.starts_with("public.")), "{tables:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_left_in_public_stays_while_a_node_is_online_and_moves_when_none_is() {
    let db = TestDb::postgres().await;
    // An earlier version: migrations 1 and 2 in public, one node Online and
    // fresh, a session and the cluster record; another application's table too.
    let mut old = PgConnection::connect(&db.url).await.unwrap();
    sqlx::migrate!("./migrations/postgres").run_to(2, &mut old).await.unwrap();
    for sql in [
        "INSERT INTO sessionlb_cluster (id, key_fingerprint, protocol, defined_at) VALUES (1, 'sha256:old', 'http', 0)",
        "INSERT INTO sessionlb_nodes (host, port, status, last_seen, version) VALUES \
         ('10.0.0.1', 8787, 'Online', CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT), '0.1.0')",
        "INSERT INTO sessionlb_sessions (key, node_id, user_name, kind, created, last_active) \
         SELECT 'kept-session', id, 'ann', 'backend', 0, 0 FROM sessionlb_nodes",
        "CREATE TABLE app_data (id INTEGER PRIMARY KEY)",
        "INSERT INTO app_data VALUES (7)",
    ] {
        sqlx::query(sql).execute(&mut old).await.unwrap();
    }
    let mut old_listener = PgListener::connect(&db.url).await.unwrap();
    old_listener.listen("sessionlb").await.unwrap();

    // A new node while the old one is online: the registry stays in public,
    // and the old node still hears what the new one does.
    let r = registry(&db, "sessionlb").await;
    let old_id = r.list_nodes().await.unwrap().into_iter().find(|n| n.host == "10.0.0.1").expect("the old node").id;
    let new_id = r.register_node(&reg("10.0.0.2")).await.unwrap();
    let heard = tokio::time::timeout(Duration::from_secs(10), old_listener.recv()).await.unwrap().unwrap();
    assert_eq!(ChangeEvent::from_payload(heard.payload()), ChangeEvent::Node { id: new_id });
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let tables = registry_tables(&mut conn).await;
    assert!(tables.contains(&"public.sessionlb_nodes".to_string()), "{tables:?}");
    assert!(!tables.iter().any(|t| t.starts_with("sessionlb.")), "{tables:?}");
    r.close().await;

    // All nodes stopped: the next start moves the registry into its schema.
    sqlx::query("UPDATE sessionlb_nodes SET status = 'Offline'").execute(&mut old).await.unwrap();
    let r = registry(&db, "sessionlb").await;
    let tables = registry_tables(&mut conn).await;
    assert_eq!(
        tables,
        [
            "public._sqlx_migrations",
            "sessionlb._sqlx_migrations",
            "sessionlb.sessionlb_cluster",
            "sessionlb.sessionlb_housekeeping",
            "sessionlb.sessionlb_nodes",
            "sessionlb.sessionlb_sessions"
        ]
    );
    let kept = r.get_session("kept-session").await.unwrap().expect("the session moved with its table");
    assert_eq!((kept.node_id, kept.user_name.as_deref()), (Some(old_id), Some("ann")));
    assert_eq!(r.cluster().await.unwrap().unwrap().key_fingerprint, "sha256:old");
    assert_eq!(r.list_nodes().await.unwrap().len(), 2);
    // The bookkeeping came along (no migration runs twice; the new node had
    // already migrated the registry in public) and stayed in public too.
    let versions = |schema: &str| format!("SELECT version FROM {schema}._sqlx_migrations ORDER BY version");
    let moved: Vec<i64> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(versions("sessionlb"))).fetch_all(&mut conn).await.unwrap();
    let left: Vec<i64> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(versions("public"))).fetch_all(&mut conn).await.unwrap();
    assert_eq!(moved, left);
    assert_eq!(moved.len(), sqlx::migrate!("./migrations/postgres").iter().count());
    // Notifications on the schema's channel.
    let mut rx = r.subscribe().await.unwrap();
    let third = r.register_node(&reg("10.0.0.3")).await.unwrap();
    assert!(matches!(next_event(&mut rx).await, ChangeEvent::Node { id } if id == third));
    // The other application's table is untouched, and an old node started
    // by mistake fails loudly instead of making a second registry.
    let app: Vec<i32> = sqlx::query_scalar("SELECT id FROM public.app_data").fetch_all(&mut conn).await.unwrap();
    assert_eq!(app, [7]);
    let err = sqlx::query("SELECT count(*) FROM sessionlb_nodes").execute(&mut old).await.unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

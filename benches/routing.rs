//! The routing decision on the hot path: find and verify the affinity
//! cookie (HMAC-SHA256, constant-time compare), look the session up in the
//! in-memory view of 20 nodes and 10,000 sessions, and check its node.
//! Issue 4's target: ≤ 2 µs per decision.
//!
//! cargo bench --bench routing

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use parking_lot::RwLock;
use pingora::http::RequestHeader;

use sessionlb::balancer;
use sessionlb::cluster::{ClusterView, NodeRecord, NodeStatus, SessionKind, SessionRecord};
use sessionlb::config::Config;
use sessionlb::config::key::SecureKey;
use sessionlb::lock::LockManager;
use sessionlb::proxy::{Router, cookie, routing};

const NODES: i64 = 20;
const SESSIONS: usize = 10_000;

fn node(id: i64) -> NodeRecord {
    NodeRecord {
        id,
        host: format!("10.0.0.{id}"),
        port: 8787,
        ipv4: Some(format!("10.0.0.{id}").parse().unwrap()),
        status: NodeStatus::Online,
        last_seen: Some(0),
        load: [0.5, 0.5, 0.5],
        cpus: 8,
        router: false,
        version: "bench".into(),
        clock_skew_ms: Some(0),
        offline_mode: false,
        started_at: None,
    }
}

struct Fixture {
    router: Router,
    cookie_request: RequestHeader,
    path_request: RequestHeader,
    now: u64,
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config =
        Arc::new(Config::from_toml(std::path::Path::new("bench.toml"), "backend = \"127.0.0.1:8788\"").unwrap());
    let key = SecureKey::from_bytes(b"3f2504e0-4f89-11d3-9a0c-0305e82c3301\n".to_vec());
    let view = Arc::new(ClusterView::new(1));
    view.set_nodes((1..=NODES).map(node).collect());
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let mut known_cookie = String::new();
    for i in 0..SESSIONS {
        let (affinity, value) = cookie::issue(&key, now);
        if i == SESSIONS / 2 {
            known_cookie = value;
        }
        view.upsert_session(SessionRecord {
            key: affinity.session_key(),
            node_id: Some(i as i64 % NODES + 1),
            user_name: Some(format!("user{}", i % 3000)),
            kind: SessionKind::Affinity,
            created: 0,
            last_active: 0,
        });
    }
    view.upsert_session(SessionRecord {
        key: "3a9e1f00c2b1a4d5e6f70".into(),
        node_id: Some(7),
        user_name: None,
        kind: SessionKind::Backend,
        created: 0,
        last_active: 0,
    });
    let registry = rt
        .block_on(sessionlb::cluster::connect(
            &sessionlb::config::DatabaseUrl::Sqlite(dir.path().join("r.db")),
            std::time::Duration::from_secs(1),
        ))
        .unwrap();
    let locks = LockManager::new(dir.path().join("locks"), &config.locks).unwrap();
    let router = Router::new(
        config.clone(),
        view,
        registry,
        key,
        "10.0.0.1:8787".into(),
        Some("127.0.0.1:8788".parse().unwrap()),
        Arc::new(RwLock::new(balancer::build(&config.balancer))),
        locks,
        rt.handle().clone(),
        sessionlb::proxy::control_client(&config).unwrap(),
    );
    let mut cookie_request = RequestHeader::build("GET", b"/rpc/console_input", None).unwrap();
    cookie_request.insert_header("host", "ide.example.com").unwrap();
    cookie_request
        .insert_header("cookie", format!("rs-csrf-token=abc123; sessionlb-affinity={known_cookie}; theme=dark"))
        .unwrap();
    let mut path_request = RequestHeader::build("GET", b"/s/3a9e1f00c2b1a4d5e6f70/rpc/x", None).unwrap();
    path_request.insert_header("host", "ide.example.com").unwrap();
    path_request.insert_header("cookie", format!("sessionlb-affinity={known_cookie}")).unwrap();
    Fixture { router, cookie_request, path_request, now, _rt: rt, _dir: dir }
}

fn bench(c: &mut Criterion) {
    let f = fixture();
    let client: Option<IpAddr> = Some("192.0.2.10".parse().unwrap());
    // Sanity: the decisions find the sessions and route them to a peer.
    let d = routing::decide(&f.router, &f.cookie_request, client, f.now);
    assert!(d.set_cookie.is_none() && d.found.is_some(), "known session expected");
    assert!(routing::check(&f.router, d.found.as_ref().unwrap()).is_ok());
    let d = routing::decide(&f.router, &f.path_request, client, f.now);
    assert_eq!(d.found.unwrap().record.node_id, Some(7));

    c.bench_function("decision: affinity cookie → known session → node (20 nodes, 10k sessions)", |b| {
        b.iter(|| {
            let d = routing::decide(&f.router, black_box(&f.cookie_request), client, f.now);
            black_box(routing::check(&f.router, d.found.as_ref().unwrap()).is_ok())
        })
    });
    c.bench_function("decision: backend key in path → known session → node", |b| {
        b.iter(|| {
            let d = routing::decide(&f.router, black_box(&f.path_request), client, f.now);
            black_box(routing::check(&f.router, d.found.as_ref().unwrap()).is_ok())
        })
    });
    let value = f.cookie_request.headers.get("cookie").unwrap().to_str().unwrap().to_string();
    let cookie_value = value.split("sessionlb-affinity=").nth(1).unwrap().split(';').next().unwrap().to_string();
    c.bench_function("affinity cookie verify (HMAC-SHA256, constant time)", |b| {
        b.iter(|| black_box(cookie::verify(&f.router.key, black_box(&cookie_value), f.now, 86_400).is_ok()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

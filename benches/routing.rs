//! The routing decision on the hot path, on the in-memory view of 20 nodes
//! and 10,000 sessions (3,000 users' sessions and backend keys): exactly the
//! functions the proxy calls per request — `routing::read_request` (cookies,
//! identity, path key), `routing::decide`, and for a new pin the cookie it
//! sets. Targets: ≤ 2 µs per decision; an anonymous request (no cookie: a
//! new pin chosen by the balancer, signed) included.
//!
//! cargo bench --bench routing

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use parking_lot::RwLock;
use pingora::http::RequestHeader;

use sessionlb::balancer;
use sessionlb::cluster::{ClusterView, NodeRecord, NodeStatus, SessionKind, SessionRecord, user_session_key};
use sessionlb::config::Config;
use sessionlb::config::key::SecureKey;
use sessionlb::lock::LockManager;
use sessionlb::proxy::routing::Decision;
use sessionlb::proxy::{Router, cookie, identity, routing};

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
        pins_recent: 0,
    }
}

struct Fixture {
    router: Router,
    anonymous_request: RequestHeader,
    pinned_request: RequestHeader,
    path_request: RequestHeader,
    user_request: RequestHeader,
    pin_value: String,
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
    for i in 0..SESSIONS {
        let (key, user, kind) = if i < 3000 {
            let user = format!("user{i}");
            (user_session_key(&user), Some(user), SessionKind::User)
        } else {
            (format!("{:021x}", i), Some(format!("user{}", i % 3000)), SessionKind::Backend)
        };
        view.upsert_session(SessionRecord {
            key,
            node_id: Some(i as i64 % NODES + 1),
            user_name: user,
            kind,
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
    let pin_value = cookie::Pin::new(7, now).sign(&key);
    let user_cookie = identity::sign_workbench_cookie(
        &identity::workbench_mac(&key),
        "user1234",
        &httpdate::fmt_http_date(SystemTime::now() + std::time::Duration::from_secs(3600)),
    );
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
    let request = |path: &str, cookie: Option<String>| {
        let mut req = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
        req.insert_header("host", "ide.example.com").unwrap();
        req.insert_header("user-agent", "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/140.0").unwrap();
        if let Some(c) = cookie {
            req.insert_header("cookie", c).unwrap();
        }
        req
    };
    let anonymous_request = request("/auth-sign-in", None);
    let pinned_request = request(
        "/rpc/console_input",
        Some(format!("rs-csrf-token=abc123; sessionlb-affinity={pin_value}; theme=dark")),
    );
    let path_request = request("/s/3a9e1f00c2b1a4d5e6f70/rpc/x", Some(format!("sessionlb-affinity={pin_value}")));
    let user_request =
        request("/", Some(format!("rs-csrf-token=abc123; user-id={user_cookie}; sessionlb-affinity={pin_value}")));
    Fixture {
        router,
        anonymous_request,
        pinned_request,
        path_request,
        user_request,
        pin_value,
        now,
        _rt: rt,
        _dir: dir,
    }
}

/// read_request + decide, as `routing::route` does before any I/O.
fn decision(f: &Fixture, req: &RequestHeader, client: Option<IpAddr>) -> Decision {
    let facts = routing::read_request(&f.router, req, client, f.now);
    let balancer = f.router.balancer.read().clone();
    routing::decide(&f.router.memory(balancer.as_ref()), &facts, Instant::now(), f.now)
}

fn bench(c: &mut Criterion) {
    let f = fixture();
    let client: Option<IpAddr> = Some("192.0.2.10".parse().unwrap());
    // Sanity: each request is decided as its benchmark says.
    assert!(matches!(decision(&f, &f.anonymous_request, client), Decision::NewPin { .. }));
    assert!(matches!(decision(&f, &f.pinned_request, client), Decision::Pinned { pin, .. } if pin.node == 7));
    assert!(
        matches!(decision(&f, &f.path_request, client), Decision::Session { entry, .. } if entry.record.node_id == Some(7))
    );
    assert!(
        matches!(decision(&f, &f.user_request, client), Decision::Session { entry, .. } if entry.record.key == "user:user1234")
    );

    c.bench_function(
        "decision: anonymous, no cookie → new pin chosen from memory, signed (20 nodes, 10k sessions)",
        |b| {
            b.iter(|| match decision(&f, black_box(&f.anonymous_request), client) {
                Decision::NewPin { pin, .. } => {
                    // As `route` does: count the pin in the node's estimate, then sign it.
                    f.router.view.pins().record(pin.node, Instant::now());
                    black_box(f.router.pin_cookie(&pin))
                }
                other => panic!("{other:?}"),
            })
        },
    );
    c.bench_function("decision: pin cookie → its node (verified-cookie cache hit)", |b| {
        b.iter(|| black_box(matches!(decision(&f, black_box(&f.pinned_request), client), Decision::Pinned { .. })))
    });
    c.bench_function("decision: backend key in path → known session → node", |b| {
        b.iter(|| black_box(matches!(decision(&f, black_box(&f.path_request), client), Decision::Session { .. })))
    });
    c.bench_function("decision: signed-in user (user-id cookie, HMAC) → the user's session", |b| {
        b.iter(|| black_box(matches!(decision(&f, black_box(&f.user_request), client), Decision::Session { .. })))
    });
    c.bench_function("pin cookie verify (HMAC-SHA256, constant time; a cache miss adds this)", |b| {
        b.iter(|| black_box(cookie::verify(&f.router.key, black_box(&f.pin_value), f.now, 86_400).is_ok()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

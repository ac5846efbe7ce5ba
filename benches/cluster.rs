//! Cluster-scale figures with real processes on the local PostgreSQL:
//!
//! 1. placement latency: requests of new signed-in users (the trusted
//!    header, from loopback) through one node, each placing the user's
//!    session (lock on shared storage, registry re-check, balancer,
//!    insert-if-absent), sequentially and 8 at a time; client-side p50/p99
//!    and the node's own `sessionlb_placement_seconds` histogram;
//! 2. memory: a node whose registry holds 20 nodes and 10,000 sessions,
//!    after loading them and serving requests: resident and peak memory.
//!
//! Issue 4's targets: placement p99 ≤ 25 ms; 10,000 sessions on 20 nodes ≤ 100 MB RSS.
//!
//! SESSIONLB_TEST_PG=postgres://postgres@127.0.0.1:5432/postgres cargo bench --bench cluster

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sessionlb::cluster::{NewSession, NodeRegistration, NodeStatus, SessionKind};
use sqlx::Connection;

const SESSIONLB: &str = env!("CARGO_BIN_EXE_sessionlb");
/// The test client is trusted to name its user (`X-Forwarded-User`).
const TRUST_LOOPBACK: &str = "[identity]\ntrusted-cidrs = [\"127.0.0.0/8\"]";
const BACKEND: &str = env!("CARGO_BIN_EXE_sessionlb-demo-backend");

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

async fn fresh_database(admin: &str) -> String {
    let name = format!("sessionlb_bench_{}", hex::encode(rand::random::<[u8; 4]>()));
    let mut conn = sqlx::PgConnection::connect(admin).await.expect("PostgreSQL at SESSIONLB_TEST_PG");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
    format!("{}/{name}", admin.rsplit_once('/').unwrap().0)
}

async fn drop_database(admin: &str, url: &str) {
    let name = url.rsplit('/').next().unwrap();
    let mut conn = sqlx::PgConnection::connect(admin).await.unwrap();
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
        .execute(&mut conn)
        .await;
}

/// Start a backend and a node on `ip`; returns them and the node's base URL.
async fn start_node(dir: &std::path::Path, db: &str, ip: &str, extra: &str) -> (Killed, Killed, String) {
    let backend_port = free_port("127.0.0.1");
    let backend = Killed(
        Command::new(BACKEND)
            .args(["--listen", &format!("127.0.0.1:{backend_port}"), "--name", "bench"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let key = dir.join("key");
    if !key.exists() {
        std::fs::write(&key, b"3f2504e0-4f89-11d3-9a0c-0305e82c3301\n").unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    let port = free_port(ip);
    let config = dir.join(format!("node-{ip}.toml"));
    std::fs::write(
        &config,
        format!(
            "www-address = \"{ip}\"\nwww-port = {port}\nbackend = \"127.0.0.1:{backend_port}\"\ndatabase = \"{db}\"\n\
             secure-cookie-key-file = \"{}\"\nserver-shared-storage-path = \"{}\"\nrun-dir = \"{}\"\n\
             grace-period = 0\nthreads = 1\nlog-level = \"warn\"\nmetrics-address = \"{ip}:{}\"\n{extra}\n",
            key.display(),
            dir.join("shared").display(),
            dir.display(),
            free_port(ip)
        ),
    )
    .unwrap();
    let node = Killed(
        Command::new(SESSIONLB).arg("--config").arg(&config).arg("serve").stderr(Stdio::null()).spawn().unwrap(),
    );
    let base = format!("http://{ip}:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get(format!("{base}/health")).send().await.map(|r| r.status().is_success()).ok() != Some(true) {
        assert!(Instant::now() < deadline, "node did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (backend, node, base)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// p50/p99 of the node's own placement histogram (bucket upper bounds).
async fn histogram(base: &str) -> String {
    let text = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("sessionlb_placement_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, count) = l.split_once("\"} ")?;
            Some((le.parse().unwrap_or(f64::INFINITY), count.parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    let at = |q: f64| buckets.iter().find(|b| b.1 >= q * total).map_or(f64::NAN, |b| b.0 * 1000.0);
    format!("server-side histogram: p50 ≤ {} ms, p99 ≤ {} ms ({} placements)", at(0.5), at(0.99), total)
}

async fn placement(admin: &str) {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(admin).await;
    let (_backend, _node, base) = start_node(dir.path(), &db, "127.0.0.2", TRUST_LOOPBACK).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let users = std::sync::atomic::AtomicUsize::new(0);
    let place = |client: reqwest::Client, url: String, user: usize| async move {
        let started = Instant::now();
        let resp = client.get(url).header("x-forwarded-user", format!("user{user:05}")).send().await.unwrap();
        assert!(resp.headers().contains_key("set-cookie"), "each request places a new user");
        assert_eq!(resp.status().as_u16(), 200);
        started.elapsed()
    };
    let next = || users.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Warm up.
    for _ in 0..50 {
        place(client.clone(), format!("{base}/"), next()).await;
    }
    let mut sequential = Vec::new();
    for _ in 0..1000 {
        sequential.push(place(client.clone(), format!("{base}/"), next()).await);
    }
    sequential.sort();
    println!(
        "placement, sequential (1000 new sessions): p50 {}, p99 {}, max {}",
        ms(percentile(&sequential, 0.5)),
        ms(percentile(&sequential, 0.99)),
        ms(*sequential.last().unwrap())
    );
    let mut concurrent = Vec::new();
    for _ in 0..125 {
        let batch: Vec<_> = (0..8).map(|_| tokio::spawn(place(client.clone(), format!("{base}/"), next()))).collect();
        for t in batch {
            concurrent.push(t.await.unwrap());
        }
    }
    concurrent.sort();
    println!(
        "placement, 8 concurrent (1000 new sessions): p50 {}, p99 {}, max {}",
        ms(percentile(&concurrent, 0.5)),
        ms(percentile(&concurrent, 0.99)),
        ms(*concurrent.last().unwrap())
    );
    println!("{}", histogram(&base).await);
    let registry =
        sessionlb::cluster::connect(&sessionlb::config::DatabaseUrl::parse(&db).unwrap(), Duration::from_secs(1))
            .await
            .unwrap();
    assert_eq!(registry.list_sessions().await.unwrap().len(), 2050, "one session per user");
    registry.close().await;
    drop_database(admin, &db).await;
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix(field)).unwrap().trim().trim_end_matches(" kB").trim().parse().unwrap()
}

async fn memory(admin: &str) {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(admin).await;
    let registry =
        sessionlb::cluster::connect(&sessionlb::config::DatabaseUrl::parse(&db).unwrap(), Duration::from_secs(1))
            .await
            .unwrap();
    // 19 other nodes (online in the registry; nothing listens at their addresses).
    let mut ids = Vec::new();
    for i in 0..19 {
        let id = registry
            .register_node(&NodeRegistration {
                host: format!("127.0.1.{}", i + 1),
                port: 9,
                router: false,
                version: "0.1.0".into(),
            })
            .await
            .unwrap();
        registry.set_node_status(id, NodeStatus::Online).await.unwrap();
        ids.push(id);
    }
    let started = Instant::now();
    for i in 0..10_000 {
        let key = format!("aff:bench-session-{i:05}-{}", hex::encode(rand::random::<[u8; 8]>()));
        let user = format!("user{:04}", i % 3000);
        registry
            .place_session(&NewSession {
                key: &key,
                node_id: ids[i % ids.len()],
                user_name: Some(&user),
                kind: SessionKind::Affinity,
            })
            .await
            .unwrap();
    }
    println!("(10,000 sessions written in {:.1} s)", started.elapsed().as_secs_f64());
    let (_backend, node, base) = start_node(dir.path(), &db, "127.0.0.3", TRUST_LOOPBACK).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h: serde_json::Value = client.get(format!("{base}/health")).send().await.unwrap().json().await.unwrap();
        if h["sessions"] == 10_000 && h["cluster_nodes"] == 20 {
            break;
        }
        assert!(Instant::now() < deadline, "node did not load the registry: {h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Serve a little traffic (200 new users' sessions, status page of everything).
    for i in 0..200 {
        client.get(format!("{base}/")).header("x-forwarded-user", format!("new{i}")).send().await.unwrap();
    }
    let status = client.get(format!("{base}/load-balancer/status")).send().await.unwrap().text().await.unwrap();
    assert!(status.lines().count() > 10_000);
    let pid = node.0.id();
    println!(
        "memory, 20 nodes and 10,200 sessions loaded: RSS {:.1} MB, peak {:.1} MB",
        rss_kib(pid, "VmRSS:") as f64 / 1024.0,
        rss_kib(pid, "VmHWM:") as f64 / 1024.0
    );
    drop(node);
    registry.close().await;
    drop_database(admin, &db).await;
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run only for real.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let admin =
        std::env::var("SESSIONLB_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        placement(&admin).await;
        memory(&admin).await;
    });
}

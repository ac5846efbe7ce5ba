//! Stopping and replacing a node without dropping anything: the drain on
//! SIGTERM, the zero-downtime upgrade (`serve --upgrade` and SIGUSR2), and
//! the systemd readiness protocol — each with real processes, an open
//! WebSocket and a stream of requests whose failures are counted.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use rustix::process::Signal;
use sessionlb::cluster::{NodeId, NodeStatus, Registry};
use tokio_tungstenite::tungstenite::Message;

use crate::common::cluster::{Browser, Cluster, ClusterOptions, TRUST_LOOPBACK, WebSocket, session_on};
use crate::common::node::{Backend, ClusterFixture, Node};
use crate::common::{eventually, eventually_sync};

/// Requests sent one after another until stopped, with every failure kept.
struct RequestStream {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RequestStream {
    /// `target()` picks the URL of each request (an outer load balancer's choice).
    fn start(mut browser: Browser, target: impl Fn() -> String + Send + 'static) -> RequestStream {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (s, o, f) = (stop.clone(), ok.clone(), failures.clone());
        let task = tokio::spawn(async move {
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                i += 1;
                let url = format!("{}?n={i}", target());
                match browser.request(reqwest::Method::GET, &url).send().await {
                    Ok(resp) if resp.status().is_success() => {
                        browser.absorb(resp.headers());
                        let _ = resp.bytes().await;
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(resp) => f.lock().push(format!("{url}: {}", resp.status())),
                    Err(e) => f.lock().push(format!("{url}: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        RequestStream { stop, ok, failures, task }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stop; returns (successes, failures).
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        (self.ok.load(Ordering::Relaxed), self.failures.lock().clone())
    }
}

/// A WebSocket pinged every 200 ms: when it last answered, and whether it closed.
struct Pinger {
    last_echo: Arc<Mutex<Instant>>,
    closed: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Pinger {
    fn start(mut ws: WebSocket) -> Pinger {
        let last_echo = Arc::new(Mutex::new(Instant::now()));
        let closed = Arc::new(AtomicBool::new(false));
        let (l, c) = (last_echo.clone(), closed.clone());
        let task = tokio::spawn(async move {
            for i in 0u64.. {
                let text = format!("ping {i}");
                if ws.send(Message::Text(text.clone().into())).await.is_err() {
                    break;
                }
                match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) if t.as_str() == text => *l.lock() = Instant::now(),
                    _ => break,
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            c.store(true, Ordering::SeqCst);
        });
        Pinger { last_echo, closed, task }
    }

    fn last_echo(&self) -> Instant {
        *self.last_echo.lock()
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// The (status, offline mode) states a node's registry row goes through, polled until stopped.
struct RowWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(String, bool)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RowWatch {
    /// Starts once the row's current state is recorded.
    async fn start(registry: Arc<dyn Registry>, id: NodeId) -> RowWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let row = registry.get_node(id).await.unwrap().expect("the node's row");
        let seen = Arc::new(Mutex::new(vec![(row.status.as_str().to_string(), row.offline_mode)]));
        let (s, v) = (stop.clone(), seen.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                if let Ok(Some(n)) = registry.get_node(id).await {
                    let state = (n.status.as_str().to_string(), n.offline_mode);
                    let mut v = v.lock();
                    if v.last() != Some(&state) {
                        v.push(state);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        RowWatch { stop, seen, task }
    }

    async fn finish(self) -> Vec<(String, bool)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.seen.lock().clone()
    }
}

async fn health_of(url: String) -> Option<(u16, serde_json::Value)> {
    let resp = reqwest::Client::builder().no_proxy().build().unwrap().get(url).send().await.ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.json().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_until_the_last_websocket_closes_and_drops_no_request() {
    let mut c = Cluster::start(ClusterOptions {
        extra: format!("health-check-interval = \"250ms\"\n{TRUST_LOOPBACK}"),
        per_node: ["drain-timeout = \"60s\"\ngrace-period = 2".into(), String::new(), String::new()],
        ..Default::default()
    })
    .await;
    let a_id = c.node_id(0).await;
    let (a_health, a_root) = (c.nodes[0].url("/health"), c.nodes[0].url("/"));
    let browser = session_on(&c, 0).await;
    let mut ws = browser.websocket(&c.nodes[0]).await;
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("hello from A".into()));
    let pinger = Pinger::start(ws);

    // An outer load balancer: sends to A while A's /health says 200, else to B.
    let a_healthy = Arc::new(AtomicBool::new(true));
    let checker = {
        let (flag, url) = (a_healthy.clone(), a_health.clone());
        tokio::spawn(async move {
            loop {
                let ok = matches!(health_of(url.clone()).await, Some((200, _)));
                flag.store(ok, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let (a_url, b_url) = (c.nodes[0].url("/page"), c.nodes[1].url("/page"));
    let flag = a_healthy.clone();
    let stream =
        RequestStream::start(browser, move || if flag.load(Ordering::Relaxed) { a_url.clone() } else { b_url.clone() });
    eventually(Duration::from_secs(5), "requests to flow", || async { (stream.ok() > 5).then_some(()) }).await;
    let rows = RowWatch::start(c.registry.clone(), a_id).await;

    let sigterm = Instant::now();
    c.nodes[0].proc.signal(Signal::TERM);
    // Draining: /health 503 (marked for peers), offline mode, still Online.
    let (_, health) = eventually(Duration::from_secs(5), "A's /health to say draining", || async {
        health_of(a_health.clone()).await.filter(|(code, _)| *code == 503)
    })
    .await;
    assert_eq!(health["status"], "draining", "{health}");
    c.wait_sees_offline_mode(&c.nodes[1], &c.nodes[0], Duration::from_secs(5), "B to see A in offline mode").await;
    let row = c.registry.get_node(a_id).await.unwrap().unwrap();
    assert_eq!((row.status, row.offline_mode), (NodeStatus::Online, true));
    // New sessions (and anonymous pins) go elsewhere, even when they arrive at A.
    for _ in 0..4 {
        for mut newcomer in [Browser::new_user(), Browser::new()] {
            let reply = newcomer.get(&a_root).await;
            assert!(matches!(reply.backend(), Some("B") | Some("C")), "{:?}", reply.backend());
        }
    }
    // A keeps serving while the WebSocket is open, and its peers still reach it
    // (the draining 503 is not a failed health check).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(pinger.last_echo().elapsed() < Duration::from_secs(1) && !pinger.is_closed(), "the WebSocket was cut");
    assert!(c.nodes[0].proc.is_running(), "A stopped with a WebSocket open");
    let b_view = c.status_json(&c.nodes[1]).await;
    let a_seen = b_view["nodes"].as_array().unwrap().iter().find(|n| n["id"] == a_id).unwrap().clone();
    assert_eq!((a_seen["reachable"].clone(), a_seen["offline_mode"].clone()), (true.into(), true.into()), "{a_seen}");

    // The WebSocket ends: A stops soon after, long before drain-timeout.
    pinger.task.abort();
    let closed = Instant::now();
    while c.nodes[0].proc.is_running() {
        assert!(
            closed.elapsed() < Duration::from_secs(15),
            "A still running {:?} after its last tunnel closed",
            closed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sigterm.elapsed() < Duration::from_secs(60));
    let log = c.nodes[0].proc.log_text();
    assert!(log.contains("drained: nothing left in progress"), "{log}");
    let row = c.registry.get_node(a_id).await.unwrap().unwrap();
    assert_eq!((row.status, row.offline_mode), (NodeStatus::Offline, false), "stopped, offline mode restored");

    // Requests continue through B (A's session is placed again, on B or C).
    let before = stream.ok();
    eventually(Duration::from_secs(10), "requests to continue", || async { (stream.ok() > before + 5).then_some(()) })
        .await;
    checker.abort();
    let (ok, failures) = stream.finish().await;
    assert!(failures.is_empty(), "{} of {} requests failed: {failures:#?}", failures.len(), ok + failures.len() as u64);
    // The row went Online → offline mode → Offline, and offline mode was
    // cleared only once the node was Offline (never eligible meanwhile).
    let seen = rows.finish().await;
    let online = |mode| ("Online".to_string(), mode);
    assert_eq!(seen.first(), Some(&online(false)), "{seen:?}");
    assert_eq!(seen.get(1), Some(&online(true)), "{seen:?}");
    assert_eq!(seen.last(), Some(&("Offline".to_string(), false)), "{seen:?}");
    assert!(!seen[1..].contains(&online(false)), "{seen:?}");
}

/// A process this test did not spawn itself (an upgrade's child): killed on drop.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0) {
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
    }
}

/// `READY=1` messages (their `MAINPID=`) received on a fake systemd notify socket.
fn ready_pids(socket: &UnixDatagram) -> Vec<String> {
    let mut buf = [0u8; 512];
    let mut pids = Vec::new();
    while let Ok(n) = socket.recv(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        if text.lines().any(|l| l == "READY=1") {
            pids.extend(text.lines().filter_map(|l| l.strip_prefix("MAINPID=")).map(str::to_string));
        }
    }
    pids
}

async fn metric(url: &str, name: &str) -> Option<f64> {
    let text = reqwest::get(url).await.ok()?.text().await.ok()?;
    crate::metrics::sample(&text, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrades_hand_the_sockets_over_without_a_failed_request_or_leaving_online() {
    const GRACE: Duration = Duration::from_secs(2);
    let mut c = Cluster::start(ClusterOptions {
        extra: TRUST_LOOPBACK.into(),
        per_node: ["grace-period = 2".into(), String::new(), String::new()],
        ..Default::default()
    })
    .await;
    let a_id = c.node_id(0).await;
    let notify_path = c.fx.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_nonblocking(true).unwrap();
    let mut spec = c.nodes[0].spec.clone();
    spec.env.push(("NOTIFY_SOCKET".into(), notify_path.display().to_string()));
    let (a_page, a_metrics) = (c.nodes[0].url("/page"), c.nodes[0].metrics_url());
    let pid_file = c.fx.path().join(format!("sessionlb-{}-{}.pid", spec.ip, spec.port));
    let pid_in_file = || std::fs::read_to_string(&pid_file).unwrap_or_default().trim().to_string();
    assert_eq!(pid_in_file(), c.nodes[0].proc.pid().to_string());

    let browser = session_on(&c, 0).await;
    let key = c.registry.list_sessions().await.unwrap().into_iter().find(|s| s.node_id == Some(a_id)).unwrap().key;
    let mut ws = browser.websocket(&c.nodes[0]).await;
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("hello from A".into()));
    let first_ws = Pinger::start(ws);
    let stream = RequestStream::start(browser.clone(), move || a_page.clone());
    let rows = RowWatch::start(c.registry.clone(), a_id).await;
    let started_before = metric(&a_metrics, "process_start_time_seconds").await.unwrap();
    // A SIGQUIT with no new process waiting is ignored (Pingora alone would stop the node).
    c.nodes[0].proc.signal(Signal::QUIT);
    eventually(Duration::from_secs(5), "the stray SIGQUIT to be logged", || async {
        c.nodes[0].proc.log_text().contains("no new process waits for the listening sockets").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(c.nodes[0].proc.is_running() && c.nodes[0].health().await.is_some(), "a stray SIGQUIT stopped the node");

    // 1. `serve --upgrade`: the new process takes the sockets, the old one finishes.
    let upgrade_started = Instant::now();
    let mut second = c.fx.spawn_serve(&spec, &["--upgrade"]);
    let second_pid = second.proc.pid().to_string();
    eventually(Duration::from_secs(20), "the new process to say it is ready", || async {
        ready_pids(&notify).contains(&second_pid).then_some(())
    })
    .await;
    assert_eq!(pid_in_file(), second_pid);
    while c.nodes[0].proc.is_running() {
        assert!(upgrade_started.elapsed() < Duration::from_secs(30), "the old process did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let old_log = c.nodes[0].proc.log_text();
    assert!(old_log.contains("handing the listening sockets to the new process"), "{old_log}");
    assert!(old_log.contains("leaving it Online"), "{old_log}");
    // The WebSocket on the old process lived on for at least grace-period after the handover.
    eventually(Duration::from_secs(5), "the old process's WebSocket to close", || async {
        first_ws.is_closed().then_some(())
    })
    .await;
    let lived = first_ws.last_echo() - upgrade_started;
    assert!(lived >= GRACE, "the WebSocket answered only {lived:?} into the upgrade");
    // The new process serves the public port and the metrics listener.
    let started_after = metric(&a_metrics, "process_start_time_seconds").await.unwrap();
    assert!(started_after > started_before, "metrics still served by the old process");
    let reply = browser.clone().get(&c.nodes[0].url("/after-upgrade")).await;
    assert_eq!((reply.status, reply.backend()), (200, Some("A")));

    // 2. SIGUSR2 (how the systemd unit upgrades): the node starts its successor itself.
    let mut ws = browser.websocket(&c.nodes[0]).await;
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("hello from A".into()));
    let second_ws = Pinger::start(ws);
    let ok_before = stream.ok();
    let usr2 = Instant::now();
    second.proc.signal(Signal::USR2);
    let third_pid = eventually(Duration::from_secs(20), "the successor to be ready", || async {
        let pids = ready_pids(&notify);
        pids.into_iter().find(|p| *p != second_pid)
    })
    .await;
    let _third = KillOnDrop(third_pid.parse().unwrap());
    assert_eq!(pid_in_file(), third_pid);
    while second.proc.is_running() {
        assert!(usr2.elapsed() < Duration::from_secs(30), "the second process did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually(Duration::from_secs(5), "the second process's WebSocket to close", || async {
        second_ws.is_closed().then_some(())
    })
    .await;
    assert!(second_ws.last_echo() - usr2 >= GRACE, "cut {:?} after SIGUSR2", second_ws.last_echo() - usr2);
    eventually(Duration::from_secs(10), "requests to flow to the third process", || async {
        (stream.ok() > ok_before + 20).then_some(())
    })
    .await;

    // Nothing failed, nothing moved, and the row never left Online.
    let (ok, failures) = stream.finish().await;
    assert!(failures.is_empty(), "{} of {} requests failed: {failures:#?}", failures.len(), ok + failures.len() as u64);
    assert_eq!(rows.finish().await, vec![("Online".to_string(), false)]);
    assert_eq!(c.registry.get_session(&key).await.unwrap().unwrap().node_id, Some(a_id), "the session stayed on A");
    let b_view = c.status_json(&c.nodes[1]).await;
    let a_seen = b_view["nodes"].as_array().unwrap().iter().find(|n| n["id"] == a_id).unwrap().clone();
    assert_eq!(a_seen["reachable"], true, "{a_seen}");
    assert_eq!(b_view["counters"]["session_moves"], 0, "{b_view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_once_online_and_stopping_on_sigterm() {
    let db = crate::common::db::TestDb::postgres().await;
    let fx = ClusterFixture::new(&db.url);
    let backend = Backend::start(fx.path(), "A").await;
    let notify_path = fx.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut spec = fx.spec("127.0.0.2", Some(backend.addr));
    spec.env.push(("NOTIFY_SOCKET".into(), notify_path.display().to_string()));
    let mut node: Node = fx.spawn(&spec);
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).expect("a notification");
    let ready = String::from_utf8_lossy(&buf[..n]).to_string();
    assert_eq!(ready, format!("READY=1\nMAINPID={}\nSTATUS=online", node.proc.pid()));
    // Ready means Online in the registry and answering on the public port.
    let rows = crate::common::node::list_nodes(&fx, &node.config);
    assert_eq!(crate::common::node::row_of(&rows, &spec).map(|r| r.status.as_str()), Some("Online"));
    assert!(node.health().await.is_some());
    node.proc.signal(Signal::TERM);
    let n = notify.recv(&mut buf).expect("a notification");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("STOPPING=1"));
    let status = eventually_sync(Duration::from_secs(30), "the node to stop", || {
        node.proc.child.as_mut().and_then(|c| c.try_wait().unwrap())
    });
    assert!(status.success());
}

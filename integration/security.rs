//! Issue 11's security holes, each shown closed with real processes:
//! forwarding headers from untrusted clients never reach a backend (hole 3).

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::cluster::{Browser, Cluster, ClusterOptions};
use crate::common::raw;

/// What a client claims about itself in forwarding headers.
const FORGED: &str = "X-Forwarded-Host: evil.example\r\n\
                      Forwarded: for=6.6.6.6;host=evil.example;proto=https\r\n\
                      X-Real-IP: 6.6.6.6\r\n\
                      X-Forwarded-Port: 444\r\n\
                      X-Forwarded-Proto: https\r\n\
                      X-Forwarded-For: 6.6.6.6\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarding_headers_of_an_untrusted_client_never_reach_the_backend() {
    // No trusted-cidrs: the test client (127.0.0.1) is an untrusted client.
    let c = Cluster::start(ClusterOptions::default()).await;
    let mut b = Browser::new();
    let owner = b.get(&c.nodes[0].url("/")).await.backend().unwrap().to_string();
    let owner_ip = c.nodes[Cluster::index_of_backend(&owner)].spec.ip.clone();
    let cookie = b.cookie_header().expect("a pin");
    let mut hops = [0; 2];
    for node in &c.nodes {
        let addr: SocketAddr = node.address().parse().unwrap();
        // HTTP/1.1 with Host, and HTTP/1.0 without one (nothing to set
        // X-Forwarded-Host from: the client's value must not survive).
        for host in [Some(node.address()), None] {
            let (version, host_line) = match &host {
                Some(h) => ("HTTP/1.1", format!("Host: {h}\r\n")),
                None => ("HTTP/1.0", String::new()),
            };
            let request =
                format!("GET /headers {version}\r\n{host_line}Connection: close\r\nCookie: {cookie}\r\n{FORGED}\r\n");
            let reply = raw::send(addr, None, request.as_bytes(), Duration::from_secs(15)).await.unwrap();
            assert_eq!(reply.status, 200, "{version} via {}: {reply:?}", node.address());
            let seen: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
            assert_eq!(seen["backend"], owner.as_str(), "the pin routes every entry to one backend");
            hops[usize::from(node.spec.ip != owner_ip)] += 1;
            let h = &seen["headers"];
            let what = format!("{version} via {}: {h}", node.address());
            assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{what}");
            assert_eq!(h["x-forwarded-proto"], "http", "{what}");
            match &host {
                Some(host) => assert_eq!(h["x-forwarded-host"], host.as_str(), "{what}"),
                None => assert!(h.get("x-forwarded-host").is_none(), "{what}"),
            }
            for name in ["forwarded", "x-real-ip", "x-forwarded-port"] {
                assert!(h.get(name).is_none(), "{name} passed: {what}");
            }
        }
    }
    assert_eq!(hops, [2, 4], "one node served locally, two forwarded (two hops)");
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A single node in front of a demo backend, on 127.0.0.2 (its own database;
/// the fields keep the processes and the database alive).
#[allow(dead_code)]
pub struct OneNode {
    pub node: crate::common::node::Node,
    pub backend: crate::common::node::Backend,
    pub fx: crate::common::node::ClusterFixture,
    pub db: crate::common::db::TestDb,
}

impl OneNode {
    pub async fn start(extra: &str) -> OneNode {
        let db = crate::common::db::TestDb::postgres().await;
        let fx = crate::common::node::ClusterFixture::new(&db.url);
        let backend = crate::common::node::Backend::start(fx.path(), "A").await;
        let mut spec = fx.spec("127.0.0.2", Some(backend.addr));
        spec.extra = extra.into();
        let node = fx.start(&spec).await;
        OneNode { node, backend, fx, db }
    }

    pub fn addr(&self) -> SocketAddr {
        self.node.address().parse().unwrap()
    }

    /// The sum of metric `name` on the node's metrics listener.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(self.node.metrics_url()).await.unwrap().text().await.unwrap();
        crate::common::cluster::metric_sum(&text, name)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_forged_forwarding_headers_is_refused_counted_and_logged_sparingly() {
    let n = OneNode::start("").await;
    let started = std::time::Instant::now();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let forged = sessionlb::proxy::forward::sign(
        &sessionlb::config::key::SecureKey::from_bytes(b"not-the-cluster-key-at-all-00000\n".to_vec()),
        1,
        1,
        now_ms(),
        "aff:x",
        None,
        &sessionlb::proxy::forward::RequestLine { method: "GET", host: &n.node.address(), path_and_query: "/" },
    );
    const FLOOD: usize = 400;
    for i in 0..FLOOD {
        // Garbage, a forged MAC, and the node-info endpoint in turn.
        let (path, header) = match i % 3 {
            0 => ("/", format!("v1;garbage;{i}")),
            1 => ("/", forged.clone()),
            _ => ("/load-balancer/node-info", forged.clone()),
        };
        let resp = client.get(n.node.url(path)).header(sessionlb::proxy::forward::HEADER, header).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 403, "forged header {i}");
    }
    let elapsed = started.elapsed();
    assert_eq!(n.metric("sessionlb_rejected_forwards_total").await, FLOOD as f64, "every refusal is counted");
    // The node still serves.
    let ok = client.get(n.node.url("/")).send().await.unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let log = n.node.proc.log_text();
    let lines = log.lines().filter(|l| l.contains("with an invalid forwarding header")).count();
    // One line per 10 s at most (plus the first).
    let bound = 2 + elapsed.as_secs() as usize / 10;
    assert!((1..=bound).contains(&lines), "{lines} log lines for {FLOOD} forged headers in {elapsed:?}:\n{log}");
    if lines > 1 {
        assert!(log.contains("suppressed="), "the count left out is logged:\n{log}");
    }
}

/// Metric `name` from the node's own metrics listener.
async fn listener_metric(node: &crate::common::node::Node, name: &str) -> f64 {
    let text = reqwest::get(node.metrics_url()).await.unwrap().text().await.unwrap();
    crate::common::cluster::metric_sum(&text, name)
}

/// A client whose connections come from `ip` (on the loopback network).
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(ip.parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_page_is_restricted_to_status_page_cidrs_and_nodes_and_asks_peers_once_a_second() {
    // The administrators' address is 127.0.0.9; every client is loopback,
    // as behind a local front proxy.
    let c =
        Cluster::start(ClusterOptions { extra: "status-page-cidrs = [\"127.0.0.9\"]\n".into(), ..Default::default() })
            .await;
    let mut ann = Browser::new();
    assert_eq!(ann.get(&c.nodes[0].url("/")).await.status, 200);
    let a = &c.nodes[0];
    let status = a.url("/load-balancer/status?format=json");
    // Allowed: the configured address, and another node (B's address).
    for from in ["127.0.0.9", "127.0.0.3"] {
        let resp = client_from(from).get(&status).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "from {from}");
        let json: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(json["nodes"].as_array().unwrap().len(), 3, "from {from}: {json}");
    }
    // Refused: loopback addresses that are neither (127.0.0.1 is no longer special).
    let refused_before = listener_metric(a, "sessionlb_status_refused_total").await;
    for from in ["127.0.0.1", "127.0.0.10", "127.0.0.200"] {
        for path in ["/load-balancer/status", "/load-balancer/status?format=json", "/metrics"] {
            let resp = client_from(from).get(a.url(path)).send().await.unwrap();
            assert_eq!(resp.status().as_u16(), 403, "{path} from {from}");
            let body = resp.text().await.unwrap();
            assert!(!body.contains("Load:") && !body.contains("sessionlb_"), "{path} from {from} leaked: {body}");
        }
    }
    // (Counted on A's own metrics listener, which status-page-cidrs does not govern.)
    let refused = listener_metric(a, "sessionlb_status_refused_total").await - refused_before;
    assert_eq!(refused, 9.0);

    // Peers' reports are reused for a second: a burst of status requests
    // asks the peers about once a second, not once per request.
    let admin = client_from("127.0.0.9");
    let rounds_before = listener_metric(a, "sessionlb_status_peer_rounds_total").await;
    let started = std::time::Instant::now();
    const BURST: usize = 30;
    for _ in 0..BURST {
        assert_eq!(admin.get(&status).send().await.unwrap().status().as_u16(), 200);
    }
    let elapsed = started.elapsed();
    let rounds = listener_metric(a, "sessionlb_status_peer_rounds_total").await - rounds_before;
    let bound = 2.0 + elapsed.as_secs_f64().ceil();
    assert!(rounds <= bound, "{rounds} rounds of peer calls for {BURST} requests in {elapsed:?}");
    assert!(rounds < BURST as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forwarding_header_is_accepted_once_from_its_sender_and_bound_to_the_body_length() {
    use sessionlb::proxy::forward;
    let c = Cluster::start(ClusterOptions::default()).await;
    let key = c.key();
    let (a, b) = (c.node_id(0).await, c.node_id(1).await);
    let host = c.nodes[1].address();
    let url = c.nodes[1].url("/x");
    let line = forward::RequestLine { method: "GET", host: &host, path_and_query: "/x" };
    let rejected = |reason: &'static str| {
        let metrics = c.nodes[1].metrics_url();
        async move {
            let text = reqwest::get(metrics).await.unwrap().text().await.unwrap();
            crate::common::cluster::metric_sum(
                &text,
                &format!("sessionlb_rejected_forwards_total{{reason=\"{reason}\"}}"),
            )
        }
    };
    let from_a = client_from("127.0.0.2");

    // Genuine, from A's address: served by B's backend.
    let good = forward::sign(&key, a, b, now_ms(), "aff:test", None, &line);
    let ok = from_a.get(&url).header(forward::HEADER, &good).send().await.unwrap();
    assert_eq!((ok.status().as_u16(), ok.headers()["x-backend"].to_str().unwrap()), (200, "B"));
    // The same header again (a replay, even from A's address): refused.
    let replay = from_a.get(&url).header(forward::HEADER, &good).send().await.unwrap();
    assert_eq!(replay.status().as_u16(), 403);
    assert_eq!(rejected("replayed").await, 1.0);

    // A fresh, valid header from anywhere but A's address: refused.
    for from in ["127.0.0.1", "127.0.0.4", "127.0.0.9"] {
        let fresh = forward::sign(&key, a, b, now_ms(), &format!("aff:{from}"), None, &line);
        let resp = client_from(from).get(&url).header(forward::HEADER, fresh).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 403, "from {from}");
    }
    assert_eq!(rejected("wrong_peer").await, 3.0);

    // Signed for a request without a body, sent with one: refused.
    let post_line = forward::RequestLine { method: "POST", ..line };
    let bodiless = forward::sign(&key, a, b, now_ms(), "aff:body", None, &post_line);
    let resp = from_a.post(&url).header(forward::HEADER, bodiless).body("hello").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    assert_eq!(rejected("bad_mac").await, 1.0);
    // Signed for its length: accepted; the same header with another length: refused.
    let framed = forward::sign_framed(&key, a, b, now_ms(), "aff:body", None, &post_line, "length=5");
    let resp = from_a.post(&url).header(forward::HEADER, &framed).body("hello").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let framed = forward::sign_framed(&key, a, b, now_ms() + 1, "aff:body", None, &post_line, "length=5");
    let resp = from_a.post(&url).header(forward::HEADER, &framed).body("hello, world").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    assert_eq!(rejected("bad_mac").await, 2.0);

    // Real forwarding between the nodes still works (the nodes leave from
    // their own addresses), for requests with bodies too.
    let mut browser = Browser::new();
    let owner = browser.get(&c.nodes[0].url("/")).await.backend().unwrap().to_string();
    for node in &c.nodes {
        let resp =
            browser.request(reqwest::Method::POST, &node.url("/upload")).body(vec![7u8; 100_000]).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "via {}", node.address());
        let result: serde_json::Value = resp.json().await.unwrap();
        assert_eq!((result["bytes"].as_u64(), result["backend"].as_str()), (Some(100_000), Some(owner.as_str())));
    }
    let forwarded_total = c.metric_all("sessionlb_rejected_forwards_total").await;
    assert_eq!(forwarded_total, 6.0, "no genuine forward was refused");
}

/// Whether the server closed `stream` (a read returns end of file or an
/// error) within `wait`.
async fn closed_within(stream: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // a response (e.g. 408) before the close
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_are_closed_after_the_deadlines_and_the_node_keeps_serving() {
    use tokio::io::AsyncWriteExt;
    let n = OneNode::start("request-header-timeout = \"1s\"\nrequest-body-idle-timeout = \"1s\"\n").await;
    let addr = n.addr();
    const SLOW: usize = 40;
    // Half a request head each, never finished.
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let mut s = raw::connect(addr, None).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
        slow.push(s);
    }
    // A stalled upload: 10 of 100 bytes, then silence.
    let mut upload = raw::connect(addr, None).await.unwrap();
    upload.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789").await.unwrap();
    // Meanwhile a normal client is served.
    let ok = reqwest::Client::new().get(n.node.url("/")).send().await.unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    // Every slow client is closed (polled with a deadline far above 1 s).
    for (i, s) in slow.iter_mut().enumerate() {
        assert!(closed_within(s, Duration::from_secs(60)).await, "slow client {i} still open");
    }
    assert!(closed_within(&mut upload, Duration::from_secs(60)).await, "the stalled upload is still open");
    assert!(n.metric("sessionlb_request_header_timeouts_total").await >= SLOW as f64);
    // A WebSocket (an upgraded tunnel) has no idle limit: silent for longer
    // than both deadlines, it still echoes.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", n.node.address())).await.unwrap();
    use futures::{SinkExt, StreamExt};
    assert!(ws.next().await.unwrap().unwrap().to_text().unwrap().starts_with("hello from"));
    tokio::time::sleep(Duration::from_millis(2500)).await; // the silence under test, not a synchronisation
    ws.send(tokio_tungstenite::tungstenite::Message::Text("still here".into())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().to_text().unwrap(), "still here");

    // Clients that hang up mid-head are not errors of the node.
    const HANGUPS: usize = 20;
    for _ in 0..HANGUPS {
        let mut s = raw::connect(addr, None).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        drop(s);
    }
    crate::common::eventually(Duration::from_secs(30), "the node to see every hang-up", || async {
        let log = n.node.proc.log_text();
        (log.matches("client closed the connection while sending its request head").count() >= HANGUPS).then_some(())
    })
    .await;
    let log = n.node.proc.log_text();
    assert!(!log.lines().any(|l| l.contains("ERROR")), "ERROR lines for clients:\n{log}");
    let ok = reqwest::Client::new().get(n.node.url("/")).send().await.unwrap();
    assert_eq!(ok.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_past_max_connections_get_503_and_are_counted() {
    let n = OneNode::start("max-connections = 5\nrequest-header-timeout = \"60s\"\n").await;
    let addr = n.addr();
    // Five idle connections hold every slot.
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(raw::connect(addr, None).await.unwrap());
    }
    crate::common::eventually(Duration::from_secs(10), "five open connections", || async {
        (n.metric("sessionlb_connections_open").await == 5.0).then_some(())
    })
    .await;
    // (Counted from here: a keep-alive connection of the readiness probe may
    // have held a slot and made one of the five be refused.)
    let before = n.metric("sessionlb_connections_refused_total").await;
    for i in 0..3 {
        let reply =
            raw::send(addr, None, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", Duration::from_secs(10))
                .await
                .unwrap();
        assert_eq!(reply.status, 503, "connection {i} past the cap: {reply:?}");
    }
    assert_eq!(n.metric("sessionlb_connections_refused_total").await - before, 3.0);
    // Slots come back when connections close.
    drop(held);
    let client = reqwest::Client::new();
    crate::common::eventually(Duration::from_secs(10), "a request to be served again", || async {
        let resp = client.get(n.node.url("/")).send().await.ok()?;
        (resp.status().as_u16() == 200).then_some(())
    })
    .await;
}

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

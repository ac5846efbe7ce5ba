//! Backend keys (`/s/<key>/`) live only in the backend that minted them:
//! while their node cannot serve them they keep their placement and are
//! answered 503 with `Retry-After` (RELIABILITY.md, defect 1), until
//! `backend-key-failover-after` has passed; and a key is registered only
//! when its backend answered it (2xx or 101), never on a redirect or error.

use std::time::{Duration, Instant};

use sessionlb::cluster::NodeId;

use crate::common::cluster::{Browser, Cluster, ClusterOptions, NAMES, TRUST_LOOPBACK, session_on};
use crate::common::eventually;

/// A key minted by C's backend and opened once (so registered on C), with
/// C's node id.
async fn key_on_c(c: &Cluster) -> (String, NodeId) {
    let mut user = session_on(c, 2).await;
    let reply = user.get(&c.nodes[0].url("/new-session")).await;
    let minted: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(minted["backend"], "C", "{minted}");
    let key = minted["key"].as_str().unwrap().to_string();
    let reply = user.get(&c.nodes[0].url(&format!("/s/{key}/"))).await;
    assert_eq!((reply.status, reply.backend()), (200, Some("C")), "{}", reply.body);
    let c_id = c.node_id(2).await;
    let registry = c.registry.clone();
    eventually(Duration::from_secs(10), "the key to be registered on C", || {
        let (registry, key) = (registry.clone(), key.clone());
        async move { registry.get_session(&key).await.ok()?.filter(|s| s.node_id == Some(c_id)).map(|_| ()) }
    })
    .await;
    (key, c_id)
}

/// `Retry-After` of a reply, which must be a 503 that no backend answered.
fn held(reply: &crate::common::cluster::Reply) -> u64 {
    assert_eq!(reply.status, 503, "expected a held key's 503, got {reply:?}");
    assert_eq!(reply.backend(), None, "a 503 of sessionlb, not of a backend: {reply:?}");
    let secs: u64 = reply
        .headers
        .get("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After: {reply:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(secs >= 1, "{reply:?}");
    secs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_key_of_a_killed_node_gets_503_with_retry_after_and_is_served_again_when_it_is_back() {
    let mut c = Cluster::start(ClusterOptions {
        extra: format!("health-check-interval = \"500ms\"\n{TRUST_LOOPBACK}"),
        ..Default::default()
    })
    .await;
    let (key, c_id) = key_on_c(&c).await;
    let path = format!("/s/{key}/");
    c.nodes[2].proc.kill();
    // Through A and B, many times: the first request meets the dead node
    // (a connect failure), later ones its unreachable mark; every one is a
    // 503 with Retry-After, never another backend's 404.
    for i in 0..12 {
        let reply = Browser::new().get(&c.nodes[i % 2].url(&path)).await;
        held(&reply);
    }
    let row = c.registry.get_session(&key).await.unwrap().unwrap();
    assert_eq!(row.node_id, Some(c_id), "the key kept its placement");
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let held_total =
        c.metric(a, "sessionlb_backend_keys_held_total").await + c.metric(b, "sessionlb_backend_keys_held_total").await;
    assert!(held_total >= 12.0, "{held_total}");
    let moves = c.metric(a, "sessionlb_session_moves_total").await + c.metric(b, "sessionlb_session_moves_total").await;
    assert_eq!(moves, 0.0, "nothing moved");
    // C comes back (same address, same row): the key is its own backend's again, through every node.
    let spec = c.nodes[2].spec.clone();
    c.nodes[2] = c.fx.spawn(&spec);
    c.nodes[2].wait_healthy().await;
    for (node, name) in c.nodes.iter().zip(NAMES) {
        let url = node.url(&path);
        eventually(Duration::from_secs(15), &format!("the key served by C through {name}"), || {
            let url = url.clone();
            async move {
                let reply = Browser::new().get(&url).await;
                if reply.status == 503 {
                    held(&reply);
                    return None;
                }
                assert_eq!((reply.status, reply.backend()), (200, Some("C")), "{reply:?}");
                Some(())
            }
        })
        .await;
    }
    assert_eq!(c.registry.get_session(&key).await.unwrap().unwrap().node_id, Some(c_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_key_is_re_placed_once_backend_key_failover_after_has_passed() {
    let mut c = Cluster::start(ClusterOptions {
        extra: format!("health-check-interval = \"500ms\"\nbackend-key-failover-after = \"2s\"\n{TRUST_LOOPBACK}"),
        ..Default::default()
    })
    .await;
    let (key, c_id) = key_on_c(&c).await;
    let path = format!("/s/{key}/");
    let killed = Instant::now();
    c.nodes[2].proc.kill();
    let mut retries = 0;
    let reply = loop {
        let reply = Browser::new().get(&c.nodes[0].url(&path)).await;
        if reply.status != 503 {
            break reply;
        }
        held(&reply);
        retries += 1;
        assert!(killed.elapsed() < Duration::from_secs(30), "the key was never re-placed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Re-placed: served by a surviving node (whose backend does not know
    // the key), not before the delay, and the registry row moved.
    assert!(retries >= 1, "the key was held before it moved");
    assert!(killed.elapsed() >= Duration::from_secs(2), "moved after {:?}", killed.elapsed());
    assert!(matches!(reply.backend(), Some("A") | Some("B")), "{reply:?}");
    let row = c.registry.get_session(&key).await.unwrap().unwrap();
    assert!(row.node_id.is_some_and(|n| n != c_id), "the row moved: {row:?}");
    let text = reqwest::get(c.nodes[0].url("/metrics")).await.unwrap().text().await.unwrap();
    let moved = ["unreachable", "connect_failure"]
        .iter()
        .map(|r| crate::common::cluster::metric_sum(&text, &format!("sessionlb_session_moves_total{{reason=\"{r}\"}}")))
        .sum::<f64>();
    assert_eq!(moved, 1.0, "one move, counted with its reason:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backend_keys_are_registered_only_when_the_backend_answered_2xx_or_101() {
    // `/status/<code>` of the demo backend answers with that status: as
    // the session path, its code is the key.
    let c = Cluster::start(ClusterOptions {
        extra: "[sessions]\nsession-path-pattern = \"/status/{key}\"\n".into(),
        ..Default::default()
    })
    .await;
    for code in [200, 204, 302, 404, 500, 503] {
        let reply = Browser::new().get(&c.nodes[0].url(&format!("/status/{code}"))).await;
        assert_eq!(reply.status, code, "{reply:?}");
    }
    let registered = |key: &'static str| {
        let registry = c.registry.clone();
        async move { registry.get_session(key).await.unwrap() }
    };
    for key in ["200", "204"] {
        eventually(Duration::from_secs(10), &format!("key {key} registered"), || async {
            registered(key).await.map(|_| ())
        })
        .await;
    }
    for key in ["302", "404", "500", "503"] {
        assert!(registered(key).await.is_none(), "a {key} answer registered its key");
    }
    assert_eq!(c.metric_all("sessionlb_backend_keys_registered_total").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_key_first_opened_as_a_websocket_is_registered_by_the_101() {
    let c = Cluster::start(ClusterOptions { extra: TRUST_LOOPBACK.into(), ..Default::default() }).await;
    let mut user = session_on(&c, 1).await;
    let minted: serde_json::Value =
        serde_json::from_str(&user.get(&c.nodes[0].url("/new-session")).await.body).unwrap();
    let key = minted["key"].as_str().unwrap().to_string();
    assert!(c.registry.get_session(&key).await.unwrap().is_none(), "minting registers nothing");
    // Only a WebSocket to the key, through C (forwarded to B, whose backend answers 101).
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{}/s/{key}/ws", c.nodes[2].address()).into_client_request().unwrap();
    request.headers_mut().insert("x-forwarded-user", user.user.clone().unwrap().parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(resp.status(), 101);
    use futures::StreamExt;
    let hello = ws.next().await.unwrap().unwrap();
    assert_eq!(hello.to_text().unwrap(), "hello from B");
    let b_id = c.node_id(1).await;
    let registry = c.registry.clone();
    eventually(Duration::from_secs(10), "the key registered on B by its 101", || {
        let (registry, key) = (registry.clone(), key.clone());
        async move { registry.get_session(&key).await.ok()?.filter(|s| s.node_id == Some(b_id)).map(|_| ()) }
    })
    .await;
}

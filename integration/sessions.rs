//! Issue 4: session activity — requests and open tunnels keep a session
//! active; `session-idle-timeout` ends the others; a user whose session
//! ended is placed again on their next request.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::common::cluster::{Browser, Cluster, ClusterOptions, TRUST_LOOPBACK};
use crate::common::eventually;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sessions_end_while_busy_ones_and_open_tunnels_stay() {
    let c = Cluster::start(ClusterOptions {
        extra: format!("{TRUST_LOOPBACK}\n[sessions]\nsession-idle-timeout = \"2s\"\ntouch-interval = \"200ms\"\n"),
        ..Default::default()
    })
    .await;

    let mut idle = Browser::as_user("idle");
    assert_eq!(idle.get(&c.nodes[0].url("/")).await.status, 200);
    let mut busy = Browser::as_user("busy");
    assert_eq!(busy.get(&c.nodes[1].url("/")).await.status, 200);
    let mut tunnel = Browser::as_user("tunnel");
    assert_eq!(tunnel.get(&c.nodes[2].url("/")).await.status, 200);
    let (idle_key, busy_key, tunnel_key) = (idle.user_key(), busy.user_key(), tunnel.user_key());
    for k in [&idle_key, &busy_key, &tunnel_key] {
        assert!(c.registry.get_session(k).await.unwrap().is_some());
    }

    // An open WebSocket (through a node that may not own the session), silent throughout.
    let mut ws = tunnel.websocket(&c.nodes[0]).await;
    assert!(matches!(ws.next().await, Some(Ok(Message::Text(_)))));

    // Five seconds: `busy` keeps asking, `idle` says nothing.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        assert_eq!(
            busy.get(&c.nodes[(started.elapsed().as_millis() / 500 % 3) as usize].url("/poll")).await.status,
            200
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    eventually(Duration::from_secs(5), "the idle session to end", || async {
        c.registry.get_session(&idle_key).await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(c.registry.get_session(&busy_key).await.unwrap().is_some(), "a session in use was ended");
    assert!(c.registry.get_session(&tunnel_key).await.unwrap().is_some(), "a session with an open tunnel was ended");

    // The tunnel still works; the idle user is placed again.
    ws.send(Message::Text("still here".into())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("still here".into()));
    let again = idle.get(&c.nodes[1].url("/")).await;
    assert_eq!(again.status, 200);
    assert!(c.registry.get_session(&idle_key).await.unwrap().is_some(), "placed again on its next request");
}

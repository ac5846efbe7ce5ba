//! Connection-level limits against slow or too many clients (slowloris):
//! the cap on open client connections (`max-connections`) and the deadline
//! for request heads (`request-header-timeout`). The idle deadline for
//! request bodies is Pingora's downstream read timeout, set per request by
//! the proxy (`request-body-idle-timeout`; tunnels have none).
//!
//! [`Limited`] wraps Pingora's HTTP application: each accepted connection
//! takes a slot (or gets a 503 and is closed) and is watched by a
//! [`Watch`]. A connection waiting for a request head has a deadline; the
//! proxy clears it when a head has arrived ([`request_started`], from
//! `early_request_filter`) and sets it again when the last request in
//! progress ends ([`request_finished`], from `logging`): the next head must
//! then arrive within Pingora's 60 s keep-alive plus the deadline. A
//! connection past its deadline is dropped (closed) and counted; nothing is
//! logged above debug, as for any client that hangs up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
// Tokio's clock: deadlines are slept on, and tests pause it.
use tokio::time::Instant;

use crate::metrics::METRICS;

/// Pingora's keep-alive wait between requests on a connection.
pub const KEEPALIVE: Duration = Duration::from_secs(60);

/// What the limits are.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// One connection's head deadline.
pub struct Watch {
    state: Mutex<WatchState>,
    changed: Notify,
    header_timeout: Duration,
}

struct WatchState {
    /// Requests in progress (more than one only with HTTP/2).
    active: usize,
    /// When the next request head must have arrived; `None` while a request is in progress.
    deadline: Option<Instant>,
}

impl Watch {
    fn new(header_timeout: Duration, now: Instant) -> Watch {
        Watch {
            state: Mutex::new(WatchState { active: 0, deadline: Some(now + header_timeout) }),
            changed: Notify::new(),
            header_timeout,
        }
    }

    /// A request head arrived: no deadline while it is served.
    pub fn started(&self) {
        let mut s = self.state.lock();
        s.active += 1;
        s.deadline = None;
        drop(s);
        self.changed.notify_one();
    }

    /// A request ended: the next head is due after the keep-alive wait.
    pub fn finished(&self, now: Instant) {
        let mut s = self.state.lock();
        s.active = s.active.saturating_sub(1);
        if s.active == 0 {
            s.deadline = Some(now + KEEPALIVE + self.header_timeout);
        }
        drop(s);
        self.changed.notify_one();
    }

    /// Resolves when the deadline passes without a head.
    pub async fn expired(&self) {
        loop {
            let deadline = self.state.lock().deadline;
            match deadline {
                None => self.changed.notified().await,
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {
                            if self.state.lock().deadline.is_some_and(|d| d <= Instant::now()) {
                                return;
                            }
                        }
                        _ = self.changed.notified() => {}
                    }
                }
            }
        }
    }
}

type ConnKey = (SocketAddr, SocketAddr);

/// Watches of open connections, by (client, local) address.
static WATCHES: LazyLock<Mutex<HashMap<ConnKey, Arc<Watch>>>> = LazyLock::new(Default::default);

/// The watch of the connection a request came on, if it is watched.
pub fn watch_of(client: Option<&SocketAddr>, local: Option<&SocketAddr>) -> Option<Arc<Watch>> {
    let key = (*client?, *local?);
    WATCHES.lock().get(&key).cloned()
}

/// A head arrived on the connection `(client, local)`; returns its watch
/// for [`request_finished`].
pub fn request_started(client: Option<&SocketAddr>, local: Option<&SocketAddr>) -> Option<Arc<Watch>> {
    let watch = watch_of(client, local)?;
    watch.started();
    Some(watch)
}

/// The request that [`request_started`] reported ended.
pub fn request_finished(watch: &Watch) {
    watch.finished(Instant::now());
}

/// Open connections (the gauge `sessionlb_connections_open`).
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// A slot among `max-connections`, given back on drop.
struct Slot;

impl Slot {
    fn take(max: usize) -> Option<Slot> {
        let before = OPEN.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            OPEN.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        METRICS.connections_open.inc();
        Some(Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::AcqRel);
        METRICS.connections_open.dec();
    }
}

/// Removes a connection's watch when it ends.
struct Registered(Option<ConnKey>);

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(key) = self.0 {
            WATCHES.lock().remove(&key);
        }
    }
}

/// Pingora's HTTP application `A` behind the connection limits.
pub struct Limited<A> {
    inner: Arc<A>,
    limits: Limits,
}

impl<A> Limited<A> {
    pub fn new(inner: A, limits: Limits) -> Limited<A> {
        Limited { inner: Arc::new(inner), limits }
    }
}

const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
content-length: 44\r\nretry-after: 1\r\nconnection: close\r\n\r\nthis node has too many open connections now\n";

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Limited<A> {
    async fn process_new(self: &Arc<Self>, mut stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let Some(_slot) = Slot::take(self.limits.max_connections) else {
            METRICS.connections_refused.inc();
            tracing::debug!(max = self.limits.max_connections, "max-connections reached: refusing a connection");
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = stream.write_all(REFUSAL).await;
                let _ = stream.flush().await;
            })
            .await;
            return None;
        };
        let key = stream.get_socket_digest().and_then(|d| {
            let peer = *d.peer_addr()?.as_inet()?;
            let local = *d.local_addr()?.as_inet()?;
            Some((peer, local))
        });
        let watch = Arc::new(Watch::new(self.limits.header_timeout, Instant::now()));
        let _registered = Registered(key.inspect(|k| {
            WATCHES.lock().insert(*k, watch.clone());
        }));
        tokio::select! {
            reused = self.inner.process_new(stream, shutdown) => reused,
            _ = watch.expired() => {
                METRICS.request_header_timeouts.inc();
                tracing::debug!(client = ?key.map(|k| k.0), "request head not received within request-header-timeout; closing the connection");
                None
            }
        }
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_head_must_arrive_before_the_deadline_and_requests_in_progress_have_none() {
        let t0 = Instant::now();
        let w = Arc::new(Watch::new(Duration::from_secs(10), t0));
        // No head: expires at the deadline.
        let expired = tokio::time::timeout(Duration::from_secs(11), w.expired()).await;
        assert!(expired.is_ok());

        let w = Arc::new(Watch::new(Duration::from_secs(10), Instant::now()));
        w.started();
        // A request in progress (a long poll, a tunnel) never expires.
        assert!(tokio::time::timeout(Duration::from_secs(3600), w.expired()).await.is_err());
        // Two in progress (HTTP/2): the first ending sets no deadline.
        w.started();
        w.finished(Instant::now());
        assert!(tokio::time::timeout(Duration::from_secs(3600), w.expired()).await.is_err());
        // The last ending: the keep-alive wait plus the deadline.
        w.finished(Instant::now());
        assert!(tokio::time::timeout(Duration::from_secs(69), w.expired()).await.is_err());
        assert!(tokio::time::timeout(Duration::from_secs(2), w.expired()).await.is_ok());
    }

    #[test]
    fn slots_are_capped_and_given_back() {
        let base = OPEN.load(Ordering::Acquire);
        let a = Slot::take(base + 2).unwrap();
        let b = Slot::take(base + 2).unwrap();
        assert!(Slot::take(base + 2).is_none());
        drop(a);
        let c = Slot::take(base + 2).unwrap();
        drop((b, c));
        assert_eq!(OPEN.load(Ordering::Acquire), base);
    }
}

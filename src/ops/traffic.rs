//! Per-request accounting for operations: how long a proxied request took,
//! how long its upstream took to connect and to answer, which upgraded
//! connections (tunnels) are open, and how many proxied requests are in
//! progress — what a drain waits for.
//!
//! Each proxied request carries one [`RequestTiming`] in its context; the
//! proxy phases call one method each. Counts are released on drop, so a
//! request that ends on any path (error, client gone) is never left counted.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use pingora::http::RequestHeader;

use crate::metrics::{self, METRICS};

/// Proxied requests in progress through this node, tunnels included.
static IN_PROGRESS: AtomicI64 = AtomicI64::new(0);

/// Proxied requests (and tunnels) in progress through this node.
pub fn in_progress() -> i64 {
    IN_PROGRESS.load(Ordering::Relaxed)
}

/// Kinds of `sessionlb_open_tunnels`.
const TUNNEL_KINDS: [&str; 2] = ["websocket", "other"];

/// Timing and accounting of one proxied request.
#[derive(Debug, Default)]
pub struct RequestTiming {
    started: Option<Instant>,
    connecting: Option<Instant>,
    sent: Option<Instant>,
    /// Index in [`metrics::UPSTREAMS`] of the current attempt.
    upstream: usize,
    /// Index in [`TUNNEL_KINDS`] once the response switched protocols.
    tunnel: Option<usize>,
}

impl RequestTiming {
    /// A proxied request starts (after the built-in endpoints).
    pub fn start(&mut self) {
        if self.started.is_none() {
            self.started = Some(Instant::now());
            IN_PROGRESS.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An upstream was chosen: `backend` (this node's) or a peer node.
    pub fn connecting(&mut self, backend: bool) {
        self.connecting = Some(Instant::now());
        self.upstream = if backend { 0 } else { 1 };
    }

    /// The upstream connection is ready; a reused one cost no connect.
    pub fn connected(&mut self, reused: bool) {
        let now = Instant::now();
        if let Some(t) = self.connecting.take()
            && !reused
        {
            metrics::observe_connect(self.upstream, (now - t).as_secs_f64());
        }
        self.sent = Some(now);
    }

    /// The upstream's response head arrived.
    pub fn first_byte(&mut self) {
        if let Some(t) = self.sent.take() {
            metrics::observe_ttfb(self.upstream, t.elapsed().as_secs_f64());
        }
    }

    /// The response head goes to the client: a 101 opens a tunnel.
    pub fn responding(&mut self, status: u16, req: &RequestHeader) {
        if status != 101 || self.tunnel.is_some() {
            return;
        }
        let websocket =
            req.headers.get(http::header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        let kind = if websocket { 0 } else { 1 };
        METRICS.open_tunnels.with_label_values(&[TUNNEL_KINDS[kind]]).inc();
        self.tunnel = Some(kind);
    }

    /// The request ended: record its duration (tunnels are not requests in
    /// this sense: their lifetime would swamp the histogram).
    /// `route` indexes [`metrics::ROUTES`].
    pub fn finish(&self, route: usize, status: u16) {
        if let (Some(t), None) = (self.started, self.tunnel) {
            metrics::observe_request(route, status, t.elapsed().as_secs_f64());
        }
    }
}

impl Drop for RequestTiming {
    fn drop(&mut self) {
        if self.started.is_some() {
            IN_PROGRESS.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(kind) = self.tunnel {
            METRICS.open_tunnels.with_label_values(&[TUNNEL_KINDS[kind]]).dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnels_and_requests_are_released_on_drop() {
        let tunnels = || METRICS.open_tunnels.with_label_values(&["websocket"]).get();
        let before = (in_progress(), tunnels());
        let mut req = RequestHeader::build("GET", b"/ws", None).unwrap();
        req.insert_header("upgrade", "WebSocket").unwrap();
        let mut t = RequestTiming::default();
        t.start();
        t.start();
        t.responding(101, &req);
        t.responding(101, &req);
        assert_eq!((in_progress(), tunnels()), (before.0 + 1, before.1 + 1), "counted once");
        drop(t);
        assert_eq!((in_progress(), tunnels()), before);
    }
}

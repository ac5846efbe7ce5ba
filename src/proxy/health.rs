//! Active health: every `health-check-interval` this node probes each
//! online peer's `/health` and its own backend (a TCP connect). A peer is
//! marked unreachable after two failed probes in a row and reachable again
//! after one success; passive failures (connect errors in the data path)
//! mark it at once. Runs on the control runtime.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use crate::cluster::{ClusterView, NodeId, NodeStatus};
use crate::metrics::METRICS;

/// Consecutive failed probes before a peer is marked unreachable.
pub const FAILURES_TO_MARK_DOWN: u32 = 2;

/// The prober's inputs.
pub struct Prober {
    pub view: Arc<ClusterView>,
    pub http: reqwest::Client,
    pub backend: Option<SocketAddr>,
    pub backend_up: Arc<AtomicBool>,
    pub interval: Duration,
    pub timeout: Duration,
    pub tls: bool,
}

impl Prober {
    /// Probe until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut failures: HashMap<NodeId, u32> = HashMap::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = shutdown.changed() => return,
            }
            self.probe_backend().await;
            self.probe_peers(&mut failures).await;
            self.export_gauges();
        }
    }

    async fn probe_backend(&self) {
        let Some(addr) = self.backend else { return };
        let up = matches!(tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(addr)).await, Ok(Ok(_)));
        let was = self.backend_up.swap(up, Ordering::Relaxed);
        if was != up {
            if up {
                tracing::info!(backend = %addr, "local backend is up again");
            } else {
                tracing::warn!(backend = %addr, "local backend is down: this node takes no new sessions and its sessions fail over");
            }
        }
    }

    async fn probe_peers(&self, failures: &mut HashMap<NodeId, u32>) {
        let nodes = self.view.nodes();
        let scheme = if self.tls { "https" } else { "http" };
        let mut probes = Vec::new();
        for n in
            nodes.nodes.iter().filter(|n| n.id != self.view.self_id() && n.status == NodeStatus::Online && !n.router)
        {
            let Some(addr) = n.socket_addr() else { continue };
            let request = self.http.get(format!("{scheme}://{addr}/health")).timeout(self.timeout);
            let id = n.id;
            probes.push(
                async move { (id, addr, matches!(request.send().await, Ok(resp) if resp.status().is_success())) },
            );
        }
        for (id, addr, ok) in futures::future::join_all(probes).await {
            if ok {
                failures.remove(&id);
                if self.view.mark_reachable(id) {
                    tracing::info!(node_id = id, %addr, "node reachable again");
                }
            } else {
                let n = failures.entry(id).or_default();
                *n += 1;
                if *n >= FAILURES_TO_MARK_DOWN && self.view.mark_unreachable(id) {
                    tracing::warn!(node_id = id, %addr, "node unreachable (health probes failed); its sessions move on their next request");
                }
            }
        }
        failures.retain(|id, _| nodes.get(*id).is_some());
    }

    fn export_gauges(&self) {
        let counts = self.view.session_counts();
        for n in &self.view.nodes().nodes {
            let label = n.address();
            let up = n.status == NodeStatus::Online && self.view.is_reachable(n.id);
            METRICS.node_up.with_label_values(&[&label]).set(i64::from(up));
            METRICS.node_sessions.with_label_values(&[&label]).set(counts.get(&n.id).copied().unwrap_or(0) as i64);
        }
    }
}

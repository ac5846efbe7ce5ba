//! Drain on stop (`drain-timeout`): before a node stops on SIGTERM it
//! enters offline mode (peers place no new sessions on it), answers
//! `/health` with 503 (an outer load balancer rotates it out) and keeps
//! serving — its sessions, and forwarding — until no proxied request or
//! tunnel is in progress, or `drain-timeout` passes. Only then is it marked
//! `Offline` and do its listeners close.
//!
//! Offline mode is an admin flag that outlives restarts; the drain restores
//! it to what it was once the node is `Offline`. A marker file in `run-dir`
//! remembers a drain in progress, so that a node killed mid-drain clears the
//! offline mode it set when it starts again.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::cluster::{ClusterView, NodeId, Registry, RegistryError};
use crate::metrics::METRICS;

static DRAINING: AtomicBool = AtomicBool::new(false);

/// Whether this node is draining (its `/health` then answers 503).
pub fn is_draining() -> bool {
    DRAINING.load(Ordering::Relaxed)
}

/// How often the drain looks at what is still in progress.
const POLL: Duration = Duration::from_millis(100);

/// One node's drain.
pub struct Drain {
    pub registry: std::sync::Arc<dyn Registry>,
    pub view: std::sync::Arc<ClusterView>,
    pub node_id: NodeId,
    pub timeout: Duration,
    /// The marker file (see the module doc).
    pub marker: PathBuf,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainEnd {
    /// Nothing was left in progress.
    Idle,
    /// `drain-timeout` passed with this many requests and tunnels left.
    TimedOut(i64),
    /// Cut short (a second signal).
    Interrupted,
}

impl Drain {
    /// Enter offline mode and start answering `/health` with 503. Returns
    /// whether this drain set offline mode (and must clear it at the end).
    pub async fn begin(&self) -> bool {
        DRAINING.store(true, Ordering::Relaxed);
        METRICS.draining.set(1);
        let already = match self.registry.get_node(self.node_id).await {
            Ok(Some(n)) => n.offline_mode,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this node's offline mode; draining without it");
                return false;
            }
        };
        if already {
            return false;
        }
        if let Err(e) = std::fs::write(&self.marker, self.node_id.to_string()) {
            tracing::warn!(error = %e, file = %self.marker.display(), "cannot write the drain marker");
        }
        match self.registry.set_offline_mode(self.node_id, true).await {
            Ok(()) => {
                self.view.set_offline_mode_locally(self.node_id, true);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot enter offline mode; peers may still place new sessions here");
                let _ = std::fs::remove_file(&self.marker);
                false
            }
        }
    }

    /// Wait until nothing is in progress, `drain-timeout` passes or
    /// `interrupt` completes.
    pub async fn wait(&self, interrupt: impl std::future::Future<Output = ()>) -> DrainEnd {
        let deadline = Instant::now() + self.timeout;
        tokio::pin!(interrupt);
        loop {
            let left = super::traffic::in_progress();
            if left <= 0 {
                return DrainEnd::Idle;
            }
            if Instant::now() >= deadline {
                return DrainEnd::TimedOut(left);
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = &mut interrupt => return DrainEnd::Interrupted,
            }
        }
    }

    /// After the node was marked `Offline`: clear the offline mode this drain set.
    pub async fn end(&self, set_offline_mode: bool) {
        if set_offline_mode {
            match self.registry.set_offline_mode(self.node_id, false).await {
                Ok(()) | Err(RegistryError::NodeNotFound(_)) => {
                    let _ = std::fs::remove_file(&self.marker);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot clear the offline mode set for the drain; it is cleared when the node starts again")
                }
            }
        }
    }
}

/// At start: if a drain was cut short (the process died while draining),
/// clear the offline mode it set.
pub async fn clear_interrupted(registry: &dyn Registry, node_id: NodeId, marker: &std::path::Path) {
    let Ok(text) = std::fs::read_to_string(marker) else { return };
    if text.trim() != node_id.to_string() {
        let _ = std::fs::remove_file(marker);
        return;
    }
    match registry.set_offline_mode(node_id, false).await {
        Ok(()) => {
            tracing::warn!("an earlier drain of this node was cut short: clearing the offline mode it had set");
            let _ = std::fs::remove_file(marker);
        }
        Err(e) => tracing::warn!(error = %e, "cannot clear the offline mode an interrupted drain left"),
    }
}

//! Verified users placed from memory while the registry was unavailable.
//!
//! A registry outage must not lock new users out: a verified user who must
//! be placed while placements fail is pinned from memory instead (the
//! balancer's [`choose_now`](crate::balancer::Balancer::choose_now) with the
//! user name), served at once, and remembered here so that the user's next
//! requests through this node go to the same node. [`register_pending`]
//! writes each remembered user's session when the registry answers again,
//! insert-if-absent: if another node registered the user meanwhile, the
//! earlier record wins, reaches the view, and the user's next request follows
//! it (and the browser's pin with it).
//!
//! Bounded: at most [`CAPACITY`] users are remembered; past that a user is
//! still served from memory, just not remembered (the next request chooses
//! again, the same way, from the same view).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::cluster::{ClusterView, NewSession, NodeId, Registry, SessionKind, user_session_key};
use crate::metrics::METRICS;

/// Users remembered at most.
pub const CAPACITY: usize = 10_000;
/// How often remembered users are written while some are waiting.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Users placed from memory, not yet registered: user → node.
#[derive(Debug, Default)]
pub struct DegradedPlacements {
    pending: Mutex<HashMap<String, NodeId>>,
}

impl DegradedPlacements {
    /// The node `user` was placed on from memory, if still waiting.
    pub fn node_of(&self, user: &str) -> Option<NodeId> {
        self.pending.lock().get(user).copied()
    }

    /// Remember (or replace) `user`'s node; false when full (not remembered).
    pub fn remember(&self, user: &str, node: NodeId) -> bool {
        let mut pending = self.pending.lock();
        let kept = if let Some(slot) = pending.get_mut(user) {
            *slot = node;
            true
        } else if pending.len() < CAPACITY {
            pending.insert(user.to_string(), node);
            true
        } else {
            false
        };
        METRICS.degraded_pending.set(pending.len() as i64);
        kept
    }

    pub fn len(&self) -> usize {
        self.pending.lock().len()
    }

    /// Users waiting per node (they count as sessions when the next user is
    /// placed from memory, as they would once registered).
    pub fn per_node(&self) -> HashMap<NodeId, usize> {
        let mut counts = HashMap::new();
        for node in self.pending.lock().values() {
            *counts.entry(*node).or_default() += 1;
        }
        counts
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forget `user` if it is still remembered on `node`.
    fn forget(&self, user: &str, node: NodeId) {
        let mut pending = self.pending.lock();
        if pending.get(user) == Some(&node) {
            pending.remove(user);
        }
        METRICS.degraded_pending.set(pending.len() as i64);
    }
}

/// Write every remembered user's session (insert-if-absent) and put what the
/// registry now holds into the view. Stops at the first failure (the
/// registry is still away); returns how many were written or superseded.
pub async fn register_pending(
    degraded: &DegradedPlacements,
    registry: &dyn Registry,
    view: &ClusterView,
    call_wait: Duration,
) -> usize {
    let pending: Vec<(String, NodeId)> = degraded.pending.lock().iter().map(|(u, n)| (u.clone(), *n)).collect();
    let mut done = 0;
    for (user, node) in pending {
        let key = user_session_key(&user);
        let session = NewSession { key: &key, node_id: node, user_name: Some(&user), kind: SessionKind::User };
        match tokio::time::timeout(call_wait, registry.place_session(&session)).await {
            Ok(Ok(rec)) => {
                if rec.node_id == Some(node) {
                    tracing::info!(user, node, "user placed during the registry outage is now registered");
                } else {
                    tracing::info!(
                        user,
                        node,
                        registered_on = ?rec.node_id,
                        "user placed during the registry outage was registered by another node meanwhile; its browsers follow that record"
                    );
                }
                view.upsert_session(rec);
                degraded.forget(&user, node);
                done += 1;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, waiting = degraded.len(), "registry still unavailable; users placed from memory wait");
                break;
            }
            Err(_) => {
                tracing::debug!(waiting = degraded.len(), "registry still slow; users placed from memory wait");
                break;
            }
        }
    }
    done
}

/// Run [`register_pending`] every [`RETRY_EVERY`] until `shutdown`.
pub async fn run(
    degraded: Arc<DegradedPlacements>,
    registry: Arc<dyn Registry>,
    view: Arc<ClusterView>,
    call_wait: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RETRY_EVERY) => {}
            _ = shutdown.changed() => return,
        }
        if !degraded.is_empty() {
            register_pending(&degraded, registry.as_ref(), &view, call_wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{NodeRegistration, NodeStatus};

    #[test]
    fn remembers_replaces_and_is_bounded() {
        let d = DegradedPlacements::default();
        assert!(d.remember("ann", 1));
        assert!(d.remember("ann", 2), "replaced after a failover");
        assert_eq!(d.node_of("ann"), Some(2));
        for i in 1..CAPACITY {
            assert!(d.remember(&format!("u{i}"), 1));
        }
        assert!(!d.remember("one-too-many", 1));
        assert_eq!(d.node_of("one-too-many"), None);
        assert!(d.remember("ann", 3), "a remembered user is still updated when full");
        d.forget("ann", 2);
        assert_eq!(d.node_of("ann"), Some(3), "only forgotten on the node it was written for");
    }

    #[tokio::test]
    async fn pending_users_are_registered_and_the_earlier_record_wins() {
        let dir = tempfile::tempdir().unwrap();
        let registry = crate::cluster::connect(
            &crate::config::DatabaseUrl::Sqlite(dir.path().join("r.db")),
            Duration::from_millis(50),
        )
        .await
        .unwrap();
        let mut ids = Vec::new();
        for host in ["a", "b"] {
            let reg = NodeRegistration { host: host.into(), port: 1, router: false, version: String::new() };
            let id = registry.register_node(&reg).await.unwrap();
            registry.set_node_status(id, NodeStatus::Online).await.unwrap();
            ids.push(id);
        }
        // Another node registered bob on b while this one had him on a.
        registry
            .place_session(&NewSession {
                key: "user:bob",
                node_id: ids[1],
                user_name: Some("bob"),
                kind: SessionKind::User,
            })
            .await
            .unwrap();
        let view = ClusterView::new(ids[0]);
        let d = DegradedPlacements::default();
        d.remember("ann", ids[0]);
        d.remember("bob", ids[0]);
        assert_eq!(register_pending(&d, registry.as_ref(), &view, Duration::from_secs(5)).await, 2);
        assert!(d.is_empty());
        assert_eq!(registry.get_session("user:ann").await.unwrap().unwrap().node_id, Some(ids[0]));
        assert_eq!(view.session("user:ann").unwrap().record.node_id, Some(ids[0]));
        assert_eq!(view.session("user:bob").unwrap().record.node_id, Some(ids[1]), "the earlier record wins");
        assert_eq!(registry.get_session("user:bob").await.unwrap().unwrap().node_id, Some(ids[1]));

        // While the registry is away nothing is lost.
        d.remember("cid", ids[1]);
        registry.close().await;
        assert_eq!(register_pending(&d, registry.as_ref(), &view, Duration::from_secs(5)).await, 0);
        assert_eq!(d.node_of("cid"), Some(ids[1]));
    }
}

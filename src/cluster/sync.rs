//! Keeping the [`ClusterView`] fresh: load a full snapshot, then apply
//! registry notifications, gathered over [`COALESCE_WINDOW`] and applied in
//! batches. Node and cluster changes reload the (small) node table; session
//! changes apply as deltas (one row or one statement's rows each); a
//! `Resync` (lost connection, pruned log) reloads everything, retrying
//! until the database answers.
//! Nodes' measurements (load reports, check-ins) are not announced: the node
//! table (only it: the cluster record's changes are announced) is re-read on
//! a fixed period for them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::model::{ChangeEvent, NodeStatus};
use super::registry::{ChangeStream, Registry, Result};
use super::view::{ClusterView, NodeChanges, SessionChange};

/// Batches of change notifications are applied at most once per this
/// period: at 200 placements/s a notification arrives every 5 ms, and the
/// window turns one wake-up and one write lock per change into one per
/// window, for at most this much more notification lag. Changes further
/// apart than the window apply as they come.
pub const COALESCE_WINDOW: Duration = Duration::from_millis(10);

/// Most notifications applied in one batch.
const MAX_BATCH: usize = 4096;

/// Load nodes, sessions and the cluster record into the view.
pub async fn load_snapshot(registry: &dyn Registry, view: &ClusterView) -> Result<NodeChanges> {
    let nodes = registry.list_nodes().await?;
    view.begin_snapshot();
    let sessions = registry.list_sessions().await?;
    let cluster = registry.cluster().await?;
    let changes = view.set_nodes(nodes);
    view.set_sessions(sessions);
    view.set_cluster(cluster);
    Ok(changes)
}

async fn reload_nodes(registry: &dyn Registry, view: &ClusterView) -> Result<NodeChanges> {
    let nodes = registry.list_nodes().await?;
    let cluster = registry.cluster().await?;
    view.set_cluster(cluster);
    Ok(view.set_nodes(nodes))
}

/// The periodic re-read: node measurements only (the cluster record's
/// changes are announced).
async fn reread_measurements(registry: &dyn Registry, view: &ClusterView) -> Result<NodeChanges> {
    Ok(view.set_nodes(registry.list_nodes().await?))
}

/// Follow notifications until `shutdown` turns true, and re-read the node
/// table every `measurements_every` (load reports and check-ins are not
/// announced). Sends `true` on `self_deleted` when this node's row disappears.
pub async fn follow(
    registry: Arc<dyn Registry>,
    view: Arc<ClusterView>,
    mut changes: ChangeStream,
    measurements_every: Duration,
    self_deleted: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut measurements = tokio::time::interval(measurements_every);
    measurements.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    measurements.reset();
    let mut last_batch =
        tokio::time::Instant::now().checked_sub(COALESCE_WINDOW).unwrap_or_else(tokio::time::Instant::now);
    loop {
        let first = tokio::select! {
            ev = changes.recv() => match ev {
                Some(ev) => ev,
                None => {
                    tracing::error!("registry notification stream ended");
                    return;
                }
            },
            _ = measurements.tick() => {
                match reread_measurements(registry.as_ref(), &view).await {
                    Ok(c) => report(&view, &c, &self_deleted),
                    Err(e) => tracing::debug!(error = %e, "re-reading node measurements failed"),
                }
                continue;
            }
            _ = shutdown.changed() => return,
        };
        // Coalesce a burst: a change that comes within COALESCE_WINDOW of
        // the last batch waits out the rest of the window (sleeping, not
        // woken by each notification), then everything that arrived
        // meanwhile is applied together. An isolated change applies at once.
        // One node reload serves many node events, one write lock many sessions.
        let since = last_batch.elapsed();
        if first != ChangeEvent::Resync && since < COALESCE_WINDOW {
            tokio::select! {
                _ = tokio::time::sleep(COALESCE_WINDOW - since) => {},
                _ = shutdown.changed() => return,
            }
        }
        last_batch = tokio::time::Instant::now();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH
            && let Ok(ev) = changes.try_recv()
        {
            batch.push(ev);
        }
        let resync = batch.contains(&ChangeEvent::Resync);
        let nodes_changed = batch.iter().any(|e| matches!(e, ChangeEvent::Node { .. } | ChangeEvent::Cluster));
        if resync {
            let mut backoff = Duration::from_millis(100);
            let node_changes = loop {
                match load_snapshot(registry.as_ref(), &view).await {
                    Ok(c) => break c,
                    Err(e) => {
                        tracing::warn!(error = %e, "reloading the registry failed; routing continues on the cached view");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {},
                            _ = shutdown.changed() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            tracing::info!(sessions = view.session_count(), "registry reloaded");
            report(&view, &node_changes, &self_deleted);
            continue;
        }
        let mut sessions = Vec::new();
        for ev in batch {
            match ev {
                ChangeEvent::Session(record) => sessions.push(SessionChange::Upsert(record)),
                ChangeEvent::SessionDelete { key } => sessions.push(SessionChange::Remove(key)),
                ChangeEvent::Sessions { s } => sessions.extend(s.into_iter().map(SessionChange::Upsert)),
                ChangeEvent::SessionDeletes { keys } => sessions.extend(keys.into_iter().map(SessionChange::Remove)),
                ChangeEvent::Node { .. } | ChangeEvent::Cluster | ChangeEvent::Resync => {}
            }
        }
        if !sessions.is_empty() {
            view.apply_session_changes(sessions);
        }
        if nodes_changed {
            match reload_nodes(registry.as_ref(), &view).await {
                Ok(c) => report(&view, &c, &self_deleted),
                Err(e) => {
                    tracing::warn!(error = %e, "reloading nodes failed; keeping the cached view")
                }
            }
        }
    }
}

fn report(view: &ClusterView, c: &NodeChanges, self_deleted: &watch::Sender<bool>) {
    for node in &c.joined {
        tracing::info!(node = %node, "node joined the cluster");
    }
    for node in &c.removed {
        tracing::info!(node = %node, "node deleted from the cluster");
    }
    for (node, status) in &c.status_changed {
        match status {
            NodeStatus::Online => tracing::info!(node = %node, "node online"),
            NodeStatus::Offline => tracing::info!(node = %node, "node left the cluster (stopped)"),
            other => tracing::info!(node = %node, status = %other, "node status changed"),
        }
    }
    for (node, offline) in &c.offline_mode_changed {
        if *offline {
            tracing::info!(node = %node, "node entered offline mode: it keeps its sessions and takes no new ones");
        } else {
            tracing::info!(node = %node, "node left offline mode");
        }
    }
    if view.nodes().get(view.self_id()).is_none() {
        tracing::warn!("this node was deleted from the registry");
        let _ = self_deleted.send(true);
    }
}

//! Placing and re-placing sessions, on the control runtime.
//!
//! Under the cross-node lock for the key (shared storage): re-check the
//! registry, choose a node with the balancer, write the placement
//! (insert-if-absent, or a compare-and-set move: the database is the final
//! guard), update the local view, release. A loser of a race uses the
//! winner's placement. When the lock cannot be had in time the placement
//! proceeds on the database guard alone (counted); when the database is down,
//! a known session whose node failed is still routed (unrecorded) and a new
//! one is refused with 503.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::prelude::*;

use super::routing::{check, control_timeout, node_addr};
use super::{RequestCtx, Route, Router, registry_calls, status_error};
use crate::balancer::{Balancer, Candidate, PlacementRequest};
use crate::cluster::view::SessionEntry;
use crate::cluster::{ClusterView, NewSession, NodeId, Registry, RegistryError, SessionKind, SessionRecord};
use crate::lock::LockManager;
use crate::metrics::METRICS;

/// A request fails over at most this many times.
pub const MAX_FAILOVERS: usize = 3;

/// Why a session leaves its node (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveReason {
    /// Its node was deleted (or the session was released).
    Deleted,
    /// Its node is stopped (`Offline`) or otherwise not Online.
    Stopped,
    /// Probes or connects say the node is down.
    Unreachable,
    /// The node is up but its backend is not.
    BackendDown,
    /// A connect to the node failed during this request.
    ConnectFailure,
}

impl MoveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveReason::Deleted => "deleted",
            MoveReason::Stopped => "stopped",
            MoveReason::Unreachable => "unreachable",
            MoveReason::BackendDown => "backend_down",
            MoveReason::ConnectFailure => "connect_failure",
        }
    }
}

/// Everything a placement needs, owned, so it can run on the control runtime.
struct Placer {
    registry: Arc<dyn Registry>,
    view: Arc<ClusterView>,
    balancer: Arc<dyn Balancer>,
    locks: LockManager,
    self_id: NodeId,
    self_serves: bool,
    lock_timeout: Duration,
}

/// What to place.
struct Job {
    key: String,
    kind: SessionKind,
    user: Option<String>,
    /// Nodes not to choose (failed during this request).
    exclude: Vec<NodeId>,
}

#[derive(Debug, thiserror::Error)]
enum PlaceError {
    #[error("no eligible node for a new session")]
    NoNode,
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Placements failed moments ago (the breaker is open): not tried.
    #[error("placements are failing; not tried for a moment")]
    Skipped,
}

impl Placer {
    fn new(r: &Router) -> Placer {
        Placer {
            registry: r.registry.clone(),
            view: r.view.clone(),
            balancer: r.balancer.read().clone(),
            locks: r.locks.clone(),
            self_id: r.self_id,
            self_serves: r.serves_locally(),
            lock_timeout: control_timeout(r),
        }
    }

    /// Eligible nodes for a new session, minus `exclude`.
    fn candidates(&self, exclude: &[NodeId]) -> Vec<Candidate> {
        let counts = self.view.session_counts();
        self.view
            .nodes()
            .nodes
            .iter()
            .filter(|n| {
                self.view.is_eligible(n) && !exclude.contains(&n.id) && (n.id != self.self_id || self.self_serves)
            })
            .map(|n| Candidate {
                id: n.id,
                address: n.address(),
                sessions: counts.get(&n.id).copied().unwrap_or(0),
                load: n.load,
                cpus: n.cpus,
            })
            .collect()
    }

    /// Whether an existing placement can be used as it is.
    fn usable(&self, node: Option<NodeId>, exclude: &[NodeId]) -> bool {
        let Some(id) = node else { return false };
        if exclude.contains(&id) {
            return false;
        }
        if id == self.self_id {
            return self.self_serves;
        }
        self.view.nodes().get(id).is_some_and(|n| self.view.can_serve(n))
    }

    async fn choose(&self, job: &Job, candidates: &[Candidate]) -> Result<NodeId, PlaceError> {
        let req = PlacementRequest { key: &job.key, user: job.user.as_deref(), candidates };
        let choice = self.balancer.choose(&req).await.ok_or(PlaceError::NoNode)?;
        if let Some(why) = &choice.fallback {
            METRICS.balancer_fallbacks.inc();
            tracing::warn!(balancer = self.balancer.name(), reason = %why, "balancer fell back to `sessions`");
        }
        Ok(choice.node)
    }

    /// Lock, re-check, choose, write, release.
    async fn place(&self, job: Job) -> Result<SessionRecord, PlaceError> {
        let started = Instant::now();
        let lock_name = format!("session:{}", job.key);
        let guard = match self.locks.acquire(&lock_name, started + self.lock_timeout).await {
            Ok(g) => {
                METRICS
                    .lock_wait_seconds
                    .with_label_values(&[g.lock_type().as_str()])
                    .observe(g.waited().as_secs_f64());
                Some(g)
            }
            Err(e) => {
                METRICS.lock_failures.inc();
                tracing::warn!(error = %e, key = %job.key, "placing without the shared-storage lock; the registry still guards against duplicates");
                None
            }
        };
        let result = self.place_locked(&job).await;
        if let Some(g) = guard
            && let Err(e) = g.release().await
        {
            tracing::warn!(error = %e, "releasing the placement lock failed");
        }
        METRICS.placement_seconds.observe(started.elapsed().as_secs_f64());
        result
    }

    async fn place_locked(&self, job: &Job) -> Result<SessionRecord, PlaceError> {
        let current = self.registry.get_session(&job.key).await?;
        if let Some(rec) = &current
            && self.usable(rec.node_id, &job.exclude)
        {
            // Placed (or moved) by someone else meanwhile: use it.
            METRICS.placement_races_lost.inc();
            self.view.upsert_session(rec.clone());
            return Ok(rec.clone());
        }
        let candidates = self.candidates(&job.exclude);
        if candidates.is_empty() {
            return Err(PlaceError::NoNode);
        }
        let node = self.choose(job, &candidates).await?;
        let rec = match current {
            None => {
                self.registry
                    .place_session(&NewSession {
                        key: &job.key,
                        node_id: node,
                        user_name: job.user.as_deref(),
                        kind: job.kind,
                    })
                    .await?
            }
            Some(rec) => self.registry.move_session(&job.key, rec.node_id, node).await?,
        };
        if rec.node_id == Some(node) {
            METRICS.placements.with_label_values(&[self.balancer.name()]).inc();
        } else {
            METRICS.placement_races_lost.inc();
        }
        if rec.user_name.is_none()
            && let Some(user) = &job.user
        {
            self.registry.set_session_user(&job.key, user).await?;
        }
        self.view.upsert_session(rec.clone());
        Ok(rec)
    }
}

/// Run `job` on the control runtime.
async fn run(r: &Router, job: Job) -> Result<SessionRecord, PlaceError> {
    let started = registry_calls::mono_ms();
    if r.placements.is_open(started) {
        // The registry failed moments ago: answer now rather than wait it out.
        return Err(PlaceError::Skipped);
    }
    let placer = Placer::new(r);
    let deadline = control_timeout(r) * 2;
    let result = match tokio::time::timeout(deadline, r.control.spawn(async move { placer.place(job).await })).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(PlaceError::Registry(RegistryError::Corrupt(format!("placement task failed: {join}")))),
        Err(_) => Err(PlaceError::Registry(RegistryError::Db(sqlx::Error::PoolTimedOut))),
    };
    match &result {
        Err(PlaceError::Registry(RegistryError::Db(_))) => r.placements.trip(registry_calls::mono_ms()),
        Ok(_) => r.placements.succeeded(started),
        Err(_) => {}
    }
    result
}

/// Set `ctx.route` for `entry` or fail with 503.
fn route_to(r: &Router, ctx: &mut RequestCtx, entry: &SessionEntry) -> Result<()> {
    match check(r, entry) {
        Ok(route) => {
            ctx.route = route;
            Ok(())
        }
        Err(_) => {
            METRICS.no_node_available.inc();
            Err(status_error(503, "the session's node cannot serve it"))
        }
    }
}

fn entry_of(r: &Router, rec: &SessionRecord) -> Arc<SessionEntry> {
    r.view.session(&rec.key).unwrap_or_else(|| {
        r.view.upsert_session(rec.clone());
        r.view.session(&rec.key).expect("just inserted")
    })
}

/// Place a new session under `key`.
pub async fn place_new(r: &Router, ctx: &mut RequestCtx, key: String, kind: SessionKind) -> Result<Arc<SessionEntry>> {
    let job = Job { key, kind, user: ctx.user.clone(), exclude: Vec::new() };
    match run(r, job).await {
        Ok(rec) => {
            let entry = entry_of(r, &rec);
            route_to(r, ctx, &entry)?;
            Ok(entry)
        }
        Err(PlaceError::NoNode) => {
            METRICS.no_node_available.inc();
            Err(status_error(503, "no node can take a new session"))
        }
        Err(PlaceError::Skipped) => {
            // Logged once, when the breaker opened.
            tracing::debug!("new session refused: placements are failing");
            Err(status_error(503, "cannot place a new session: registry unavailable"))
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot place a new session: the registry is unavailable");
            Err(status_error(503, "cannot place a new session: registry unavailable"))
        }
    }
}

/// Re-place a session whose node cannot serve it.
pub async fn replace(
    r: &Router,
    ctx: &mut RequestCtx,
    entry: Arc<SessionEntry>,
    reason: MoveReason,
) -> Result<Arc<SessionEntry>> {
    let job = Job {
        key: entry.record.key.clone(),
        kind: entry.record.kind,
        user: ctx.user.clone().or(entry.record.user_name.clone()),
        exclude: Vec::new(),
    };
    moved(r, ctx, job, entry, reason).await
}

/// After a failure during this request: re-place on the next eligible node.
pub async fn fail_over(r: &Router, ctx: &mut RequestCtx) -> Result<()> {
    let Some(entry) = ctx.entry.clone() else {
        return Err(status_error(503, "no node could take the request"));
    };
    let reason =
        if std::mem::take(&mut ctx.peer_backend_down) { MoveReason::BackendDown } else { MoveReason::ConnectFailure };
    let job = Job {
        key: entry.record.key.clone(),
        kind: entry.record.kind,
        user: ctx.user.clone().or(entry.record.user_name.clone()),
        exclude: ctx.failed.clone(),
    };
    let new_entry = moved(r, ctx, job, entry.clone(), reason).await?;
    // Move the in-flight count to the new entry.
    entry.stream_closed();
    new_entry.stream_opened();
    ctx.entry = Some(new_entry);
    Ok(())
}

async fn moved(
    r: &Router,
    ctx: &mut RequestCtx,
    job: Job,
    old: Arc<SessionEntry>,
    reason: MoveReason,
) -> Result<Arc<SessionEntry>> {
    let from = old.record.node_id;
    let key = job.key.clone();
    let exclude = job.exclude.clone();
    match run(r, job).await {
        Ok(rec) => {
            if rec.node_id != from {
                METRICS.session_moves.with_label_values(&[reason.as_str()]).inc();
                tracing::info!(key = %rec.key, from = ?from, to = ?rec.node_id, reason = reason.as_str(), "session moved");
            }
            let entry = entry_of(r, &rec);
            route_to(r, ctx, &entry)?;
            Ok(entry)
        }
        Err(PlaceError::NoNode) => {
            METRICS.no_node_available.inc();
            Err(status_error(503, "no node can take this session"))
        }
        Err(e) => {
            // The registry is down: route a known session anyway, unrecorded.
            let placer = Placer::new(r);
            let candidates = placer.candidates(&exclude);
            let fallback = Job { key, kind: SessionKind::Affinity, user: ctx.user.clone(), exclude };
            let node = placer
                .choose(&fallback, &candidates)
                .await
                .map_err(|_| status_error(503, "no node can take this session"))?;
            tracing::warn!(error = %e, key = %fallback.key, node, "registry unavailable: routing the session to a new node without recording the move");
            let target = r.view.nodes().get(node).cloned();
            ctx.route = if node == r.self_id {
                Route::Local
            } else {
                match target.as_ref().and_then(node_addr) {
                    Some(addr) => Route::Peer { id: node, addr },
                    None => return Err(status_error(503, "no node can take this session")),
                }
            };
            Ok(old)
        }
    }
}

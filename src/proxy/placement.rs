//! Placing and re-placing registry sessions, on the control runtime.
//!
//! Takes plain facts — the key, its kind, the user, the candidate nodes, the
//! nodes to avoid and why the session moves — and returns the placed entry
//! or a typed [`PlaceError`]; it knows no request. Under the cross-node lock
//! for the key (shared storage): re-check the registry, choose a node with
//! the balancer, write the placement (insert-if-absent, or a compare-and-set
//! move: the database is the final guard), update the local view, release.
//! A loser of a race uses the winner's placement. When the lock cannot be
//! had in time the placement proceeds on the database guard alone (counted).
//!
//! Bounded: every registry call may take [`Placer::registry_wait`] at most
//! (a stopped database fails fast instead of holding the request for the
//! pool's connect timeout), and [`run`] cancels the placement when the
//! request that waits for it goes away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::balancer::{Balancer, Candidate, PlacementRequest};
use crate::cluster::view::SessionEntry;
use crate::cluster::{ClusterView, NewSession, NodeId, Registry, RegistryError, SessionKind, SessionRecord};
use crate::lock::LockManager;
use crate::metrics::METRICS;

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
    /// The node is a router (no backend): it serves no sessions.
    Router,
}

impl MoveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveReason::Deleted => "deleted",
            MoveReason::Stopped => "stopped",
            MoveReason::Unreachable => "unreachable",
            MoveReason::BackendDown => "backend_down",
            MoveReason::ConnectFailure => "connect_failure",
            MoveReason::Router => "router",
        }
    }
}

/// What to place.
#[derive(Debug, Clone)]
pub struct Job {
    /// The registry key (`user:<name>`, a backend key, a legacy `aff:<id>`).
    pub key: String,
    pub kind: SessionKind,
    /// The user, for the balancer (and the record, when it is new).
    pub user: Option<String>,
    /// The nodes that may take it (eligible now), sorted by id.
    pub candidates: Vec<Candidate>,
    /// Nodes that must not keep or take it (they failed during this request).
    pub exclude: Vec<NodeId>,
    /// Why, when the session exists and is leaving its node.
    pub moving: Option<MoveReason>,
}

/// A placement's result.
#[derive(Debug, Clone)]
pub struct Placed {
    /// The session as the registry now has it, as the view holds it.
    pub entry: Arc<SessionEntry>,
    /// Whether this placement chose the node (rather than finding another's).
    pub won: bool,
}

/// Why a placement did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// No candidate node (none eligible, or all excluded).
    #[error("no eligible node")]
    NoCandidate,
    /// The registry answered with an error.
    #[error("the registry is unavailable: {0}")]
    RegistryDown(#[source] RegistryError),
    /// A registry call, or the whole placement, took longer than allowed.
    #[error("the placement did not finish within {} ms", .0.as_millis())]
    TimedOut(Duration),
    /// The placement task panicked or was stopped.
    #[error("the placement task failed: {0}")]
    TaskFailed(String),
}

impl PlaceError {
    /// Whether the registry (not the cluster's nodes) is to blame.
    pub fn is_registry(&self) -> bool {
        !matches!(self, PlaceError::NoCandidate)
    }
}

/// Everything a placement needs, owned, so it can run on the control runtime.
#[derive(Clone)]
pub struct Placer {
    pub registry: Arc<dyn Registry>,
    pub view: Arc<ClusterView>,
    pub balancer: Arc<dyn Balancer>,
    pub locks: LockManager,
    /// The longest wait for the cross-node lock.
    pub lock_timeout: Duration,
    /// The longest wait for one registry call.
    pub registry_wait: Duration,
    /// This node, and whether it serves sessions itself right now.
    pub self_id: NodeId,
    pub self_serves: bool,
}

impl Placer {
    /// Whether an existing placement can be kept as it is.
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

    async fn db<T>(&self, call: impl Future<Output = Result<T, RegistryError>>) -> Result<T, PlaceError> {
        match tokio::time::timeout(self.registry_wait, call).await {
            Ok(result) => result.map_err(PlaceError::RegistryDown),
            Err(_) => Err(PlaceError::TimedOut(self.registry_wait)),
        }
    }

    /// Lock, re-check, choose, write, release.
    pub async fn place(&self, job: &Job) -> Result<Placed, PlaceError> {
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
        let result = self.place_locked(job).await;
        if let Some(g) = guard
            && let Err(e) = g.release().await
        {
            tracing::warn!(error = %e, "releasing the placement lock failed");
        }
        METRICS.placement_seconds.observe(started.elapsed().as_secs_f64());
        result
    }

    async fn place_locked(&self, job: &Job) -> Result<Placed, PlaceError> {
        let current = self.db(self.registry.get_session(&job.key)).await?;
        if let Some(rec) = current.as_ref().filter(|rec| self.usable(rec.node_id, &job.exclude)) {
            // Placed (or moved) by someone else meanwhile: use it.
            METRICS.placement_races_lost.inc();
            return Ok(Placed { entry: self.view.upsert_session(rec.clone()), won: false });
        }
        let candidates: Vec<Candidate> =
            job.candidates.iter().filter(|c| !job.exclude.contains(&c.id)).cloned().collect();
        if candidates.is_empty() {
            return Err(PlaceError::NoCandidate);
        }
        let req = PlacementRequest { key: &job.key, user: job.user.as_deref(), candidates: &candidates };
        let choice = self.balancer.choose(&req).await.ok_or(PlaceError::NoCandidate)?;
        if let Some(why) = &choice.fallback {
            METRICS.balancer_fallbacks.inc();
            tracing::warn!(balancer = self.balancer.name(), reason = %why, "balancer fell back to `sessions`");
        }
        let node = choice.node;
        let rec: SessionRecord = match current {
            None => {
                self.db(self.registry.place_session(&NewSession {
                    key: &job.key,
                    node_id: node,
                    user_name: job.user.as_deref(),
                    kind: job.kind,
                }))
                .await?
            }
            Some(rec) => self.db(self.registry.move_session(&job.key, rec.node_id, node)).await?,
        };
        let won = rec.node_id == Some(node);
        if won {
            METRICS.placements.with_label_values(&[self.balancer.name()]).inc();
        } else {
            METRICS.placement_races_lost.inc();
        }
        Ok(Placed { entry: self.view.upsert_session(rec), won })
    }
}

/// Aborts the placement task when the request waiting for it goes away.
struct AbortOnDrop {
    task: tokio::task::AbortHandle,
    armed: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if self.armed && !self.task.is_finished() {
            self.task.abort();
            METRICS.placements_cancelled.inc();
            tracing::debug!("placement cancelled: its request has gone");
        }
    }
}

/// Run `job` with `placer` on `control`, waiting `limit` at most. If the
/// returned future is dropped before it finishes (the client went away), the
/// placement is cancelled: the task is aborted at its next await point,
/// releasing its lock; a write it already sent is insert-if-absent or
/// compare-and-set, so a half-done placement leaves a consistent registry.
pub async fn run(
    placer: Placer,
    job: Job,
    control: &tokio::runtime::Handle,
    limit: Duration,
) -> Result<Placed, PlaceError> {
    let task = control.spawn(async move { placer.place(&job).await });
    let mut guard = AbortOnDrop { task: task.abort_handle(), armed: true };
    let result = match tokio::time::timeout(limit, task).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(PlaceError::TaskFailed(join.to_string())),
        Err(_) => {
            guard.task.abort();
            Err(PlaceError::TimedOut(limit))
        }
    };
    guard.armed = false;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::SessionsBalancer;
    use crate::cluster::{NodeRecord, NodeStatus};

    fn node(id: NodeId) -> NodeRecord {
        NodeRecord {
            id,
            host: format!("10.0.0.{id}"),
            port: 8787,
            status: NodeStatus::Online,
            last_seen: Some(0),
            ..NodeRecord::for_test()
        }
    }

    fn candidate(id: NodeId, sessions: usize) -> Candidate {
        Candidate { id, address: format!("10.0.0.{id}:8787").into(), sessions, recent_pins: 0, load: [0.0; 3], cpus: 1 }
    }

    struct Fixture {
        placer: Placer,
        registry: Arc<dyn Registry>,
        _dir: tempfile::TempDir,
    }

    /// A SQLite registry with nodes 1..=3 Online, a view of them, node 1 being us.
    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let registry = crate::cluster::connect(
            &crate::config::DatabaseUrl::Sqlite(dir.path().join("r.db")),
            Duration::from_millis(50),
        )
        .await
        .unwrap();
        let mut nodes = Vec::new();
        for i in 1..=3 {
            let id = registry
                .register_node(&crate::cluster::NodeRegistration {
                    host: format!("10.0.0.{i}"),
                    port: 8787,
                    router: false,
                    version: String::new(),
                })
                .await
                .unwrap();
            registry.set_node_status(id, NodeStatus::Online).await.unwrap();
            nodes.push(node(id));
        }
        let view = Arc::new(ClusterView::new(1));
        view.set_nodes(nodes);
        let locks = LockManager::new(dir.path().join("locks"), &crate::config::LockSettings::default()).unwrap();
        let placer = Placer {
            registry: registry.clone(),
            view,
            balancer: Arc::new(SessionsBalancer),
            locks,
            lock_timeout: Duration::from_secs(5),
            registry_wait: Duration::from_secs(5),
            self_id: 1,
            self_serves: true,
        };
        Fixture { placer, registry, _dir: dir }
    }

    fn user_job(user: &str, candidates: Vec<Candidate>) -> Job {
        Job {
            key: crate::cluster::user_session_key(user),
            kind: SessionKind::User,
            user: Some(user.into()),
            candidates,
            exclude: Vec::new(),
            moving: None,
        }
    }

    #[tokio::test]
    async fn a_new_user_session_is_written_and_inserted_in_the_view() {
        let f = fixture().await;
        let placed = f.placer.place(&user_job("ann", vec![candidate(1, 2), candidate(2, 0), candidate(3, 1)])).await;
        let placed = placed.unwrap();
        assert!(placed.won);
        assert_eq!(placed.entry.record.node_id, Some(2), "the balancer's choice");
        assert_eq!(placed.entry.record.user_name.as_deref(), Some("ann"));
        let row = f.registry.get_session("user:ann").await.unwrap().unwrap();
        assert_eq!((row.node_id, row.kind), (Some(2), SessionKind::User));
        let in_view = f.placer.view.session("user:ann").unwrap();
        assert!(Arc::ptr_eq(&in_view, &placed.entry), "the entry returned is the one inserted");
    }

    #[tokio::test]
    async fn a_lost_race_uses_the_winners_node() {
        let f = fixture().await;
        // Another node placed ann on node 3 meanwhile (its notification not yet here).
        f.registry
            .place_session(&NewSession { key: "user:ann", node_id: 3, user_name: Some("ann"), kind: SessionKind::User })
            .await
            .unwrap();
        let placed = f.placer.place(&user_job("ann", vec![candidate(1, 0), candidate(2, 0)])).await.unwrap();
        assert!(!placed.won);
        assert_eq!(placed.entry.record.node_id, Some(3));
        assert_eq!(f.placer.view.session("user:ann").unwrap().record.node_id, Some(3));
    }

    #[tokio::test]
    async fn excluded_nodes_neither_keep_nor_take_the_session() {
        let f = fixture().await;
        f.registry
            .place_session(&NewSession { key: "k1", node_id: 2, user_name: None, kind: SessionKind::Backend })
            .await
            .unwrap();
        let job = Job {
            key: "k1".into(),
            kind: SessionKind::Backend,
            user: None,
            // Node 3 would win on sessions, but failed during this request.
            candidates: vec![candidate(1, 5), candidate(2, 0), candidate(3, 0)],
            exclude: vec![2, 3],
            moving: Some(MoveReason::ConnectFailure),
        };
        let placed = f.placer.place(&job).await.unwrap();
        assert!(placed.won);
        assert_eq!(placed.entry.record.node_id, Some(1), "moved off the failed node, not onto another failed one");
        assert_eq!(f.registry.get_session("k1").await.unwrap().unwrap().node_id, Some(1));
    }

    #[tokio::test]
    async fn no_candidate_is_its_own_error_and_writes_nothing() {
        let f = fixture().await;
        let err = f.placer.place(&user_job("ann", Vec::new())).await.unwrap_err();
        assert!(matches!(err, PlaceError::NoCandidate), "{err}");
        assert!(!err.is_registry());
        let job = Job { exclude: vec![2], ..user_job("bob", vec![candidate(2, 0)]) };
        assert!(matches!(f.placer.place(&job).await, Err(PlaceError::NoCandidate)));
        assert!(f.registry.list_sessions().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_closed_registry_is_registry_down_not_a_made_up_error() {
        let f = fixture().await;
        f.registry.close().await;
        let err = f.placer.place(&user_job("ann", vec![candidate(2, 0)])).await.unwrap_err();
        assert!(matches!(err, PlaceError::RegistryDown(_)), "{err:?}");
        assert!(err.is_registry());
        assert!(f.placer.view.session("user:ann").is_none());
    }

    #[tokio::test]
    async fn a_stalled_registry_call_times_out_within_the_registry_wait() {
        let mut f = fixture().await;
        let wait = Duration::from_millis(200);
        f.placer.registry_wait = wait;
        let started = Instant::now();
        // A call that never answers (a database that accepts but says nothing).
        let err = f.placer.db(std::future::pending::<Result<(), RegistryError>>()).await.unwrap_err();
        assert!(matches!(err, PlaceError::TimedOut(w) if w == wait), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_placement_whose_request_went_away_is_cancelled_and_releases_its_lock() {
        let f = fixture().await;
        // Someone holds ann's lock: the placement waits for it.
        let held = f.placer.locks.acquire("session:user:ann", Instant::now() + Duration::from_secs(5)).await.unwrap();
        let handle = tokio::runtime::Handle::current();
        let cancelled_before = METRICS.placements_cancelled.get();
        let job = user_job("ann", vec![candidate(2, 0)]);
        let waiting = run(f.placer.clone(), job.clone(), &handle, Duration::from_secs(30));
        // The request gives up (its client disconnected) while the placement waits.
        assert!(tokio::time::timeout(Duration::from_millis(200), waiting).await.is_err());
        assert!(METRICS.placements_cancelled.get() > cancelled_before);
        held.release().await.unwrap();
        // Nothing was written, and the lock is free for the next placement at once.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(f.registry.get_session("user:ann").await.unwrap().is_none(), "the cancelled placement wrote nothing");
        let again =
            tokio::time::timeout(Duration::from_secs(5), run(f.placer.clone(), job, &handle, Duration::from_secs(30)))
                .await
                .expect("the lock was released");
        assert_eq!(again.unwrap().entry.record.node_id, Some(2));
    }

    #[tokio::test]
    async fn the_whole_placement_is_bounded() {
        let f = fixture().await;
        let _held = f.placer.locks.acquire("session:user:ann", Instant::now() + Duration::from_secs(5)).await.unwrap();
        let handle = tokio::runtime::Handle::current();
        let err = run(f.placer.clone(), user_job("ann", vec![candidate(2, 0)]), &handle, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, PlaceError::TimedOut(_)), "{err:?}");
    }
}

//! The in-memory view of the cluster that routing reads: nodes (a
//! copy-on-write snapshot), sessions (indexed by key, node and user),
//! peer reachability, and local activity waiting to be written back.
//!
//! Kept fresh by `sync` from registry notifications; read on every request
//! without touching the database. Local placements are inserted at once so
//! that a node never waits for its own notification.
//!
//! Bounded: at most `max-sessions-in-memory` sessions are kept (updates and
//! removals of known ones always apply; a new one past the cap is not kept,
//! logged once and counted in `sessionlb_view_capacity_reached_total`). The
//! anonymous pins this node issued recently are counted in [`RecentPins`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use parking_lot::RwLock;

use super::model::*;
use super::pins::RecentPins;
use crate::metrics::METRICS;

/// Sessions kept in memory by default (`[sessions] max-sessions-in-memory`).
pub const DEFAULT_SESSION_CAPACITY: usize = 250_000;

/// All known nodes, sorted by id.
#[derive(Debug, Default)]
pub struct NodeSnapshot {
    pub nodes: Vec<NodeRecord>,
    /// `host:port` of each node, in the order of `nodes` (built once per snapshot).
    addresses: Vec<Arc<str>>,
}

impl NodeSnapshot {
    /// A snapshot of `nodes` (sorted here by id).
    pub fn new(mut nodes: Vec<NodeRecord>) -> NodeSnapshot {
        nodes.sort_by_key(|n| n.id);
        let addresses = nodes.iter().map(|n| Arc::from(n.address())).collect();
        NodeSnapshot { nodes, addresses }
    }

    pub fn get(&self, id: NodeId) -> Option<&NodeRecord> {
        self.nodes.binary_search_by_key(&id, |n| n.id).ok().map(|i| &self.nodes[i])
    }

    /// Every node with its `host:port` (shared, no allocation).
    pub fn with_addresses(&self) -> impl Iterator<Item = (&NodeRecord, &Arc<str>)> {
        self.nodes.iter().zip(&self.addresses)
    }
}

/// Local activity of a session, shared by every version of its entry (a
/// request holding an older entry still counts against the current one).
#[derive(Debug, Default)]
struct Activity {
    /// Last request seen by this node (ms, local clock); 0 = none since the last write-back.
    last_request: AtomicI64,
    /// Requests in flight through this node, upgraded and streaming ones included.
    in_flight: AtomicU32,
}

/// A session as this node knows it, with its local activity.
#[derive(Debug)]
pub struct SessionEntry {
    pub record: SessionRecord,
    activity: Arc<Activity>,
}

impl SessionEntry {
    /// Note a request for this session (cheap: one atomic store).
    pub fn touch(&self, now_ms: i64) {
        self.activity.last_request.store(now_ms, Ordering::Relaxed);
    }

    /// A request (possibly long-lived: a WebSocket, a stream) started.
    pub fn stream_opened(&self) {
        self.activity.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// That request ended.
    pub fn stream_closed(&self) {
        let _ = self.activity.in_flight.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Requests in flight through this node.
    pub fn open_streams(&self) -> u32 {
        self.activity.in_flight.load(Ordering::Relaxed)
    }

    fn last_request(&self) -> i64 {
        self.activity.last_request.load(Ordering::Relaxed)
    }
}

/// An entry in the key index, hashed and compared by its record's key, so
/// that the key is stored once (in the record), not again as the map's key.
#[derive(Debug, Clone)]
struct ByKey(Arc<SessionEntry>);

impl std::hash::Hash for ByKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes: `Borrow<str>` lookups must agree.
        self.0.record.key.as_str().hash(state);
    }
}

impl PartialEq for ByKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.record.key == other.0.record.key
    }
}

impl Eq for ByKey {}

impl std::borrow::Borrow<str> for ByKey {
    fn borrow(&self) -> &str {
        &self.0.record.key
    }
}

/// The sessions, indexed (issue 12: about 480 bytes per session in round 1,
/// with the key stored three times and a hash set per user; now the key
/// lives only in the record and a user's sessions are a short vector of the
/// entries themselves).
#[derive(Debug, Default)]
struct SessionIndex {
    by_key: HashSet<ByKey>,
    per_node: HashMap<NodeId, usize>,
    by_user: HashMap<String, Vec<Arc<SessionEntry>>>,
}

impl SessionIndex {
    /// Insert or replace a session; a replaced entry's activity carries over.
    /// A new key past `capacity` is not kept: the entry is returned detached
    /// (it routes this request; its activity is not written back) and
    /// `false` says so.
    fn insert(
        &mut self,
        record: SessionRecord,
        activity: Option<Arc<Activity>>,
        capacity: usize,
    ) -> (Arc<SessionEntry>, bool) {
        let known = self.get(&record.key).map(|e| e.activity.clone());
        let kept = known.is_some() || self.by_key.len() < capacity;
        let activity = activity.or(known).unwrap_or_default();
        let fresh = Arc::new(SessionEntry { record, activity });
        if !kept {
            return (fresh, false);
        }
        self.remove(&fresh.record.key);
        if let Some(node) = fresh.record.node_id {
            *self.per_node.entry(node).or_default() += 1;
        }
        if let Some(user) = &fresh.record.user_name {
            match self.by_user.get_mut(user.as_str()) {
                Some(entries) => entries.push(fresh.clone()),
                None => {
                    self.by_user.insert(user.clone(), vec![fresh.clone()]);
                }
            }
        }
        self.by_key.insert(ByKey(fresh.clone()));
        (fresh, true)
    }

    fn get(&self, key: &str) -> Option<&Arc<SessionEntry>> {
        self.by_key.get(key).map(|e| &e.0)
    }

    fn entries(&self) -> impl Iterator<Item = &Arc<SessionEntry>> {
        self.by_key.iter().map(|e| &e.0)
    }

    fn remove(&mut self, key: &str) -> Option<Arc<SessionEntry>> {
        let old = self.by_key.take(key)?.0;
        if let Some(node) = old.record.node_id
            && let Some(n) = self.per_node.get_mut(&node)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_node.remove(&node);
            }
        }
        if let Some(user) = &old.record.user_name
            && let Some(entries) = self.by_user.get_mut(user.as_str())
        {
            entries.retain(|e| !Arc::ptr_eq(e, &old));
            if entries.is_empty() {
                self.by_user.remove(user);
            }
        }
        Some(old)
    }
}

/// A session that changed node, as this node learned it (its own moves and
/// peers' alike), for the status page.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionMove {
    pub key: String,
    pub user: Option<String>,
    /// `None`: its node had been deleted.
    pub from: Option<NodeId>,
    pub to: NodeId,
    /// When this node learned it (ms, local clock).
    pub at_ms: i64,
}

/// One announced change to the sessions (see [`ClusterView::apply_session_changes`]).
#[derive(Debug, Clone, PartialEq)]
pub enum SessionChange {
    /// Added, moved, or its user set.
    Upsert(SessionRecord),
    /// Ended.
    Remove(String),
}

/// How many recent moves the view keeps.
pub const RECENT_MOVES: usize = 20;

/// What changed between two node snapshots, for logs and reactions.
#[derive(Debug, Default, PartialEq)]
pub struct NodeChanges {
    pub joined: Vec<String>,
    pub removed: Vec<String>,
    pub status_changed: Vec<(String, NodeStatus)>,
    pub offline_mode_changed: Vec<(String, bool)>,
}

/// This node's picture of the cluster.
pub struct ClusterView {
    self_id: NodeId,
    nodes: ArcSwap<NodeSnapshot>,
    cluster: RwLock<Option<ClusterRecord>>,
    sessions: RwLock<SessionIndex>,
    unreachable: RwLock<HashSet<NodeId>>,
    /// When each node that cannot serve now was first seen failing
    /// (unreachable, not Online, or this node's backend down).
    down_since: parking_lot::Mutex<HashMap<NodeId, Instant>>,
    moves: parking_lot::Mutex<VecDeque<SessionMove>>,
    /// Most sessions kept in memory.
    session_capacity: usize,
    /// Whether the capacity was reached (logged once per episode).
    at_capacity: AtomicBool,
    pins: RecentPins,
    /// While a full snapshot is read ([`ClusterView::begin_snapshot`] until
    /// [`ClusterView::set_sessions`]): the sessions this node upserted
    /// meanwhile, which the snapshot may have been read too early to hold.
    upserted_during_snapshot: parking_lot::Mutex<Option<Vec<SessionRecord>>>,
}

impl ClusterView {
    /// A view keeping at most [`DEFAULT_SESSION_CAPACITY`] sessions.
    pub fn new(self_id: NodeId) -> ClusterView {
        ClusterView::with_session_capacity(self_id, DEFAULT_SESSION_CAPACITY)
    }

    /// A view keeping at most `capacity` sessions in memory.
    pub fn with_session_capacity(self_id: NodeId, capacity: usize) -> ClusterView {
        ClusterView {
            self_id,
            nodes: ArcSwap::from_pointee(NodeSnapshot::default()),
            cluster: RwLock::new(None),
            sessions: RwLock::new(SessionIndex::default()),
            unreachable: RwLock::new(HashSet::new()),
            down_since: parking_lot::Mutex::new(HashMap::new()),
            moves: parking_lot::Mutex::new(VecDeque::with_capacity(RECENT_MOVES)),
            session_capacity: capacity,
            at_capacity: AtomicBool::new(false),
            pins: RecentPins::new(),
            upserted_during_snapshot: parking_lot::Mutex::new(None),
        }
    }

    /// Anonymous pins this node issued recently.
    pub fn pins(&self) -> &RecentPins {
        &self.pins
    }

    /// The most sessions this view keeps.
    pub fn session_capacity(&self) -> usize {
        self.session_capacity
    }

    /// This node's id.
    pub fn self_id(&self) -> NodeId {
        self.self_id
    }

    // --- nodes

    /// The current node snapshot (cheap: one atomic load).
    pub fn nodes(&self) -> Arc<NodeSnapshot> {
        self.nodes.load_full()
    }

    /// This node's own row, if present.
    pub fn self_node(&self) -> Option<NodeRecord> {
        self.nodes().get(self.self_id).cloned()
    }

    /// Replace the node list; returns what changed.
    pub fn set_nodes(&self, nodes: Vec<NodeRecord>) -> NodeChanges {
        let new = NodeSnapshot::new(nodes);
        let nodes = &new.nodes;
        let old = self.nodes.load_full();
        let mut changes = NodeChanges::default();
        for n in nodes {
            match old.get(n.id) {
                None => changes.joined.push(n.address()),
                Some(prev) => {
                    if prev.status != n.status {
                        changes.status_changed.push((n.address(), n.status));
                        if n.status == NodeStatus::Online {
                            // A (re)started node is reachable until shown otherwise.
                            self.unreachable.write().remove(&n.id);
                            self.down_since.lock().remove(&n.id);
                        } else if prev.status == NodeStatus::Online {
                            self.down_since.lock().entry(n.id).or_insert_with(Instant::now);
                        }
                    }
                    if prev.offline_mode != n.offline_mode {
                        changes.offline_mode_changed.push((n.address(), n.offline_mode));
                    }
                }
            }
        }
        for n in &old.nodes {
            if new.get(n.id).is_none() {
                changes.removed.push(n.address());
                self.unreachable.write().remove(&n.id);
                self.down_since.lock().remove(&n.id);
            }
        }
        self.nodes.store(Arc::new(new));
        changes
    }

    /// Apply a change of offline mode made by this process at once (its
    /// notification confirms it later): a draining node stops placing new
    /// sessions on itself without waiting for the database.
    pub fn set_offline_mode_locally(&self, id: NodeId, offline: bool) {
        let old = self.nodes.load_full();
        let Ok(i) = old.nodes.binary_search_by_key(&id, |n| n.id) else { return };
        let mut nodes = old.nodes.clone();
        nodes[i].offline_mode = offline;
        self.nodes.store(Arc::new(NodeSnapshot::new(nodes)));
    }

    // --- cluster record

    pub fn set_cluster(&self, record: Option<ClusterRecord>) {
        *self.cluster.write() = record;
    }

    pub fn cluster(&self) -> Option<ClusterRecord> {
        self.cluster.read().clone()
    }

    // --- reachability (from probes and connect failures)

    /// Mark a peer unreachable; returns whether that is news.
    pub fn mark_unreachable(&self, id: NodeId) -> bool {
        let news = self.unreachable.write().insert(id);
        if news {
            self.note_unavailable(id, Instant::now());
        }
        news
    }

    /// Mark a peer reachable again; returns whether that is news.
    pub fn mark_reachable(&self, id: NodeId) -> bool {
        if !self.unreachable.read().contains(&id) {
            return false;
        }
        let news = self.unreachable.write().remove(&id);
        if news && self.nodes().get(id).is_some_and(|n| n.status == NodeStatus::Online) {
            self.note_available(id);
        }
        news
    }

    /// When `id` was first seen unable to serve in its current outage
    /// (marked unreachable, seen leaving `Online`, or — this node — its
    /// backend down); `now` if this is the first time.
    pub fn note_unavailable(&self, id: NodeId, now: Instant) -> Instant {
        *self.down_since.lock().entry(id).or_insert(now)
    }

    /// `id` serves again: a later outage is counted from its own start.
    pub fn note_available(&self, id: NodeId) {
        self.down_since.lock().remove(&id);
    }

    pub fn is_reachable(&self, id: NodeId) -> bool {
        !self.unreachable.read().contains(&id)
    }

    /// Whether new sessions may be placed on this node: Online, reachable,
    /// not in offline mode, not a router.
    pub fn is_eligible(&self, node: &NodeRecord) -> bool {
        node.status == NodeStatus::Online && !node.offline_mode && !node.router && self.is_reachable(node.id)
    }

    /// Every node of `nodes` for which `keep` holds among those eligible for
    /// new sessions ([`ClusterView::is_eligible`]), with one read of the
    /// reachability set for all of them (a request choosing a node reads it
    /// once, not once per node).
    pub fn eligible<'a, T>(
        &self,
        nodes: impl Iterator<Item = (&'a NodeRecord, T)>,
        mut keep: impl FnMut(&NodeRecord) -> bool,
    ) -> Vec<(&'a NodeRecord, T)> {
        let unreachable = self.unreachable.read();
        nodes
            .filter(|(n, _)| {
                n.status == NodeStatus::Online
                    && !n.offline_mode
                    && !n.router
                    && !unreachable.contains(&n.id)
                    && keep(n)
            })
            .collect()
    }

    /// Whether existing sessions may be routed to this node: Online and
    /// reachable (offline mode still serves its sessions).
    pub fn can_serve(&self, node: &NodeRecord) -> bool {
        node.status == NodeStatus::Online && !node.router && self.is_reachable(node.id)
    }

    // --- sessions

    pub fn session(&self, key: &str) -> Option<Arc<SessionEntry>> {
        self.sessions.read().get(key).cloned()
    }

    /// The user's most recently active session that has a node.
    pub fn latest_session_of(&self, user: &str) -> Option<Arc<SessionEntry>> {
        self.latest_session_where(user, |_| true)
    }

    /// The user's most recently active session whose node passes `usable`.
    pub fn latest_session_where(&self, user: &str, usable: impl Fn(NodeId) -> bool) -> Option<Arc<SessionEntry>> {
        let index = self.sessions.read();
        index
            .by_user
            .get(user)?
            .iter()
            .filter(|e| e.record.node_id.is_some_and(&usable))
            .max_by(|a, b| {
                let recency = |e: &SessionEntry| (e.record.last_active.max(e.last_request()), e.record.created);
                recency(a).cmp(&recency(b)).then_with(|| a.record.key.cmp(&b.record.key))
            })
            .cloned()
    }

    /// Insert or update a session; returns its entry as inserted (detached,
    /// not kept, when the view is full and the key is new).
    pub fn upsert_session(&self, record: SessionRecord) -> Arc<SessionEntry> {
        if let Some(upserted) = self.upserted_during_snapshot.lock().as_mut() {
            upserted.push(record.clone());
        }
        let (entry, kept) = {
            let mut index = self.sessions.write();
            self.note_move(index.get(&record.key).map(|e| &e.record), &record);
            let result = index.insert(record, None, self.session_capacity);
            METRICS.view_sessions.set(index.by_key.len() as i64);
            result
        };
        self.note_capacity(kept, 1);
        entry
    }

    /// Remember a session that changed node.
    fn note_move(&self, old: Option<&SessionRecord>, new: &SessionRecord) {
        let (Some(old), Some(to)) = (old, new.node_id) else { return };
        if old.node_id == Some(to) {
            return;
        }
        let mut moves = self.moves.lock();
        if moves.len() == RECENT_MOVES {
            moves.pop_front();
        }
        let at_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        moves.push_back(SessionMove {
            key: new.key.clone(),
            user: new.user_name.clone(),
            from: old.node_id,
            to,
            at_ms,
        });
    }

    /// The most recent session moves, newest first.
    pub fn recent_moves(&self) -> Vec<SessionMove> {
        self.moves.lock().iter().rev().cloned().collect()
    }

    /// Apply a batch of announced changes, in order, under one write lock
    /// (a burst of notifications costs one lock, not one per change).
    pub fn apply_session_changes(&self, changes: impl IntoIterator<Item = SessionChange>) {
        let mut not_kept = 0;
        {
            let mut index = self.sessions.write();
            for change in changes {
                match change {
                    SessionChange::Upsert(record) => {
                        self.note_move(index.get(&record.key).map(|e| &e.record), &record);
                        if !index.insert(record, None, self.session_capacity).1 {
                            not_kept += 1;
                        }
                    }
                    SessionChange::Remove(key) => {
                        index.remove(&key);
                    }
                }
            }
            METRICS.view_sessions.set(index.by_key.len() as i64);
        }
        self.note_capacity(not_kept == 0, not_kept);
    }

    pub fn remove_session(&self, key: &str) {
        let mut index = self.sessions.write();
        index.remove(key);
        METRICS.view_sessions.set(index.by_key.len() as i64);
    }

    /// A full snapshot of the sessions is about to be read: remember the
    /// sessions upserted from now on, so that [`ClusterView::set_sessions`]
    /// keeps those the snapshot missed (a placement committed after the
    /// snapshot's read is announced, but its notification can come before
    /// the snapshot is installed and would be overwritten by it).
    pub fn begin_snapshot(&self) {
        *self.upserted_during_snapshot.lock() = Some(Vec::new());
    }

    /// Replace all sessions (after a full reload), keeping local activity;
    /// past the capacity, the most recently active ones are kept. Sessions
    /// this node upserted since [`ClusterView::begin_snapshot`] that are not
    /// in `records` are kept too.
    pub fn set_sessions(&self, mut records: Vec<SessionRecord>) {
        if let Some(upserted) = self.upserted_during_snapshot.lock().take() {
            let in_snapshot: HashSet<&str> = records.iter().map(|r| r.key.as_str()).collect();
            let mut missed: Vec<SessionRecord> =
                upserted.into_iter().filter(|r| !in_snapshot.contains(r.key.as_str())).collect();
            // The last upsert of a key wins, as it did in the view.
            missed.reverse();
            let mut seen = HashSet::new();
            missed.retain(|r| seen.insert(r.key.clone()));
            records.extend(missed);
        }
        if records.len() > self.session_capacity {
            records.sort_by_key(|r| std::cmp::Reverse(r.last_active));
        }
        let mut dropped = 0;
        {
            let mut index = self.sessions.write();
            let mut fresh = SessionIndex::default();
            for r in records {
                let old = index.get(&r.key);
                self.note_move(old.map(|e| &e.record), &r);
                let activity = old.map(|e| e.activity.clone());
                if !fresh.insert(r, activity, self.session_capacity).1 {
                    dropped += 1;
                }
            }
            *index = fresh;
            METRICS.view_sessions.set(index.by_key.len() as i64);
        }
        self.note_capacity(dropped == 0, dropped);
    }

    /// Log (once per episode) and count sessions that did not fit.
    fn note_capacity(&self, kept: bool, not_kept: u64) {
        if kept {
            if self.at_capacity.load(Ordering::Relaxed) && self.session_count() < self.session_capacity {
                self.at_capacity.store(false, Ordering::Relaxed);
                tracing::info!(capacity = self.session_capacity, "sessions fit in memory again");
            }
            return;
        }
        METRICS.view_capacity_reached.inc_by(not_kept);
        if !self.at_capacity.swap(true, Ordering::Relaxed) {
            tracing::error!(
                capacity = self.session_capacity,
                "the in-memory session view is full: further new sessions are routed but not kept in memory \
                 (their activity is not recorded and other nodes' sessions are looked up in the registry); \
                 raise `max-sessions-in-memory` in [sessions]"
            );
        }
    }

    /// Calls `f` with the number of sessions on each node (under the read lock).
    pub fn with_session_counts<R>(&self, f: impl FnOnce(&HashMap<NodeId, usize>) -> R) -> R {
        f(&self.sessions.read().per_node)
    }

    /// Sessions per node.
    pub fn session_counts(&self) -> HashMap<NodeId, usize> {
        self.sessions.read().per_node.clone()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.read().by_key.len()
    }

    /// All sessions (for the status page), sorted by key.
    pub fn sessions(&self) -> Vec<Arc<SessionEntry>> {
        let mut all: Vec<_> = self.sessions.read().entries().cloned().collect();
        all.sort_by(|a, b| a.record.key.cmp(&b.record.key));
        all
    }

    /// Keys active through this node since the last call (requests seen, or
    /// a connection still open), clearing the request marks.
    pub fn take_active_keys(&self) -> Vec<String> {
        let index = self.sessions.read();
        index
            .entries()
            .filter(|e| e.activity.last_request.swap(0, Ordering::Relaxed) != 0 || e.open_streams() > 0)
            .map(|e| e.record.key.clone())
            .collect()
    }

    /// Put back activity taken by [`take_active_keys`](Self::take_active_keys)
    /// that could not be written: the next write retries it, so a session
    /// used during a database outage is not expired early.
    pub fn restore_active_keys(&self, keys: &[String], now_ms: i64) {
        let index = self.sessions.read();
        for key in keys {
            if let Some(entry) = index.get(key) {
                entry.touch(now_ms);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(key: &str, node: Option<NodeId>, user: Option<&str>, last_active: i64) -> SessionRecord {
        SessionRecord {
            key: key.into(),
            node_id: node,
            user_name: user.map(Into::into),
            kind: SessionKind::Backend,
            created: 1,
            last_active,
        }
    }

    #[test]
    fn a_batch_of_changes_applies_in_order_and_keeps_activity() {
        let v = ClusterView::new(1);
        let kept = v.upsert_session(session("a", Some(1), Some("ann"), 1));
        kept.touch(50);
        v.apply_session_changes([
            SessionChange::Upsert(session("b", Some(2), None, 1)),
            SessionChange::Upsert(session("a", Some(2), Some("ann"), 1)),
            SessionChange::Remove("b".into()),
            SessionChange::Upsert(session("b", Some(3), None, 1)),
            SessionChange::Remove("never-seen".into()),
        ]);
        assert_eq!(v.session("a").unwrap().record.node_id, Some(2));
        assert_eq!(v.session("b").unwrap().record.node_id, Some(3), "the later change wins");
        assert_eq!(v.session_counts(), HashMap::from([(2, 1), (3, 1)]));
        assert_eq!(v.take_active_keys(), vec!["a".to_string()], "a's activity carried over");
        assert_eq!(v.recent_moves()[0].key, "a");
        assert_eq!(v.latest_session_of("ann").unwrap().record.node_id, Some(2));
    }

    #[test]
    fn counts_follow_inserts_moves_and_removals() {
        let v = ClusterView::new(1);
        v.upsert_session(session("a", Some(1), None, 1));
        v.upsert_session(session("b", Some(1), None, 1));
        v.upsert_session(session("c", Some(2), None, 1));
        assert_eq!(v.session_counts(), HashMap::from([(1, 2), (2, 1)]));
        v.upsert_session(session("a", Some(2), None, 1));
        assert_eq!(v.session_counts(), HashMap::from([(1, 1), (2, 2)]));
        v.remove_session("b");
        v.remove_session("b");
        assert_eq!(v.session_counts(), HashMap::from([(2, 2)]));
        v.upsert_session(session("c", None, None, 1));
        assert_eq!(v.session_counts(), HashMap::from([(2, 1)]));
    }

    #[test]
    fn latest_session_of_a_user_prefers_recent_activity() {
        let v = ClusterView::new(1);
        v.upsert_session(session("old", Some(1), Some("ann"), 100));
        v.upsert_session(session("new", Some(2), Some("ann"), 200));
        v.upsert_session(session("orphan", None, Some("ann"), 300));
        assert_eq!(v.latest_session_of("ann").unwrap().record.key, "new");
        v.session("old").unwrap().touch(500);
        assert_eq!(v.latest_session_of("ann").unwrap().record.key, "old");
        assert!(v.latest_session_of("bob").is_none());
    }

    #[test]
    fn activity_survives_updates_and_is_taken_once() {
        let v = ClusterView::new(1);
        v.upsert_session(session("a", Some(1), None, 1));
        v.upsert_session(session("b", Some(1), None, 1));
        v.session("a").unwrap().touch(10);
        v.session("b").unwrap().stream_opened();
        v.upsert_session(session("a", Some(2), None, 1));
        let mut keys = v.take_active_keys();
        keys.sort();
        assert_eq!(keys, vec!["a", "b"]);
        assert_eq!(v.take_active_keys(), vec!["b"], "open streams stay active; requests are taken once");
        v.session("b").unwrap().stream_closed();
        v.session("b").unwrap().stream_closed();
        assert!(v.take_active_keys().is_empty());
    }

    #[test]
    fn a_snapshot_read_before_a_local_placement_does_not_erase_it() {
        let v = ClusterView::new(1);
        v.upsert_session(session("old", Some(2), None, 1));
        v.begin_snapshot();
        // Placed here while the snapshot was being read (and not in it).
        v.upsert_session(session("placed", Some(3), Some("ann"), 5));
        v.upsert_session(session("moved", Some(2), None, 5));
        v.upsert_session(session("moved", Some(3), None, 6));
        v.set_sessions(vec![session("old", Some(2), None, 1), session("other", Some(2), None, 2)]);
        assert_eq!(v.session("placed").unwrap().record.node_id, Some(3));
        assert_eq!(v.session("moved").unwrap().record.node_id, Some(3), "the last upsert wins");
        assert!(v.session("other").is_some());
        // Without a snapshot in progress, a reload is the whole truth.
        v.set_sessions(vec![session("other", Some(2), None, 2)]);
        assert!(v.session("placed").is_none() && v.session("old").is_none());
        assert_eq!(v.session_count(), 1);
    }

    #[test]
    fn activity_that_could_not_be_written_is_taken_again() {
        let v = ClusterView::new(1);
        v.upsert_session(session("a", Some(1), None, 1));
        v.session("a").unwrap().touch(10);
        let keys = v.take_active_keys();
        assert_eq!(keys, vec!["a"]);
        assert!(v.take_active_keys().is_empty());
        v.restore_active_keys(&keys, 20);
        v.restore_active_keys(&["gone".to_string()], 20);
        assert_eq!(v.take_active_keys(), vec!["a"]);
    }

    #[test]
    fn a_request_holding_an_older_entry_closes_against_the_current_one() {
        let v = ClusterView::new(1);
        v.upsert_session(session("a", Some(1), None, 1));
        let held = v.session("a").unwrap();
        held.stream_opened();
        // The session moves (a notification, a resync) while the request runs.
        v.upsert_session(session("a", Some(2), None, 1));
        v.set_sessions(vec![session("a", Some(3), None, 1)]);
        assert_eq!(v.session("a").unwrap().open_streams(), 1);
        held.stream_closed();
        assert_eq!(v.session("a").unwrap().open_streams(), 0, "the session can go idle again");
    }

    #[test]
    fn moves_are_remembered_newest_first_and_bounded() {
        let v = ClusterView::new(1);
        v.upsert_session(session("a", Some(1), Some("ann"), 1));
        v.upsert_session(session("a", Some(1), Some("ann"), 2));
        assert!(v.recent_moves().is_empty(), "a new session or an update in place is no move");
        v.upsert_session(session("a", Some(2), Some("ann"), 3));
        v.upsert_session(session("b", None, None, 1));
        v.set_sessions(vec![session("a", Some(2), Some("ann"), 3), session("b", Some(3), None, 1)]);
        let moves: Vec<_> = v.recent_moves().into_iter().map(|m| (m.key, m.from, m.to)).collect();
        assert_eq!(moves, vec![("b".into(), None, 3), ("a".into(), Some(1), 2)]);
        for i in 0..(RECENT_MOVES as i64 + 5) {
            v.upsert_session(session("c", Some(1 + i % 2), None, i));
        }
        assert_eq!(v.recent_moves().len(), RECENT_MOVES);
    }

    #[test]
    fn node_changes_are_reported() {
        let v = ClusterView::new(1);
        let mut n =
            NodeRecord { id: 1, host: "a".into(), port: 1, status: NodeStatus::Starting, ..NodeRecord::for_test() };
        assert_eq!(v.set_nodes(vec![n.clone()]).joined, vec!["a:1"]);
        n.status = NodeStatus::Online;
        n.offline_mode = true;
        let c = v.set_nodes(vec![n.clone()]);
        assert_eq!(c.status_changed, vec![("a:1".to_string(), NodeStatus::Online)]);
        assert_eq!(c.offline_mode_changed, vec![("a:1".to_string(), true)]);
        assert!(!v.is_eligible(&n), "offline mode takes no new sessions");
        assert!(v.can_serve(&n), "but still serves its own");
        assert_eq!(v.set_nodes(vec![]).removed, vec!["a:1"]);
    }

    #[test]
    fn the_insert_returns_the_entry_it_inserted() {
        let v = ClusterView::new(1);
        let e = v.upsert_session(session("a", Some(1), Some("ann"), 1));
        assert!(Arc::ptr_eq(&e, &v.session("a").unwrap()));
        e.touch(5);
        // An update returns the new entry, sharing the activity.
        let moved = v.upsert_session(session("a", Some(2), Some("ann"), 1));
        assert_eq!(moved.record.node_id, Some(2));
        assert_eq!(moved.last_request(), 5);
    }

    #[test]
    fn past_its_capacity_the_view_keeps_updates_but_not_new_keys() {
        let v = ClusterView::with_session_capacity(1, 2);
        let reached = METRICS.view_capacity_reached.get();
        v.upsert_session(session("a", Some(1), None, 1));
        v.upsert_session(session("b", Some(1), None, 1));
        let c = v.upsert_session(session("c", Some(2), None, 1));
        assert_eq!(c.record.key, "c", "a detached entry still routes its request");
        assert!(v.session("c").is_none(), "but is not kept");
        assert_eq!(v.session_count(), 2);
        assert!(METRICS.view_capacity_reached.get() > reached, "counted");
        // Known keys still move, and removals make room.
        v.upsert_session(session("a", Some(3), None, 1));
        assert_eq!(v.session("a").unwrap().record.node_id, Some(3));
        v.remove_session("b");
        v.upsert_session(session("c", Some(2), None, 1));
        assert!(v.session("c").is_some());
        // A full reload past the capacity keeps the most recently active.
        v.set_sessions(vec![
            session("old", Some(1), None, 10),
            session("new", Some(1), None, 30),
            session("mid", Some(1), None, 20),
        ]);
        let mut kept: Vec<String> = v.sessions().iter().map(|e| e.record.key.clone()).collect();
        kept.sort();
        assert_eq!(kept, ["mid", "new"]);
    }

    #[test]
    fn an_outage_is_counted_from_when_the_node_was_first_seen_failing() {
        let v = ClusterView::new(1);
        let mut n =
            NodeRecord { id: 2, host: "b".into(), port: 1, status: NodeStatus::Online, ..NodeRecord::for_test() };
        v.set_nodes(vec![n.clone()]);
        let t0 = Instant::now();
        let later = t0 + std::time::Duration::from_secs(5);
        assert!(v.mark_unreachable(2));
        let since = v.note_unavailable(2, later);
        assert!(since <= Instant::now(), "the mark started the count, not the later look");
        assert!(!v.mark_unreachable(2));
        assert_eq!(v.note_unavailable(2, later), since, "marked again: still the same outage");
        // Reachable again: the next outage starts a new count.
        assert!(v.mark_reachable(2));
        assert_eq!(v.note_unavailable(2, later), later);
        v.note_available(2);
        // A node seen leaving Online starts its count; coming back ends it.
        n.status = NodeStatus::Offline;
        v.set_nodes(vec![n.clone()]);
        let stopped = v.note_unavailable(2, later);
        assert!(stopped < later);
        n.status = NodeStatus::Online;
        v.set_nodes(vec![n.clone()]);
        assert_eq!(v.note_unavailable(2, later), later);
        // Unreachable while stopped: reachable again does not end the outage.
        v.note_available(2);
        n.status = NodeStatus::Offline;
        v.set_nodes(vec![n]);
        v.mark_unreachable(2);
        let since = v.note_unavailable(2, later);
        v.mark_reachable(2);
        assert_eq!(v.note_unavailable(2, later), since, "still not Online");
    }

    #[test]
    fn a_users_latest_session_can_be_limited_to_usable_nodes() {
        let v = ClusterView::new(1);
        v.upsert_session(session("on-1", Some(1), Some("ann"), 100));
        v.upsert_session(session("on-2", Some(2), Some("ann"), 200));
        assert_eq!(v.latest_session_where("ann", |n| n != 2).unwrap().record.key, "on-1");
        assert!(v.latest_session_where("ann", |_| false).is_none());
    }
}

/// The view's memory per session, measured (issue 12): not a test, run with
/// `cargo test --release --lib view_memory -- --ignored --nocapture`.
#[cfg(test)]
mod memory {
    use super::*;

    fn rss_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
    }

    #[test]
    #[ignore = "a measurement, not a test"]
    fn view_memory_per_session() {
        let v = ClusterView::new(1);
        let n = 100_000;
        let before = rss_bytes();
        for i in 0..n {
            // Keys and users as the bulk phase of bench/scale.sh writes them.
            v.upsert_session(SessionRecord {
                key: format!("user:bulk-{i}"),
                node_id: Some(i % 50),
                user_name: Some(format!("bulk-{i}")),
                kind: SessionKind::User,
                created: 1,
                last_active: 1,
            });
        }
        let after = rss_bytes();
        println!("view memory: {} bytes per session ({n} sessions)", (after - before) / n as u64);
    }
}

//! The routing decision for a request that is not a built-in endpoint and
//! not a node-to-node request. One way, in three steps:
//!
//! 1. [`read_request`] — what the request carries, without I/O: the
//!    verified user, the verified signed cookie (a pin, or a legacy v1
//!    affinity cookie), the backend key in the path;
//! 2. [`decide`] — where it goes, from memory only, in this order:
//!    a registered backend key (held, 503 with `Retry-After`, while its node
//!    is down, up to `backend-key-failover-after`) → the verified user's most recent session on
//!    a node that can serve it → a legacy affinity cookie's session → for a
//!    verified user: place the user (or the node it was placed on from
//!    memory during a registry outage); for an anonymous browser: its pin,
//!    or a new pin chosen by the balancer from memory;
//! 3. [`route`] — acts on it: looks up an unknown backend key first (bounded,
//!    `backend_keys`), places or moves registry sessions (`placement`),
//!    places a user from memory when the registry is unavailable
//!    (`degraded`), sets the pin cookie, and answers 503 when no node can
//!    take the request.
//!
//! State is created only for something worth remembering: a verified user
//! (a `user:<name>` session, under the per-user cross-node lock) or a
//! backend key its backend answered. An anonymous browser costs no lock, no
//! database round trip and no notification: its pin cookie is the only record.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pingora::http::RequestHeader;
use pingora::prelude::*;

use super::backend_keys;
use super::breaker::mono_ms;
use super::cookie::{self, AffinityCookie, Pin};
use super::degraded::DegradedPlacements;
use super::placement::{self, Job, MoveReason, PlaceError};
use super::{RequestCtx, Route, Router, Via, identity, now_secs, status_error};
use crate::balancer::{Balancer, Candidate, PlacementRequest};
use crate::cluster::view::SessionEntry;
use crate::cluster::{ClusterView, NodeId, NodeStatus, SessionKind, user_session_key};
use crate::config::SessionPathPattern;
use crate::metrics::METRICS;

/// Longest session key accepted from a path.
pub const MAX_KEY_LEN: usize = 128;
/// The longest one registry call of a placement may take: a database that
/// is down fails the placement this fast (then the user is placed from
/// memory), not after the pool's connect timeout.
pub const PLACEMENT_CALL_WAIT: Duration = Duration::from_millis(500);
/// A request fails over at most this many times.
pub const MAX_FAILOVERS: usize = 3;

/// The backend key in `path`, if the path matches the pattern: the text
/// after the prefix up to the suffix (or the end of the path), made of
/// 1–128 of `[A-Za-z0-9._~-]`.
pub fn path_key(pattern: &SessionPathPattern, path: &str) -> Option<String> {
    let rest = path.strip_prefix(pattern.prefix.as_str())?;
    let end = rest.bytes().position(|b| !(b.is_ascii_alphanumeric() || b"._~-".contains(&b))).unwrap_or(rest.len());
    let (key, after) = rest.split_at(end);
    if key.is_empty() || key.len() > MAX_KEY_LEN || key == "." || key == ".." {
        return None;
    }
    (after.starts_with(pattern.suffix.as_str()) || after.is_empty()).then(|| key.to_string())
}

/// The user of a request: Workbench cookie (its value, if the request has
/// one), then trusted header, else none.
pub fn identify(r: &Router, req: &RequestHeader, user_cookie: Option<&str>, client: Option<IpAddr>) -> Option<String> {
    let live = r.settings();
    let id = &live.config.identity;
    if id.rstudio_user_cookie
        && let Some(value) = user_cookie
    {
        match identity::verify_workbench_cookie(&r.workbench_mac, value, SystemTime::now()) {
            Ok(user) => return Some(user),
            Err(reason) => {
                METRICS.rejected_cookies.with_label_values(&["user", reason.as_str()]).inc();
                tracing::debug!(reason = reason.as_str(), "ignored a user-id cookie that does not verify");
            }
        }
    }
    if !id.trusted_cidrs.is_empty()
        && let Some(header) = &id.trusted_header
        && client.is_some_and(|ip| identity::is_trusted(ip, &id.trusted_cidrs))
        && let Some(value) = req.headers.get(header.as_str())
        && let Ok(user) = value.to_str()
    {
        let user = user.trim();
        if !user.is_empty() && user.len() <= 256 {
            return Some(user.to_string());
        }
    }
    None
}

pub(crate) fn cookie_headers(req: &RequestHeader) -> impl Iterator<Item = &[u8]> {
    req.headers.get_all(http::header::COOKIE).iter().map(|v| v.as_bytes())
}

/// What a request carries, verified.
#[derive(Debug, Clone, Default)]
pub struct RequestFacts {
    /// The verified user, if any.
    pub user: Option<String>,
    /// The signed cookie, if it verified (a rejected one counts as absent).
    pub cookie: Option<Arc<AffinityCookie>>,
    /// A backend key in the path.
    pub path_key: Option<String>,
    /// The path key's session as a registry lookup found it, for when the
    /// view could not keep it (see `max-sessions-in-memory`).
    pub path_session: Option<Arc<SessionEntry>>,
}

impl RequestFacts {
    /// The pin the browser carries, if any.
    pub fn pin(&self) -> Option<&Pin> {
        self.cookie.as_deref().and_then(AffinityCookie::pin)
    }
}

/// Read identity, the signed cookie and the path key. Counts cookies that
/// do not verify (they are then ignored, never trusted).
pub fn read_request(r: &Router, req: &RequestHeader, client: Option<IpAddr>, now_secs: u64) -> RequestFacts {
    let live = r.settings();
    let cfg = &live.config.sessions;
    let [signed, user_cookie] = cookie::find_cookies(
        cookie_headers(req),
        [cfg.affinity_cookie_name.as_str(), live.config.identity.user_cookie_name.as_str()],
    );
    let user = identify(r, req, user_cookie, client);
    let cookie = signed.and_then(|value| {
        r.cookies
            .verify(&r.key, value, now_secs, cfg.affinity_cookie_max_age.as_secs())
            .map_err(|reason| {
                let kind = cookie::rejection_kind(value);
                METRICS.rejected_cookies.with_label_values(&[kind, reason.as_str()]).inc();
                tracing::debug!(kind, reason = reason.as_str(), client = ?client, "ignored a cookie that does not verify");
            })
            .ok()
    });
    RequestFacts { user, cookie, path_key: path_key(&cfg.path_pattern, req.uri.path()), path_session: None }
}

/// Where `node` is reached from `here` if it can serve sessions now, else why not.
pub fn route_to(view: &ClusterView, here: NodeId, here_serves: bool, node: NodeId) -> Result<Route, MoveReason> {
    if node == here {
        return if here_serves { Ok(Route::Local) } else { Err(MoveReason::BackendDown) };
    }
    let nodes = view.nodes();
    let Some(n) = nodes.get(node) else {
        return Err(MoveReason::Deleted);
    };
    match n.status {
        NodeStatus::Online if n.router => return Err(MoveReason::Router),
        NodeStatus::Online => {}
        NodeStatus::Deleting => return Err(MoveReason::Deleted),
        _ => return Err(MoveReason::Stopped),
    }
    if !view.is_reachable(node) {
        return Err(MoveReason::Unreachable);
    }
    n.socket_addr().map(|addr| Route::Peer { id: node, addr }).ok_or(MoveReason::Unreachable)
}

/// Whether the session's node can serve it now, and how to reach it.
pub fn check(r: &Router, entry: &SessionEntry) -> Result<Route, MoveReason> {
    let node = entry.record.node_id.ok_or(MoveReason::Deleted)?;
    route_to(&r.view, r.self_id, r.serves_locally(), node)
}

/// The nodes that may take a new session or pin, minus `exclude`: eligible
/// (Online, reachable, not in offline mode, not a router; this node only
/// while its backend is up), with their session counts and the pins this
/// node issued to them recently. Sorted by id.
pub fn candidates(
    view: &ClusterView,
    here: NodeId,
    here_serves: bool,
    exclude: &[NodeId],
    now: Instant,
) -> Vec<Candidate> {
    let nodes = view.nodes();
    let eligible = view.eligible(nodes.with_addresses(), |n| !exclude.contains(&n.id) && (n.id != here || here_serves));
    let mut out: Vec<Candidate> = view.with_session_counts(|counts| {
        eligible
            .into_iter()
            .map(|(n, address)| Candidate {
                id: n.id,
                address: address.clone(),
                sessions: counts.get(&n.id).copied().unwrap_or(0),
                recent_pins: 0,
                load: n.load,
                cpus: n.cpus,
            })
            .collect()
    });
    if !out.is_empty() {
        view.pins().each(now, |id, pins| {
            if let Ok(i) = out.binary_search_by_key(&id, |c| c.id) {
                out[i].recent_pins = pins as usize;
            }
        });
    }
    out
}

/// What routing reads besides the request: this node's memory.
pub struct Memory<'a> {
    pub view: &'a ClusterView,
    pub here: NodeId,
    /// Whether this node serves sessions itself right now.
    pub here_serves: bool,
    pub balancer: &'a dyn Balancer,
    pub degraded: &'a DegradedPlacements,
    /// `backend-key-failover-after` (zero: never).
    pub key_failover_after: Duration,
}

impl Memory<'_> {
    fn route_to(&self, node: NodeId) -> Result<Route, MoveReason> {
        route_to(self.view, self.here, self.here_serves, node)
    }

    fn candidates(&self, exclude: &[NodeId], now: Instant) -> Vec<Candidate> {
        candidates(self.view, self.here, self.here_serves, exclude, now)
    }

    /// The balancer's choice from memory for `key` (a pin id) or `user`.
    fn choose_now(&self, key: &str, user: Option<&str>, exclude: &[NodeId], now: Instant) -> Option<(NodeId, Route)> {
        let candidates = self.candidates(exclude, now);
        let node = self.balancer.choose_now(&PlacementRequest { key, user, candidates: &candidates })?;
        self.route_to(node).ok().map(|route| (node, route))
    }
}

/// How a registered session was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// The backend key in the path.
    PathKey,
    /// The verified user's most recent session.
    User,
    /// A legacy (v1) affinity cookie's session.
    Legacy,
}

/// Why a new pin is issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinReason {
    /// The browser had no valid pin.
    New,
    /// Its pin's node can no longer take it.
    Replaced(MoveReason),
}

/// Where a request goes, decided from memory.
#[derive(Debug)]
pub enum Decision {
    /// A registered session on a node that can serve it.
    Session { entry: Arc<SessionEntry>, route: Route, found: Found },
    /// A registered session whose node cannot serve it: re-place it.
    Move { entry: Arc<SessionEntry>, reason: MoveReason, found: Found },
    /// A backend key whose node cannot serve it now but may come back: it
    /// keeps its placement; the request gets 503 with `Retry-After`.
    Hold { entry: Arc<SessionEntry>, reason: MoveReason, retry_after: Duration },
    /// A verified user with no session a node can serve: place one.
    PlaceUser { user: String },
    /// A verified user placed from memory while the registry was unavailable.
    Degraded { user: String, node: NodeId, route: Route },
    /// An anonymous browser following its pin.
    Pinned { pin: Pin, route: Route },
    /// An anonymous browser pinned now (its cookie is to be set).
    NewPin { pin: Pin, route: Route, reason: PinReason },
    /// No node can take the request.
    NoNode,
}

fn by_session(m: &Memory<'_>, entry: Arc<SessionEntry>, found: Found, now: Instant) -> Decision {
    match entry.record.node_id.ok_or(MoveReason::Deleted).and_then(|node| m.route_to(node)) {
        Ok(route) => Decision::Session { entry, route, found },
        Err(reason) if found == Found::PathKey => {
            match hold_backend_key(m.view, &entry, reason, m.key_failover_after, now) {
                Some(retry_after) => Decision::Hold { entry, reason, retry_after },
                None => Decision::Move { entry, reason, found },
            }
        }
        Err(reason) => Decision::Move { entry, reason, found },
    }
}

/// Whether a backend key whose node cannot serve it (for `reason`) keeps its
/// placement now, and for how much longer at most ([`Duration::MAX`]: until
/// its node is back). A backend key lives only in its node's backend: moving
/// it elsewhere answers 404 and strands it there after its node is back. So
/// while the node is down, unreachable, stopped or its backend down, the key
/// stays, until `failover_after` (zero: never) has passed since the node was
/// first seen failing. A deleted node (or one that became a router) never
/// takes its keys back: they move at once, as do sessions of other kinds.
pub fn hold_backend_key(
    view: &ClusterView,
    entry: &SessionEntry,
    reason: MoveReason,
    failover_after: Duration,
    now: Instant,
) -> Option<Duration> {
    if entry.record.kind != SessionKind::Backend {
        return None;
    }
    let node = entry.record.node_id?;
    match reason {
        MoveReason::Deleted | MoveReason::Router => return None,
        MoveReason::Stopped | MoveReason::Unreachable | MoveReason::BackendDown | MoveReason::ConnectFailure => {}
    }
    let since = view.note_unavailable(node, now);
    if failover_after.is_zero() {
        return Some(Duration::MAX);
    }
    let down_for = now.saturating_duration_since(since);
    (down_for < failover_after).then(|| failover_after - down_for)
}

/// The `Retry-After` seconds of a held backend key: when its node is next
/// checked (`health-check-interval`), or when the key would move, whichever
/// is sooner; at least 1.
pub fn retry_after_secs(left: Duration, check_interval: Duration) -> u64 {
    left.min(check_interval).as_secs_f64().ceil().max(1.0) as u64
}

/// Decide where a request goes, from memory only (see the module doc for
/// the order). A new pin is chosen by the balancer over the candidates,
/// with the pins this node issued recently; it keeps the id of a pin it
/// replaces.
pub fn decide(m: &Memory<'_>, facts: &RequestFacts, now: Instant, now_secs: u64) -> Decision {
    // 1. A registered backend key.
    if let Some(entry) =
        facts.path_key.as_deref().and_then(|k| m.view.session(k)).or_else(|| facts.path_session.clone())
    {
        return by_session(m, entry, Found::PathKey, now);
    }
    let legacy = facts.cookie.as_deref().and_then(AffinityCookie::legacy).and_then(|a| m.view.session(a.session_key()));
    if let Some(user) = &facts.user {
        // 2. The user's most recent session on a node that can serve it.
        if let Some(entry) = m.view.latest_session_where(user, |node| m.route_to(node).is_ok()) {
            return by_session(m, entry, Found::User, now);
        }
        // 3. A legacy cookie's session, while its node serves it.
        if let Some(entry) = legacy.filter(|e| e.record.node_id.is_some_and(|n| m.route_to(n).is_ok())) {
            return by_session(m, entry, Found::Legacy, now);
        }
        // 4. Placed from memory during a registry outage, not registered yet.
        if let Some(node) = m.degraded.node_of(user)
            && let Ok(route) = m.route_to(node)
        {
            return Decision::Degraded { user: user.clone(), node, route };
        }
        return Decision::PlaceUser { user: user.clone() };
    }
    // Anonymous: a legacy cookie's session (re-placed if its node failed), else the pin.
    if let Some(entry) = legacy {
        return by_session(m, entry, Found::Legacy, now);
    }
    let (id, reason) = match facts.pin() {
        Some(pin) => match m.route_to(pin.node) {
            Ok(route) => return Decision::Pinned { pin: pin.clone(), route },
            Err(why) => (pin.id.clone(), PinReason::Replaced(why)),
        },
        None => (cookie::new_pin_id(), PinReason::New),
    };
    match m.choose_now(&id, None, &[], now) {
        Some((node, route)) => Decision::NewPin { pin: Pin { id, node, issued: now_secs }, route, reason },
        None => Decision::NoNode,
    }
}

/// Decide where the request goes and prepare it: look up an unknown backend
/// key, place or move sessions, set the pin cookie. Fails with 503 when no
/// node can take the request.
pub async fn route(r: &Router, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
    let now_secs = now_secs();
    let mut facts = read_request(r, session.req_header(), ctx.client, now_secs);
    // A backend key this node has not heard of yet (its notification may
    // still be on the way): one bounded registry lookup before deciding.
    if let Some(key) = &facts.path_key
        && r.view.session(key).is_none()
    {
        facts.path_session = backend_keys::lookup(r, key).await;
    }
    ctx.user = facts.user.clone();
    ctx.browser_pin = facts.pin().cloned();
    ctx.path_key_known =
        facts.path_session.is_some() || facts.path_key.as_deref().is_some_and(|k| r.view.session(k).is_some());
    ctx.path_key = facts.path_key.clone();
    let balancer = r.balancer.read().clone();
    let memory = r.memory(balancer.as_ref());
    let now = Instant::now();
    // The node a signed-in user's browser is pinned to, or a browser
    // without a pin that found a session.
    let mut pin_to: Option<(NodeId, &'static str)> = None;
    match decide(&memory, &facts, now, now_secs) {
        Decision::Session { entry, route, found } => {
            ctx.route = route;
            if let Some(node) = entry.record.node_id
                && (found == Found::User || (facts.user.is_none() && facts.cookie.is_none()))
            {
                pin_to = Some((node, if found == Found::User { "user" } else { "new" }));
            }
            ctx.via = Via::Session(entry);
        }
        Decision::Hold { entry, reason, retry_after } => {
            return hold(r, ctx, &entry, reason, retry_after);
        }
        Decision::Move { entry, reason, found } => {
            let moved = move_session(r, ctx, &memory, balancer.clone(), entry, reason, Vec::new()).await?;
            if found == Found::User
                && let Some(node) = moved.record.node_id
            {
                pin_to = Some((node, "user"));
            }
            ctx.via = Via::Session(moved);
        }
        Decision::PlaceUser { user } => {
            let node = place_user(r, ctx, &memory, balancer.clone(), &user).await?;
            pin_to = Some((node, "user"));
        }
        Decision::Degraded { user, node, route } => {
            ctx.route = route;
            ctx.via = Via::Degraded { key: user_session_key(&user) };
            pin_to = Some((node, "user"));
        }
        Decision::Pinned { pin, route } => {
            ctx.route = route;
            let max_age = r.settings().config.sessions.affinity_cookie_max_age.as_secs();
            if now_secs.saturating_sub(pin.issued) > max_age / 2 {
                let refreshed = pin.moved_to(pin.node, now_secs);
                ctx.set_cookie = Some(r.pin_cookie(&refreshed));
                ctx.via = Via::Pin(refreshed);
            } else {
                ctx.via = Via::Pin(pin);
            }
        }
        Decision::NewPin { pin, route, reason } => {
            ctx.route = route;
            let label = match reason {
                PinReason::New => "new",
                PinReason::Replaced(why) => {
                    tracing::debug!(pin = %pin.id, reason = why.as_str(), node = pin.node, "pin replaced");
                    "replaced"
                }
            };
            issue_anonymous_pin(r, ctx, pin, label, now);
        }
        Decision::NoNode => {
            METRICS.no_node_available.inc();
            return Err(status_error(503, "no node can take the request"));
        }
    }
    if let Some((node, reason)) = pin_to {
        repin(r, ctx, facts.pin(), node, reason, now_secs);
    }
    tracing::debug!(
        target: crate::telemetry::DIAGNOSTICS_TARGET,
        via = %ctx.via,
        route = ?ctx.route,
        user = ?ctx.user,
        path = %session.req_header().uri.path(),
        "routed"
    );
    if let Via::Session(entry) = &ctx.via {
        entry.touch(super::now_ms());
        entry.stream_opened();
    }
    ctx.in_flight = true;
    METRICS.in_flight.inc();
    Ok(())
}

/// Answer a request for a held backend key: 503 with `Retry-After`
/// (written by `fail_to_proxy`), the key's placement untouched.
fn hold(r: &Router, ctx: &mut RequestCtx, entry: &SessionEntry, reason: MoveReason, left: Duration) -> Result<()> {
    let secs = retry_after_secs(left, r.settings().config.cluster.health_check_interval);
    ctx.retry_after = Some(secs);
    METRICS.backend_keys_held.with_label_values(&[reason.as_str()]).inc();
    tracing::debug!(
        key = %entry.record.key,
        node = ?entry.record.node_id,
        reason = reason.as_str(),
        retry_after = secs,
        "backend key's node cannot serve it: 503, the key stays"
    );
    Err(status_error(503, "the backend key's node cannot serve it now; retry later"))
}

/// Set the cookie of a new anonymous pin and count it.
fn issue_anonymous_pin(r: &Router, ctx: &mut RequestCtx, pin: Pin, reason: &'static str, now: Instant) {
    let recent = r.view.pins().record(pin.node, now);
    METRICS.pins_recent.set(recent as i64);
    METRICS.pins_issued.with_label_values(&[reason]).inc();
    ctx.set_cookie = Some(r.pin_cookie(&pin));
    ctx.via = Via::Pin(pin);
}

/// Point the browser's pin at `node` (a signed-in user's node), unless it
/// already points there and is fresh. Keeps the pin's id.
fn repin(r: &Router, ctx: &mut RequestCtx, current: Option<&Pin>, node: NodeId, reason: &'static str, now_secs: u64) {
    let max_age = r.settings().config.sessions.affinity_cookie_max_age.as_secs();
    let pin = match current {
        Some(p) if p.node == node && now_secs.saturating_sub(p.issued) <= max_age / 2 => return,
        Some(p) if p.node == node => p.moved_to(node, now_secs),
        Some(p) => {
            METRICS.pins_issued.with_label_values(&[reason]).inc();
            p.moved_to(node, now_secs)
        }
        None => {
            METRICS.pins_issued.with_label_values(&[reason]).inc();
            Pin { id: cookie::new_pin_id(), node, issued: now_secs }
        }
    };
    ctx.set_cookie = Some(r.pin_cookie(&pin));
}

/// Place `user`'s session under the per-user lock; when the registry is
/// unavailable, place the user from memory instead. Returns the node.
async fn place_user(
    r: &Router,
    ctx: &mut RequestCtx,
    m: &Memory<'_>,
    balancer: Arc<dyn Balancer>,
    user: &str,
) -> Result<NodeId> {
    let started = mono_ms();
    if r.placements.is_open(started) {
        return place_from_memory(r, ctx, m, user, &[]);
    }
    let candidates = m.candidates(&[], Instant::now());
    if candidates.is_empty() {
        METRICS.no_node_available.inc();
        return Err(status_error(503, "no node can take a new session"));
    }
    let key = user_session_key(user);
    // The user's session on a node that cannot serve it: placing it again
    // moves it, counted with the reason (as `move_session` counts its moves).
    let leaving = m
        .view
        .session(&key)
        .and_then(|e| e.record.node_id)
        .and_then(|node| m.route_to(node).err().map(|why| (node, why)));
    let job = Job {
        key,
        kind: SessionKind::User,
        user: Some(user.to_string()),
        candidates,
        exclude: Vec::new(),
        moving: leaving.map(|(_, why)| why),
    };
    match placement::run(r.placer(balancer), job, &r.control, r.placement_limit()).await {
        Ok(placed) => {
            r.placements.succeeded(started);
            if let Some((from, why)) = leaving
                && placed.won
                && placed.entry.record.node_id != Some(from)
            {
                METRICS.session_moves.with_label_values(&[why.as_str()]).inc();
                tracing::info!(key = %placed.entry.record.key, from, to = ?placed.entry.record.node_id, reason = why.as_str(), "session moved");
            }
            let node = placed.entry.record.node_id.ok_or(MoveReason::Deleted);
            match node.and_then(|n| m.route_to(n).map(|route| (n, route))) {
                Ok((node, route)) => {
                    ctx.route = route;
                    ctx.via = Via::Session(placed.entry);
                    Ok(node)
                }
                Err(_) => {
                    METRICS.no_node_available.inc();
                    Err(status_error(503, "the user's node cannot serve the request"))
                }
            }
        }
        Err(PlaceError::NoCandidate) => {
            METRICS.no_node_available.inc();
            Err(status_error(503, "no node can take a new session"))
        }
        Err(e) => {
            r.placements.trip(mono_ms());
            tracing::warn!(error = %e, user, "cannot place the user in the registry; placing from memory");
            place_from_memory(r, ctx, m, user, &[])
        }
    }
}

/// Place `user` from memory (the registry is unavailable): the balancer's
/// choice now, remembered until it can be registered.
fn place_from_memory(
    r: &Router,
    ctx: &mut RequestCtx,
    m: &Memory<'_>,
    user: &str,
    exclude: &[NodeId],
) -> Result<NodeId> {
    let key = user_session_key(user);
    // Users placed from memory count as the sessions they will be.
    let waiting = m.degraded.per_node();
    let mut candidates = m.candidates(exclude, Instant::now());
    for c in &mut candidates {
        c.sessions += waiting.get(&c.id).copied().unwrap_or(0);
    }
    let chosen = m.balancer.choose_now(&PlacementRequest { key: &key, user: Some(user), candidates: &candidates });
    let Some((node, route)) = chosen.and_then(|node| m.route_to(node).ok().map(|route| (node, route))) else {
        METRICS.no_node_available.inc();
        return Err(status_error(503, "no node can take a new session"));
    };
    if !r.degraded.remember(user, node) {
        tracing::warn!(user, "too many users placed from memory are waiting; this one is not remembered");
    }
    METRICS.degraded_placements.inc();
    tracing::debug!(user, node, "user placed from memory (registry unavailable); registered when it answers");
    ctx.route = route;
    ctx.via = Via::Degraded { key };
    Ok(node)
}

/// Move a registered session off a node that cannot serve it (or that
/// failed during this request). When the registry is unavailable the
/// request is routed to a node chosen from memory and the move is not recorded.
async fn move_session(
    r: &Router,
    ctx: &mut RequestCtx,
    m: &Memory<'_>,
    balancer: Arc<dyn Balancer>,
    entry: Arc<SessionEntry>,
    reason: MoveReason,
    exclude: Vec<NodeId>,
) -> Result<Arc<SessionEntry>> {
    let from = entry.record.node_id;
    let user = ctx.user.clone().or_else(|| entry.record.user_name.clone());
    let job = Job {
        key: entry.record.key.clone(),
        kind: entry.record.kind,
        user: user.clone(),
        candidates: m.candidates(&exclude, Instant::now()),
        exclude: exclude.clone(),
        moving: Some(reason),
    };
    let started = mono_ms();
    let failure = if r.placements.is_open(started) {
        // Placements failed moments ago: do not wait for the registry.
        None
    } else {
        match placement::run(r.placer(balancer), job, &r.control, r.placement_limit()).await {
            Ok(placed) => {
                r.placements.succeeded(started);
                let rec = &placed.entry.record;
                if rec.node_id != from {
                    METRICS.session_moves.with_label_values(&[reason.as_str()]).inc();
                    tracing::info!(key = %rec.key, from = ?from, to = ?rec.node_id, reason = reason.as_str(), "session moved");
                }
                return match rec.node_id.ok_or(MoveReason::Deleted).and_then(|n| m.route_to(n)) {
                    Ok(route) => {
                        ctx.route = route;
                        Ok(placed.entry)
                    }
                    Err(_) => {
                        METRICS.no_node_available.inc();
                        Err(status_error(503, "the session's node cannot serve it"))
                    }
                };
            }
            Err(PlaceError::NoCandidate) => {
                METRICS.no_node_available.inc();
                return Err(status_error(503, "no node can take this session"));
            }
            Err(e) => {
                r.placements.trip(mono_ms());
                Some(e)
            }
        }
    };
    // The registry is unavailable: route the known session anyway, unrecorded.
    let Some((node, route)) = m.choose_now(&entry.record.key, user.as_deref(), &exclude, Instant::now()) else {
        METRICS.no_node_available.inc();
        return Err(status_error(503, "no node can take this session"));
    };
    match failure {
        Some(e) => {
            tracing::warn!(error = %e, key = %entry.record.key, node, "registry unavailable: routing the session to a new node without recording the move")
        }
        None => {
            tracing::debug!(key = %entry.record.key, node, "placements are failing: routing the session to a new node without recording the move")
        }
    }
    ctx.route = route;
    Ok(entry)
}

/// After a failure during this request (a connect failure, or the peer's
/// backend is down): route to the next node that can take it.
pub async fn fail_over(r: &Router, ctx: &mut RequestCtx) -> Result<()> {
    let reason =
        if std::mem::take(&mut ctx.peer_backend_down) { MoveReason::BackendDown } else { MoveReason::ConnectFailure };
    let balancer = r.balancer.read().clone();
    let memory = r.memory(balancer.as_ref());
    let failed = ctx.failed.clone();
    let now = Instant::now();
    match std::mem::take(&mut ctx.via) {
        Via::Session(entry) if entry.record.kind == SessionKind::Backend => {
            if ctx.path_key.as_deref() == Some(entry.record.key.as_str()) {
                // The key itself was asked for: it stays on its node while it may come back.
                if let Some(left) = hold_backend_key(
                    &r.view,
                    &entry,
                    reason,
                    r.settings().config.cluster.backend_key_failover_after,
                    now,
                ) {
                    let result = hold(r, ctx, &entry, reason, left);
                    ctx.via = Via::Session(entry);
                    return result;
                }
            } else if let Some(user) = ctx.user.clone() {
                // A user routed by their latest backend key: the user moves, the key does not.
                entry.stream_closed();
                let node = place_user(r, ctx, &memory, balancer.clone(), &user).await?;
                if let Via::Session(placed) = &ctx.via {
                    placed.stream_opened();
                }
                let pin = ctx.browser_pin.clone();
                repin(r, ctx, pin.as_ref(), node, "failover", super::now_secs());
                return Ok(());
            }
            let moved = move_session(r, ctx, &memory, balancer.clone(), entry.clone(), reason, failed).await?;
            entry.stream_closed();
            moved.stream_opened();
            ctx.via = Via::Session(moved);
        }
        Via::Session(entry) => {
            let moved = move_session(r, ctx, &memory, balancer.clone(), entry.clone(), reason, failed).await?;
            // The in-flight count moves with the request.
            entry.stream_closed();
            moved.stream_opened();
            if ctx.user.is_some()
                && let Some(node) = moved.record.node_id
            {
                let pin = ctx.browser_pin.clone();
                repin(r, ctx, pin.as_ref(), node, "failover", super::now_secs());
            }
            ctx.via = Via::Session(moved);
        }
        Via::Pin(pin) => {
            let Some((node, route)) = memory.choose_now(&pin.id, None, &failed, now) else {
                METRICS.no_node_available.inc();
                return Err(status_error(503, "no node could take the request"));
            };
            tracing::debug!(pin = %pin.id, from = pin.node, to = node, reason = reason.as_str(), "pin moved");
            ctx.route = route;
            issue_anonymous_pin(r, ctx, pin.moved_to(node, now_secs()), "failover", now);
        }
        Via::Degraded { .. } => {
            let user = ctx.user.clone().unwrap_or_default();
            let node = place_from_memory(r, ctx, &memory, &user, &failed)?;
            let pin = ctx.browser_pin.clone();
            repin(r, ctx, pin.as_ref(), node, "failover", super::now_secs());
        }
        Via::None => return Err(status_error(503, "no node could take the request")),
    }
    Ok(())
}

#[cfg(test)]
mod tests;

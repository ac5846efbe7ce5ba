//! The routing decision for a request that is not a built-in endpoint and
//! not a node-to-node request: identity, session keys, and the order
//! registered backend key → affinity key → the user's most recent session →
//! place a new one. Known sessions are decided from the in-memory view.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pingora::http::RequestHeader;
use pingora::prelude::*;

use super::cookie::{self, Affinity};
use super::placement::{self, MoveReason};
use super::{RequestCtx, Route, Router, identity, now_ms, now_secs, registry_calls};
use crate::cluster::view::SessionEntry;
use crate::cluster::{NodeRecord, NodeStatus, SessionKind};
use crate::config::SessionPathPattern;
use crate::metrics::METRICS;

/// Longest session key accepted from a path.
pub const MAX_KEY_LEN: usize = 128;

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
    let id = &r.config.identity;
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

/// Where a node is reached.
pub fn node_addr(node: &NodeRecord) -> Option<SocketAddr> {
    let ip = node.ipv4.or_else(|| node.host.parse().ok())?;
    Some(SocketAddr::new(ip, node.port))
}

/// Whether the session's node can serve it now, and how to reach it.
pub fn check(r: &Router, entry: &SessionEntry) -> Result<Route, MoveReason> {
    let Some(id) = entry.record.node_id else {
        return Err(MoveReason::Deleted);
    };
    if id == r.self_id {
        return if r.serves_locally() { Ok(Route::Local) } else { Err(MoveReason::BackendDown) };
    }
    let nodes = r.view.nodes();
    let Some(node) = nodes.get(id) else {
        return Err(MoveReason::Deleted);
    };
    match node.status {
        NodeStatus::Online if !node.router => {}
        NodeStatus::Deleting => return Err(MoveReason::Deleted),
        _ => return Err(MoveReason::Stopped),
    }
    if !r.view.is_reachable(id) {
        return Err(MoveReason::Unreachable);
    }
    node_addr(node).map(|addr| Route::Peer { id, addr }).ok_or(MoveReason::Unreachable)
}

/// What the request carries, and the session it belongs to as far as the
/// in-memory view knows — computed without I/O.
#[derive(Debug)]
pub struct Decision {
    pub user: Option<String>,
    /// The verified affinity cookie, or a fresh one.
    pub affinity: Arc<Affinity>,
    /// `Set-Cookie` value when the cookie is new or refreshed.
    pub set_cookie: Option<String>,
    /// A backend key in the path.
    pub path_key: Option<String>,
    /// Whether the view knows the path key.
    pub path_key_known: bool,
    /// The session found, in routing order: path key, affinity key, the user's latest.
    pub found: Option<Arc<SessionEntry>>,
}

/// The routing decision's pure part: identity, cookies, keys, lookups in
/// the view. Counts rejected cookies.
pub fn decide(r: &Router, req: &RequestHeader, client: Option<IpAddr>, now: u64) -> Decision {
    let cfg = &r.config.sessions;
    let [affinity_cookie, user_cookie] = cookie::find_cookies(
        cookie_headers(req),
        [cfg.affinity_cookie_name.as_str(), r.config.identity.user_cookie_name.as_str()],
    );
    let user = identify(r, req, user_cookie, client);

    // The affinity cookie: verified, refreshed when old, replaced when bad or absent.
    let max_age = cfg.affinity_cookie_max_age.as_secs();
    let verified = affinity_cookie.and_then(|value| {
        r.cookies
            .verify(&r.key, value, now, max_age)
            .map_err(|reason| {
                METRICS.rejected_cookies.with_label_values(&["affinity", reason.as_str()]).inc();
                tracing::debug!(reason = reason.as_str(), client = ?client, "ignored an affinity cookie that does not verify");
            })
            .ok()
    });
    let set =
        |value: &str| Some(cookie::set_cookie_header(&cfg.affinity_cookie_name, value, max_age, cfg.cookie_secure));
    let (affinity, set_cookie) = match verified {
        Some(a) if now.saturating_sub(a.issued) > max_age / 2 => {
            let refreshed = cookie::sign(&r.key, &a.id, now);
            (Arc::new(a.reissued(now)), set(&refreshed))
        }
        Some(a) => (a, None),
        None => {
            let (a, value) = cookie::issue(&r.key, now);
            (Arc::new(a), set(&value))
        }
    };

    // 1. a registered backend key; 2. the affinity key; 3. the user's most recent session.
    let path_key = path_key(&cfg.path_pattern, req.uri.path());
    let by_path = path_key.as_deref().and_then(|k| r.view.session(k));
    let path_key_known = by_path.is_some();
    let found = by_path
        .or_else(|| r.view.session(affinity.session_key()))
        .or_else(|| user.as_deref().and_then(|u| r.view.latest_session_of(u)));
    Decision { user, affinity, set_cookie, path_key, path_key_known, found }
}

/// Decide where the request goes (placing or re-placing its session when needed).
pub async fn route(r: &Router, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
    let d = decide(r, session.req_header(), ctx.client, now_secs());
    ctx.user = d.user;
    ctx.set_cookie = d.set_cookie;
    ctx.path_key_known = d.path_key_known;
    let mut found = d.found;
    // A backend key this node has not heard of yet (its notification may
    // still be on the way): one registry lookup before routing otherwise.
    if let Some(pk) = &d.path_key
        && !d.path_key_known
        && let Some(entry) = registry_calls::lookup(r, pk).await
    {
        ctx.path_key_known = true;
        found = Some(entry);
    }
    ctx.path_key = d.path_key;

    let entry = match found {
        Some(entry) => match check(r, &entry) {
            Ok(route) => {
                ctx.route = route;
                entry
            }
            Err(reason) => placement::replace(r, ctx, entry, reason).await?,
        },
        // 4. a new session under the affinity key
        None => placement::place_new(r, ctx, d.affinity.session_key().to_string(), SessionKind::Affinity).await?,
    };
    tracing::debug!(
        target: crate::telemetry::DIAGNOSTICS_TARGET,
        key = %entry.record.key,
        node = ?entry.record.node_id,
        route = ?ctx.route,
        user = ?ctx.user,
        path = %req_path(session),
        "routed"
    );
    entry.touch(now_ms());
    entry.stream_opened();
    ctx.in_flight = true;
    METRICS.in_flight.inc();
    ctx.entry = Some(entry);
    Ok(())
}

fn req_path(session: &Session) -> &str {
    session.req_header().uri.path()
}

/// How long the proxy waits for the control plane (placements, lookups).
pub(crate) fn control_timeout(r: &Router) -> Duration {
    r.config.proxy.timeout.unwrap_or(Duration::from_secs(30)).max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(s: &str) -> SessionPathPattern {
        SessionPathPattern::parse(s).unwrap()
    }

    #[test]
    fn backend_keys_come_from_the_path_pattern() {
        let p = pattern("/s/{key}/");
        assert_eq!(path_key(&p, "/s/3a9e1f00c2b1a4d5e6f70/").as_deref(), Some("3a9e1f00c2b1a4d5e6f70"));
        assert_eq!(path_key(&p, "/s/abc/rpc/console_input").as_deref(), Some("abc"));
        assert_eq!(path_key(&p, "/s/abc").as_deref(), Some("abc"));
        assert_eq!(path_key(&p, "/s/"), None);
        assert_eq!(path_key(&p, "/s/../etc/passwd"), None);
        assert_eq!(path_key(&p, "/s/ab%2Fc/"), None, "no encoded separators");
        assert_eq!(path_key(&p, "/x/abc/"), None);
        assert_eq!(path_key(&p, &format!("/s/{}/", "a".repeat(129))), None);
        let jupyter = pattern("/user/{key}/");
        assert_eq!(path_key(&jupyter, "/user/alice/lab").as_deref(), Some("alice"));
    }
}

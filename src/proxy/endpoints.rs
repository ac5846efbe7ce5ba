//! Endpoints sessionlb answers itself; they create no session.
//!
//! - `GET /health`: 200 with this node's state as JSON; 503 while its local
//!   backend is down (peers' probes then treat the node as unreachable), and
//!   while it drains before stopping (marked so that peers keep routing its
//!   sessions here).
//! - `GET /metrics`: Prometheus text, to `status-page-cidrs` and cluster node
//!   addresses only (anyone else uses `metrics-address`).
//! - `GET /load-balancer/status` (`?format=json` or `Accept: application/json`
//!   for JSON, `Accept: text/html` for the page in `status_page`): every
//!   node, its sessions and, separately, the anonymous pins it issued
//!   recently, gathered from all nodes (peers' reports reused for a second);
//!   readable only from `status-page-cidrs` (default loopback) and cluster
//!   node addresses (403 otherwise, counted, logged at most every 10 s).
//!   Load is shown as a fraction of the node's total CPU (load average ÷
//!   CPUs); the JSON form has the raw load averages and CPU count too.
//! - `GET /load-balancer/node-info`: one node's own report, for the status
//!   page of another node; requires a valid signed node-to-node header.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use serde::{Deserialize, Serialize};

use super::forward::{self, BACKEND_DOWN_HEADER, RequestLine};
use super::{RequestCtx, Router, now_ms};
use crate::cluster::node::VERSION;
use crate::cluster::{NodeId, NodeStatus, load};
use crate::metrics::{self, METRICS};

const HEALTH: &str = "/health";
const METRICS_PATH: &str = "/metrics";
const STATUS: &str = "/load-balancer/status";
const NODE_INFO: &str = "/load-balancer/node-info";
/// Refused status requests: one log line per interval at most.
static STATUS_REFUSALS_LOG: super::log_limit::LogLimit =
    super::log_limit::LogLimit::new(super::log_limit::DEFAULT_INTERVAL);
/// How long the status page waits for a peer's report.
const GATHER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// The session key a node-info request is signed with.
const NODE_INFO_KEY: &str = "node-info";

/// Whether sessionlb answers `path` itself.
pub fn is_builtin(path: &str) -> bool {
    matches!(path, HEALTH | METRICS_PATH | STATUS | NODE_INFO)
}

/// Answer a built-in endpoint.
pub async fn serve(r: &Router, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
    match session.req_header().uri.path() {
        HEALTH => health(r, session).await,
        METRICS_PATH if may_read_status(r, ctx.client) => {
            respond(session, 200, "text/plain; version=0.0.4", metrics::render().into()).await
        }
        METRICS_PATH => {
            METRICS.status_refused.inc();
            respond_text(
                session,
                403,
                "forbidden: /metrics is served to status-page-cidrs and cluster nodes here; use metrics-address\n",
            )
            .await
        }
        STATUS => status(r, session, ctx).await,
        _ => node_info(r, session, ctx).await,
    }
}

pub async fn respond(session: &mut Session, status: u16, content_type: &str, body: Bytes) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header("content-type", content_type)?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

pub async fn respond_text(session: &mut Session, status: u16, text: &'static str) -> Result<()> {
    respond(session, status, "text/plain; charset=utf-8", Bytes::from_static(text.as_bytes())).await
}

/// 503 with the marker that makes the sending node fail over.
pub async fn respond_backend_down(session: &mut Session) -> Result<()> {
    let body = Bytes::from_static(b"this node's backend is down\n");
    let mut resp = ResponseHeader::build(503, Some(4))?;
    resp.insert_header(BACKEND_DOWN_HEADER, "1")?;
    resp.insert_header("content-type", "text/plain; charset=utf-8")?;
    resp.insert_header("content-length", body.len().to_string())?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

async fn health(r: &Router, session: &mut Session) -> Result<()> {
    let me = r.view.self_node();
    let backend_up = r.backend.is_none() || r.backend_up.load(Ordering::Relaxed);
    let draining = crate::ops::drain::is_draining();
    let body = serde_json::json!({
        "status": if draining { "draining" } else if backend_up { "ok" } else { "backend down" },
        "node_id": r.self_id,
        "node": r.self_address,
        "version": VERSION,
        "router": r.backend.is_none(),
        "backend_up": backend_up,
        "offline_mode": me.as_ref().is_some_and(|n| n.offline_mode),
        "cluster_nodes": r.view.nodes().nodes.len(),
        "sessions": r.view.session_count(),
        "pins_recent": r.view.pins().total(std::time::Instant::now()),
        "balancer": r.balancer.read().name(),
    });
    if draining {
        // 503 for outer load balancers; the marker keeps peers routing this node's sessions here.
        let body = Bytes::from(body.to_string());
        let mut resp = ResponseHeader::build(503, Some(4))?;
        resp.insert_header("content-type", "application/json")?;
        resp.insert_header("content-length", body.len().to_string())?;
        resp.insert_header("cache-control", "no-store")?;
        resp.insert_header(super::health::DRAINING_HEADER, "1")?;
        session.write_response_header(Box::new(resp), false).await?;
        return session.write_response_body(Some(body), true).await;
    }
    respond(session, if backend_up { 200 } else { 503 }, "application/json", body.to_string().into()).await
}

/// One node's report of itself (what `/load-balancer/node-info` returns).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    pub address: String,
    pub version: String,
    pub load: [f64; 3],
    pub cpus: u32,
    pub backend_up: bool,
    pub in_flight: i64,
    pub balancer: String,
    /// Anonymous pins this node issued recently (absent from older versions).
    #[serde(default)]
    pub pins_recent: u64,
    pub counters: BTreeMap<String, u64>,
    /// Draining before it stops (absent from older nodes' reports).
    #[serde(default)]
    pub draining: bool,
}

fn counters() -> BTreeMap<String, u64> {
    let m = &*METRICS;
    BTreeMap::from([
        ("rejected_cookies".into(), metrics::total(&m.rejected_cookies)),
        ("rejected_forwards".into(), metrics::total(&m.rejected_forwards)),
        ("placements".into(), metrics::total(&m.placements)),
        ("session_moves".into(), metrics::total(&m.session_moves)),
        ("backend_keys_registered".into(), m.backend_keys_registered.get()),
        ("registry_breaker_trips".into(), m.registry_breaker_trips.get()),
        ("placement_races_lost".into(), m.placement_races_lost.get()),
        ("balancer_fallbacks".into(), m.balancer_fallbacks.get()),
        ("lock_failures".into(), m.lock_failures.get()),
        ("connect_failures".into(), metrics::total(&m.connect_failures)),
        ("no_node_available".into(), m.no_node_available.get()),
        ("pins_issued".into(), metrics::total(&m.pins_issued)),
        ("degraded_placements".into(), m.degraded_placements.get()),
        ("placements_cancelled".into(), m.placements_cancelled.get()),
        ("custom_balancer_cap_reached".into(), m.custom_balancer_cap_reached.get()),
        ("view_capacity_reached".into(), m.view_capacity_reached.get()),
    ])
}

fn self_info(r: &Router) -> NodeInfo {
    let recorded = r.view.self_node();
    NodeInfo {
        id: r.self_id,
        address: r.self_address.clone(),
        version: VERSION.into(),
        load: load::read_loadavg(&r.config.node.loadavg_path)
            .unwrap_or_else(|_| recorded.as_ref().map_or([0.0; 3], |n| n.load)),
        cpus: load::cpu_count(),
        backend_up: r.backend.is_none() || r.backend_up.load(Ordering::Relaxed),
        in_flight: METRICS.in_flight.get(),
        balancer: r.balancer.read().name().into(),
        pins_recent: r.view.pins().total(std::time::Instant::now()),
        counters: counters(),
        draining: crate::ops::drain::is_draining(),
    }
}

async fn node_info(r: &Router, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
    match r.verify_forward(session.req_header(), ctx.client) {
        Ok(f) if f.key == NODE_INFO_KEY => {
            let body = serde_json::to_string(&self_info(r)).expect("serialisable");
            respond(session, 200, "application/json", body.into()).await
        }
        Ok(_) => respond_text(session, 403, "forbidden\n").await,
        Err(reason) => {
            super::count_refused_forward(reason, ctx.client, NODE_INFO, "a node-info request");
            respond_text(session, 403, "forbidden: node-to-node endpoint\n").await
        }
    }
}

/// One of `status-page-cidrs` (default loopback) or a cluster node's address.
fn may_read_status(r: &Router, client: Option<IpAddr>) -> bool {
    let Some(ip) = client else { return false };
    super::identity::is_trusted(ip, &r.settings().config.proxy.status_page_cidrs) || r.is_node_address(ip)
}

/// How long peers' reports are reused: a burst of status requests (a
/// refreshing page, several viewers) asks each peer at most once a second.
const GATHER_CACHE: std::time::Duration = std::time::Duration::from_secs(1);

/// Peers' reports gathered last, and when. The lock is held while
/// gathering, so concurrent status requests share one round of calls.
/// (when, the peers asked, their reports)
type PeerReports = (std::time::Instant, Vec<NodeId>, BTreeMap<NodeId, NodeInfo>);
static PEER_REPORTS: tokio::sync::Mutex<Option<PeerReports>> = tokio::sync::Mutex::const_new(None);

/// Every online node's report: this node's fresh, peers' from the last
/// second's round of calls (if the same peers are to be asked: one that
/// became reachable or unreachable since is seen at once), else asked now.
async fn gather(r: &Router) -> BTreeMap<NodeId, NodeInfo> {
    let peers = peers_to_ask(r);
    let mut cached = PEER_REPORTS.lock().await;
    let mut out = match cached.as_ref() {
        Some((at, asked, infos)) if at.elapsed() < GATHER_CACHE && *asked == peers => infos.clone(),
        _ => {
            let infos = gather_peers(r).await;
            METRICS.status_peer_rounds.inc();
            *cached = Some((std::time::Instant::now(), peers, infos.clone()));
            infos
        }
    };
    drop(cached);
    out.insert(r.self_id, self_info(r));
    out
}

/// Peers known to be down are not asked.
fn should_ask(r: &Router, n: &crate::cluster::NodeRecord) -> bool {
    n.id != r.self_id && n.status == NodeStatus::Online && !n.router && r.view.is_reachable(n.id)
}

/// The peers a status request asks now.
fn peers_to_ask(r: &Router) -> Vec<NodeId> {
    r.view.nodes().nodes.iter().filter(|n| should_ask(r, n)).map(|n| n.id).collect()
}

/// Ask every other online node for its report, concurrently, each bounded by `timeout`.
async fn gather_peers(r: &Router) -> BTreeMap<NodeId, NodeInfo> {
    let nodes = r.view.nodes();
    let mut calls = Vec::new();
    // Peers known to be down are not asked, and no peer may hold the page up
    // for long: a frozen node answers nothing.
    let wait = r.control_timeout().min(GATHER_TIMEOUT);
    for n in nodes.nodes.iter().filter(|n| should_ask(r, n)) {
        let Some(addr) = n.socket_addr() else { continue };
        let scheme = if r.config.proxy.ssl_enabled { "https" } else { "http" };
        let host = addr.to_string();
        let line = RequestLine { method: "GET", host: &host, path_and_query: NODE_INFO };
        let signature = forward::sign(&r.key, r.self_id, n.id, now_ms(), NODE_INFO_KEY, None, &line);
        let request =
            r.http.get(format!("{scheme}://{host}{NODE_INFO}")).header(forward::HEADER, signature).timeout(wait);
        let id = n.id;
        calls.push(r.control.spawn(async move {
            let resp = request.send().await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            resp.json::<NodeInfo>().await.ok().map(|info| (id, info))
        }));
    }
    let mut out = BTreeMap::new();
    for call in calls {
        if let Ok(Some((id, info))) = call.await {
            out.insert(id, info);
        }
    }
    out
}

async fn status(r: &Router, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
    if !may_read_status(r, ctx.client) {
        METRICS.status_refused.inc();
        if let Some(suppressed) = STATUS_REFUSALS_LOG.allow(std::time::Instant::now()) {
            tracing::info!(
                client = ?ctx.client,
                suppressed,
                "status page refused: not in status-page-cidrs nor a cluster node (at most one such line per 10 s)"
            );
        }
        return respond_text(
            session,
            403,
            "forbidden: the status page is readable from status-page-cidrs and cluster nodes only\n",
        )
        .await;
    }
    let req = session.req_header();
    let query = |param: &str| req.uri.query().and_then(|q| q.split('&').find_map(|p| p.strip_prefix(param)));
    let accept = req.headers.get("accept").and_then(|a| a.to_str().ok()).unwrap_or("");
    let json = query("format=") == Some("json") || accept.contains("application/json");
    let html = !json && (query("format=") == Some("html") || accept.contains("text/html"));
    let refresh = query("refresh=").map_or(Some(5), |v| v.parse::<u32>().ok());
    let infos = gather(r).await;
    let nodes = r.view.nodes();
    let sessions = r.view.sessions();
    let listed: Vec<_> = nodes
        .nodes
        .iter()
        .filter(|n| {
            !n.router && (n.status == NodeStatus::Online || sessions.iter().any(|s| s.record.node_id == Some(n.id)))
        })
        .collect();

    if json {
        let mut totals: BTreeMap<String, u64> = BTreeMap::new();
        for info in infos.values() {
            for (k, v) in &info.counters {
                *totals.entry(k.clone()).or_default() += v;
            }
        }
        let nodes_json: Vec<_> = listed
            .iter()
            .map(|n| {
                let info = infos.get(&n.id);
                let node_sessions: Vec<_> = sessions
                    .iter()
                    .filter(|s| s.record.node_id == Some(n.id))
                    .map(|s| {
                        serde_json::json!({
                            "key": s.record.key, "user": s.record.user_name, "kind": s.record.kind.as_str(),
                            "created": s.record.created, "last_active": s.record.last_active,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "id": n.id,
                    "address": n.address(),
                    "status": n.status.as_str(),
                    "offline_mode": n.offline_mode,
                    "reachable": n.status == NodeStatus::Online && info.is_some() && r.view.is_reachable(n.id),
                    "version": n.version,
                    "load": info.map_or(n.load, |i| i.load),
                    "cpus": info.map_or(n.cpus, |i| i.cpus),
                    "load_per_cpu": load::per_cpu(info.map_or(n.load, |i| i.load), info.map_or(n.cpus, |i| i.cpus)),
                    "backend_up": info.map(|i| i.backend_up),
                    "in_flight": info.map(|i| i.in_flight),
                    "counters": info.map(|i| &i.counters),
                    "sessions": node_sessions,
                    "pins_recent": info.map_or(n.pins_recent, |i| i.pins_recent),
                })
            })
            .collect();
        let body = serde_json::json!({
            "node": r.self_address,
            "node_id": r.self_id,
            "balancer": r.balancer.read().name(),
            "nodes": nodes_json,
            "counters": totals,
        });
        return respond(session, 200, "application/json", body.to_string().into()).await;
    }

    if html {
        let Some(refresh_secs) = refresh.filter(|r| *r <= 3600) else {
            return respond_text(session, 400, "`refresh` must be a number of seconds from 0 (off) to 3600\n").await;
        };
        let moves = r.view.recent_moves();
        let page = super::status_page::Page {
            viewer: &r.self_address,
            viewer_version: VERSION,
            balancer: r.balancer.read().name(),
            nodes: listed
                .iter()
                .map(|n| super::status_page::NodeView {
                    node: n,
                    info: infos.get(&n.id),
                    reachable: n.status == NodeStatus::Online && infos.contains_key(&n.id) && r.view.is_reachable(n.id),
                    sessions: sessions.iter().filter(|s| s.record.node_id == Some(n.id)).map(|s| &s.record).collect(),
                })
                .collect(),
            moves: &moves,
            refresh_secs,
            now_ms: now_ms(),
        };
        return super::status_page::respond(session, &page).await;
    }

    let mut text = String::new();
    for n in listed {
        let info = infos.get(&n.id);
        let mut marker = "";
        if n.status != NodeStatus::Online || info.is_none() || !r.view.is_reachable(n.id) {
            marker = " (unreachable)";
        } else if n.offline_mode {
            marker = " (offline)";
        }
        // As the admin guide shows it: a fraction of the node's total CPU.
        let l = load::per_cpu(info.map_or(n.load, |i| i.load), info.map_or(n.cpus, |i| i.cpus));
        let [a, b, c] = l.map(load::format_fraction);
        text.push_str(&format!("{}{marker}  Load: {a}, {b}, {c}\n", n.address()));
        for s in sessions.iter().filter(|s| s.record.node_id == Some(n.id)) {
            text.push_str(&format!(
                "   {} - {}\n",
                s.record.key,
                s.record.user_name.as_deref().unwrap_or("(anonymous)")
            ));
        }
        let pins = info.map_or(n.pins_recent, |i| i.pins_recent);
        if pins > 0 {
            text.push_str(&format!("   ({pins} anonymous pins issued recently)\n"));
        }
        text.push('\n');
    }
    respond(session, 200, "text/plain; charset=utf-8", text.into()).await
}

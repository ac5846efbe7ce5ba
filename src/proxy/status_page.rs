//! The HTML form of `/load-balancer/status` (for `Accept: text/html`): every
//! node with its state, offline mode, reachability, load as a fraction of its
//! CPUs, version and clock skew, and the anonymous pins it issued recently;
//! sessions per node and per user; the recent session moves. It refreshes itself (`<meta http-equiv="refresh">`, no
//! script) and loads nothing from anywhere (inline CSS), so it works on an
//! air-gapped cluster. Every value from the registry or a request is
//! escaped, and the page is served with a CSP that allows no script at all:
//! it shares its origin with the IDE.

use std::collections::BTreeMap;
use std::fmt::Write;

use bytes::Bytes;
use chrono::{Local, TimeZone};
use pingora::http::ResponseHeader;
use pingora::prelude::*;

use super::endpoints::NodeInfo;
use crate::cluster::view::SessionMove;
use crate::cluster::{NodeId, NodeRecord, NodeStatus, SessionRecord};

/// `Content-Security-Policy` of the page: inline styles, nothing else.
pub const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One node as the page shows it.
pub struct NodeView<'a> {
    pub node: &'a NodeRecord,
    /// Its own report, when it answered.
    pub info: Option<&'a NodeInfo>,
    pub reachable: bool,
    pub sessions: Vec<&'a SessionRecord>,
}

/// Everything on the page.
pub struct Page<'a> {
    /// The node serving the page.
    pub viewer: &'a str,
    pub viewer_version: &'a str,
    pub balancer: &'a str,
    pub nodes: Vec<NodeView<'a>>,
    pub moves: &'a [SessionMove],
    /// Seconds between refreshes; 0 = none.
    pub refresh_secs: u32,
    pub now_ms: i64,
}

/// `s` with HTML's special characters escaped (for text and quoted attributes).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn time(ms: i64) -> String {
    Local.timestamp_millis_opt(ms).single().map_or_else(|| "-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

fn ago(now_ms: i64, ms: i64) -> String {
    let s = (now_ms - ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h {}m ago", s / 3600, s % 3600 / 60),
        _ => format!("{}d ago", s / 86400),
    }
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px;font-weight:600}
header p{margin:4px 0 0;color:#b8c0cf;font-size:13px}
main{padding:16px 24px;max-width:1400px}
section{background:#fff;border:1px solid #dde1e8;border-radius:6px;margin:0 0 16px;padding:12px 16px}
h2{font-size:16px;margin:0 0 8px}
h3{font-size:14px;margin:14px 0 6px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eceef2;vertical-align:middle}
th{font-size:12px;color:#5b6475;text-transform:uppercase;letter-spacing:.03em}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
.badge{display:inline-block;padding:1px 7px;border-radius:10px;font-size:12px;font-weight:600;margin-right:4px}
.ok{background:#dcf5e3;color:#17652f}.warn{background:#fff1cc;color:#7a5200}.bad{background:#fde0e0;color:#8f1d1d}.muted{background:#eceef2;color:#5b6475}
.bar{display:inline-block;width:90px;height:8px;background:#eceef2;border-radius:4px;vertical-align:middle;margin-right:6px;overflow:hidden}
.bar span{display:block;height:100%;background:#3b82f6}
.bar span.hot{background:#e0a100}.bar span.over{background:#d33}
.empty{color:#5b6475;font-style:italic}
";

/// Answer with the page (no caching, no script, no sniffing).
pub async fn respond(session: &mut Session, page: &Page<'_>) -> Result<()> {
    let body = Bytes::from(render(page));
    let mut resp = ResponseHeader::build(200, Some(5))?;
    resp.insert_header("content-type", "text/html; charset=utf-8")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    resp.insert_header("content-security-policy", CSP)?;
    resp.insert_header("x-content-type-options", "nosniff")?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Render the page.
pub fn render(page: &Page<'_>) -> String {
    let mut h = String::with_capacity(8192);
    let total: usize = page.nodes.iter().map(|n| n.sessions.len()).sum();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
    );
    if page.refresh_secs > 0 {
        let _ = write!(h, "<meta http-equiv=\"refresh\" content=\"{}\">", page.refresh_secs);
    }
    let _ = write!(
        h,
        "<title>sessionlb status — {viewer}</title><style>{STYLE}</style></head><body>\
         <header><h1>sessionlb cluster status</h1><p>as seen from <strong>{viewer}</strong> · balancer <strong>{balancer}</strong> · \
         {nodes} node{ns} · {total} session{ss} · {when}{refresh}</p></header><main>",
        viewer = escape(page.viewer),
        balancer = escape(page.balancer),
        nodes = page.nodes.len(),
        ns = if page.nodes.len() == 1 { "" } else { "s" },
        ss = if total == 1 { "" } else { "s" },
        when = time(page.now_ms),
        refresh =
            if page.refresh_secs > 0 { format!(" · refreshes every {}s", page.refresh_secs) } else { String::new() },
    );
    nodes_table(&mut h, page);
    sessions_per_node(&mut h, page);
    sessions_per_user(&mut h, page);
    moves(&mut h, page);
    h.push_str("</main></body></html>\n");
    h
}

fn state_badges(n: &NodeView<'_>) -> String {
    let mut b = String::new();
    let (class, text) = match n.node.status {
        NodeStatus::Online if n.reachable => ("ok", "Online".to_string()),
        NodeStatus::Online => ("bad", "Online · unreachable".to_string()),
        other => ("muted", other.as_str().to_string()),
    };
    let _ = write!(b, "<span class=\"badge {class}\">{}</span>", escape(&text));
    if n.node.offline_mode {
        b.push_str("<span class=\"badge warn\">offline mode</span>");
    }
    if n.info.is_some_and(|i| i.draining) {
        b.push_str("<span class=\"badge warn\">draining</span>");
    }
    if n.info.is_some_and(|i| !i.backend_up) {
        b.push_str("<span class=\"badge bad\">backend down</span>");
    }
    b
}

fn load_cell(n: &NodeView<'_>) -> String {
    let load = n.info.map_or(n.node.load, |i| i.load);
    let cpus = n.info.map_or(n.node.cpus, |i| i.cpus).max(1);
    let fraction = load[0] / f64::from(cpus);
    let class = if fraction > 1.0 {
        "over"
    } else if fraction > 0.7 {
        "hot"
    } else {
        ""
    };
    format!(
        "<span class=\"bar\" title=\"1-minute load ÷ {cpus} CPUs\"><span class=\"{class}\" style=\"width:{w:.0}%\"></span></span>\
         {pct:.0}% <span class=\"muted-text\">({l1:.2}, {l5:.2}, {l15:.2} on {cpus} CPU{s})</span>",
        w = (fraction * 100.0).clamp(0.0, 100.0),
        pct = fraction * 100.0,
        l1 = load[0],
        l5 = load[1],
        l15 = load[2],
        s = if cpus == 1 { "" } else { "s" },
    )
}

fn nodes_table(h: &mut String, page: &Page<'_>) {
    h.push_str(
        "<section id=\"nodes\"><h2>Nodes</h2><table><thead><tr><th>Node</th><th>ID</th><th>State</th>\
         <th>Load (of CPUs)</th><th>Version</th><th>Clock skew</th><th>In flight</th><th>Sessions</th>\
         <th title=\"anonymous pin cookies issued in the last 5 minutes (no registry session)\">Pins (5 min)</th></tr></thead><tbody>",
    );
    for n in &page.nodes {
        let version = if n.node.version == page.viewer_version {
            escape(&n.node.version)
        } else {
            format!(
                "<span class=\"badge warn\" title=\"differs from this node's {}\">{}</span>",
                escape(page.viewer_version),
                escape(&n.node.version)
            )
        };
        let skew = match n.node.clock_skew_ms {
            None => "-".to_string(),
            Some(ms) if ms.abs() > 1000 => format!("<span class=\"badge bad\" title=\"over a second\">{ms} ms</span>"),
            Some(ms) => format!("{ms} ms"),
        };
        let _ = write!(
            h,
            "<tr data-node=\"{addr}\"><td><a href=\"#node-{id}\"><code>{addr}</code></a></td><td class=\"num\">{id}</td><td>{state}</td>\
             <td>{load}</td><td>{version}</td><td class=\"num\">{skew}</td><td class=\"num\">{in_flight}</td><td class=\"num\">{count}</td><td class=\"num\">{pins}</td></tr>",
            addr = escape(&n.node.address()),
            id = n.node.id,
            state = state_badges(n),
            load = load_cell(n),
            in_flight = n.info.map_or("-".to_string(), |i| i.in_flight.to_string()),
            count = n.sessions.len(),
            pins = n.info.map_or(n.node.pins_recent, |i| i.pins_recent),
        );
    }
    if page.nodes.is_empty() {
        h.push_str("<tr><td colspan=\"9\" class=\"empty\">no nodes</td></tr>");
    }
    h.push_str("</tbody></table></section>");
}

fn sessions_per_node(h: &mut String, page: &Page<'_>) {
    h.push_str("<section id=\"sessions\"><h2>Sessions per node</h2>");
    for n in &page.nodes {
        let _ = write!(
            h,
            "<h3 id=\"node-{id}\"><code>{addr}</code> · {count} session{s}</h3>",
            id = n.node.id,
            addr = escape(&n.node.address()),
            count = n.sessions.len(),
            s = if n.sessions.len() == 1 { "" } else { "s" },
        );
        if n.sessions.is_empty() {
            h.push_str("<p class=\"empty\">no sessions</p>");
            continue;
        }
        h.push_str(
            "<table><thead><tr><th>Session key</th><th>User</th><th>Kind</th><th>Created</th><th>Last active</th></tr></thead><tbody>",
        );
        for s in &n.sessions {
            let _ = write!(
                h,
                "<tr data-session=\"{key}\" data-on=\"{addr}\"><td><code>{key}</code></td><td>{user}</td><td>{kind}</td><td>{created}</td><td>{active}</td></tr>",
                key = escape(&s.key),
                addr = escape(&n.node.address()),
                user = s
                    .user_name
                    .as_deref()
                    .map_or_else(|| "<span class=\"empty\">(anonymous)</span>".to_string(), escape),
                kind = s.kind.as_str(),
                created = time(s.created),
                active = ago(page.now_ms, s.last_active),
            );
        }
        h.push_str("</tbody></table>");
    }
    h.push_str("</section>");
}

fn sessions_per_user(h: &mut String, page: &Page<'_>) {
    let mut users: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    for n in &page.nodes {
        for s in &n.sessions {
            let user = s.user_name.as_deref().unwrap_or("");
            *users.entry(user).or_default().entry(n.node.address()).or_default() += 1;
        }
    }
    h.push_str("<section id=\"users\"><h2>Sessions per user</h2>");
    if users.is_empty() {
        h.push_str("<p class=\"empty\">no sessions</p></section>");
        return;
    }
    h.push_str("<table><thead><tr><th>User</th><th>Sessions</th><th>On</th></tr></thead><tbody>");
    for (user, nodes) in &users {
        let name = if user.is_empty() { "<span class=\"empty\">(anonymous)</span>".to_string() } else { escape(user) };
        let on: Vec<String> = nodes.iter().map(|(addr, n)| format!("<code>{}</code> ({n})", escape(addr))).collect();
        let _ = write!(
            h,
            "<tr data-user=\"{u}\"><td>{name}</td><td class=\"num\">{count}</td><td>{on}</td></tr>",
            u = escape(user),
            count = nodes.values().sum::<usize>(),
            on = on.join(", "),
        );
    }
    h.push_str("</tbody></table></section>");
}

fn moves(h: &mut String, page: &Page<'_>) {
    let name = |id: Option<NodeId>| -> String {
        match id {
            None => "<span class=\"empty\">(deleted node)</span>".into(),
            Some(id) => page
                .nodes
                .iter()
                .find(|n| n.node.id == id)
                .map_or_else(|| format!("node {id}"), |n| format!("<code>{}</code>", escape(&n.node.address()))),
        }
    };
    h.push_str("<section id=\"moves\"><h2>Recent session moves</h2>");
    if page.moves.is_empty() {
        h.push_str("<p class=\"empty\">none since this node started</p></section>");
        return;
    }
    h.push_str(
        "<table><thead><tr><th>When</th><th>Session key</th><th>User</th><th>From</th><th>To</th></tr></thead><tbody>",
    );
    for m in page.moves {
        let _ = write!(
            h,
            "<tr data-move=\"{key}\"><td>{when}</td><td><code>{key}</code></td><td>{user}</td><td>{from}</td><td>{to}</td></tr>",
            when = ago(page.now_ms, m.at_ms),
            key = escape(&m.key),
            user = m.user.as_deref().map_or_else(|| "<span class=\"empty\">(anonymous)</span>".to_string(), escape),
            from = name(m.from),
            to = name(Some(m.to)),
        );
    }
    h.push_str("</tbody></table></section>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::SessionKind;

    fn node(id: NodeId, offline_mode: bool) -> NodeRecord {
        NodeRecord {
            id,
            host: format!("10.0.0.{id}"),
            port: 8787,
            ipv4: None,
            status: NodeStatus::Online,
            last_seen: None,
            load: [1.5, 1.0, 0.5],
            cpus: 4,
            router: false,
            version: "0.1.0".into(),
            clock_skew_ms: Some(2500),
            offline_mode,
            started_at: None,
            pins_recent: 7,
        }
    }

    #[test]
    fn values_are_escaped_and_states_shown() {
        let a = node(1, false);
        let b = node(2, true);
        let evil = SessionRecord {
            key: "k\"><script>x</script>".into(),
            node_id: Some(1),
            user_name: Some("<img src=x onerror=alert(1)>".into()),
            kind: SessionKind::Backend,
            created: 0,
            last_active: 0,
        };
        let moves = [SessionMove { key: "m1".into(), user: None, from: None, to: 2, at_ms: 0 }];
        let page = Page {
            viewer: "10.0.0.1:8787",
            viewer_version: "0.1.0",
            balancer: "sessions",
            nodes: vec![
                NodeView { node: &a, info: None, reachable: true, sessions: vec![&evil] },
                NodeView { node: &b, info: None, reachable: false, sessions: vec![] },
            ],
            moves: &moves,
            refresh_secs: 5,
            now_ms: 10_000,
        };
        let html = render(&page);
        assert!(!html.contains("<script>") && !html.contains("<img"), "{html}");
        assert!(html.contains("k&quot;&gt;&lt;script&gt;x&lt;/script&gt;"));
        assert!(html.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
        assert!(html.contains("offline mode") && html.contains("Online · unreachable"));
        assert!(html.contains("38%"), "1.5 load on 4 CPUs: {html}");
        assert!(html.contains("title=\"over a second\""));
        assert!(html.contains("<td class=\"num\">1</td><td class=\"num\">7</td></tr>"), "sessions, then pins: {html}");
        assert!(html.contains("(deleted node)") && html.contains("<code>10.0.0.2:8787</code>"));
        assert!(!html.contains("http://") && !html.contains("https://"), "no external assets");
    }
}

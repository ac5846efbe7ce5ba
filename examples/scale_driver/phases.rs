//! The measured phases other than the storm: the cluster at rest, the bulk
//! load of sessions (and how long every node takes to absorb it), and a
//! node joining a cluster that already holds them.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::{Value, json};

use crate::cluster::{self, Jar, Node, UserCookies, backend_of, metric_sum};
use crate::costs::Processes;
use crate::pg::{Monitor, Registry};
use crate::stats::{finite, spread};

/// The cluster left alone for `seconds`: CPU, memory, connections, registry traffic.
pub async fn rest(
    procs: &Processes,
    monitor: &mut Monitor,
    label: &str,
    seconds: f64,
) -> anyhow::Result<(String, Value)> {
    let http = cluster::client();
    let mut sessions = Vec::new();
    for n in &procs.nodes {
        sessions.push(cluster::view_sessions(&http, n).await? as f64);
    }
    let counters_before = monitor.counters().await?;
    let window = procs.start();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut peak = monitor.connections().await?;
    let mut last = peak.clone();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(2).min(deadline - Instant::now())).await;
        let c = monitor.connections().await?;
        if c.total() > peak.total() {
            peak = c.clone();
        }
        last = c;
    }
    let costs = procs.finish(&window);
    let counters_after = monitor.counters().await?;
    let statements = counters_after.since(&counters_before);
    let calls: u64 = statements.iter().map(|d| d.calls).sum();
    let xacts = counters_after.xacts.saturating_sub(counters_before.xacts);
    let secs = costs.seconds;
    let per_node: Vec<f64> = procs.nodes.iter().map(|n| peak.per_app.get(&n.name).map_or(0, |c| c.0) as f64).collect();
    let (cmin, cmed, cmax) = spread(&per_node);
    // At the end of the window: what an idle node settles to (pools close idle connections).
    let settled: Vec<f64> = procs.nodes.iter().map(|n| last.per_app.get(&n.name).map_or(0, |c| c.0) as f64).collect();
    let (lmin, lmed, lmax) = spread(&settled);
    let (smin, _, smax) = spread(&sessions);
    let others: u64 =
        peak.per_app.iter().filter(|(app, _)| !procs.nodes.iter().any(|n| &&n.name == app)).map(|(_, c)| c.0).sum();

    let mut md =
        format!("### At rest: {label} ({} nodes, {smin:.0}–{smax:.0} sessions in each view)\n\n", procs.nodes.len());
    md += &format!(
        "- PostgreSQL connections to the registry: **{} in total** (peak over the window; {others} not from nodes), \
         per node min {cmin:.0} / median {cmed:.0} / max {cmax:.0}\n",
        peak.total() - others
    );
    md += &format!(
        "- at the end of the window: {} in total, per node min {lmin:.0} / median {lmed:.0} / max {lmax:.0}\n",
        settled.iter().sum::<f64>()
    );
    md += &format!(
        "- **registry at rest: {:.1} statements/s** (pg_stat_statements), {:.1} transactions/s (pg_stat_database, \
         whose counts arrive up to 10 s late); {}\n",
        calls as f64 / secs,
        xacts as f64 / secs,
        crate::pg::describe(&statements, secs, 5)
    );
    md += &costs.markdown("at rest");
    let json = json!({
        "label": label,
        "nodes": procs.nodes.len(),
        "view_sessions": { "min": smin, "max": smax },
        "pg_connections": { "total": peak.total() - others, "per_node_min": cmin, "per_node_median": cmed, "per_node_max": cmax },
        "pg_connections_at_end": { "total": settled.iter().sum::<f64>(), "per_node_min": lmin, "per_node_median": lmed, "per_node_max": lmax },
        "statements_per_s": finite(calls as f64 / secs),
        "xacts_per_s": finite(xacts as f64 / secs),
        "top_statements": crate::pg::deltas_json(&statements, secs, 8),
        "costs": costs.json(),
    });
    Ok((md, json))
}

/// Fill the registry up to `total` sessions, in chunks of `chunk` rows per
/// transaction (each row announced as a placement is), and time how long
/// every node takes to hold them all.
pub async fn bulk(
    procs: &Processes,
    registry: &mut Registry,
    monitor: &mut Monitor,
    total: u64,
    chunk: u64,
) -> anyhow::Result<(String, Value)> {
    let http = cluster::client();
    let existing = registry.session_count().await?;
    let rss_before: Vec<f64> =
        procs.nodes.iter().map(|n| crate::procfs::sample(n.pid).map_or(0.0, |s| s.rss_kb as f64 / 1024.0)).collect();
    let nodes: Vec<i64> = registry.online_nodes().await?.into_keys().collect();
    let window = procs.start();
    let t0 = Instant::now();
    registry.bulk_insert(0, total.saturating_sub(existing), &nodes, chunk).await?;
    let inserted = t0.elapsed();
    let now_total = registry.session_count().await?;
    // Each node's time to hold every session.
    let mut reached: Vec<Option<Duration>> = vec![None; procs.nodes.len()];
    let mut queue_peak: f64 = 0.0;
    let limit = Duration::from_secs(1800);
    while reached.iter().any(Option::is_none) {
        anyhow::ensure!(t0.elapsed() < limit, "nodes did not absorb {now_total} sessions within {limit:?}");
        queue_peak = queue_peak.max(monitor.notification_queue_usage().await.unwrap_or(0.0));
        for (i, n) in procs.nodes.iter().enumerate() {
            if reached[i].is_none() && cluster::view_sessions(&http, n).await.unwrap_or(0) >= now_total {
                reached[i] = Some(t0.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let costs = procs.finish(&window);
    let absorbed: Vec<f64> = reached.iter().map(|d| d.unwrap_or_default().as_secs_f64()).collect();
    let (amin, amed, amax) = spread(&absorbed);
    let added = now_total.saturating_sub(existing) as f64;
    let per_session: Vec<f64> = costs
        .node_rss_mb
        .iter()
        .zip(&rss_before)
        .map(|(after, before)| (after - before) * 1024.0 * 1024.0 / added.max(1.0))
        .collect();
    let (pmin, pmed, pmax) = spread(&per_session);
    let node_cpu_s: f64 = costs.node_cpu.iter().sum::<f64>() / 100.0 * costs.seconds;

    let mut md = format!(
        "### Bulk load: {existing} → {now_total} sessions ({} rows per transaction, each announced)\n\n",
        chunk
    );
    md += &format!(
        "- inserted in {:.1} s; every node's view held all {now_total} after min {amin:.1} / median {amed:.1} / **max {amax:.1} s**; \
         notification queue peak {:.3} %\n",
        inserted.as_secs_f64(),
        queue_peak * 100.0
    );
    md += &format!(
        "- absorbing them cost the nodes {node_cpu_s:.1} CPU-seconds in all ({:.1} µs of CPU per session per node) and PostgreSQL {:.1} CPU-seconds\n",
        node_cpu_s / procs.nodes.len() as f64 / added.max(1.0) * 1e6,
        costs.pg_cpu / 100.0 * costs.seconds
    );
    md += &format!(
        "- **memory per session** in a node's view (RSS growth / sessions added): min {pmin:.0} / median {pmed:.0} / max {pmax:.0} bytes\n"
    );
    md += &costs.markdown("while absorbing");
    let json = json!({
        "sessions_before": existing, "sessions_after": now_total, "chunk": chunk,
        "insert_s": finite(inserted.as_secs_f64()),
        "absorbed_s": { "min": finite(amin), "median": finite(amed), "max": finite(amax) },
        "notification_queue_peak": queue_peak,
        "node_cpu_s_total": finite(node_cpu_s),
        "bytes_per_session": { "min": finite(pmin), "median": finite(pmed), "max": finite(pmax) },
        "costs": costs.json(),
    });
    Ok((md, json))
}

/// A node started at `started_unix_ns` joins: time until it answers
/// `/health` (it loads the registry before it listens), until its view holds
/// `want` sessions, and until it routes a user of the bulk load to the
/// node that holds that user's session without placing anything.
pub async fn join(
    node: &Node,
    others: &[Node],
    registry: &mut Registry,
    cookies: &UserCookies,
    started_unix_ns: u128,
    want: u64,
    user: &str,
) -> anyhow::Result<(String, Value)> {
    let http = cluster::client();
    let since_start = || {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_nanos();
        now.saturating_sub(started_unix_ns) as f64 / 1e9
    };
    let limit = 300.0;
    let mut answered = None;
    let mut loaded = None;
    let mut sessions = 0;
    while loaded.is_none() {
        anyhow::ensure!(since_start() < limit, "the joining node did not load {want} sessions within {limit} s");
        if let Ok(c) = cluster::view_sessions(&http, node).await {
            answered.get_or_insert_with(since_start);
            sessions = c;
            if c >= want {
                loaded = Some(since_start());
            }
        }
        if loaded.is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let home = registry.node_of_user(user).await?.with_context(|| {
        format!("{user} has no session in the registry (join routes a user of the bulk phase: run bulk first)")
    })?;
    let expected = others.iter().find(|n| n.address() == home).map(|n| n.name.clone());
    let before = metric_sum(&cluster::metrics(&http, node).await?, "sessionlb_placements_total");
    let jar = Jar::with(&cookies.cookie(user));
    let resp = http.get(format!("{}/bench", node.base())).header(reqwest::header::COOKIE, jar.header()).send().await?;
    let routed = since_start();
    let status = resp.status();
    let backend = backend_of(&resp);
    let after = metric_sum(&cluster::metrics(&http, node).await?, "sessionlb_placements_total");
    let rss = crate::procfs::sample(node.pid).map_or(0.0, |s| s.rss_kb as f64 / 1024.0);
    let routed_ok = status == 200 && after == before && (expected.is_none() || backend == expected);
    let answered = answered.unwrap_or(f64::NAN);
    let loaded = loaded.unwrap_or(f64::NAN);

    let mut md = format!("### A node joins a cluster of {} nodes holding {want} sessions\n\n", others.len());
    md += &format!(
        "- from process start: first `/health` answer after **{answered:.2} s** (it loads the registry before listening), \
         view complete ({sessions} sessions) after {loaded:.2} s\n"
    );
    md += &format!(
        "- then a request of `{user}` (session on {home}) was answered {status} by backend {} {} ({}), {routed:.2} s after start; RSS {rss:.1} MB\n",
        backend.as_deref().unwrap_or("?"),
        if routed_ok { "with no placement" } else { "— NOT as expected" },
        expected.as_deref().map_or("backend not checked".to_string(), |e| format!("expected {e}"))
    );
    let json = json!({
        "sessions": sessions, "answered_s": finite(answered), "loaded_s": finite(loaded), "routed_s": finite(routed),
        "routed_ok": routed_ok, "status": status.as_u16(), "backend": backend, "expected_backend": expected,
        "placements_on_join_node": after - before, "rss_mb": finite(rss),
    });
    Ok((md, json))
}

/// The cost of one change broadcast: `count` sessions written one per
/// transaction at `rate`/s straight into the registry (no proxy, no
/// placement: only the change notification reaches the nodes), against the
/// same cluster idle for the same time just before. CPU per notification per
/// node = (CPU share while notified − CPU share idle) × time / notifications.
pub async fn notify(
    procs: &Processes,
    registry: &mut Registry,
    rate: f64,
    count: u64,
) -> anyhow::Result<(String, Value)> {
    let http = cluster::client();
    let nodes: Vec<i64> = registry.online_nodes().await?.into_keys().collect();
    let secs = count as f64 / rate;
    let idle_window = procs.start();
    tokio::time::sleep(Duration::from_secs_f64(secs + 2.0)).await;
    let idle = procs.finish(&idle_window);
    let window = procs.start();
    let t0 = tokio::time::Instant::now();
    for i in 0..count {
        tokio::time::sleep_until(t0 + Duration::from_secs_f64(i as f64 / rate)).await;
        registry.insert_one(&format!("notify-{i}"), nodes[i as usize % nodes.len()]).await?;
    }
    let sent_in = t0.elapsed().as_secs_f64();
    // The same time again after the last one, so the window matches the idle one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy = procs.finish(&window);
    let want = registry.session_count().await?;
    let mut behind = Vec::new();
    for n in &procs.nodes {
        let c = cluster::view_sessions(&http, n).await?;
        if c < want {
            behind.push(format!("{} holds {c}", n.name));
        }
    }
    let per_node_us: Vec<f64> = busy
        .node_cpu
        .iter()
        .zip(&idle.node_cpu)
        .map(|(b, i)| (b - i) / 100.0 * busy.seconds / count as f64 * 1e6)
        .collect();
    let (umin, umed, umax) = spread(&per_node_us);
    let pg_us = (busy.pg_cpu - idle.pg_cpu) / 100.0 * busy.seconds / count as f64 * 1e6;
    let nodes_total_us = per_node_us.iter().sum::<f64>();

    let mut md = format!(
        "### Broadcast cost: {count} sessions written one per transaction at {rate}/s straight into the registry\n\n"
    );
    md += &format!(
        "- sent in {sent_in:.1} s; afterwards {} ({} nodes behind)\n",
        if behind.is_empty() { "every node held them all".to_string() } else { behind.join(", ") },
        behind.len()
    );
    md += &format!(
        "- **CPU per change notification, per node**: min {umin:.0} / median {umed:.0} / max {umax:.0} µs \
         (CPU while notified minus CPU idle over the same time); all {} nodes together {nodes_total_us:.0} µs; \
         PostgreSQL {pg_us:.0} µs per change (fan-out to every listener)\n",
        procs.nodes.len()
    );
    md += &format!(
        "- at {rate} changes/s that is {:.1} % of a core per node and {:.0} % of a core for the cluster\n",
        umed * rate / 1e4,
        (nodes_total_us + pg_us) * rate / 1e4
    );
    let json = json!({
        "count": count, "rate": rate, "sent_s": finite(sent_in), "nodes_behind": behind.len(),
        "node_us_per_notification": { "min": finite(umin), "median": finite(umed), "max": finite(umax) },
        "nodes_total_us_per_notification": finite(nodes_total_us),
        "postgres_us_per_notification": finite(pg_us),
        "idle": idle.json(), "notified": busy.json(),
    });
    Ok((md, json))
}

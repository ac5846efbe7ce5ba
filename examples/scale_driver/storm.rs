//! The morning login storm: new users arrive at a set rate (open loop: an
//! arrival does not wait for the previous one), each with a signed `user-id`
//! cookie and no other, through the entry nodes in turn; each one's first
//! request places a session. Meanwhile a set number of users placed before
//! the storm keep their sessions busy: one request per interval each, sent
//! to a random entry node with the cookies they hold, and every answer must
//! come from the backend of their session's node (sticky).
//!
//! Notification lag is measured on *observer* nodes, which receive no
//! traffic from the driver but `/health` polls: a node learns of a placement
//! made elsewhere only through the registry's change notifications, and its
//! `/health` reports how many sessions its in-memory view holds — the view
//! that routes requests without a database round trip. Notifications arrive
//! in commit order, so the k-th session an observer learns of is matched
//! with the k-th session written (its `created` time: the database's clock,
//! on this same machine, at the insert just before the commit); lag = (wall
//! time of the first poll answer showing ≥ baseline + k sessions) − (k-th
//! `created`). It includes the commit itself, and the poll answer bounds the
//! moment from above by at most one poll period plus the poll's round trip
//! (reported). The same matching against the k-th placement
//! answer the driver received is reported too (it can be negative: a
//! loaded entry node may answer after the observer already knows).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::cluster::{self, Jar, Node, UserCookies, backend_of, bucket_quantile, metric_sum, placement_buckets};
use crate::costs::Processes;
use crate::pg::{Connections, Monitor};
use crate::stats::{Samples, finite};

/// Storm settings.
pub struct Storm {
    pub procs: Processes,
    pub cookies: Arc<UserCookies>,
    pub monitor: Monitor,
    /// Prefix of user names (unique per run).
    pub run: String,
    pub rate: f64,
    pub duration: Duration,
    pub busy: usize,
    pub busy_interval: Duration,
    pub observers: usize,
    pub poll: Duration,
    /// Whether every node has a backend of its own named after it (stickiness is checked).
    pub per_node_backends: bool,
}

/// A user with a placed session.
#[derive(Clone)]
struct Placed {
    jar: Jar,
    /// `x-backend` of the first answer.
    home: Option<String>,
}

struct Placement {
    done: Instant,
    ms: f64,
}

/// Place `user` through `node`: one request with only the user cookie.
async fn place(
    http: &reqwest::Client,
    cookies: &UserCookies,
    user: &str,
    node: &Node,
) -> Result<(Placed, f64), String> {
    let mut jar = Jar::with(&cookies.cookie(user));
    let t0 = Instant::now();
    let resp = http
        .get(format!("{}/bench", node.base()))
        .header(reqwest::header::COOKIE, jar.header())
        .send()
        .await
        .map_err(|e| format!("{}: {e}", node.name))?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    if resp.status() != 200 {
        return Err(format!("{}: status {}", node.name, resp.status()));
    }
    jar.keep_from(&resp);
    let home = backend_of(&resp);
    let _ = resp.bytes().await;
    Ok((Placed { jar, home }, ms))
}

/// Wait until every node's view holds at least the registry's session count.
pub async fn wait_views(
    http: &reqwest::Client,
    nodes: &[Node],
    want: u64,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    loop {
        let mut behind = Vec::new();
        for n in nodes {
            match cluster::view_sessions(http, n).await {
                Ok(c) if c >= want => {}
                Ok(c) => behind.push(format!("{} has {c}", n.name)),
                Err(e) => behind.push(format!("{}: {e}", n.name)),
            }
        }
        if behind.is_empty() {
            return Ok(t0.elapsed());
        }
        anyhow::ensure!(
            t0.elapsed() < limit,
            "after {limit:?}, {} nodes do not hold {want} sessions: {}",
            behind.len(),
            behind.join(", ")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Peak connections seen by the sampler.
#[derive(Default)]
struct Peaks {
    total: u64,
    active: u64,
    per_app: std::collections::BTreeMap<String, u64>,
    queue_usage: f64,
    rss_mb: Vec<f64>,
}

impl Peaks {
    fn add(&mut self, c: &Connections, queue_usage: f64, rss_mb: Vec<f64>) {
        self.total = self.total.max(c.total());
        self.active = self.active.max(c.active());
        for (app, (n, _)) in &c.per_app {
            let e = self.per_app.entry(app.clone()).or_default();
            *e = (*e).max(*n);
        }
        self.queue_usage = self.queue_usage.max(queue_usage);
        if self.rss_mb.is_empty() {
            self.rss_mb = rss_mb;
        } else {
            for (a, b) in self.rss_mb.iter_mut().zip(rss_mb) {
                *a = a.max(b);
            }
        }
    }
}

impl Storm {
    pub async fn run(mut self, admin_registry: &mut crate::pg::Registry) -> anyhow::Result<(String, Value)> {
        let nodes = self.procs.nodes.clone();
        anyhow::ensure!(
            self.observers < nodes.len(),
            "need at least one entry node besides {} observers",
            self.observers
        );
        let (entries, observers) = nodes.split_at(nodes.len() - self.observers);
        let entries: Arc<Vec<Node>> = Arc::new(entries.to_vec());
        let observers = observers.to_vec();
        let http = cluster::client();
        let cookies = self.cookies.clone();

        // --- warm-up: the busy users get their sessions (not measured)
        let mut busy_users: Vec<Placed> = Vec::with_capacity(self.busy);
        let gap = Duration::from_secs_f64(1.0 / self.rate.max(1.0));
        let mut warm = Vec::new();
        for i in 0..self.busy {
            let (http, cookies, entries) = (http.clone(), cookies.clone(), entries.clone());
            let user = format!("{}-busy-{i}", self.run);
            warm.push(tokio::spawn(async move {
                let node = &entries[i % entries.len()];
                place(&http, &cookies, &user, node).await
            }));
            tokio::time::sleep(gap).await;
        }
        let mut warm_failures = Vec::new();
        for w in warm {
            match w.await? {
                Ok((p, _)) => busy_users.push(p),
                Err(e) => warm_failures.push(e),
            }
        }
        anyhow::ensure!(
            warm_failures.len() * 100 <= self.busy.max(1),
            "{} of {} warm-up placements failed, e.g. {}",
            warm_failures.len(),
            self.busy,
            warm_failures[0]
        );
        let registered = admin_registry.session_count().await?;
        wait_views(&http, &nodes, registered, Duration::from_secs(120)).await?;
        let mut baseline = Vec::new();
        for o in &observers {
            baseline.push(cluster::view_sessions(&http, o).await?);
        }

        // --- before
        let mut before_metrics = Vec::new();
        for n in &nodes {
            before_metrics.push(cluster::metrics(&http, n).await?);
        }
        let counters_before = self.monitor.counters().await?;
        let window = self.procs.start();
        let t_start = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));

        // --- sampler: peak connections, notification queue, node memory
        let peaks = Arc::new(Mutex::new(Peaks::default()));
        let monitor = Arc::new(tokio::sync::Mutex::new(self.monitor));
        let sampler = {
            let (stop, peaks, monitor, pids) = (stop.clone(), peaks.clone(), monitor.clone(), nodes.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let mut m = monitor.lock().await;
                    let c: Connections = m.connections().await.unwrap_or_default();
                    let q = m.notification_queue_usage().await.unwrap_or(0.0);
                    drop(m);
                    let rss: Vec<f64> = pids
                        .iter()
                        .map(|n| crate::procfs::sample(n.pid).map_or(0.0, |s| s.rss_kb as f64 / 1024.0))
                        .collect();
                    peaks.lock().add(&c, q, rss);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        };

        // --- observers: poll /health, keep (answer time, count) at every change
        let obs_stop = Arc::new(AtomicBool::new(false));
        let mut observer_tasks = Vec::new();
        for o in observers.clone() {
            let (http, stop, poll) = (http.clone(), obs_stop.clone(), self.poll);
            observer_tasks.push(tokio::spawn(async move {
                let mut seen: Vec<(Instant, f64, u64)> = Vec::new();
                let mut rtt = Samples::default();
                let mut tick = tokio::time::interval(poll);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let t0 = Instant::now();
                    if let Ok(c) = cluster::view_sessions(&http, &o).await {
                        let t1 = Instant::now();
                        rtt.push((t1 - t0).as_secs_f64() * 1000.0);
                        if seen.last().is_none_or(|l| l.2 != c) {
                            seen.push((t1, unix_ms(), c));
                        }
                    }
                }
                (seen, rtt)
            }));
        }

        // --- busy sessions
        let busy_requests = Arc::new(AtomicU64::new(0));
        let busy_errors = Arc::new(Mutex::new(Vec::<String>::new()));
        let misrouted = Arc::new(AtomicU64::new(0));
        let busy_latency = Arc::new(Mutex::new(Samples::default()));
        let mut busy_tasks = Vec::new();
        for user in busy_users {
            let (http, stop, entries, interval) = (http.clone(), stop.clone(), entries.clone(), self.busy_interval);
            let (requests, errors, misrouted, latency) =
                (busy_requests.clone(), busy_errors.clone(), misrouted.clone(), busy_latency.clone());
            let check = self.per_node_backends;
            busy_tasks.push(tokio::spawn(async move {
                let mut user = user;
                let phase = rand::rng().random_range(0.0..interval.as_secs_f64());
                tokio::time::sleep(Duration::from_secs_f64(phase)).await;
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let node = &entries[rand::rng().random_range(0..entries.len())];
                    let t0 = Instant::now();
                    let sent = http
                        .get(format!("{}/bench", node.base()))
                        .header(reqwest::header::COOKIE, user.jar.header())
                        .send()
                        .await;
                    requests.fetch_add(1, Ordering::Relaxed);
                    match sent {
                        Ok(resp) if resp.status() == 200 => {
                            latency.lock().push(t0.elapsed().as_secs_f64() * 1000.0);
                            if check && backend_of(&resp) != user.home {
                                misrouted.fetch_add(1, Ordering::Relaxed);
                            }
                            user.jar.keep_from(&resp);
                            let _ = resp.bytes().await;
                        }
                        Ok(resp) => errors.lock().push(format!("{}: status {}", node.name, resp.status())),
                        Err(e) => errors.lock().push(format!("{}: {e}", node.name)),
                    }
                }
            }));
        }

        // --- the storm: open-loop arrivals
        let total = (self.rate * self.duration.as_secs_f64()).round() as usize;
        let inflight = Arc::new(Semaphore::new(4096));
        let placements = Arc::new(Mutex::new(Vec::<Placement>::with_capacity(total)));
        let failures = Arc::new(Mutex::new(Vec::<String>::new()));
        let mut late = Samples::default();
        let mut storm_tasks = Vec::with_capacity(total);
        let t_storm = tokio::time::Instant::now();
        for i in 0..total {
            let at = t_storm + Duration::from_secs_f64(i as f64 / self.rate);
            tokio::time::sleep_until(at).await;
            late.push(at.elapsed().as_secs_f64() * 1000.0);
            let permit = inflight.clone().acquire_owned().await?;
            let (http, cookies, entries) = (http.clone(), cookies.clone(), entries.clone());
            let (placements, failures) = (placements.clone(), failures.clone());
            let user = format!("{}-storm-{i}", self.run);
            storm_tasks.push(tokio::spawn(async move {
                let node = &entries[i % entries.len()];
                match place(&http, &cookies, &user, node).await {
                    Ok((_, ms)) => placements.lock().push(Placement { done: Instant::now(), ms }),
                    Err(e) => failures.lock().push(e),
                }
                drop(permit);
            }));
        }
        for t in storm_tasks {
            t.await?;
        }
        let storm_secs = t_storm.elapsed().as_secs_f64();
        // Busy traffic lasts at least the storm's duration.
        let remaining = self.duration.saturating_sub(t_start.elapsed());
        tokio::time::sleep(remaining).await;
        stop.store(true, Ordering::Relaxed);
        for t in busy_tasks {
            t.await?;
        }
        sampler.await?;
        let costs = self.procs.finish(&window);
        let mut monitor = Arc::try_unwrap(monitor).ok().expect("sampler ended").into_inner();
        let counters_after = monitor.counters().await?;

        // Observers: until each has seen every placement (or 30 s).
        let placed_ok = placements.lock().len() as u64;
        let deadline = Instant::now() + Duration::from_secs(30);
        'wait: while Instant::now() < deadline {
            for (o, base) in observers.iter().zip(&baseline) {
                if cluster::view_sessions(&http, o).await.unwrap_or(0) < base + placed_ok {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue 'wait;
                }
            }
            break;
        }
        obs_stop.store(true, Ordering::Relaxed);
        let mut lag = Samples::default();
        let mut lag_from_answer = Samples::default();
        let mut poll_rtt = Samples::default();
        let mut unseen = 0u64;
        let mut done: Vec<Instant> = placements.lock().iter().map(|p| p.done).collect();
        done.sort();
        let written = admin_registry.created_times(&format!("{}-storm-", self.run)).await?;
        for (task, base) in observer_tasks.into_iter().zip(&baseline) {
            let (seen, rtt) = task.await?;
            poll_rtt.extend(&rtt);
            for (k, t_done) in done.iter().enumerate() {
                let want = base + k as u64 + 1;
                match seen.iter().find(|(_, _, c)| *c >= want) {
                    Some((t_seen, wall_seen, _)) => {
                        lag_from_answer.push(signed_ms(*t_seen, *t_done));
                        if let Some(w) = written.get(k) {
                            lag.push(wall_seen - w);
                        }
                    }
                    None => unseen += 1,
                }
            }
        }

        // --- after: what the nodes counted
        let mut placed_by_nodes = 0.0;
        let mut races = 0.0;
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        for (n, before) in nodes.iter().zip(&before_metrics) {
            let after = cluster::metrics(&http, n).await?;
            placed_by_nodes +=
                metric_sum(&after, "sessionlb_placements_total") - metric_sum(before, "sessionlb_placements_total");
            races += metric_sum(&after, "sessionlb_placement_races_lost_total")
                - metric_sum(before, "sessionlb_placement_races_lost_total");
            let (a, b) = (placement_buckets(&after), placement_buckets(before));
            if buckets.is_empty() {
                buckets = a.iter().map(|(le, _)| (*le, 0.0)).collect();
            }
            for (i, (le, count)) in a.iter().enumerate() {
                let prev = b.iter().find(|x| x.0 == *le).map_or(0.0, |x| x.1);
                if let Some(slot) = buckets.get_mut(i) {
                    slot.1 += count - prev;
                }
            }
        }
        let statements = counters_after.since(&counters_before);
        let calls: u64 = statements.iter().map(|d| d.calls).sum();
        let xacts = counters_after.xacts.saturating_sub(counters_before.xacts);

        let mut latency = Samples::default();
        for p in placements.lock().iter() {
            latency.push(p.ms);
        }
        let failures = failures.lock().clone();
        let busy_errors = busy_errors.lock().clone();
        let busy_latency = busy_latency.lock().clone();
        let peaks = std::mem::take(&mut *peaks.lock());
        let per_node_conn: Vec<f64> =
            nodes.iter().map(|n| peaks.per_app.get(&n.name).copied().unwrap_or(0) as f64).collect();
        let (cmin, cmed, cmax) = crate::stats::spread(&per_node_conn);
        let (rmin, rmed, rmax) = crate::stats::spread(&peaks.rss_mb);
        let achieved = placed_ok as f64 / storm_secs;
        let secs = costs.seconds;
        let obs_cpu: Vec<f64> = costs.node_cpu[entries.len()..].to_vec();
        let entry_cpu: Vec<f64> = costs.node_cpu[..entries.len()].to_vec();

        let mut md = String::new();
        md += &format!(
            "### Placement storm: {} new users at {} /s for {:.0} s, {} busy sessions (one request per {:?} each)\n\n",
            total,
            self.rate,
            self.duration.as_secs_f64(),
            self.busy,
            self.busy_interval
        );
        md += &format!(
            "- entry nodes {}, observer nodes {} (no driver traffic but `/health` every {:?})\n",
            entries.len(),
            observers.len(),
            self.poll
        );
        md += &format!(
            "- placements: {placed_ok} of {total} answered 200 ({} failed{}); **{achieved:.1} placements/s** achieved; \
             nodes counted {placed_by_nodes:.0} placements and {races:.0} lost races; arrivals late by p99 {:.1} ms\n",
            failures.len(),
            failures.first().map(|e| format!(", e.g. {e}")).unwrap_or_default(),
            late.quantile(0.99)
        );
        md += &format!("- **placement latency** (client, first request of a new user): {}\n", latency.summary());
        md += &format!(
            "- placement latency (nodes' `sessionlb_placement_seconds`, bucket bounds): p50 {}, p99 {}\n",
            bucket_bound(bucket_quantile(&buckets, 0.5)),
            bucket_bound(bucket_quantile(&buckets, 0.99))
        );
        md += &format!(
            "- **notification lag** (session inserted → observer's view holds it): {}; {unseen} not seen within 30 s; \
             poll round trip {}\n",
            lag.summary(),
            poll_rtt.summary()
        );
        md +=
            &format!("- notification lag counted from the placement's answer instead: {}\n", lag_from_answer.summary());
        md += &format!(
            "- busy sessions: {} requests, {} errors{}, {} answered by another node's backend{}; latency {}\n",
            busy_requests.load(Ordering::Relaxed),
            busy_errors.len(),
            busy_errors.first().map(|e| format!(" (e.g. {e})")).unwrap_or_default(),
            misrouted.load(Ordering::Relaxed),
            if self.per_node_backends { "" } else { " (not checked: one shared backend)" },
            busy_latency.summary()
        );
        md += &format!(
            "- PostgreSQL connections to the registry (peak, sampled every second): total {} ({} active at once at most); \
             per node min {cmin:.0} / median {cmed:.0} / max {cmax:.0}; notification queue peak {:.4} %\n",
            peaks.total,
            peaks.active,
            peaks.queue_usage * 100.0
        );
        md += &format!(
            "- registry during the storm: {:.0} statements/s, {:.0} transactions/s; {}\n",
            calls as f64 / secs,
            xacts as f64 / secs,
            crate::pg::describe(&statements, secs, 4)
        );
        md += &costs.markdown("under the storm");
        md += &format!(
            "- CPU per node by role: entry nodes median {:.2} %, observer nodes median {:.2} % (observers only absorb notifications and answer polls)\n",
            crate::stats::spread(&entry_cpu).1,
            crate::stats::spread(&obs_cpu).1
        );
        md += &format!("- RSS per node, peak during the storm: min {rmin:.1} / median {rmed:.1} / max {rmax:.1} MB\n");

        let json = json!({
            "users": total, "rate": self.rate, "duration_s": self.duration.as_secs_f64(),
            "busy": self.busy, "busy_interval_ms": self.busy_interval.as_millis() as u64,
            "entry_nodes": entries.len(), "observer_nodes": observers.len(), "poll_ms": self.poll.as_millis() as u64,
            "placements_ok": placed_ok, "placements_failed": failures.len(),
            "placements_per_s": finite(achieved), "placed_by_nodes": placed_by_nodes, "races_lost": races,
            "placement": latency.json(),
            "placement_server_p50_ms_le": finite(bucket_quantile(&buckets, 0.5)),
            "placement_server_p99_ms_le": finite(bucket_quantile(&buckets, 0.99)),
            "arrival_late": late.json(),
            "notification_lag": lag.json(), "notification_lag_from_answer": lag_from_answer.json(), "notification_unseen": unseen, "poll_rtt": poll_rtt.json(),
            "busy_requests": busy_requests.load(Ordering::Relaxed), "busy_errors": busy_errors.len(),
            "busy_misrouted": misrouted.load(Ordering::Relaxed), "busy_checked": self.per_node_backends,
            "busy_latency": busy_latency.json(),
            "pg_connections_peak": { "total": peaks.total, "active": peaks.active,
                                     "per_node_min": cmin, "per_node_median": cmed, "per_node_max": cmax },
            "notification_queue_peak": peaks.queue_usage,
            "statements_per_s": finite(calls as f64 / secs), "xacts_per_s": finite(xacts as f64 / secs),
            "top_statements": crate::pg::deltas_json(&statements, secs, 8),
            "costs": costs.json(),
            "entry_node_cpu_median_pct": finite(crate::stats::spread(&entry_cpu).1),
            "observer_node_cpu_median_pct": finite(crate::stats::spread(&obs_cpu).1),
            "node_rss_peak_mb": { "min": finite(rmin), "median": finite(rmed), "max": finite(rmax) },
        });
        Ok((md, json))
    }
}

/// A histogram quantile's bucket bound: `≤ 5 ms`, or `> 5000 ms` past the last bucket.
fn bucket_bound(ms: f64) -> String {
    if ms.is_infinite() { "> 5000 ms (past the last bucket)".into() } else { format!("≤ {ms} ms") }
}

/// Wall-clock milliseconds since the Unix epoch.
fn unix_ms() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// `a - b` in ms, negative when `a` is earlier.
fn signed_ms(a: Instant, b: Instant) -> f64 {
    if a >= b { (a - b).as_secs_f64() * 1000.0 } else { -((b - a).as_secs_f64() * 1000.0) }
}

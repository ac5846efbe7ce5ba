//! Prometheus metrics: every metric is registered once in [`METRICS`], served
//! at `/metrics`, and the same counters feed the status page's JSON. Labels
//! stay low-cardinality: node addresses and reasons, never sessions or users.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// All of sessionlb's metrics.
pub struct Metrics {
    pub registry: Registry,
    /// Proxied requests by how they were routed (`local`, `forwarded`, `inbound`) and status class.
    pub requests: IntCounterVec,
    /// Cookies ignored because they did not verify: `kind` = affinity | user, `reason`.
    pub rejected_cookies: IntCounterVec,
    /// Node-to-node headers refused with 403, by reason.
    pub rejected_forwards: IntCounterVec,
    /// New sessions placed, by balancer.
    pub placements: IntCounterVec,
    /// Balancer fallbacks (e.g. custom plug-in timed out).
    pub balancer_fallbacks: IntCounter,
    /// Sessions moved to another node, by reason.
    pub session_moves: IntCounterVec,
    /// Backend keys registered on this node.
    pub backend_keys_registered: IntCounter,
    /// Requests for a backend key answered 503 + `Retry-After` because its
    /// node cannot serve it now (the key keeps its placement), by reason.
    pub backend_keys_held: IntCounterVec,
    pub registry_breaker_trips: IntCounter,
    /// Placements that lost a race and used the winner's node.
    pub placement_races_lost: IntCounter,
    /// Placement latency (lock, re-check, choose, write).
    pub placement_seconds: Histogram,
    /// Time spent waiting for the cross-node lock.
    pub lock_wait_seconds: HistogramVec,
    /// Placements done without the shared-storage lock (lock unavailable; the database still guards).
    pub lock_failures: IntCounter,
    /// Requests in flight through this node (long-lived ones included).
    pub in_flight: IntGauge,
    /// Connect failures to nodes (passive health), by node.
    pub connect_failures: IntCounterVec,
    /// Requests answered 503 because no node could take them.
    pub no_node_available: IntCounter,
    /// Anonymous pins issued, by reason (`new`, `replaced`, `user`, `failover`).
    pub pins_issued: IntCounterVec,
    /// Pins this node issued within the recent window (`cluster::pins`).
    pub pins_recent: IntGauge,
    /// Verified users pinned from memory because the registry was unavailable.
    pub degraded_placements: IntCounter,
    /// Such users waiting to be registered once the registry answers.
    pub degraded_pending: IntGauge,
    /// Placements abandoned because every request waiting for them had gone.
    pub placements_cancelled: IntCounter,
    /// Sessions in this node's in-memory view.
    pub view_sessions: IntGauge,
    /// New sessions not kept in memory because the view was full.
    pub view_capacity_reached: IntCounter,
    /// Placements that did not run the custom plug-in because
    /// `custom-balancer-max-running` plug-ins were already running.
    pub custom_balancer_cap_reached: IntCounter,
    // --- operations (issue 10). Per-node gauges (`sessionlb_node_up`,
    // `sessionlb_node_sessions`, `sessionlb_offline_mode`) are read from the
    // cluster view at scrape time: see `ops::cluster_metrics`.
    /// Proxied request duration (head in to last byte out), by route and status class; tunnels excluded.
    pub request_duration: HistogramVec,
    /// Time to open a new connection to the local backend or a peer, by upstream.
    pub upstream_connect: HistogramVec,
    /// Time from a connection to the upstream's first response byte, by upstream.
    pub upstream_ttfb: HistogramVec,
    /// Upgraded connections (tunnels) open through this node, by kind (`websocket`, `other`).
    pub open_tunnels: IntGaugeVec,
    /// Always 1, labelled with the version.
    pub build_info: IntGaugeVec,
    /// 1 while this node drains before stopping.
    pub draining: IntGauge,
    /// Registry round trips, by operation.
    pub registry_seconds: HistogramVec,
    /// Registry operations that failed, by operation.
    pub registry_errors: IntCounterVec,
    /// Time from a registry change (database clock) to its arrival at this node.
    pub notification_lag: Histogram,
    /// This node's clock minus the database's, measured at check-in.
    pub clock_skew: Gauge,
    // --- hostile input (issue 11)
    /// Status page and `/metrics` requests refused (not in `status-page-cidrs`, not a node).
    pub status_refused: IntCounter,
    /// Rounds of node-info calls to peers made for status requests (at most one a second).
    pub status_peer_rounds: IntCounter,
    /// Client connections open on the proxy port.
    pub connections_open: IntGauge,
    /// Client connections refused (503, closed) because `max-connections` were open.
    pub connections_refused: IntCounter,
    /// Connections closed because a request head did not arrive within `request-header-timeout`.
    pub request_header_timeouts: IntCounter,
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram_vec(r: &Registry, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels).expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

/// Buckets for whole requests (an IDE's long polls run for tens of seconds).
const REQUEST_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Buckets for connects, database round trips and notification delays.
const CONNECT_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let r = Registry::new();
    let latency_buckets = vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
    let placement_seconds = Histogram::with_opts(
        HistogramOpts::new(
            "sessionlb_placement_seconds",
            "Time to place a new session (lock, re-check, choose, write)",
        )
        .buckets(latency_buckets.clone()),
    )
    .expect("valid metric");
    r.register(Box::new(placement_seconds.clone())).expect("unique metric");
    let lock_wait_seconds = HistogramVec::new(
        HistogramOpts::new("sessionlb_lock_wait_seconds", "Time spent waiting for the cross-node placement lock")
            .buckets(latency_buckets),
        &["lock_type"],
    )
    .expect("valid metric");
    r.register(Box::new(lock_wait_seconds.clone())).expect("unique metric");
    let in_flight = IntGauge::new(
        "sessionlb_requests_in_flight",
        "Requests in flight through this node, WebSockets and streams included",
    )
    .expect("valid metric");
    r.register(Box::new(in_flight.clone())).expect("unique metric");
    Metrics {
        requests: counter_vec(&r, "sessionlb_requests_total", "Proxied requests", &["route", "class"]),
        rejected_cookies: counter_vec(
            &r,
            "sessionlb_rejected_cookies_total",
            "Cookies ignored because they did not verify",
            &["kind", "reason"],
        ),
        rejected_forwards: counter_vec(
            &r,
            "sessionlb_rejected_forwards_total",
            "Node-to-node requests refused (403)",
            &["reason"],
        ),
        placements: counter_vec(&r, "sessionlb_placements_total", "New sessions placed by this node", &["balancer"]),
        balancer_fallbacks: counter(&r, "sessionlb_balancer_fallbacks_total", "Balancer fallbacks to `sessions`"),
        session_moves: counter_vec(&r, "sessionlb_session_moves_total", "Sessions moved to another node", &["reason"]),
        backend_keys_registered: counter(
            &r,
            "sessionlb_backend_keys_registered_total",
            "Backend session keys registered on this node",
        ),
        backend_keys_held: counter_vec(
            &r,
            "sessionlb_backend_keys_held_total",
            "Requests for a backend key whose node cannot serve it now, answered 503 with Retry-After (the key stays)",
            &["reason"],
        ),
        registry_breaker_trips: counter(
            &r,
            "sessionlb_registry_breaker_trips_total",
            "Times requests started skipping an unavailable registry",
        ),
        placement_races_lost: counter(
            &r,
            "sessionlb_placement_races_lost_total",
            "Placements that found another node's placement",
        ),
        placement_seconds,
        lock_wait_seconds,
        lock_failures: counter(&r, "sessionlb_lock_failures_total", "Placements made without the shared-storage lock"),
        in_flight,
        connect_failures: counter_vec(
            &r,
            "sessionlb_connect_failures_total",
            "Failed connects to a node or the local backend",
            &["node"],
        ),
        no_node_available: counter(
            &r,
            "sessionlb_no_node_available_total",
            "Requests answered 503: no node could take them",
        ),
        pins_issued: counter_vec(
            &r,
            "sessionlb_pins_issued_total",
            "Anonymous pin cookies issued (chosen from memory, no registry row)",
            &["reason"],
        ),
        pins_recent: gauge(&r, "sessionlb_pins_recent", "Anonymous pins this node issued in the last 5 minutes"),
        degraded_placements: counter(
            &r,
            "sessionlb_degraded_placements_total",
            "Verified users pinned from memory because the registry was unavailable",
        ),
        degraded_pending: gauge(
            &r,
            "sessionlb_degraded_pending",
            "Users placed from memory, waiting to be registered when the registry answers",
        ),
        placements_cancelled: counter(
            &r,
            "sessionlb_placements_cancelled_total",
            "Placements abandoned because their request had gone",
        ),
        view_sessions: gauge(&r, "sessionlb_view_sessions", "Sessions held in this node's in-memory view"),
        view_capacity_reached: counter(
            &r,
            "sessionlb_view_capacity_reached_total",
            "New sessions not kept in memory because the view was full (max-sessions-in-memory)",
        ),
        custom_balancer_cap_reached: counter(
            &r,
            "sessionlb_custom_balancer_cap_reached_total",
            "Placements that fell back to `sessions` because custom-balancer-max-running plug-ins were running",
        ),
        request_duration: histogram_vec(
            &r,
            "sessionlb_request_duration_seconds",
            "Proxied request duration, from the request head to the last response byte (tunnels excluded)",
            &["route", "class"],
            REQUEST_BUCKETS,
        ),
        upstream_connect: histogram_vec(
            &r,
            "sessionlb_upstream_connect_seconds",
            "Time to open a new connection to the local backend or a peer node",
            &["upstream"],
            CONNECT_BUCKETS,
        ),
        upstream_ttfb: histogram_vec(
            &r,
            "sessionlb_upstream_ttfb_seconds",
            "Time from sending a request upstream to the first byte of its response",
            &["upstream"],
            REQUEST_BUCKETS,
        ),
        open_tunnels: gauge_vec(
            &r,
            "sessionlb_open_tunnels",
            "Upgraded connections (WebSocket or other) open through this node",
            &["kind"],
        ),
        build_info: {
            let g = gauge_vec(&r, "sessionlb_build_info", "Always 1; the version of this sessionlb", &["version"]);
            g.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
            g
        },
        draining: gauge(&r, "sessionlb_draining", "1 while this node drains before stopping"),
        registry_seconds: histogram_vec(
            &r,
            "sessionlb_registry_seconds",
            "Registry database round trips, by operation",
            &["op"],
            CONNECT_BUCKETS,
        ),
        registry_errors: counter_vec(&r, "sessionlb_registry_errors_total", "Registry operations that failed", &["op"]),
        notification_lag: {
            let h = Histogram::with_opts(
                HistogramOpts::new(
                    "sessionlb_notification_lag_seconds",
                    "Time from a registry change (database clock) to its arrival at this node",
                )
                .buckets(CONNECT_BUCKETS.to_vec()),
            )
            .expect("valid metric");
            r.register(Box::new(h.clone())).expect("unique metric");
            h
        },
        clock_skew: {
            let g = Gauge::new("sessionlb_clock_skew_seconds", "This node's clock minus the database's, at check-in")
                .expect("valid metric");
            r.register(Box::new(g.clone())).expect("unique metric");
            g
        },
        status_refused: counter(
            &r,
            "sessionlb_status_refused_total",
            "Status page and /metrics requests refused (not in status-page-cidrs, not a node)",
        ),
        status_peer_rounds: counter(
            &r,
            "sessionlb_status_peer_rounds_total",
            "Rounds of calls to peers for status requests (at most one a second)",
        ),
        connections_open: gauge(&r, "sessionlb_connections_open", "Client connections open on the proxy port"),
        connections_refused: counter(
            &r,
            "sessionlb_connections_refused_total",
            "Client connections refused with 503 because max-connections were open",
        ),
        request_header_timeouts: counter(
            &r,
            "sessionlb_request_header_timeouts_total",
            "Connections closed because a request head did not arrive within request-header-timeout",
        ),
        registry: r,
    }
});

/// Routes of `sessionlb_requests_total`.
pub const ROUTES: [&str; 3] = ["local", "forwarded", "inbound"];
/// Status classes of `sessionlb_requests_total`.
pub const CLASSES: [&str; 7] = ["none", "1xx", "2xx", "3xx", "4xx", "5xx", "other"];

/// `sessionlb_requests_total` children resolved once, so that counting a
/// request is one atomic add rather than a label lookup.
static REQUEST_COUNTERS: LazyLock<Vec<prometheus::IntCounter>> = LazyLock::new(|| {
    ROUTES.iter().flat_map(|r| CLASSES.iter().map(move |c| METRICS.requests.with_label_values(&[r, c]))).collect()
});

/// The index in [`CLASSES`] of a response status (0 = none).
fn class_index(status: u16) -> usize {
    match status {
        0 => 0,
        100..=199 => 1,
        200..=299 => 2,
        300..=399 => 3,
        400..=499 => 4,
        500..=599 => 5,
        _ => 6,
    }
}

/// Count one proxied request: `route` indexes [`ROUTES`], `status` is the response status (0 = none).
pub fn count_request(route: usize, status: u16) {
    REQUEST_COUNTERS[route * CLASSES.len() + class_index(status)].inc();
}

/// `sessionlb_request_duration_seconds` children, resolved once like [`REQUEST_COUNTERS`].
static REQUEST_DURATIONS: LazyLock<Vec<Histogram>> = LazyLock::new(|| {
    ROUTES
        .iter()
        .flat_map(|r| CLASSES.iter().map(move |c| METRICS.request_duration.with_label_values(&[r, c])))
        .collect()
});

/// Record a finished request's duration (`route` indexes [`ROUTES`]).
pub fn observe_request(route: usize, status: u16, seconds: f64) {
    REQUEST_DURATIONS[route * CLASSES.len() + class_index(status)].observe(seconds);
}

/// Upstreams of the connect and time-to-first-byte histograms.
pub const UPSTREAMS: [&str; 2] = ["backend", "peer"];

static UPSTREAM_CONNECT: LazyLock<[Histogram; 2]> =
    LazyLock::new(|| UPSTREAMS.map(|u| METRICS.upstream_connect.with_label_values(&[u])));
static UPSTREAM_TTFB: LazyLock<[Histogram; 2]> =
    LazyLock::new(|| UPSTREAMS.map(|u| METRICS.upstream_ttfb.with_label_values(&[u])));

/// Record a new upstream connection's connect time (`upstream` indexes [`UPSTREAMS`]).
pub fn observe_connect(upstream: usize, seconds: f64) {
    UPSTREAM_CONNECT[upstream].observe(seconds);
}

/// Record an upstream's time to first byte (`upstream` indexes [`UPSTREAMS`]).
pub fn observe_ttfb(upstream: usize, seconds: f64) {
    UPSTREAM_TTFB[upstream].observe(seconds);
}

/// Sum of a counter vector over all label values.
pub fn total(c: &IntCounterVec) -> u64 {
    use prometheus::core::Collector;
    c.collect().iter().flat_map(|mf| mf.get_metric().iter().map(|m| m.get_counter().value() as u64)).sum()
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    let mut buf = Vec::new();
    TextEncoder::new().encode(&METRICS.registry.gather(), &mut buf).expect("text encoding");
    String::from_utf8(buf).expect("prometheus text is UTF-8")
}

/// Record a registry notification's arrival: `at_db_ms` is the database
/// time of the change; this node's clock is corrected by its measured skew.
pub fn observe_notification_lag(at_db_ms: i64) {
    let skew_ms = (METRICS.clock_skew.get() * 1000.0).round() as i64;
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let lag_ms = (now_ms - skew_ms - at_db_ms).max(0);
    METRICS.notification_lag.observe(lag_ms as f64 / 1000.0);
}

/// Create the series of known label values at zero, so that they are
/// scraped (and alerts on `increase()` see their first change) before
/// anything happened.
pub fn init_series() {
    LazyLock::force(&REQUEST_COUNTERS);
    LazyLock::force(&REQUEST_DURATIONS);
    LazyLock::force(&UPSTREAM_CONNECT);
    LazyLock::force(&UPSTREAM_TTFB);
    for kind in ["websocket", "other"] {
        METRICS.open_tunnels.with_label_values(&[kind]);
    }
}

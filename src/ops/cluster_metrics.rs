//! Per-node gauges read from the cluster view when `/metrics` is scraped:
//! `sessionlb_node_up{node}`, `sessionlb_node_sessions{node}`,
//! `sessionlb_node_missed_checkin{node}` (as `list-nodes` shows it),
//! `sessionlb_node_last_checkin_timestamp_seconds{node}`, and this node's
//! `sessionlb_offline_mode` and `sessionlb_backend_up`.
//!
//! Read at scrape time, they always agree with the status page (a gauge set
//! by a periodic task lagged it by up to a health-check interval: after a
//! burst of 201 placements it showed 97), and a deleted node's series
//! disappear with the node.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, IntGauge, IntGaugeVec, Opts};

use crate::cluster::{ClusterView, NodeStatus};

/// The collector; register it once with [`register`].
pub struct ClusterMetrics {
    view: Arc<ClusterView>,
    checkin_interval: Duration,
    node_up: IntGaugeVec,
    node_sessions: IntGaugeVec,
    missed_checkin: IntGaugeVec,
    last_checkin: GaugeVec,
    offline_mode: IntGauge,
    /// The local backend's health (none on a router).
    backend: Option<(Arc<AtomicBool>, IntGauge)>,
}

impl ClusterMetrics {
    pub fn new(
        view: Arc<ClusterView>,
        checkin_interval: Duration,
        backend_up: Option<Arc<AtomicBool>>,
    ) -> ClusterMetrics {
        let gauge_vec =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["node"]).expect("valid metric");
        ClusterMetrics {
            view,
            checkin_interval,
            missed_checkin: gauge_vec(
                "sessionlb_node_missed_checkin",
                "1 for an Online node not seen for twice checkin-interval (list-nodes: Missed check-in)",
            ),
            last_checkin: GaugeVec::new(
                Opts::new(
                    "sessionlb_node_last_checkin_timestamp_seconds",
                    "When each node last checked in (database clock)",
                ),
                &["node"],
            )
            .expect("valid metric"),
            node_up: gauge_vec("sessionlb_node_up", "1 when this node sees the node Online and reachable"),
            node_sessions: gauge_vec(
                "sessionlb_node_sessions",
                "Sessions placed on each node, as this node's view holds them",
            ),
            offline_mode: IntGauge::new(
                "sessionlb_offline_mode",
                "1 while this node is in offline mode (takes no new sessions)",
            )
            .expect("valid metric"),
            backend: backend_up.map(|up| {
                let gauge =
                    IntGauge::new("sessionlb_backend_up", "1 while this node's backend passes its health checks")
                        .expect("valid metric");
                (up, gauge)
            }),
        }
    }

    fn refresh(&self) {
        let nodes = self.view.nodes();
        let counts = self.view.session_counts();
        self.node_up.reset();
        self.node_sessions.reset();
        self.missed_checkin.reset();
        self.last_checkin.reset();
        // The database's clock, as this node estimates it.
        let now = crate::cluster::node::local_now_ms() - (crate::metrics::METRICS.clock_skew.get() * 1000.0) as i64;
        for n in &nodes.nodes {
            let label = n.address();
            let up = n.status == NodeStatus::Online && self.view.is_reachable(n.id);
            self.node_up.with_label_values(&[&label]).set(i64::from(up));
            self.node_sessions.with_label_values(&[&label]).set(counts.get(&n.id).copied().unwrap_or(0) as i64);
            let missed = n.status == NodeStatus::Online && !n.is_fresh(now, self.checkin_interval);
            self.missed_checkin.with_label_values(&[&label]).set(i64::from(missed));
            if let Some(seen) = n.last_seen {
                self.last_checkin.with_label_values(&[&label]).set(seen as f64 / 1000.0);
            }
        }
        let offline = nodes.get(self.view.self_id()).is_some_and(|n| n.offline_mode);
        self.offline_mode.set(i64::from(offline));
        if let Some((up, gauge)) = &self.backend {
            gauge.set(i64::from(up.load(Ordering::Relaxed)));
        }
    }
}

impl Collector for ClusterMetrics {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.node_up.desc();
        d.extend(self.node_sessions.desc());
        d.extend(self.missed_checkin.desc());
        d.extend(self.last_checkin.desc());
        d.extend(self.offline_mode.desc());
        if let Some((_, gauge)) = &self.backend {
            d.extend(gauge.desc());
        }
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.refresh();
        let mut families = self.node_up.collect();
        families.extend(self.node_sessions.collect());
        families.extend(self.missed_checkin.collect());
        families.extend(self.last_checkin.collect());
        families.extend(self.offline_mode.collect());
        if let Some((_, gauge)) = &self.backend {
            families.extend(gauge.collect());
        }
        families
    }
}

/// Add the cluster gauges of `view` to the process's metrics.
pub fn register(view: Arc<ClusterView>, checkin_interval: Duration, backend_up: Option<Arc<AtomicBool>>) {
    let collector = ClusterMetrics::new(view, checkin_interval, backend_up);
    if let Err(e) = crate::metrics::METRICS.registry.register(Box::new(collector)) {
        tracing::warn!(error = %e, "cannot register the cluster metrics");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{NodeRecord, SessionKind, SessionRecord};

    fn node(id: i64) -> NodeRecord {
        NodeRecord {
            id,
            host: "10.0.0.1".into(),
            port: 8000 + id as u16,
            status: NodeStatus::Online,
            last_seen: Some(crate::cluster::node::local_now_ms()),
            ..NodeRecord::for_test()
        }
    }

    fn text(c: &ClusterMetrics) -> String {
        let mut buf = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &c.collect(), &mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn gauges_follow_the_view_at_scrape_time() {
        let view = Arc::new(ClusterView::new(1));
        let backend_up = Arc::new(AtomicBool::new(true));
        let c = ClusterMetrics::new(view.clone(), Duration::from_secs(300), Some(backend_up.clone()));
        view.set_nodes(vec![node(1), node(2)]);
        for i in 0..201 {
            view.upsert_session(SessionRecord {
                key: format!("k{i}"),
                node_id: Some(1 + i % 2),
                user_name: None,
                kind: SessionKind::Affinity,
                created: 1,
                last_active: 1,
            });
        }
        let t = text(&c);
        assert!(t.contains("sessionlb_node_sessions{node=\"10.0.0.1:8001\"} 101\n"), "{t}");
        assert!(t.contains("sessionlb_node_sessions{node=\"10.0.0.1:8002\"} 100\n"), "{t}");
        assert!(t.contains("sessionlb_node_missed_checkin{node=\"10.0.0.1:8002\"} 0\n"), "{t}");
        view.mark_unreachable(2);
        let mut me = node(1);
        me.offline_mode = true;
        let mut stale = node(2);
        stale.last_seen = Some(crate::cluster::node::local_now_ms() - 601_000);
        view.set_nodes(vec![me, stale]);
        let t = text(&c);
        assert!(t.contains("sessionlb_node_up{node=\"10.0.0.1:8002\"} 0\n"), "{t}");
        assert!(t.contains("sessionlb_node_missed_checkin{node=\"10.0.0.1:8002\"} 1\n"), "{t}");
        assert!(t.contains("sessionlb_offline_mode 1\n"), "{t}");
        assert!(t.contains("sessionlb_backend_up 1\n"), "{t}");
        backend_up.store(false, Ordering::Relaxed);
        assert!(text(&c).contains("sessionlb_backend_up 0\n"));
        view.set_nodes(vec![node(1)]);
        let t = text(&c);
        assert!(!t.contains("10.0.0.1:8002"), "a deleted node's series are gone: {t}");
    }
}

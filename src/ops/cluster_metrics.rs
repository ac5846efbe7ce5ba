//! Per-node gauges read from the cluster view when `/metrics` is scraped:
//! `sessionlb_node_up{node}`, `sessionlb_node_sessions{node}` and this
//! node's `sessionlb_offline_mode`.
//!
//! Read at scrape time, they always agree with the status page (a gauge set
//! by a periodic task lagged it by up to a health-check interval: after a
//! burst of 201 placements it showed 97), and a deleted node's series
//! disappear with the node.

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGauge, IntGaugeVec, Opts};

use crate::cluster::{ClusterView, NodeStatus};

/// The collector; register it once with [`register`].
pub struct ClusterMetrics {
    view: Arc<ClusterView>,
    node_up: IntGaugeVec,
    node_sessions: IntGaugeVec,
    offline_mode: IntGauge,
}

impl ClusterMetrics {
    pub fn new(view: Arc<ClusterView>) -> ClusterMetrics {
        let gauge_vec =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["node"]).expect("valid metric");
        ClusterMetrics {
            view,
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
        }
    }

    fn refresh(&self) {
        let nodes = self.view.nodes();
        let counts = self.view.session_counts();
        self.node_up.reset();
        self.node_sessions.reset();
        for n in &nodes.nodes {
            let label = n.address();
            let up = n.status == NodeStatus::Online && self.view.is_reachable(n.id);
            self.node_up.with_label_values(&[&label]).set(i64::from(up));
            self.node_sessions.with_label_values(&[&label]).set(counts.get(&n.id).copied().unwrap_or(0) as i64);
        }
        let offline = nodes.get(self.view.self_id()).is_some_and(|n| n.offline_mode);
        self.offline_mode.set(i64::from(offline));
    }
}

impl Collector for ClusterMetrics {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.node_up.desc();
        d.extend(self.node_sessions.desc());
        d.extend(self.offline_mode.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.refresh();
        let mut families = self.node_up.collect();
        families.extend(self.node_sessions.collect());
        families.extend(self.offline_mode.collect());
        families
    }
}

/// Add the cluster gauges of `view` to the process's metrics.
pub fn register(view: Arc<ClusterView>) {
    if let Err(e) = crate::metrics::METRICS.registry.register(Box::new(ClusterMetrics::new(view))) {
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
            ipv4: None,
            status: NodeStatus::Online,
            last_seen: None,
            load: [0.0; 3],
            cpus: 1,
            router: false,
            version: String::new(),
            clock_skew_ms: None,
            offline_mode: false,
            started_at: None,
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
        let c = ClusterMetrics::new(view.clone());
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
        view.mark_unreachable(2);
        let mut me = node(1);
        me.offline_mode = true;
        view.set_nodes(vec![me, node(2)]);
        let t = text(&c);
        assert!(t.contains("sessionlb_node_up{node=\"10.0.0.1:8002\"} 0\n"), "{t}");
        assert!(t.contains("sessionlb_offline_mode 1\n"), "{t}");
        view.set_nodes(vec![node(1)]);
        let t = text(&c);
        assert!(!t.contains("10.0.0.1:8002"), "a deleted node's series are gone: {t}");
    }
}

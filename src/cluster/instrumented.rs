//! A [`Registry`] that times every call of another one: the
//! `sessionlb_registry_seconds{op}` histogram (database round trips, as the
//! caller waits for them) and `sessionlb_registry_errors_total{op}`.
//! `serve` wraps its registry in it; a new registry method needs one line here.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::model::*;
use super::registry::{ChangeStream, NewSession, Registry, Result};
use crate::metrics::METRICS;

/// Times the calls of the registry it wraps.
pub struct Instrumented(pub Arc<dyn Registry>);

/// The operations timed (each has its error counter from the start).
const OPS: &[&str] = &[
    "now_ms",
    "register_node",
    "take_over_node",
    "set_node_status",
    "set_node_ipv4",
    "join_cluster",
    "check_in",
    "report_load",
    "set_offline_mode",
    "list_nodes",
    "get_node",
    "find_node",
    "delete_node",
    "cluster",
    "reset_cluster",
    "place_session",
    "move_session",
    "touch_sessions",
    "set_session_user",
    "expire_idle_sessions",
    "delete_session",
    "get_session",
    "list_sessions",
    "count_sessions",
];

/// Wrap `registry` so that its calls are measured.
pub fn instrumented(registry: Arc<dyn Registry>) -> Arc<dyn Registry> {
    for op in OPS {
        METRICS.registry_errors.with_label_values(&[op]);
    }
    Arc::new(Instrumented(registry))
}

async fn timed<T>(op: &'static str, call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let started = Instant::now();
    let result = call.await;
    METRICS.registry_seconds.with_label_values(&[op]).observe(started.elapsed().as_secs_f64());
    if result.is_err() {
        METRICS.registry_errors.with_label_values(&[op]).inc();
    }
    result
}

#[async_trait]
impl Registry for Instrumented {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
    async fn now_ms(&self) -> Result<Millis> {
        timed("now_ms", self.0.now_ms()).await
    }
    async fn register_node(&self, reg: &NodeRegistration) -> Result<NodeId> {
        timed("register_node", self.0.register_node(reg)).await
    }
    async fn take_over_node(&self, reg: &NodeRegistration) -> Result<Option<NodeId>> {
        timed("take_over_node", self.0.take_over_node(reg)).await
    }
    async fn set_node_status(&self, id: NodeId, status: NodeStatus) -> Result<()> {
        timed("set_node_status", self.0.set_node_status(id, status)).await
    }
    async fn set_node_ipv4(&self, id: NodeId, ipv4: Option<IpAddr>) -> Result<()> {
        timed("set_node_ipv4", self.0.set_node_ipv4(id, ipv4)).await
    }
    async fn join_cluster(
        &self,
        id: NodeId,
        fingerprint: &str,
        protocol: &str,
        freshness: Duration,
    ) -> Result<JoinOutcome> {
        timed("join_cluster", self.0.join_cluster(id, fingerprint, protocol, freshness)).await
    }
    async fn check_in(&self, id: NodeId, clock_skew_ms: i64) -> Result<()> {
        timed("check_in", self.0.check_in(id, clock_skew_ms)).await
    }
    async fn report_load(&self, id: NodeId, load: [f64; 3], cpus: u32, pins_recent: u64) -> Result<()> {
        timed("report_load", self.0.report_load(id, load, cpus, pins_recent)).await
    }
    async fn set_offline_mode(&self, id: NodeId, offline: bool) -> Result<()> {
        timed("set_offline_mode", self.0.set_offline_mode(id, offline)).await
    }
    async fn list_nodes(&self) -> Result<Vec<NodeRecord>> {
        timed("list_nodes", self.0.list_nodes()).await
    }
    async fn get_node(&self, id: NodeId) -> Result<Option<NodeRecord>> {
        timed("get_node", self.0.get_node(id)).await
    }
    async fn find_node(&self, host: &str, port: u16) -> Result<Option<NodeRecord>> {
        timed("find_node", self.0.find_node(host, port)).await
    }
    async fn delete_node(&self, id: NodeId, force: bool) -> Result<DeleteOutcome> {
        timed("delete_node", self.0.delete_node(id, force)).await
    }
    async fn cluster(&self) -> Result<Option<ClusterRecord>> {
        timed("cluster", self.0.cluster()).await
    }
    async fn reset_cluster(&self) -> Result<bool> {
        timed("reset_cluster", self.0.reset_cluster()).await
    }
    async fn place_session(&self, session: &NewSession<'_>) -> Result<SessionRecord> {
        timed("place_session", self.0.place_session(session)).await
    }
    async fn move_session(&self, key: &str, from: Option<NodeId>, to: NodeId) -> Result<SessionRecord> {
        timed("move_session", self.0.move_session(key, from, to)).await
    }
    async fn touch_sessions(&self, keys: &[String]) -> Result<u64> {
        timed("touch_sessions", self.0.touch_sessions(keys)).await
    }
    async fn set_session_user(&self, key: &str, user: &str) -> Result<()> {
        timed("set_session_user", self.0.set_session_user(key, user)).await
    }
    async fn expire_idle_sessions(&self, idle: Duration) -> Result<u64> {
        timed("expire_idle_sessions", self.0.expire_idle_sessions(idle)).await
    }
    async fn delete_session(&self, key: &str) -> Result<bool> {
        timed("delete_session", self.0.delete_session(key)).await
    }
    async fn get_session(&self, key: &str) -> Result<Option<SessionRecord>> {
        timed("get_session", self.0.get_session(key)).await
    }
    async fn list_sessions(&self) -> Result<Vec<SessionRecord>> {
        timed("list_sessions", self.0.list_sessions()).await
    }
    async fn count_sessions(&self, node: NodeId) -> Result<u64> {
        timed("count_sessions", self.0.count_sessions(node)).await
    }
    async fn subscribe(&self) -> Result<ChangeStream> {
        self.0.subscribe().await
    }
    async fn close(&self) {
        self.0.close().await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_timed_operation_is_listed() {
        let source = include_str!("instrumented.rs");
        let timed: Vec<&str> = source.split("timed(\"").skip(1).filter_map(|rest| rest.split('"').next()).collect();
        assert!(timed.len() > 20);
        for op in timed {
            assert!(super::OPS.contains(&op), "{op} is timed but not in OPS");
        }
    }
}

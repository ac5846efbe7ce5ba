//! Active health checks, built on pingora-load-balancing: every
//! `health-check-interval` this node checks each online peer (`GET /health`)
//! and its own backend (a TCP connect, or `GET health-check-backend-path`).
//!
//! The peers are a [`Backends`] set whose [`ServiceDiscovery`] is the
//! cluster view, so nodes joining, stopping or being deleted change what is
//! checked without a restart; pingora's health state applies the
//! `health-check-fall` / `health-check-rise` thresholds. Passive failures (a
//! failed connect in the data path) mark a node down at once; such a mark is
//! lifted by the next successful check, while a node the checks found down
//! needs `health-check-rise` successes. A draining peer (stopping, offline
//! mode) answers 503 with [`DRAINING_HEADER`]: it still serves its sessions,
//! so it counts as reachable. Runs on the control runtime.
//!
//! Deadlines: a probe, and a connect to a peer in the data path, may take
//! [`check_deadline`] — about `health-check-interval`, never more than
//! `timeout` — and rounds start every interval (a slow round delays the next
//! one, it does not add a pause after it). So a peer that is frozen (its
//! kernel still accepts connections) or cut off (connects hang) is found
//! after about `health-check-fall` intervals, not `fall` × (interval +
//! `timeout`).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::lb::discovery::{ServiceDiscovery, Static};
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora::lb::{Backend, Backends, Extensions};
use pingora::prelude::*;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use tokio::sync::watch;

use crate::cluster::{ClusterView, NodeId, NodeStatus};
use crate::config::{BackendHealthCheck, Config};

/// Set on a `/health` 503 that means "draining, still serving my sessions".
pub const DRAINING_HEADER: &str = "x-sessionlb-draining";

/// The shortest deadline of a probe or a peer connect: a busy node (or
/// machine) must not be taken for a dead one because of a short interval.
pub const MIN_CHECK_DEADLINE: Duration = Duration::from_secs(1);

/// How long one probe, or one TCP connect to a peer in the data path, may
/// take: `health-check-interval` (at least [`MIN_CHECK_DEADLINE`]), and
/// never more than `timeout`.
pub fn check_deadline(config: &Config) -> Duration {
    let timeout = config.proxy.timeout.unwrap_or(Duration::from_secs(10));
    timeout.min(config.cluster.health_check_interval.max(MIN_CHECK_DEADLINE))
}

/// What the checks need.
pub struct HealthChecks {
    pub view: Arc<ClusterView>,
    pub http: reqwest::Client,
    pub backend: Option<SocketAddr>,
    pub backend_up: Arc<AtomicBool>,
    pub interval: Duration,
    /// Bounds each check.
    pub timeout: Duration,
    pub tls: bool,
    /// Consecutive successes to mark up, failures to mark down.
    pub rise: usize,
    pub fall: usize,
    pub backend_check: BackendHealthCheck,
}

impl HealthChecks {
    /// The checks as configured.
    pub fn new(
        config: &Config,
        view: Arc<ClusterView>,
        http: reqwest::Client,
        backend: Option<SocketAddr>,
        backend_up: Arc<AtomicBool>,
    ) -> HealthChecks {
        let interval = config.cluster.health_check_interval;
        HealthChecks {
            view,
            http,
            backend,
            backend_up,
            interval,
            timeout: check_deadline(config),
            tls: config.proxy.ssl_enabled,
            rise: config.cluster.health_check_rise,
            fall: config.cluster.health_check_fall,
            backend_check: config.cluster.backend_health_check.clone(),
        }
    }

    /// Check until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let peer_outcomes = Outcomes::default();
        let mut peers = Backends::new(Box::new(PeerDiscovery { view: self.view.clone() }));
        peers.set_health_check(Box::new(Recorded {
            inner: Box::new(PeerCheck {
                http: self.http.clone(),
                scheme: if self.tls { "https" } else { "http" },
                timeout: self.timeout,
                rise: self.rise,
                fall: self.fall,
            }),
            outcomes: peer_outcomes.clone(),
        }));
        let backend_outcomes = Outcomes::default();
        let local = self.backend.map(|addr| {
            let mut set = Backends::new(Static::new(BTreeSet::from([inet_backend(addr, Extensions::new())])));
            set.set_health_check(Box::new(Recorded {
                inner: self.backend_check(addr),
                outcomes: backend_outcomes.clone(),
            }));
            set
        });
        if let Some(local) = &local
            && let Err(e) = local.update(|_| {}).await
        {
            tracing::error!(error = %e, "cannot set up the backend health check");
        }
        // A round starts every interval; one that overran (each check is
        // bounded by `timeout`) is followed by the next at once.
        let mut rounds = tokio::time::interval_at(tokio::time::Instant::now() + self.interval, self.interval);
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = rounds.tick() => {}
                _ = shutdown.changed() => return,
            }
            if let Err(e) = peers.update(|_| {}).await {
                tracing::warn!(error = %e, "listing peers for health checks failed");
            }
            let local_pass = async {
                if let Some(local) = &local {
                    local.run_health_check(false).await;
                }
            };
            tokio::join!(peers.run_health_check(true), local_pass);
            self.apply_peers(&peers, &peer_outcomes);
            if let (Some(local), Some(addr)) = (&local, self.backend) {
                self.apply_backend(local, addr, &backend_outcomes);
            }
        }
    }

    /// The local backend's check: pingora's TCP or HTTP check.
    fn backend_check(&self, addr: SocketAddr) -> Box<dyn HealthCheck + Send + Sync> {
        match &self.backend_check {
            BackendHealthCheck::Tcp => {
                let mut check = TcpHealthCheck::new();
                check.peer_template.options.connection_timeout = Some(self.timeout);
                check.consecutive_success = self.rise;
                check.consecutive_failure = self.fall;
                check
            }
            BackendHealthCheck::Http { path } => {
                let host = addr.to_string();
                let mut check = HttpHealthCheck::new(&host, false);
                let mut req = RequestHeader::build("GET", path.as_bytes(), None).expect("a valid path (checked)");
                req.insert_header("host", &host).expect("a valid host");
                req.insert_header("user-agent", "sessionlb-health-check").expect("a valid header");
                check.req = req;
                check.peer_template.options.connection_timeout = Some(self.timeout);
                check.peer_template.options.read_timeout = Some(self.timeout);
                check.consecutive_success = self.rise;
                check.consecutive_failure = self.fall;
                check.validator = Some(Box::new(|resp: &ResponseHeader| {
                    if (200..400).contains(&resp.status.as_u16()) {
                        Ok(())
                    } else {
                        Error::e_explain(
                            ErrorType::CustomCode("backend health check", resp.status.as_u16()),
                            "expected a 2xx or 3xx answer",
                        )
                    }
                }));
                Box::new(check)
            }
        }
    }

    fn apply_peers(&self, peers: &Backends, outcomes: &Outcomes) {
        let last = outcomes.take();
        for b in peers.get_backend().iter() {
            let (Some(&id), Some(addr)) = (b.ext.get::<NodeId>(), b.addr.as_inet()) else { continue };
            if !peers.ready(b) {
                if self.view.mark_unreachable(id) {
                    tracing::warn!(node_id = id, %addr, "node unreachable (health checks failed); its sessions move on their next request");
                }
            } else if last.get(addr) == Some(&true) && self.view.mark_reachable(id) {
                tracing::info!(node_id = id, %addr, "node reachable again");
            }
        }
    }

    fn apply_backend(&self, local: &Backends, addr: SocketAddr, outcomes: &Outcomes) {
        let last = outcomes.take();
        let ready = local.get_backend().iter().all(|b| local.ready(b));
        let up = if !ready {
            false
        } else {
            last.get(&addr).copied().unwrap_or(false) || self.backend_up.load(Ordering::Relaxed)
        };
        if up {
            self.view.note_available(self.view.self_id());
        } else {
            self.view.note_unavailable(self.view.self_id(), std::time::Instant::now());
        }
        if self.backend_up.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!(backend = %addr, "local backend is up again");
            } else {
                tracing::warn!(backend = %addr, "local backend is down: this node takes no new sessions and its sessions fail over");
            }
        }
    }
}

fn inet_backend(addr: SocketAddr, ext: Extensions) -> Backend {
    Backend { addr: PingoraAddr::Inet(addr), weight: 1, ext }
}

/// The online peers from the cluster view, each carrying its node id.
struct PeerDiscovery {
    view: Arc<ClusterView>,
}

#[async_trait]
impl ServiceDiscovery for PeerDiscovery {
    async fn discover(&self) -> Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let nodes = self.view.nodes();
        let peers = nodes
            .nodes
            .iter()
            .filter(|n| n.id != self.view.self_id() && n.status == NodeStatus::Online && !n.router)
            .filter_map(|n| {
                let mut ext = Extensions::new();
                ext.insert(n.id);
                n.socket_addr().map(|addr| inet_backend(addr, ext))
            })
            .collect();
        Ok((peers, HashMap::new()))
    }
}

/// `GET /health` on a peer, through the node-to-node client (which verifies
/// peers' certificates like the data path does).
struct PeerCheck {
    http: reqwest::Client,
    scheme: &'static str,
    timeout: Duration,
    rise: usize,
    fall: usize,
}

#[async_trait]
impl HealthCheck for PeerCheck {
    async fn check(&self, target: &Backend) -> Result<()> {
        let url = format!("{}://{}/health", self.scheme, target.addr);
        let resp = self
            .http
            .get(url)
            .timeout(self.timeout)
            .send()
            .await
            .or_err(ErrorType::ConnectError, "peer health check")?;
        let draining = resp.headers().contains_key(DRAINING_HEADER);
        if resp.status().is_success() || draining {
            Ok(())
        } else {
            Error::e_explain(ErrorType::CustomCode("peer health check", resp.status().as_u16()), "/health failed")
        }
    }

    fn health_threshold(&self, success: bool) -> usize {
        if success { self.rise } else { self.fall }
    }
}

/// The latest outcome per target since the last [`Outcomes::take`].
#[derive(Clone, Default)]
struct Outcomes(Arc<Mutex<HashMap<SocketAddr, bool>>>);

impl Outcomes {
    fn take(&self) -> HashMap<SocketAddr, bool> {
        std::mem::take(&mut *self.0.lock())
    }
}

/// A check that also records each outcome (pingora's health state only
/// reports flips; a passive mark is lifted by any success).
struct Recorded {
    inner: Box<dyn HealthCheck + Send + Sync>,
    outcomes: Outcomes,
}

#[async_trait]
impl HealthCheck for Recorded {
    async fn check(&self, target: &Backend) -> Result<()> {
        let result = self.inner.check(target).await;
        if let Some(addr) = target.addr.as_inet() {
            self.outcomes.0.lock().insert(*addr, result.is_ok());
        }
        result
    }

    fn health_threshold(&self, success: bool) -> usize {
        self.inner.health_threshold(success)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::NodeRecord;

    fn node(id: NodeId, port: u16, status: NodeStatus, router: bool) -> NodeRecord {
        NodeRecord { id, host: "127.0.0.1".into(), port, status, router, ..NodeRecord::for_test() }
    }

    #[test]
    fn a_check_takes_about_an_interval_at_least_a_second_and_at_most_timeout() {
        let config = |extra: &str| {
            let text = format!("database = \"sqlite:///tmp/x.db\"\n{extra}");
            Config::from_toml(std::path::Path::new("/etc/sessionlb/sessionlb.toml"), &text).unwrap()
        };
        assert_eq!(check_deadline(&config("")), Duration::from_secs(2), "the default interval, under the 10 s timeout");
        let c = config("health-check-interval = \"5s\"\ntimeout = \"30s\"\n");
        assert_eq!(check_deadline(&c), Duration::from_secs(5));
        let c = config("health-check-interval = \"250ms\"\n");
        assert_eq!(check_deadline(&c), MIN_CHECK_DEADLINE);
        let c = config("health-check-interval = \"1m\"\ntimeout = \"3s\"\n");
        assert_eq!(check_deadline(&c), Duration::from_secs(3));
        let c = config("health-check-interval = \"4s\"\ntimeout = 0\n");
        assert_eq!(check_deadline(&c), Duration::from_secs(4), "no timeout: the interval");
    }

    #[tokio::test]
    async fn peers_are_discovered_from_the_cluster_view() {
        let view = Arc::new(ClusterView::new(1));
        view.set_nodes(vec![
            node(1, 1001, NodeStatus::Online, false),
            node(2, 1002, NodeStatus::Online, false),
            node(3, 1003, NodeStatus::Offline, false),
            node(4, 1004, NodeStatus::Online, true),
        ]);
        let discovery = PeerDiscovery { view: view.clone() };
        let ids =
            |set: &BTreeSet<Backend>| -> Vec<NodeId> { set.iter().map(|b| *b.ext.get::<NodeId>().unwrap()).collect() };
        let (found, _) = discovery.discover().await.unwrap();
        assert_eq!(ids(&found), vec![2], "self, stopped nodes and routers are not checked");
        view.set_nodes(vec![node(1, 1001, NodeStatus::Online, false), node(5, 1005, NodeStatus::Online, false)]);
        let (found, _) = discovery.discover().await.unwrap();
        assert_eq!(ids(&found), vec![5], "a deleted node is no longer checked, a new one is");
    }
}

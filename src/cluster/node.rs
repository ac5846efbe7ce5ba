//! The node lifecycle: `Starting` → key checks → address resolution →
//! cluster check → `Online`; then periodic check-ins (with clock skew), load
//! reports (with the anonymous pins issued recently), activity write-back and
//! idle-session expiry; `Offline` (or row removal with `delete-node-on-exit`)
//! when it stops.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::address::{self, AddressError, NodeAddress, Resolver};
use super::load;
use super::model::*;
use super::registry::{Registry, RegistryError};
use super::view::ClusterView;
use crate::config::Config;
use crate::config::key::{KeyError, SecureKey};

/// The version recorded in the registry and compared by `list-nodes`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A node that passed its start-up checks and is `Online`.
#[derive(Debug)]
pub struct StartedNode {
    pub id: NodeId,
    pub address: NodeAddress,
    pub key: SecureKey,
    pub outcome: JoinOutcome,
}

/// Why a node could not come online. The matching status is already in the registry.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{source} (status: {status})")]
    Key {
        status: NodeStatus,
        #[source]
        source: KeyError,
    },
    #[error("{0} (status: Failed to resolve)")]
    Address(#[from] AddressError),
    #[error(
        "refusing to come online: {reason}, and these nodes are online with the current key: {}. \
         Use the same secure cookie key and protocol on every node, or stop all nodes (or run `sessionlb reset-cluster`) to redefine the cluster (status: Invalid secure cookie key)",
        live_nodes.join(", ")
    )]
    Rejected { reason: String, live_nodes: Vec<String> },
    #[error(
        "nothing to upgrade: no Online node is registered for {node} (`serve --upgrade` takes over a running node; start it without --upgrade)"
    )]
    NotRunning { node: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Local wall-clock time in ms since the epoch.
pub fn local_now_ms() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Run the start-up checks and come online; with `takeover` (a
/// zero-downtime upgrade), take over the running node's `Online` row instead.
pub async fn start(
    config: &Config,
    registry: &dyn Registry,
    resolver: &dyn Resolver,
    takeover: bool,
) -> Result<StartedNode, StartError> {
    let address = address::determine(&config.node, resolver);
    if takeover {
        return take_over(config, registry, address?).await;
    }
    let (host, port) = match &address {
        Ok(a) => (a.host.clone(), a.port),
        Err(e) => (e.host.clone(), e.port),
    };
    let id = registry
        .register_node(&NodeRegistration {
            host: host.clone(),
            port,
            router: config.is_router(),
            version: VERSION.into(),
        })
        .await?;
    tracing::info!(node_id = id, node = %format!("{host}:{port}"), "node registered (Starting)");

    let key = match config.secure_key() {
        Ok(key) => key,
        Err(source) => {
            let status = match source {
                KeyError::Missing { .. } => NodeStatus::MissingSecureCookieKey,
                KeyError::BadPermissions { .. } => NodeStatus::InvalidPermissionsOnSecureCookieKey,
                KeyError::TooShort { .. } | KeyError::Io { .. } => NodeStatus::InvalidSecureCookieKey,
            };
            registry.set_node_status(id, status).await?;
            return Err(StartError::Key { status, source });
        }
    };

    let address = match address {
        Ok(a) => a,
        Err(e) => {
            registry.set_node_status(id, NodeStatus::FailedToResolve).await?;
            return Err(e.into());
        }
    };
    registry.set_node_ipv4(id, Some(address.ip)).await?;
    // The first load report precedes `Online`: peers never see this node
    // eligible with the registry's default (zero) load.
    match load::read_loadavg(&config.node.loadavg_path) {
        Ok(avg) => registry.report_load(id, avg, load::cpu_count(), 0).await?,
        Err(e) => tracing::warn!(error = %e, "cannot read the load average"),
    }

    let freshness = 2 * config.cluster.checkin_interval;
    let outcome = registry.join_cluster(id, &key.fingerprint(), config.protocol(), freshness).await?;
    match &outcome {
        JoinOutcome::Rejected { live_nodes, reason } => {
            return Err(StartError::Rejected { reason: reason.clone(), live_nodes: live_nodes.clone() });
        }
        JoinOutcome::Defined => {
            tracing::info!(protocol = config.protocol(), "cluster defined by this node")
        }
        JoinOutcome::Redefined { previous_protocol } => tracing::warn!(
            protocol = config.protocol(),
            previous_protocol = %previous_protocol,
            "cluster redefined by this node: its key or protocol differed and no other node was online"
        ),
        JoinOutcome::Joined => tracing::info!("joined the cluster"),
    }
    Ok(StartedNode { id, address, key, outcome })
}

/// `serve --upgrade`: the same checks as a start, but nothing is written
/// unless they pass, and the row stays `Online` throughout (peers keep
/// routing to the address, which the old and then the new process serve).
async fn take_over(config: &Config, registry: &dyn Registry, address: NodeAddress) -> Result<StartedNode, StartError> {
    let key = SecureKey::load(&config.cluster.secure_cookie_key_file).map_err(|source| {
        let status = match source {
            KeyError::Missing { .. } => NodeStatus::MissingSecureCookieKey,
            KeyError::BadPermissions { .. } => NodeStatus::InvalidPermissionsOnSecureCookieKey,
            KeyError::TooShort { .. } | KeyError::Io { .. } => NodeStatus::InvalidSecureCookieKey,
        };
        StartError::Key { status, source }
    })?;
    let node = address.host_port();
    if let Some(cluster) = registry.cluster().await? {
        let same_key: bool =
            subtle::ConstantTimeEq::ct_eq(cluster.key_fingerprint.as_bytes(), key.fingerprint().as_bytes()).into();
        let reason = if !same_key {
            Some("its secure cookie key differs from the cluster's".to_string())
        } else if cluster.protocol != config.protocol() {
            Some(format!("its protocol {} differs from the cluster's {}", config.protocol(), cluster.protocol))
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(StartError::Rejected { reason, live_nodes: vec![node] });
        }
    }
    let registration = NodeRegistration {
        host: address.host.clone(),
        port: address.port,
        router: config.is_router(),
        version: VERSION.into(),
    };
    let Some(id) = registry.take_over_node(&registration).await? else {
        return Err(StartError::NotRunning { node });
    };
    registry.set_node_ipv4(id, Some(address.ip)).await?;
    tracing::info!(node_id = id, node = %node, "took over the running node's registry row (it stays Online)");
    Ok(StartedNode { id, address, key, outcome: JoinOutcome::Joined })
}

/// Measure this node's clock against the database's and check in.
pub async fn check_in(registry: &dyn Registry, id: NodeId) -> Result<i64, RegistryError> {
    let t0 = local_now_ms();
    let db = registry.now_ms().await?;
    let t1 = local_now_ms();
    let skew = (t0 + t1) / 2 - db;
    crate::metrics::METRICS.clock_skew.set(skew as f64 / 1000.0);
    registry.check_in(id, skew).await?;
    Ok(skew)
}

/// What the background tasks need.
pub struct NodeContext {
    pub config: Arc<Config>,
    /// The configuration as last reloaded (for the settings a reload changes).
    pub current: watch::Receiver<Arc<Config>>,
    pub registry: Arc<dyn Registry>,
    pub view: Arc<ClusterView>,
    pub id: NodeId,
    /// Set to true when this node's row was deleted by an admin.
    pub self_deleted: watch::Sender<bool>,
}

/// Start the periodic tasks on the current runtime; they end when
/// `shutdown` turns true.
pub fn spawn_background(ctx: Arc<NodeContext>, shutdown: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let cfg = &ctx.config;
    let mut tasks = Vec::new();

    let c = ctx.clone();
    tasks.push(every(cfg.cluster.checkin_interval, shutdown.clone(), move || {
        let c = c.clone();
        async move {
            match check_in(c.registry.as_ref(), c.id).await {
                Ok(skew) if skew.abs() > 1000 => tracing::warn!(
                    clock_skew_ms = skew,
                    "this node's clock differs from the database's by more than a second; locks and check-ins depend on synchronised clocks"
                ),
                Ok(_) => {}
                Err(RegistryError::NodeNotFound(_)) => {
                    tracing::warn!("this node's registry row is gone (deleted by an admin)");
                    let _ = c.self_deleted.send(true);
                }
                Err(e) => tracing::warn!(error = %e, "check-in failed; will retry"),
            }
        }
    }));

    // Load reports are written when they change (see LoadReport::worth_writing)
    // or are older than the check-in interval: an idle cluster writes almost none.
    let c = ctx.clone();
    let last_report: Arc<parking_lot::Mutex<Option<(load::LoadReport, std::time::Instant)>>> = Arc::default();
    let max_age = cfg.cluster.checkin_interval;
    tasks.push(every(cfg.cluster.load_report_interval, shutdown.clone(), move || {
        let c = c.clone();
        let last_report = last_report.clone();
        async move {
            let pins = c.view.pins().total(std::time::Instant::now());
            crate::metrics::METRICS.pins_recent.set(pins as i64);
            match load::read_loadavg(&c.config.node.loadavg_path) {
                Ok(avg) => {
                    let report = load::LoadReport { load: avg, cpus: load::cpu_count(), pins_recent: pins };
                    let last = *last_report.lock();
                    let age = last.map_or(std::time::Duration::MAX, |(_, at)| at.elapsed());
                    if !report.worth_writing(last.as_ref().map(|(r, _)| r), age, max_age) {
                        return;
                    }
                    match c.registry.report_load(c.id, avg, report.cpus, pins).await {
                        Ok(()) => *last_report.lock() = Some((report, std::time::Instant::now())),
                        Err(e) => tracing::debug!(error = %e, "load report failed"),
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the load average"),
            }
        }
    }));

    let c = ctx.clone();
    tasks.push(every(cfg.sessions.touch_interval, shutdown.clone(), move || {
        let c = c.clone();
        async move {
            let keys = c.view.take_active_keys();
            if keys.is_empty() {
                return;
            }
            for chunk in keys.chunks(1000) {
                if let Err(e) = c.registry.touch_sessions(chunk).await {
                    tracing::warn!(error = %e, sessions = chunk.len(), "writing session activity failed; retrying later");
                    c.view.restore_active_keys(chunk, local_now_ms());
                }
            }
        }
    }));

    let c = ctx.clone();
    let expiry_every = super::registry::expiry_period(cfg.sessions.idle_timeout);
    tasks.push(every(expiry_every, shutdown, move || {
        let c = c.clone();
        async move {
            // Write activity first, so that a session in use is never expired.
            let keys = c.view.take_active_keys();
            if !keys.is_empty() && c.registry.touch_sessions(&keys).await.is_err() {
                c.view.restore_active_keys(&keys, local_now_ms());
                return;
            }
            let idle_timeout = c.current.borrow().sessions.idle_timeout;
            match c.registry.expire_idle_sessions(idle_timeout).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(sessions = n, "idle sessions ended"),
                Err(e) => tracing::debug!(error = %e, "expiring idle sessions failed"),
            }
        }
    }));
    tasks
}

/// Run `f` every `period` (first run after one period) until shutdown.
fn every<F, Fut>(period: Duration, mut shutdown: watch::Receiver<bool>, mut f: F) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => f().await,
                _ = shutdown.changed() => return,
            }
        }
    })
}

/// Mark the node stopped (or remove its row when `delete`).
pub async fn stop(registry: &dyn Registry, id: NodeId, delete: bool) -> Result<(), RegistryError> {
    if delete {
        registry.delete_node(id, true).await?;
        tracing::info!(node_id = id, "node row removed (delete-node-on-exit)");
    } else {
        match registry.set_node_status(id, NodeStatus::Offline).await {
            Ok(()) | Err(RegistryError::NodeNotFound(_)) => {}
            Err(e) => return Err(e),
        }
        tracing::info!(node_id = id, "node offline");
    }
    Ok(())
}

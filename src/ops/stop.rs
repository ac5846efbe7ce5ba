//! What a running node does when told to stop, and in which order:
//!
//! - SIGTERM: drain (see [`super::drain`]; skipped with `drain-timeout = 0`),
//!   then mark the node `Offline`, then Pingora closes the listeners and
//!   gives what is left `grace-period`. A second SIGTERM ends the drain early.
//! - SIGINT: mark `Offline` and stop at once.
//! - SIGQUIT: hand the listening sockets to a new process waiting for them
//!   (`serve --upgrade`); the node stays `Online`. Ignored when none waits.
//! - deletion by an admin: mark `Offline` (the row is gone) and stop gracefully.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use super::drain::{Drain, DrainEnd};
use super::{systemd, upgrade};
use crate::cluster::{ClusterView, NodeId, Registry, node};
use crate::config::Config;
use crate::metrics::METRICS;

/// Waits for a stop request and prepares the registry before Pingora stops.
pub struct StopWatch {
    pub config: Arc<Config>,
    pub registry: Arc<dyn Registry>,
    pub view: Arc<ClusterView>,
    pub node_id: NodeId,
    /// The control runtime (every registry call runs there).
    pub control: tokio::runtime::Handle,
    pub self_deleted: watch::Receiver<bool>,
    /// Set when the sockets were handed to a new process.
    pub handed_over: Arc<AtomicBool>,
    /// The configuration as last reloaded (`drain-timeout` reloads).
    pub current: watch::Receiver<Arc<Config>>,
}

enum Why {
    Term,
    Int,
    Quit,
    Deleted,
}

#[async_trait]
impl ShutdownSignalWatch for StopWatch {
    async fn recv(&self) -> ShutdownSignal {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let mut quit = signal(SignalKind::quit()).expect("SIGQUIT handler");
        let mut deleted = self.self_deleted.clone();
        loop {
            let why = tokio::select! {
                _ = term.recv() => Why::Term,
                _ = int.recv() => Why::Int,
                _ = quit.recv() => Why::Quit,
                _ = deleted.wait_for(|d| *d) => Why::Deleted,
            };
            match why {
                Why::Quit if upgrade::successor_waiting(&self.config) => {
                    tracing::info!("SIGQUIT: handing the listening sockets to the new process; this node stays Online");
                    self.handed_over.store(true, Ordering::SeqCst);
                    systemd::notify("STATUS=handing over to a new process");
                    return ShutdownSignal::GracefulUpgrade;
                }
                Why::Quit => {
                    tracing::error!(
                        socket = %upgrade::upgrade_socket(&self.config).display(),
                        "SIGQUIT, but no new process waits for the listening sockets (start one with `sessionlb serve --upgrade`); ignored"
                    );
                }
                Why::Int => {
                    systemd::stopping("stopping");
                    self.mark_offline("SIGINT").await;
                    return ShutdownSignal::FastShutdown;
                }
                Why::Deleted => {
                    systemd::stopping("stopping: deleted by an admin");
                    self.mark_offline("node deleted by an admin").await;
                    return ShutdownSignal::GracefulTerminate;
                }
                Why::Term if self.current.borrow().server.drain_timeout.is_zero() => {
                    systemd::stopping("stopping");
                    self.mark_offline("SIGTERM").await;
                    return ShutdownSignal::GracefulTerminate;
                }
                Why::Term => return self.drain(&mut term, &mut int).await,
            }
        }
    }
}

impl StopWatch {
    async fn mark_offline(&self, why: &str) {
        tracing::info!(reason = why, "stopping: marking this node Offline");
        let registry = self.registry.clone();
        let id = self.node_id;
        let marked = self.control.spawn(async move {
            tokio::time::timeout(Duration::from_secs(5), node::stop(registry.as_ref(), id, false)).await
        });
        if !matches!(marked.await, Ok(Ok(Ok(())))) {
            tracing::warn!("could not mark this node Offline before stopping");
        }
    }

    /// SIGTERM with a drain: runs the drain on the control runtime; a
    /// second SIGTERM ends it early, a SIGINT stops at once.
    async fn drain(
        &self,
        term: &mut tokio::signal::unix::Signal,
        int: &mut tokio::signal::unix::Signal,
    ) -> ShutdownSignal {
        let timeout = self.current.borrow().server.drain_timeout;
        tracing::info!(
            drain_timeout = %crate::config::reader::humanize(timeout),
            in_progress = super::traffic::in_progress(),
            "SIGTERM: draining (offline mode, /health 503) until open requests and tunnels end"
        );
        systemd::stopping("draining");
        let (cut_tx, cut_rx) = watch::channel(false);
        let drain = Drain {
            registry: self.registry.clone(),
            view: self.view.clone(),
            node_id: self.node_id,
            timeout,
            marker: upgrade::drain_marker(&self.config),
        };
        let task = self.control.spawn(async move {
            let set_offline_mode = drain.begin().await;
            let mut cut = cut_rx;
            let end = drain
                .wait(async move {
                    let _ = cut.wait_for(|c| *c).await;
                })
                .await;
            match end {
                DrainEnd::Idle => tracing::info!("drained: nothing left in progress"),
                DrainEnd::TimedOut(left) => {
                    tracing::warn!(
                        in_progress = left,
                        "drain-timeout passed; stopping with requests and tunnels still open"
                    )
                }
                DrainEnd::Interrupted => tracing::info!("drain cut short"),
            }
            tracing::info!("stopping: marking this node Offline");
            match tokio::time::timeout(
                Duration::from_secs(5),
                node::stop(drain.registry.as_ref(), drain.node_id, false),
            )
            .await
            {
                Ok(Ok(())) => {}
                _ => tracing::warn!("could not mark this node Offline before stopping"),
            }
            drain.end(set_offline_mode).await;
            METRICS.draining.set(0);
        });
        tokio::pin!(task);
        let mut fast = false;
        loop {
            tokio::select! {
                _ = &mut task => break,
                _ = term.recv() => {
                    tracing::info!("second SIGTERM: ending the drain");
                    let _ = cut_tx.send(true);
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT: ending the drain and stopping at once");
                    fast = true;
                    let _ = cut_tx.send(true);
                }
            }
        }
        if fast { ShutdownSignal::FastShutdown } else { ShutdownSignal::GracefulTerminate }
    }
}

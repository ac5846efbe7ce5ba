//! `sessionlb serve`: wires the node lifecycle, the control-plane tasks and
//! the Pingora proxy into one process, and shuts them down in order.
//!
//! Threads: a small "control" tokio runtime owns every database connection
//! (start-up checks, check-ins, notifications, placements); Pingora runs the
//! proxy on its own runtimes and reads the in-memory [`ClusterView`].
//! On SIGTERM/SIGINT (or when an admin deletes this node) the node is marked
//! `Offline` *first*, so peers stop sending it new work, then Pingora drains.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::cluster::address::{Resolver, SystemResolver};
use crate::cluster::node::{self, NodeContext, StartError};
use crate::cluster::{self, ClusterView, Registry, RegistryError};
use crate::config::Config;
use crate::proxy::Proxy;

/// `serve` failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to the registry at {url}: {source}")]
    Registry {
        url: String,
        #[source]
        source: RegistryError,
    },
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot start the control runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Run a node until it is told to stop.
pub fn serve(config: Config) -> Result<(), ServeError> {
    serve_with(config, Arc::new(SystemResolver))
}

/// [`serve`] with an injected resolver.
pub fn serve_with(config: Config, resolver: Arc<dyn Resolver>) -> Result<(), ServeError> {
    let config = Arc::new(config);
    let listen = format!("{}:{}", config.node.www_address, config.node.www_port);
    // Fail early and clearly if the port is taken (Pingora would exit later).
    TcpListener::bind(&listen).map_err(|source| ServeError::Listen {
        address: listen.clone(),
        source,
    })?;

    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sessionlb-control")
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;

    let url = config.cluster.database.redacted();
    let registry = control
        .block_on(cluster::connect(
            &config.cluster.database,
            config.cluster.poll_interval,
        ))
        .map_err(|source| ServeError::Registry {
            url: url.clone(),
            source,
        })?;
    tracing::info!(registry = registry.kind(), database = %url, "registry connected");

    let started = control.block_on(node::start(&config, registry.as_ref(), resolver.as_ref()))?;
    let node_address = started.address.host_port();
    tracing::info!(node_id = started.id, node = %node_address, listen = %listen, "node online");

    let view = Arc::new(ClusterView::new(started.id));
    let (self_deleted_tx, self_deleted_rx) = watch::channel(false);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let tasks = control.block_on(async {
        if let Err(e) = node::check_in(registry.as_ref(), started.id).await {
            tracing::warn!(error = %e, "first check-in failed");
        }
        // Subscribe before loading the snapshot so that nothing falls between.
        let changes = registry.subscribe().await;
        if let Err(e) = cluster::sync::load_snapshot(registry.as_ref(), &view).await {
            tracing::warn!(error = %e, "loading the registry failed; it will be retried");
        }
        let ctx = Arc::new(NodeContext {
            config: config.clone(),
            registry: registry.clone(),
            view: view.clone(),
            id: started.id,
            self_deleted: self_deleted_tx.clone(),
        });
        let mut tasks = node::spawn_background(ctx, shutdown_rx.clone());
        match changes {
            Ok(rx) => tasks.push(tokio::spawn(cluster::sync::follow(
                registry.clone(),
                view.clone(),
                rx,
                self_deleted_tx,
                shutdown_rx.clone(),
            ))),
            Err(e) => tracing::error!(error = %e, "cannot subscribe to registry changes"),
        }
        tasks
    });

    let mut server = Server::new_with_opt_and_conf(None, pingora_conf(&config));
    server.bootstrap();
    let proxy = Proxy {
        config: config.clone(),
        view: view.clone(),
        node_address,
    };
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, proxy);
    service.add_tcp(&listen);
    server.add_service(service);

    let watch = StopWatch {
        registry: registry.clone(),
        node_id: started.id,
        control: control.handle().clone(),
        self_deleted: self_deleted_rx,
    };
    server.run(RunArgs {
        shutdown_signal: Box::new(watch),
    });

    // Pingora has drained; stop the control plane and record the stop.
    let _ = shutdown_tx.send(true);
    control.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        if let Err(e) = node::stop(
            registry.as_ref(),
            started.id,
            config.node.delete_node_on_exit,
        )
        .await
        {
            tracing::error!(error = %e, "could not record this node as stopped");
        }
        registry.close().await;
    });
    control.shutdown_timeout(Duration::from_secs(1));
    tracing::info!("stopped");
    Ok(())
}

fn pingora_conf(config: &Config) -> ServerConf {
    let s = &config.server;
    let port = config.node.www_port;
    let address = config.node.www_address;
    ServerConf {
        threads: if s.threads == 0 {
            crate::cluster::load::cpu_count() as usize
        } else {
            s.threads
        },
        grace_period_seconds: Some(s.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(s.shutdown_timeout.as_secs()),
        pid_file: s
            .run_dir
            .join(format!("sessionlb-{address}-{port}.pid"))
            .display()
            .to_string(),
        upgrade_sock: s
            .run_dir
            .join(format!("sessionlb-{address}-{port}.upgrade.sock"))
            .display()
            .to_string(),
        ..ServerConf::default()
    }
}

/// Waits for a stop request (SIGTERM: graceful; SIGINT: fast; deletion by
/// an admin: graceful) and marks the node `Offline` before Pingora drains.
struct StopWatch {
    registry: Arc<dyn Registry>,
    node_id: cluster::NodeId,
    control: tokio::runtime::Handle,
    self_deleted: watch::Receiver<bool>,
}

#[async_trait]
impl ShutdownSignalWatch for StopWatch {
    async fn recv(&self) -> ShutdownSignal {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let mut deleted = self.self_deleted.clone();
        let (kind, why) = tokio::select! {
            _ = term.recv() => (ShutdownSignal::GracefulTerminate, "SIGTERM"),
            _ = int.recv() => (ShutdownSignal::FastShutdown, "SIGINT"),
            _ = deleted.wait_for(|d| *d) => (ShutdownSignal::GracefulTerminate, "node deleted by an admin"),
        };
        tracing::info!(reason = why, "stopping: marking this node Offline");
        let registry = self.registry.clone();
        let id = self.node_id;
        let marked = self.control.spawn(async move {
            tokio::time::timeout(
                Duration::from_secs(5),
                node::stop(registry.as_ref(), id, false),
            )
            .await
        });
        if !matches!(marked.await, Ok(Ok(Ok(())))) {
            tracing::warn!("could not mark this node Offline before draining");
        }
        kind
    }
}

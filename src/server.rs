//! `sessionlb serve`: wires the node lifecycle, the control-plane tasks and
//! the Pingora proxy into one process, and shuts them down in order.
//!
//! Threads: a small "control" tokio runtime owns every database connection
//! (start-up checks, check-ins, notifications, placements); Pingora runs the
//! proxy on its own runtimes and reads the in-memory [`ClusterView`].
//! On SIGTERM/SIGINT (or when an admin deletes this node) the node is marked
//! `Offline` *first*, so peers stop sending it new work, then Pingora drains.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::TcpSocketOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use parking_lot::RwLock;

use crate::balancer::{self, Balancer};
use crate::cluster::address::{Resolver, SystemResolver};
use crate::cluster::node::{self, NodeContext, StartError};
use crate::cluster::{self, ClusterView, Registry, RegistryError};
use crate::config::{Config, ConfigError};
use crate::lock::{LockError, LockManager};
use crate::proxy::Router;
use crate::proxy::health::Prober;

/// Re-reads the configuration (on SIGHUP).
pub type Reload = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

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
    #[error("cannot use the shared storage {path} for locks: {source}")]
    SharedStorage {
        path: String,
        #[source]
        source: LockError,
    },
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Database(String),
    #[error("cannot resolve the backend {backend}: {reason}")]
    Backend { backend: String, reason: String },
}

/// Run a node until it is told to stop. `reload` re-reads the
/// configuration on SIGHUP (the balancer changes without a restart).
pub fn serve(config: Config, reload: Option<Reload>) -> Result<(), ServeError> {
    serve_with(config, Arc::new(SystemResolver), reload)
}

/// [`serve`] with an injected resolver.
pub fn serve_with(config: Config, resolver: Arc<dyn Resolver>, reload: Option<Reload>) -> Result<(), ServeError> {
    let config = Arc::new(config);
    let listen = config.listen_address().to_string();
    // Fail early and clearly if the port is taken (Pingora would exit later).
    TcpListener::bind(&listen).map_err(|source| ServeError::Listen { address: listen.clone(), source })?;
    let backend = resolve_backend(config.node.backend.as_deref())?;
    let shared = &config.cluster.shared_storage_path;
    let locks = LockManager::new(shared.clone(), &config.locks)
        .map_err(|source| ServeError::SharedStorage { path: shared.display().to_string(), source })?;

    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sessionlb-control")
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;

    // Everything that can fail is checked before the node comes online: a
    // node that fails after that would stay `Online` in the registry.
    let http = crate::proxy::control_client(&config).map_err(ServeError::Tls)?;
    let tls_files = tls_files(&config)?;

    let url = config.cluster.database.redacted();
    let database = config.registry_url().map_err(ServeError::Database)?;
    let registry = control
        .block_on(cluster::connect_with(&database, &cluster::RegistryOptions::from_config(&config)))
        .map_err(|source| ServeError::Registry { url: url.clone(), source })?;
    tracing::info!(registry = registry.kind(), database = %url, "registry connected");

    let started = control.block_on(node::start(&config, registry.as_ref(), resolver.as_ref()))?;
    let node_address = started.address.host_port();
    tracing::info!(node_id = started.id, node = %node_address, listen = %listen, "node online");

    let view = Arc::new(ClusterView::with_session_capacity(started.id, config.sessions.max_sessions_in_memory));
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
                config.cluster.load_report_interval,
                self_deleted_tx,
                shutdown_rx.clone(),
            ))),
            Err(e) => tracing::error!(error = %e, "cannot subscribe to registry changes"),
        }
        tasks
    });

    let balancer: Arc<RwLock<Arc<dyn Balancer>>> = Arc::new(RwLock::new(balancer::build(&config.balancer)));
    let router = Router::new(
        config.clone(),
        view.clone(),
        registry.clone(),
        started.key.clone(),
        node_address,
        backend,
        balancer.clone(),
        locks,
        control.handle().clone(),
        http,
    );
    let probe_timeout =
        config.proxy.timeout.unwrap_or(Duration::from_secs(10)).min(config.cluster.health_check_interval * 2);
    let prober = Prober {
        view: view.clone(),
        http: router.http.clone(),
        backend,
        backend_up: router.backend_up.clone(),
        interval: config.cluster.health_check_interval,
        timeout: probe_timeout,
        tls: config.proxy.ssl_enabled,
    };
    let mut tasks = tasks;
    tasks.push(control.spawn(prober.run(shutdown_rx.clone())));
    tasks.push(control.spawn(crate::proxy::degraded::run(
        router.degraded.clone(),
        registry.clone(),
        view.clone(),
        router.control_timeout().min(crate::proxy::routing::PLACEMENT_CALL_WAIT),
        shutdown_rx.clone(),
    )));
    if let Some(reload) = reload {
        tasks.push(control.spawn(reload_on_sighup(reload, config.clone(), balancer, shutdown_rx.clone())));
    }

    let mut server = Server::new_with_opt_and_conf(None, pingora_conf(&config));
    server.bootstrap();
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, router);
    // Unbounded tunnels and bodies (see the proxy) need TCP keepalive to end
    // when a client vanishes without closing (sleep, NAT drop).
    let mut socket = TcpSocketOptions::default();
    socket.tcp_keepalive = Some(crate::proxy::tcp_keepalive());
    match tls_files {
        Some((cert, key)) => match TlsSettings::intermediate(&cert, &key) {
            Ok(settings) => service.add_tls_with_settings(&listen, Some(socket), settings),
            Err(e) => {
                // Not expected (the files were checked), but never leave the row Online.
                let _ = shutdown_tx.send(true);
                if let Err(stop) = control.block_on(node::stop(registry.as_ref(), started.id, false)) {
                    tracing::error!(error = %stop, "could not record this node as stopped");
                }
                return Err(ServeError::Tls(format!("cannot listen with TLS on {listen}: {e}")));
            }
        },
        None => service.add_tcp_with_settings(&listen, socket),
    }
    server.add_service(service);

    let watch = StopWatch {
        registry: registry.clone(),
        node_id: started.id,
        control: control.handle().clone(),
        self_deleted: self_deleted_rx,
    };
    server.run(RunArgs { shutdown_signal: Box::new(watch) });

    // Pingora has drained; stop the control plane and record the stop.
    let _ = shutdown_tx.send(true);
    control.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        if let Err(e) = node::stop(registry.as_ref(), started.id, config.node.delete_node_on_exit).await {
            tracing::error!(error = %e, "could not record this node as stopped");
        }
        registry.close().await;
    });
    control.shutdown_timeout(Duration::from_secs(1));
    tracing::info!("stopped");
    Ok(())
}

/// With `ssl-enabled`: the certificate chain and key paths, once they are
/// known to load and to match (Pingora would panic on them later, after the
/// node came online).
fn tls_files(config: &Config) -> Result<Option<(String, String)>, ServeError> {
    let (Some(cert), Some(key)) = (&config.proxy.ssl_certificate, &config.proxy.ssl_certificate_key) else {
        return Ok(None);
    };
    if !config.proxy.ssl_enabled {
        return Ok(None);
    }
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let fail =
        |reason: String| ServeError::Tls(format!("ssl-certificate {cert} / ssl-certificate-key {key}: {reason}"));
    let (chain, private) = match pingora::tls::load_certs_and_key_files(&cert, &key) {
        Ok(Some(pair)) => pair,
        Ok(None) => return Err(fail("no certificate in the first, or no private key in the second".into())),
        Err(e) => return Err(fail(format!("cannot read them: {e}"))),
    };
    pingora::tls::install_default_crypto_provider();
    pingora::tls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| fail(format!("the key does not go with the certificate: {e}")))?;
    Ok(Some((cert, key)))
}

fn resolve_backend(backend: Option<&str>) -> Result<Option<SocketAddr>, ServeError> {
    let Some(b) = backend else { return Ok(None) };
    let fail = |reason: String| ServeError::Backend { backend: b.to_string(), reason };
    let mut addrs = b.to_socket_addrs().map_err(|e| fail(e.to_string()))?;
    addrs.next().map(Some).ok_or_else(|| fail("no address".into()))
}

/// On SIGHUP: re-read the configuration; apply the balancer settings at
/// once, and say which other changes need a restart.
async fn reload_on_sighup(
    reload: Reload,
    running: Arc<Config>,
    balancer: Arc<RwLock<Arc<dyn Balancer>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            _ = shutdown.changed() => return,
        }
        match reload() {
            Ok(new) => {
                let next = balancer::build(&new.balancer);
                tracing::info!(balancer = next.name(), "configuration reloaded: balancer applied");
                *balancer.write() = next;
                let (mut old_rest, mut new_rest) = (running.as_ref().clone(), new);
                old_rest.balancer = new_rest.balancer.clone();
                old_rest.files.clear();
                new_rest.files.clear();
                if old_rest.render() != new_rest.render() {
                    tracing::warn!("other configuration changes take effect after a restart");
                }
            }
            Err(e) => tracing::error!(error = %e, "configuration reload failed; keeping the running configuration"),
        }
    }
}

fn pingora_conf(config: &Config) -> ServerConf {
    let s = &config.server;
    let port = config.node.www_port;
    let address = config.node.www_address;
    ServerConf {
        threads: if s.threads == 0 { crate::cluster::load::cpu_count() as usize } else { s.threads },
        grace_period_seconds: Some(s.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(s.shutdown_timeout.as_secs()),
        pid_file: s.run_dir.join(format!("sessionlb-{address}-{port}.pid")).display().to_string(),
        ca_file: config.proxy.ssl_ca_file.as_ref().map(|p| p.display().to_string()),
        upgrade_sock: s.run_dir.join(format!("sessionlb-{address}-{port}.upgrade.sock")).display().to_string(),
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
            tokio::time::timeout(Duration::from_secs(5), node::stop(registry.as_ref(), id, false)).await
        });
        if !matches!(marked.await, Ok(Ok(Ok(())))) {
            tracing::warn!("could not mark this node Offline before draining");
        }
        kind
    }
}

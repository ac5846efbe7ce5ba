//! `sessionlb serve`: wires the node lifecycle, the control-plane tasks and
//! the Pingora proxy into one process, and shuts them down in order.
//!
//! Threads: a small "control" tokio runtime owns every database connection
//! (start-up checks, check-ins, notifications, placements); Pingora runs the
//! proxy on its own runtimes and reads the in-memory [`ClusterView`].
//! On SIGTERM the node drains, is marked `Offline`, then Pingora stops; on
//! SIGQUIT it hands its sockets to an upgraded process (see [`crate::ops`]).

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use pingora::listeners::TcpSocketOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::server::configuration::ServerConf;
use pingora::server::{ExecutionPhase, RunArgs, Server};
use tokio::sync::watch;

use parking_lot::RwLock;

use crate::balancer::{self, Balancer};
use crate::cluster::address::{Resolver, SystemResolver};
use crate::cluster::node::{self, NodeContext, StartError};
use crate::cluster::{self, ClusterView, RegistryError};
use crate::config::Config;
use crate::lock::{LockError, LockManager};
use crate::ops::{self, stop::StopWatch, upgrade};
use crate::proxy::Router;
use crate::proxy::health::HealthChecks;

/// Re-reads the configuration (on SIGHUP; see [`crate::ops::reload`]).
pub type Reload = ops::reload::Load;

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
    #[error(transparent)]
    Upgrade(#[from] upgrade::UpgradeError),
    #[error("{0}")]
    AccessLog(String),
}

/// How `serve` starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServeOptions {
    /// Take the listening sockets (and the node's `Online` row) over from the
    /// running process for the same address: a zero-downtime upgrade.
    pub upgrade: bool,
}

/// Run a node until it is told to stop. `reload` re-reads the
/// configuration on SIGHUP (see [`crate::ops::reload`] for what changes
/// without a restart).
pub fn serve(config: Config, reload: Option<Reload>, options: ServeOptions) -> Result<(), ServeError> {
    serve_with(config, Arc::new(SystemResolver), reload, options)
}

/// [`serve`] with an injected resolver.
pub fn serve_with(
    config: Config,
    resolver: Arc<dyn Resolver>,
    reload: Option<Reload>,
    options: ServeOptions,
) -> Result<(), ServeError> {
    let config = Arc::new(config);
    let listen = config.listen_address().to_string();
    // An upgrade takes the sockets the running process holds; otherwise fail
    // early and clearly if a port is taken (Pingora would exit later).
    let predecessor = if options.upgrade { Some(upgrade::running_process(&config)?) } else { None };
    if predecessor.is_none() {
        check_free(&listen)?;
        if let Some(metrics) = config.server.metrics_address {
            check_free(&metrics.to_string())?;
        }
    }
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
    let access_log = ops::access_log::AccessLog::default();
    access_log.reopen(&config.server).map_err(ServeError::AccessLog)?;
    // The configuration in effect, as reloaded, for the control-plane tasks.
    let (current_tx, current_rx) = watch::channel(config.clone());

    let url = config.cluster.database.redacted();
    let database = config.registry_url().map_err(ServeError::Database)?;
    let registry = control
        .block_on(cluster::connect_with(&database, &cluster::RegistryOptions::from_config(&config)))
        .map(cluster::instrumented::instrumented)
        .map_err(|source| ServeError::Registry { url: url.clone(), source })?;
    tracing::info!(registry = registry.kind(), database = %url, "registry connected");

    let started = control.block_on(node::start(&config, registry.as_ref(), resolver.as_ref(), options.upgrade))?;
    let node_address = started.address.host_port();
    tracing::info!(node_id = started.id, node = %node_address, listen = %listen, "node online");
    // What this process recorded: after handing over, a newer start time
    // means the new process owns the row.
    let started_at = control.block_on(registry.get_node(started.id)).ok().flatten().and_then(|n| n.started_at);
    if !options.upgrade {
        control.block_on(ops::drain::clear_interrupted(registry.as_ref(), started.id, &upgrade::drain_marker(&config)));
    }

    let view = Arc::new(ClusterView::with_session_capacity(started.id, config.sessions.max_sessions_in_memory));
    crate::metrics::init_series();
    ops::process_metrics::register();
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
            current: current_rx.clone(),
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
    let mut router = Router::new(
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
    router.access_log = access_log.clone();
    let backend_up = backend.map(|_| router.backend_up.clone());
    ops::cluster_metrics::register(view.clone(), config.cluster.checkin_interval, backend_up);
    let mut tasks = tasks;
    tasks.push(control.spawn(run_health_checks(
        view.clone(),
        router.http.clone(),
        backend,
        router.backend_up.clone(),
        current_rx.clone(),
        shutdown_rx.clone(),
    )));
    tasks.push(control.spawn(crate::proxy::degraded::run(
        router.degraded.clone(),
        registry.clone(),
        view.clone(),
        router.control_timeout().min(crate::proxy::routing::PLACEMENT_CALL_WAIT),
        shutdown_rx.clone(),
    )));
    ops::reload::register_metrics();
    if let Some(load) = reload {
        let reloader = ops::reload::Reloader {
            load,
            started: config.clone(),
            live: router.live.clone(),
            balancer,
            locks: router.locks.clone(),
            access_log,
            current: current_tx,
        };
        tasks.push(control.spawn(ops::reload::reload_on_sighup(reloader, shutdown_rx.clone())));
    }

    let opt = pingora::server::configuration::Opt { upgrade: options.upgrade, ..Default::default() };
    let mut server = Server::new_with_opt_and_conf(Some(opt), pingora_conf(&config));
    if let Some(old) = predecessor {
        upgrade::request_handover(&config, old);
    }
    // With --upgrade, this waits for the running process's sockets.
    server.bootstrap();
    let pid_file = upgrade::pid_file(&config);
    upgrade::write_pid_file(&pid_file);
    // The proxy behind the connection cap and the request-head deadline.
    let limits = crate::proxy::conn_limits::Limits {
        max_connections: config.server.max_connections,
        header_timeout: config.server.request_header_timeout,
    };
    let proxy = pingora::proxy::http_proxy(&server.configuration, router);
    let mut service = pingora::services::listening::Service::new(
        "sessionlb proxy".into(),
        crate::proxy::conn_limits::Limited::new(proxy, limits),
    );
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
    if let Some(address) = config.server.metrics_address {
        server.add_service(ops::metrics_listener::service(address));
        tracing::info!(address = %address, "serving /metrics");
    }
    tasks.push(control.spawn(notify_when_ready(server.watch_execution_phase(), listen.clone())));
    tasks.push(control.spawn(upgrade::start_successor_on_sigusr2(shutdown_rx.clone())));

    let handed_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = StopWatch {
        config: config.clone(),
        registry: registry.clone(),
        view: view.clone(),
        node_id: started.id,
        control: control.handle().clone(),
        self_deleted: self_deleted_rx,
        handed_over: handed_over.clone(),
        current: current_rx,
    };
    server.run(RunArgs { shutdown_signal: Box::new(watch) });

    // Pingora has stopped; stop the control plane and record the stop
    // (unless a new process took the node over).
    let _ = shutdown_tx.send(true);
    control.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        let taken_over = handed_over.load(std::sync::atomic::Ordering::SeqCst)
            && matches!(registry.get_node(started.id).await, Ok(Some(n)) if n.started_at != started_at);
        if taken_over {
            tracing::info!("the new process took this node over; leaving it Online");
        } else if let Err(e) = node::stop(registry.as_ref(), started.id, config.node.delete_node_on_exit).await {
            tracing::error!(error = %e, "could not record this node as stopped");
        }
        registry.close().await;
    });
    control.shutdown_timeout(Duration::from_secs(1));
    upgrade::remove_pid_file_if_ours(&pid_file);
    tracing::info!("stopped");
    Ok(())
}

/// Fail early and clearly when `address` cannot be listened on.
fn check_free(address: &str) -> Result<(), ServeError> {
    TcpListener::bind(address).map(drop).map_err(|source| ServeError::Listen { address: address.to_string(), source })
}

/// Tell systemd (`Type=notify`) that the node is ready once Pingora runs and
/// the public port accepts connections (the node is Online by then).
async fn notify_when_ready(mut phases: tokio::sync::broadcast::Receiver<ExecutionPhase>, listen: String) {
    loop {
        match phases.recv().await {
            Ok(ExecutionPhase::Running) => break,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(_) => return,
        }
    }
    let Ok(mut address) = listen.parse::<SocketAddr>() else { return };
    if address.ip().is_unspecified() {
        address.set_ip(if address.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(address).await.is_ok() {
            tracing::info!(listen = %listen, "ready");
            ops::systemd::ready();
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!(listen = %listen, "the public port does not accept connections");
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

/// Run the health checks with the configuration in effect; when a reload
/// changes their settings (interval, thresholds, backend check, timeout),
/// start them anew with the new ones.
async fn run_health_checks(
    view: Arc<ClusterView>,
    http: reqwest::Client,
    backend: Option<SocketAddr>,
    backend_up: Arc<std::sync::atomic::AtomicBool>,
    mut current: watch::Receiver<Arc<Config>>,
    mut shutdown: watch::Receiver<bool>,
) {
    fn settings(c: &Config) -> impl PartialEq + use<> {
        let k = &c.cluster;
        (
            k.health_check_interval,
            k.health_check_rise,
            k.health_check_fall,
            k.backend_health_check.clone(),
            c.proxy.timeout,
        )
    }
    loop {
        let config = current.borrow_and_update().clone();
        let checks = HealthChecks::new(&config, view.clone(), http.clone(), backend, backend_up.clone());
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(checks.run(stop_rx));
        let stopping = loop {
            tokio::select! {
                changed = current.changed() => {
                    if changed.is_err() {
                        let _ = shutdown.changed().await;
                        break true;
                    }
                    if settings(&current.borrow()) != settings(&config) {
                        break false;
                    }
                }
                _ = shutdown.changed() => break true,
            }
        };
        let _ = stop_tx.send(true);
        let _ = task.await;
        if stopping {
            return;
        }
        tracing::info!("health checks restarted with the reloaded settings");
    }
}

fn pingora_conf(config: &Config) -> ServerConf {
    let s = &config.server;
    ServerConf {
        threads: if s.threads == 0 { crate::cluster::load::cpu_count() as usize } else { s.threads },
        grace_period_seconds: Some(s.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(s.shutdown_timeout.as_secs()),
        pid_file: upgrade::pid_file(config).display().to_string(),
        ca_file: config.proxy.ssl_ca_file.as_ref().map(|p| p.display().to_string()),
        upgrade_sock: upgrade::upgrade_socket(config).display().to_string(),
        ..ServerConf::default()
    }
}

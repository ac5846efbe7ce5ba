//! The floor of sessionlb's stack: a bare Pingora `ProxyHttp` forwarder that
//! sends every request to one backend, built exactly like `sessionlb serve`
//! builds its proxy — same Pingora version and features, release profile,
//! mimalloc as the global allocator, the same `ServerConf` (see
//! `src/server.rs::pingora_conf`) and the same `PeerOptions` (see
//! `src/proxy/mod.rs::upstream_peer`) — but with no routing, identity,
//! cookies, metrics or control plane. `bench/e2e.sh` compares sessionlb
//! against it: whatever sessionlb costs beyond this is ours.
//!
//! ```text
//! bare_forwarder --listen 127.0.0.1:9001 --backend 127.0.0.1:9000 --threads 1
//!     [--keepalive-pool N] [--no-work-stealing] [--listener-tasks N]
//! ```
//!
//! The optional flags are tuning knobs for experiments (defaults = what
//! sessionlb uses, i.e. Pingora's defaults). SIGINT stops at once; SIGTERM
//! drains with no grace period.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::RunArgs;
use pingora::server::configuration::ServerConf;

/// Same allocator as `src/main.rs`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Forwards everything to `backend`.
struct Forwarder {
    backend: SocketAddr,
    /// sessionlb's `timeout` (default 10 s): bounds connects only.
    connect_timeout: Option<Duration>,
}

#[async_trait]
impl ProxyHttp for Forwarder {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        // The same options sessionlb sets for its local backend.
        let mut peer = HttpPeer::new(self.backend, false, String::new());
        peer.options.connection_timeout = self.connect_timeout;
        peer.options.total_connection_timeout = self.connect_timeout;
        peer.options.read_timeout = None;
        peer.options.write_timeout = None;
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }
}

struct Args {
    listen: String,
    backend: SocketAddr,
    threads: usize,
    keepalive_pool: Option<usize>,
    work_stealing: bool,
    listener_tasks: Option<usize>,
}

fn usage() -> ! {
    eprintln!(
        "usage: bare_forwarder --listen ADDR --backend ADDR --threads N \
         [--keepalive-pool N] [--no-work-stealing] [--listener-tasks N]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut listen = None;
    let mut backend = None;
    let mut threads = 1;
    let mut keepalive_pool = None;
    let mut work_stealing = true;
    let mut listener_tasks = None;
    let mut args = std::env::args().skip(1);
    let number = |v: Option<String>| v.and_then(|v| v.parse::<usize>().ok()).unwrap_or_else(|| usage());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = Some(args.next().unwrap_or_else(|| usage())),
            "--backend" => backend = Some(args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage())),
            "--threads" => threads = number(args.next()),
            "--keepalive-pool" => keepalive_pool = Some(number(args.next())),
            "--listener-tasks" => listener_tasks = Some(number(args.next())),
            "--no-work-stealing" => work_stealing = false,
            _ => usage(),
        }
    }
    let (Some(listen), Some(backend)) = (listen, backend) else { usage() };
    Args { listen, backend, threads, keepalive_pool, work_stealing, listener_tasks }
}

fn main() {
    let args = parse_args();
    // Own pid file and upgrade socket, as sessionlb keeps them in its run-dir.
    let run_dir = tempfile::Builder::new().prefix("bare-forwarder-").tempdir().expect("temporary run directory");
    let defaults = ServerConf::default();
    // As `src/server.rs::pingora_conf`, with `grace-period = 0` and
    // `shutdown-timeout = 1` (the benchmark's sessionlb settings).
    let conf = ServerConf {
        threads: if args.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            args.threads
        },
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        pid_file: run_dir.path().join("bare-forwarder.pid").display().to_string(),
        upgrade_sock: run_dir.path().join("bare-forwarder.upgrade.sock").display().to_string(),
        upstream_keepalive_pool_size: args.keepalive_pool.unwrap_or(defaults.upstream_keepalive_pool_size),
        work_stealing: args.work_stealing,
        listener_tasks_per_fd: args.listener_tasks.unwrap_or(defaults.listener_tasks_per_fd),
        ..defaults
    };

    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let forwarder = Forwarder { backend: args.backend, connect_timeout: Some(Duration::from_secs(10)) };
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, forwarder);
    service.add_tcp(&args.listen);
    server.add_service(service);
    eprintln!("bare_forwarder: {} -> {}", args.listen, args.backend);
    server.run(RunArgs::default());
    drop(run_dir);
}

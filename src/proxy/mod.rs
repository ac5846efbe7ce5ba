//! The Pingora data path: built-in endpoints, identity, the pin cookie,
//! routing to the node that hosts a session, placement of new sessions,
//! node-to-node forwarding and failover.
//!
//! Phases of one request (Pingora's `ProxyHttp`):
//!
//! ```text
//! early_request_filter    the head is in: stop the connection's head deadline (conn_limits)
//! request_filter          built-in endpoints (/health, /metrics, /load-balancer/…)
//!                         │ inbound node-to-node request? verify header → 403 | serve locally
//!                         └ routing: read the request, decide from memory, act:
//!                           backend key → user's session → (user) place | (anonymous) pin
//! upstream_peer           local backend or the chosen node; after a failure,
//!                         routing::fail_over (the session moves, or the pin does)
//! upstream_request_filter sign the forwarding header; X-Forwarded-*; strip untrusted identity
//! fail_to_connect         passive health: mark the node (or own backend) down, retry
//! upstream_response_filter peer's backend down (marker) → retry elsewhere;
//!                         local backend answered a path key with 2xx/101 → register it here
//! connected_to_upstream   upstream connect time
//! response_filter         Set-Cookie for a new, moved or refreshed pin; a 101 opens a tunnel
//! logging                 metrics; close the session's in-flight count
//! ```
//!
//! `ctx.timing` ([`crate::ops::traffic`]) times each proxied request and
//! counts it (and its tunnel) for the metrics and the drain on stop.
//!
//! The request path is one-way: `routing` decides and answers (503s
//! included) and uses `placement` (plain facts in, a placed entry or a typed
//! error out), `backend_keys` (lookups and registrations), `breaker`,
//! `degraded` and `cookie`; none of those know the request. Known sessions
//! and pins are routed from the in-memory [`ClusterView`] without a database
//! round trip; only placements of verified users, moves and unknown backend
//! keys reach the registry, through the control runtime.

pub mod backend_keys;
pub mod breaker;
pub mod conn_limits;
pub mod cookie;
pub mod degraded;
mod endpoints;
pub mod forward;
pub mod health;
pub mod identity;
pub mod log_limit;
pub mod placement;
pub mod routing;
mod status_page;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use hmac::Hmac;
use parking_lot::RwLock;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use sha2::Sha256;

use self::cookie::Pin;
use self::degraded::DegradedPlacements;
use crate::balancer::Balancer;
use crate::cluster::view::SessionEntry;
use crate::cluster::{ClusterView, NodeId, Registry};
use crate::config::Config;
use crate::config::key::SecureKey;
use crate::lock::LockManager;
use crate::metrics::METRICS;

use self::forward::{BACKEND_DOWN_HEADER, ForwardRejection, Forwarded, RequestLine};

// Header names used on every request, parsed once.
static FORWARD_HEADER: std::sync::LazyLock<http::HeaderName> =
    std::sync::LazyLock::new(|| http::HeaderName::from_static(forward::HEADER));
static BACKEND_DOWN: std::sync::LazyLock<http::HeaderName> =
    std::sync::LazyLock::new(|| http::HeaderName::from_static(BACKEND_DOWN_HEADER));
static X_FORWARDED_FOR: std::sync::LazyLock<http::HeaderName> =
    std::sync::LazyLock::new(|| http::HeaderName::from_static("x-forwarded-for"));
static X_FORWARDED_PROTO: std::sync::LazyLock<http::HeaderName> =
    std::sync::LazyLock::new(|| http::HeaderName::from_static("x-forwarded-proto"));
static X_FORWARDED_HOST: std::sync::LazyLock<http::HeaderName> =
    std::sync::LazyLock::new(|| http::HeaderName::from_static("x-forwarded-host"));

/// How many verified affinity cookies are remembered (about 150 bytes each).
const COOKIE_CACHE_CAPACITY: usize = 16_384;

/// The settings a configuration reload may change, swapped as a whole
/// (see [`crate::ops::reload`]): each request reads one consistent version.
pub struct LiveSettings {
    pub config: Arc<Config>,
    /// `[identity] trusted-header`, parsed once (validated by the configuration).
    pub trusted_header: Option<http::HeaderName>,
}

impl LiveSettings {
    pub fn new(config: Arc<Config>) -> LiveSettings {
        LiveSettings { trusted_header: config_trusted_header(&config), config }
    }
}

/// The running node's reloadable settings, shared with the reload task.
pub type Live = Arc<arc_swap::ArcSwap<LiveSettings>>;

/// State shared by every request of a node.
pub struct Router {
    /// The configuration the node started with: read it only for settings
    /// that need a restart (addresses, TLS, paths). Settings a reload
    /// changes are read through [`Router::settings`].
    pub config: Arc<Config>,
    /// The current reloadable settings (see [`Router::settings`]).
    pub live: Live,
    pub view: Arc<ClusterView>,
    pub registry: Arc<dyn Registry>,
    pub key: SecureKey,
    workbench_mac: Hmac<Sha256>,
    pub self_id: NodeId,
    /// This node's `host:port`.
    pub self_address: String,
    /// The local IDE server; `None` on a router node.
    pub backend: Option<SocketAddr>,
    /// Whether the local backend accepted the last probe or connect.
    pub backend_up: Arc<AtomicBool>,
    /// Replaced on configuration reload (SIGHUP).
    pub balancer: Arc<RwLock<Arc<dyn Balancer>>>,
    pub locks: LockManager,
    /// The control runtime: every database call runs there.
    pub control: tokio::runtime::Handle,
    /// Client for node-to-node control calls.
    pub http: reqwest::Client,
    /// Signed cookies (pins) verified recently (saves an HMAC per request).
    pub cookies: cookie::VerifiedCookies,
    /// Open while optional registry calls (lookups, registrations) recently
    /// failed or were slow: requests skip them.
    pub optional_calls: breaker::RegistryBreaker,
    /// Open while placements recently failed: users are placed from memory at once.
    pub placements: breaker::RegistryBreaker,
    /// Backend keys recently looked up and not found.
    pub key_misses: backend_keys::MissCache,
    /// Backend-key lookups waiting for the registry.
    pub lookups: backend_keys::LookupsInFlight,
    /// Users placed from memory while the registry was unavailable.
    pub degraded: Arc<DegradedPlacements>,
    /// One line per request when `access-log` is set (see [`crate::ops::access_log`]).
    pub access_log: crate::ops::access_log::AccessLog,
    /// Node-to-node headers accepted within the window (each is accepted once).
    pub replays: forward::ReplayCache,
}

impl Router {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        view: Arc<ClusterView>,
        registry: Arc<dyn Registry>,
        key: SecureKey,
        self_address: String,
        backend: Option<SocketAddr>,
        balancer: Arc<RwLock<Arc<dyn Balancer>>>,
        locks: LockManager,
        control: tokio::runtime::Handle,
        http: reqwest::Client,
    ) -> Router {
        let live = Arc::new(arc_swap::ArcSwap::from_pointee(LiveSettings::new(config.clone())));
        Router {
            workbench_mac: identity::workbench_mac(&key),
            self_id: view.self_id(),
            config,
            view,
            registry,
            key,
            self_address,
            backend,
            backend_up: Arc::new(AtomicBool::new(true)),
            balancer,
            locks,
            control,
            http,
            cookies: cookie::VerifiedCookies::new(COOKIE_CACHE_CAPACITY),
            live,
            optional_calls: breaker::RegistryBreaker::new("backend key lookups and registrations"),
            placements: breaker::RegistryBreaker::new("placements"),
            key_misses: backend_keys::MissCache::default(),
            lookups: backend_keys::LookupsInFlight::default(),
            degraded: Arc::new(DegradedPlacements::default()),
            access_log: crate::ops::access_log::AccessLog::default(),
            replays: forward::ReplayCache::new(forward::REPLAY_CACHE_CAPACITY),
        }
    }

    /// The current reloadable settings (one load per request phase).
    pub fn settings(&self) -> arc_swap::Guard<Arc<LiveSettings>> {
        self.live.load()
    }

    /// How long the proxy waits for the control plane (placements, lookups).
    pub fn control_timeout(&self) -> Duration {
        self.settings().config.proxy.timeout.unwrap_or(Duration::from_secs(30)).max(Duration::from_secs(1))
    }

    /// The longest a request waits for a whole placement (lock, balancer, writes).
    pub fn placement_limit(&self) -> Duration {
        self.control_timeout() * 2
    }

    /// What routing reads besides the request.
    pub fn memory<'a>(&'a self, balancer: &'a dyn Balancer) -> routing::Memory<'a> {
        routing::Memory {
            view: &self.view,
            here: self.self_id,
            here_serves: self.serves_locally(),
            balancer,
            degraded: &self.degraded,
            key_failover_after: self.settings().config.cluster.backend_key_failover_after,
        }
    }

    /// A placer with this node's registry, view, locks and `balancer`.
    pub fn placer(&self, balancer: Arc<dyn Balancer>) -> placement::Placer {
        placement::Placer {
            registry: self.registry.clone(),
            view: self.view.clone(),
            balancer,
            locks: self.locks.clone(),
            lock_timeout: self.control_timeout(),
            registry_wait: self.control_timeout().min(routing::PLACEMENT_CALL_WAIT),
            self_id: self.self_id,
            self_serves: self.serves_locally(),
        }
    }

    /// The `Set-Cookie` value for `pin`.
    pub fn pin_cookie(&self, pin: &Pin) -> String {
        let live = self.settings();
        let s = &live.config.sessions;
        cookie::set_cookie_header(
            &s.affinity_cookie_name,
            &pin.sign(&self.key),
            s.affinity_cookie_max_age.as_secs(),
            s.cookie_secure,
        )
    }

    /// Whether this node can serve sessions itself right now.
    pub fn serves_locally(&self) -> bool {
        self.backend.is_some() && self.backend_up.load(Ordering::Relaxed)
    }

    /// Check a request's node-to-node header (absent counts as malformed):
    /// meant for this node, from a known node, in the time window, MAC over
    /// this request line and body framing; then that `client` (the
    /// connection's peer) is the sender's registered address (unless
    /// `forward-peer-check = false`) and that the header is new.
    pub fn verify_forward(
        &self,
        req: &RequestHeader,
        client: Option<IpAddr>,
    ) -> std::result::Result<Forwarded, ForwardRejection> {
        let header = req.headers.get(forward::HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        let now = now_ms();
        let settings = self.settings();
        let window = settings.config.proxy.forwarding_window.as_millis() as i64;
        let f = forward::verify_framed(
            &self.key,
            header,
            self.self_id,
            |id| self.view.nodes().get(id).is_some(),
            now,
            window,
            &request_line(req),
            &body_framing(req, req),
        )?;
        if settings.config.proxy.forward_peer_check && !self.is_address_of(f.sender, client) {
            return Err(ForwardRejection::WrongPeer);
        }
        let (at, id) = forward::replay_id(header).ok_or(ForwardRejection::Malformed)?;
        self.replays.check(at, id, now, window)?;
        Ok(f)
    }

    /// Whether `client` is node `id`'s registered address (its IPv4, or its
    /// host when that is an address).
    fn is_address_of(&self, id: NodeId, client: Option<IpAddr>) -> bool {
        let Some(ip) = client.map(canonical_ip) else { return false };
        self.view.nodes().get(id).is_some_and(|n| n.ipv4 == Some(ip) || n.host.parse::<IpAddr>().ok() == Some(ip))
    }

    /// Whether `ip` is a cluster node's registered address (its IPv4, or
    /// its host when that is an address).
    pub fn is_node_address(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.view.nodes().nodes.iter().any(|n| n.ipv4 == Some(ip) || n.host.parse::<IpAddr>().ok() == Some(ip))
    }

    /// The address node-to-node connections leave from: `www-address`
    /// when it is a specific address (otherwise the kernel's choice).
    pub fn own_address(&self) -> Option<IpAddr> {
        own_address(&self.config)
    }

    /// Peer scheme for node-to-node traffic.
    fn peer_tls(&self) -> bool {
        self.config.proxy.ssl_enabled
    }
}

/// `www-address` when it is a specific address.
fn own_address(config: &Config) -> Option<IpAddr> {
    let ip = config.node.www_address;
    (!ip.is_unspecified()).then_some(ip)
}

/// The HTTP client for node-to-node control calls (probes, status
/// gathering): bounded by `timeout`, verifying peers like the data path
/// does, leaving from `www-address` when it is a specific address.
pub fn control_client(config: &Config) -> std::result::Result<reqwest::Client, String> {
    let timeout = config.proxy.timeout.unwrap_or(Duration::from_secs(30));
    let mut builder = reqwest::Client::builder()
        .local_address(own_address(config))
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_keepalive(Duration::from_secs(60))
        .danger_accept_invalid_certs(!config.proxy.verify_ssl_certs)
        .no_proxy();
    if let Some(path) = &config.proxy.ssl_ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read ssl-ca-file {}: {e}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("ssl-ca-file {} is not a PEM certificate bundle: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("ssl-ca-file {} holds no certificate", path.display()));
        }
        builder = builder.tls_built_in_root_certs(false);
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| format!("cannot build the node-to-node HTTP client: {e}"))
}

/// IPv4-mapped IPv6 addresses as IPv4.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The body framing the forwarding MAC covers: `sent` is the request as it
/// goes upstream (its `Content-Length`), `original` as it came in (Pingora
/// re-frames a body without a length as chunked after the filters).
fn body_framing(sent: &RequestHeader, original: &RequestHeader) -> String {
    let length = sent.headers.get(http::header::CONTENT_LENGTH).map(|v| v.as_bytes());
    let chunked = length.is_none() && original.headers.contains_key(http::header::TRANSFER_ENCODING)
        || sent.headers.contains_key(http::header::TRANSFER_ENCODING);
    forward::framing(length, chunked)
}

/// An address as a header value, IPv4 without the formatting machinery
/// (this runs on every request).
fn ip_header_value(ip: IpAddr) -> std::result::Result<http::HeaderValue, http::header::InvalidHeaderValue> {
    let IpAddr::V4(v4) = ip else {
        return http::HeaderValue::try_from(ip.to_string());
    };
    let mut buf = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            buf[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            buf[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            buf[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        buf[len] = b'0' + octet % 10;
        len += 1;
    }
    http::HeaderValue::from_bytes(&buf[..len])
}

/// TCP keepalive for client and peer connections: with no read timeout on
/// tunnels and bodies, it is what ends a connection whose other end vanished
/// without closing it (about 2 minutes: 60 s idle, then 6 probes 10 s apart).
pub fn tcp_keepalive() -> pingora::protocols::TcpKeepalive {
    pingora::protocols::TcpKeepalive {
        idle: Duration::from_secs(60),
        interval: Duration::from_secs(10),
        count: 6,
        user_timeout: Duration::ZERO,
    }
}

/// Pingora reads a downstream request body (and, after a 101, the client
/// side of a tunnel) under a 60 s read timeout: an idle WebSocket would be
/// cut. Upgrade requests (tunnels) read without a timeout; other requests'
/// bodies may be silent for `request-body-idle-timeout` (the head itself is
/// bounded by `request-header-timeout`, see `conn_limits`).
fn set_downstream_reads(session: &mut Session, body_idle: Duration) {
    let idle = if session.is_upgrade_req() { None } else { Some(body_idle) };
    session.set_read_timeout(idle);
    // Draining an unread body before reusing the connection stays bounded.
    session.set_total_drain_timeout(Some(Duration::from_secs(60)));
}

/// Forwarding headers only a trusted front proxy (`trusted-cidrs`) may
/// send; from anyone else they are removed, and `X-Forwarded-For`, `-Proto`
/// and `-Host` are then set from the connection and the request's own Host.
const UNTRUSTED_FORWARDING_HEADERS: [&str; 6] =
    ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port", "x-real-ip", "forwarded"];

fn scrub_forwarding_headers(upstream: &mut RequestHeader) {
    for name in UNTRUSTED_FORWARDING_HEADERS {
        if upstream.headers.contains_key(name) {
            upstream.remove_header(name);
        }
    }
}

fn config_trusted_header(config: &Config) -> Option<http::HeaderName> {
    config.identity.trusted_header.as_deref().and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok())
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Route {
    #[default]
    Unset,
    /// This node's backend.
    Local,
    /// Another node.
    Peer { id: NodeId, addr: SocketAddr },
}

/// What a request was routed by.
#[derive(Debug, Clone, Default)]
pub enum Via {
    #[default]
    None,
    /// A registry session (kept for activity accounting).
    Session(Arc<SessionEntry>),
    /// An anonymous browser's pin.
    Pin(Pin),
    /// A verified user placed from memory (registry unavailable); the user's session key.
    Degraded { key: String },
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::None => f.write_str("-"),
            Via::Session(e) => write!(f, "key={}", e.record.key),
            Via::Pin(p) => write!(f, "pin={}", p.id),
            Via::Degraded { key } => write!(f, "key={key} (from memory)"),
        }
    }
}

/// Per-request state.
#[derive(Default)]
pub struct RequestCtx {
    pub route: Route,
    /// A verified node-to-node request: serve locally, never forward.
    pub inbound: Option<Forwarded>,
    pub user: Option<String>,
    /// A backend key found in the path, to register here if our backend answers it with 2xx or 101.
    pub path_key: Option<String>,
    pub path_key_known: bool,
    /// `Set-Cookie` value to add to the response.
    pub set_cookie: Option<String>,
    /// The pin the browser came with, if it verified.
    pub browser_pin: Option<Pin>,
    /// Nodes that failed during this request (connect failure, backend down).
    pub failed: Vec<NodeId>,
    /// Set when a peer said its backend is down: the request may be retried elsewhere.
    pub peer_backend_down: bool,
    /// What the request was routed by.
    pub via: Via,
    pub client: Option<IpAddr>,
    /// The connection's head deadline, cleared while this request is served.
    pub conn_watch: Option<Arc<conn_limits::Watch>>,
    /// A held backend key: answer 503 with this `Retry-After` (seconds).
    pub retry_after: Option<u64>,
    pub in_flight: bool,
    /// Durations, tunnels and the drain's count of requests in progress.
    pub timing: crate::ops::traffic::RequestTiming,
    /// When the request arrived, set only while the access log is on.
    pub received: Option<std::time::Instant>,
}

impl RequestCtx {
    /// The key this request is routed by, for the forwarding header and logs
    /// (for a node-to-node request, the sender's; for a pin, its id).
    pub fn session_key(&self) -> Option<&str> {
        if let Some(f) = &self.inbound {
            return Some(&f.key);
        }
        match &self.via {
            Via::Session(e) => Some(&e.record.key),
            Via::Pin(p) => Some(&p.id),
            Via::Degraded { key } => Some(key),
            Via::None => None,
        }
    }
}

/// Local wall clock in ms and s.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    match session.client_addr()? {
        PingoraAddr::Inet(a) => Some(a.ip()),
        _ => None,
    }
}

/// The request's Host (header, else URI authority).
pub(crate) fn host_of(req: &RequestHeader) -> &str {
    req.headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .unwrap_or("")
}

pub(crate) fn request_line(req: &RequestHeader) -> RequestLine<'_> {
    RequestLine {
        method: req.method.as_str(),
        host: host_of(req),
        path_and_query: req.uri.path_and_query().map_or("/", |p| p.as_str()),
    }
}

/// An error that makes Pingora answer with `status`.
pub(crate) fn status_error(status: u16, why: &'static str) -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(status), why)
}

#[async_trait]
impl ProxyHttp for Router {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    async fn early_request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        // The head is in: the connection's head deadline stops until this request ends.
        ctx.conn_watch = conn_limits::request_started(
            session.client_addr().and_then(|a| a.as_inet()),
            session.server_addr().and_then(|a| a.as_inet()),
        );
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if self.access_log.enabled() {
            ctx.received = Some(std::time::Instant::now());
        }
        ctx.client = client_ip(session);
        if endpoints::is_builtin(session.req_header().uri.path()) {
            endpoints::serve(self, session, ctx).await?;
            return Ok(true);
        }
        ctx.timing.start();

        // A request from another node of the cluster: verified or refused.
        if session.req_header().headers.contains_key(forward::HEADER) {
            match self.verify_forward(session.req_header(), ctx.client) {
                Ok(f) => {
                    if !self.serves_locally() {
                        endpoints::respond_backend_down(session).await?;
                        return Ok(true);
                    }
                    ctx.user = f.user.clone();
                    ctx.path_key = routing::path_key(
                        &self.settings().config.sessions.path_pattern,
                        session.req_header().uri.path(),
                    );
                    ctx.path_key_known = ctx.path_key.as_deref().is_some_and(|k| self.view.session(k).is_some());
                    tracing::debug!(
                        target: crate::telemetry::DIAGNOSTICS_TARGET,
                        sender = f.sender,
                        key = %f.key,
                        path = %session.req_header().uri.path(),
                        "serving a request forwarded by another node"
                    );
                    ctx.inbound = Some(f);
                    ctx.route = Route::Local;
                    set_downstream_reads(session, self.settings().config.server.request_body_idle_timeout);
                    return Ok(false);
                }
                Err(reason) => {
                    refuse_forward(session, ctx, reason).await?;
                    return Ok(true);
                }
            }
        }

        routing::route(self, session, ctx).await?;
        set_downstream_reads(session, self.settings().config.server.request_body_idle_timeout);
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        if !ctx.failed.is_empty() && ctx.inbound.is_none() {
            routing::fail_over(self, ctx).await?;
        }
        let (addr, tls, sni) = match ctx.route {
            Route::Local => match self.backend {
                // rustls needs a server name even unverified: the address.
                Some(b) => (b, self.config.node.backend_tls, b.ip().to_string()),
                None => return Err(status_error(503, "router node without a backend")),
            },
            // Peers are verified against their registered host (name or IP):
            // Pingora skips verification when the SNI is empty.
            Route::Peer { id, addr } => {
                let host = if self.peer_tls() { self.view.nodes().get(id).map(|n| n.host.clone()) } else { None };
                (addr, self.peer_tls(), host.unwrap_or_default())
            }
            Route::Unset => return Err(status_error(500, "request was not routed")),
        };
        let mut peer = HttpPeer::new(addr, tls, sni);
        let timeout = self.settings().config.proxy.timeout;
        peer.options.connection_timeout = timeout;
        peer.options.total_connection_timeout = timeout;
        if matches!(ctx.route, Route::Peer { .. }) {
            // A peer cut off (connects hang) is given up on, marked and
            // failed over after about a health-check interval, not `timeout`.
            peer.options.connection_timeout = Some(health::check_deadline(&self.settings().config));
        }
        // `timeout` never bounds proxied bodies, long polls or tunnels.
        peer.options.read_timeout = None;
        peer.options.write_timeout = None;
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        peer.options.tcp_keepalive = Some(tcp_keepalive());
        if let (Route::Peer { .. }, Some(local)) = (ctx.route, self.own_address()) {
            // Peers check that a forwarded request comes from the sender's
            // registered address: leave from ours (where the kernel would
            // pick another source, e.g. 127.0.0.1 on the loopback network).
            let mut bind = pingora::connectors::l4::BindTo::default();
            bind.addr = Some(SocketAddr::new(local, 0));
            peer.options.bind_to = Some(bind);
        }
        if tls {
            // The local backend (rserver serving https) runs on this node:
            // its certificate, made for the public name, is not checked.
            let verify = matches!(ctx.route, Route::Peer { .. }) && self.config.proxy.verify_ssl_certs;
            peer.options.verify_cert = verify;
            peer.options.verify_hostname = verify;
        }
        ctx.timing.connecting(matches!(ctx.route, Route::Local));
        Ok(Box::new(peer))
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        _fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.timing.connected(reused);
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if upstream.headers.contains_key(&*FORWARD_HEADER) {
            upstream.remove_header(&*FORWARD_HEADER);
        }
        let live = self.settings();
        if let Some(f) = &ctx.inbound {
            // The sending node already set X-Forwarded-* and vetted identity
            // headers. The identity header is not covered by the forwarding
            // MAC, so only a value equal to the signed user passes: a replayed
            // forwarding header cannot carry another identity.
            if let Some(name) = &live.trusted_header {
                let mut values = upstream.headers.get_all(name).iter();
                let only_the_signed_user = match (values.next(), values.next()) {
                    (None, _) => true,
                    (Some(value), None) => f.user.as_deref().map(str::as_bytes) == Some(value.as_bytes()),
                    (Some(_), Some(_)) => false,
                };
                if !only_the_signed_user {
                    upstream.remove_header(name);
                }
            }
            return Ok(());
        }
        let cidrs = &live.config.identity.trusted_cidrs;
        let trusted = !cidrs.is_empty() && ctx.client.is_some_and(|ip| identity::is_trusted(ip, cidrs));
        if let Some(name) = &live.trusted_header
            && !trusted
            && upstream.headers.contains_key(name)
        {
            upstream.remove_header(name);
        }
        if !trusted {
            // Set below from this connection and request, or not at all: a
            // client's own values must not survive (e.g. `X-Forwarded-Host`
            // of an HTTP/1.0 request without Host).
            scrub_forwarding_headers(upstream);
        }
        if let Some(ip) = ctx.client {
            let value = match upstream.headers.get(&*X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
                Some(prev) if trusted => http::HeaderValue::try_from(format!("{prev}, {ip}")),
                _ => ip_header_value(ip),
            };
            if let Ok(value) = value {
                upstream.insert_header("x-forwarded-for", value)?;
            }
        }
        if !(trusted && upstream.headers.contains_key(&*X_FORWARDED_PROTO)) {
            let proto = if self.config.proxy.ssl_enabled { "https" } else { "http" };
            upstream.insert_header("x-forwarded-proto", http::HeaderValue::from_static(proto))?;
        }
        if !(trusted && upstream.headers.contains_key(&*X_FORWARDED_HOST))
            && let Some(host) = session.req_header().headers.get(http::header::HOST).cloned()
        {
            upstream.insert_header("x-forwarded-host", host)?;
        }
        if let Route::Peer { id, .. } = ctx.route {
            let key = ctx.session_key().unwrap_or_default();
            let framing = body_framing(upstream, session.req_header());
            let value = forward::sign_framed(
                &self.key,
                self.self_id,
                id,
                now_ms(),
                key,
                ctx.user.as_deref(),
                &request_line(upstream),
                &framing,
            );
            upstream.insert_header(forward::HEADER, value)?;
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let failed = match ctx.route {
            Route::Local => {
                self.view.note_unavailable(self.self_id, std::time::Instant::now());
                if self.backend_up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(backend = ?self.backend, error = %e, "local backend refused a connection; marking it down");
                }
                METRICS.connect_failures.with_label_values(&["backend"]).inc();
                self.self_id
            }
            Route::Peer { id, addr } => {
                if self.view.mark_unreachable(id) {
                    tracing::warn!(node_id = id, %addr, error = %e, "node unreachable (connect failed); failing over");
                }
                METRICS.connect_failures.with_label_values(&[&addr.to_string()]).inc();
                id
            }
            Route::Unset => return e,
        };
        ctx.failed.push(failed);
        // A node-to-node request is never retried by its target: the sender fails over.
        e.set_retry(ctx.inbound.is_none() && ctx.failed.len() <= routing::MAX_FAILOVERS);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if ctx.peer_backend_down {
            // The peer answered before touching any backend: safe to retry
            // any method, as long as the request body is still buffered.
            // (`fail_over` reads and clears the flag to count the move.)
            let retry = !session.as_ref().retry_buffer_truncated() && ctx.failed.len() <= routing::MAX_FAILOVERS;
            e.set_retry(retry);
        } else if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated() {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.timing.first_byte();
        match ctx.route {
            Route::Peer { id, addr }
                if resp.status.as_u16() == 503 && resp.headers.contains_key(BACKEND_DOWN_HEADER) =>
            {
                if self.view.mark_unreachable(id) {
                    tracing::warn!(node_id = id, %addr, "node reports its backend down; failing over");
                }
                ctx.failed.push(id);
                ctx.peer_backend_down = true;
                return Err(Error::explain(ErrorType::ConnectRefused, "peer's backend is down"));
            }
            Route::Local if backend_keys::registers(resp.status.as_u16()) && !ctx.path_key_known => {
                if let Some(key) = ctx.path_key.clone() {
                    backend_keys::register(self, &key, ctx.user.clone()).await;
                    ctx.path_key_known = true;
                }
            }
            _ => {}
        }
        // Only this node's own refusal (written by `respond_backend_down`,
        // never through this filter) may carry the marker: a backend (which
        // users' apps can be) must not be able to make a sender mark this
        // node unreachable and move its sessions away.
        if matches!(ctx.route, Route::Local) && resp.headers.contains_key(&*BACKEND_DOWN) {
            resp.remove_header(&*BACKEND_DOWN);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.timing.responding(resp.status.as_u16(), session.req_header());
        if let Some(cookie) = ctx.set_cookie.take() {
            resp.append_header(http::header::SET_COOKIE, cookie)?;
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> pingora::proxy::FailToProxy {
        // A node-to-node request whose backend is gone: tell the sender to fail over.
        if ctx.inbound.is_some() && ctx.failed.contains(&self.self_id) {
            let _ = endpoints::respond_backend_down(session).await;
            return pingora::proxy::FailToProxy { error_code: 503, can_reuse_downstream: false };
        }
        if let Some(secs) = ctx.retry_after {
            let _ = respond_retry_later(session, secs).await;
            return pingora::proxy::FailToProxy { error_code: 503, can_reuse_downstream: false };
        }
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            _ if !ctx.failed.is_empty() => {
                METRICS.no_node_available.inc();
                503
            }
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => 0,
                _ => 500,
            },
        };
        if code > 0 {
            let _ = session.respond_error(code).await;
        }
        pingora::proxy::FailToProxy { error_code: code, can_reuse_downstream: false }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        if let Some(watch) = ctx.conn_watch.take() {
            conn_limits::request_finished(&watch);
        }
        if ctx.in_flight {
            METRICS.in_flight.dec();
            if let Via::Session(entry) = &ctx.via {
                entry.stream_closed();
                entry.touch(now_ms());
            }
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        if let Some(received) = ctx.received {
            self.log_access(session, ctx, status, received);
        }
        let route = match (ctx.inbound.is_some(), ctx.route) {
            (true, _) => 2,
            (false, Route::Local) => 0,
            (false, Route::Peer { .. }) => 1,
            (false, Route::Unset) => return,
        };
        crate::metrics::count_request(route, status);
        ctx.timing.finish(route, status);
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, e: &Error) -> bool {
        // Client disconnects are routine for an IDE (tabs closed mid-request);
        // a held backend key's 503 is an answer, not a failure of this node.
        matches!(e.esource(), ErrorSource::Downstream) || ctx.retry_after.is_some()
    }
}

/// 503 with `Retry-After: secs`: the request's backend key stays on a node
/// that cannot serve it now.
async fn respond_retry_later(session: &mut Session, secs: u64) -> Result<()> {
    let body = bytes::Bytes::from_static(b"this session's node is not available right now; retry shortly\n");
    let mut resp = ResponseHeader::build(503, Some(5))?;
    resp.insert_header("retry-after", secs.to_string())?;
    resp.insert_header("content-type", "text/plain; charset=utf-8")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

impl Router {
    /// Hand one ended request to the access log (no query string, no
    /// cookie, no user: see [`crate::ops::access_log`]).
    fn log_access(&self, session: &Session, ctx: &RequestCtx, status: u16, received: std::time::Instant) {
        use crate::cluster::model::SessionKind as Kind;
        use crate::ops::access_log::{Entry, Route as Logged, SessionKind};
        let (route, node) = match (ctx.inbound.is_some(), ctx.route) {
            (true, _) => (Logged::ServedForPeer, Some(self.self_id)),
            (false, Route::Local) => (Logged::Local, Some(self.self_id)),
            (false, Route::Peer { id, .. }) => (Logged::Forwarded, Some(id)),
            (false, Route::Unset) => (Logged::None, None),
        };
        let kind = match &ctx.via {
            Via::None => SessionKind::None,
            Via::Pin(_) => SessionKind::Pin,
            Via::Degraded { .. } => SessionKind::User,
            Via::Session(e) => match e.record.kind {
                Kind::Backend => SessionKind::BackendKey,
                Kind::User => SessionKind::User,
                Kind::Affinity => SessionKind::Pin,
            },
        };
        let req = session.req_header();
        self.access_log.log(Entry {
            time: SystemTime::now(),
            client: ctx.client,
            method: req.method.clone(),
            path: req.uri.path().to_string(),
            status,
            bytes: session.body_bytes_sent(),
            duration: received.elapsed(),
            route,
            node,
            session: kind,
        });
    }
}

/// Forged or replayed node-to-node headers: one WARN line per interval at
/// most (an unauthenticated client must not flood the log); each one is
/// counted in `sessionlb_rejected_forwards_total`.
pub(crate) static FORWARD_REFUSALS_LOG: log_limit::LogLimit = log_limit::LogLimit::new(log_limit::DEFAULT_INTERVAL);

/// Count a refused node-to-node header, and log it unless rate-limited.
pub(crate) fn count_refused_forward(reason: ForwardRejection, client: Option<IpAddr>, path: &str, what: &str) {
    METRICS.rejected_forwards.with_label_values(&[reason.as_str()]).inc();
    if let Some(suppressed) = FORWARD_REFUSALS_LOG.allow(std::time::Instant::now()) {
        tracing::warn!(
            reason = reason.as_str(),
            client = ?client,
            path,
            suppressed,
            "refused {what} with an invalid forwarding header (at most one such line per {}s; `suppressed` more since the last; all are counted in sessionlb_rejected_forwards_total)",
            log_limit::DEFAULT_INTERVAL.as_secs()
        );
    }
}

async fn refuse_forward(session: &mut Session, ctx: &mut RequestCtx, reason: ForwardRejection) -> Result<()> {
    count_refused_forward(reason, ctx.client, session.req_header().uri.path(), "a node-to-node request");
    endpoints::respond_text(session, 403, "forbidden: invalid node-to-node request\n").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_format_like_display() {
        for ip in ["0.0.0.0", "127.0.0.1", "10.20.30.40", "255.255.255.255", "192.168.100.9", "::1", "fe80::1:2"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_header_value(ip).unwrap().to_str().unwrap(), ip.to_string());
        }
    }
}

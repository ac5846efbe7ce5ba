//! A running cluster for routing tests: nodes A, B, C on 127.0.0.2–4, each
//! in front of its own demo backend (named after the node), optionally a
//! router node on 127.0.0.5; and a cookie-keeping HTTP client.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::header::{HeaderMap, SET_COOKIE};
use sessionlb::cluster::{NodeId, Registry};

use super::db::TestDb;
use super::eventually;
use super::node::{Backend, ClusterFixture, Node, NodeSpec};

/// A client WebSocket over plain TCP.
pub type WebSocket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub const NODE_IPS: [&str; 3] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
pub const NAMES: [&str; 3] = ["A", "B", "C"];
pub const ROUTER_IP: &str = "127.0.0.5";

/// Trust the user header from loopback (the test client): a browser made
/// with [`Browser::as_user`] is then a signed-in user.
pub const TRUST_LOOPBACK: &str = "[identity]\ntrusted-cidrs = [\"127.0.0.0/8\"]\n";

/// Three nodes with backends (and maybe a router), sharing one database.
/// Fields drop in order: processes first (their logs are printed from the
/// temp dir on failure), then the registry connection, the temp dir, the database.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub router: Option<Node>,
    pub backends: Vec<Backend>,
    pub registry: std::sync::Arc<dyn Registry>,
    pub fx: ClusterFixture,
    pub db: TestDb,
}

/// How to build a cluster.
#[derive(Default, Clone)]
pub struct ClusterOptions {
    /// Extra TOML for every node (top-level keys first, then sections).
    pub extra: String,
    /// Extra TOML per node (A, B, C), added after `extra`'s top-level keys.
    pub per_node: [String; 3],
    pub router: bool,
    /// A database URL to use instead of a fresh PostgreSQL database.
    pub database_url: Option<String>,
    /// Nodes serve TLS (`extra` carries the ssl-* keys).
    pub tls: bool,
    /// Backends sign users in as Workbench does, with the cluster's key.
    pub sign_in: bool,
    /// Environment variables of every node.
    pub env: Vec<(String, String)>,
}

fn merge_toml(top: &str, per_node: &str) -> String {
    // Top-level keys must precede sections: put per-node keys first.
    format!("{per_node}\n{top}")
}

impl Cluster {
    pub async fn start(opts: ClusterOptions) -> Cluster {
        let db = TestDb::postgres().await;
        let url = opts.database_url.clone().unwrap_or_else(|| db.url.clone());
        let fx = ClusterFixture::new(&url);
        let mut backends = Vec::new();
        for name in NAMES {
            let key = opts.sign_in.then_some(fx.key_file.as_path());
            backends.push(Backend::start_with(fx.path(), name, key).await);
        }
        let mut specs: Vec<NodeSpec> = Vec::new();
        for (i, ip) in NODE_IPS.iter().enumerate() {
            let mut spec = fx.spec(ip, Some(backends[i].addr));
            spec.extra = merge_toml(&opts.extra, &opts.per_node[i]);
            spec.tls = opts.tls;
            spec.env = opts.env.clone();
            specs.push(spec);
        }
        let mut nodes = Vec::new();
        for spec in &specs {
            nodes.push(fx.spawn(spec));
        }
        for node in &mut nodes {
            node.wait_healthy().await;
        }
        let router = if opts.router {
            let mut spec = fx.spec(ROUTER_IP, None);
            spec.extra = opts.extra.clone();
            Some(fx.start(&spec).await)
        } else {
            None
        };
        let registry = sessionlb::cluster::connect(
            &sessionlb::config::DatabaseUrl::parse(&url).unwrap(),
            Duration::from_millis(50),
        )
        .await
        .unwrap();
        let cluster = Cluster { db, fx, backends, nodes, router, registry };
        cluster.wait_converged().await;
        cluster
    }

    /// Every node sees every node online.
    pub async fn wait_converged(&self) {
        let expected = 3 + usize::from(self.router.is_some());
        for node in self.nodes.iter().chain(self.router.iter()) {
            eventually(Duration::from_secs(10), "nodes to see each other", || async {
                node.health().await.filter(|h| h["cluster_nodes"] == expected).map(|_| ())
            })
            .await;
        }
    }

    /// The registry id of node `i` (0 = A).
    pub async fn node_id(&self, i: usize) -> NodeId {
        let spec = &self.nodes[i].spec;
        self.registry.find_node(&spec.ip, spec.port).await.unwrap().expect("node registered").id
    }

    /// Index (0 = A) of the node with registry id `id`.
    pub async fn index_of(&self, id: NodeId) -> Option<usize> {
        for i in 0..3 {
            if self.node_id(i).await == id {
                return Some(i);
            }
        }
        None
    }

    /// Sessions per node (A, B, C) in the registry.
    pub async fn counts(&self) -> [u64; 3] {
        let mut out = [0; 3];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.registry.count_sessions(self.node_id(i).await).await.unwrap();
        }
        out
    }

    /// Run an admin command against this cluster.
    pub fn admin(&self, args: &[&str]) -> std::process::Output {
        self.fx.admin(&self.nodes[0].config, args)
    }

    /// The secure cookie key the cluster uses.
    pub fn key(&self) -> sessionlb::config::key::SecureKey {
        sessionlb::config::key::SecureKey::load(&self.fx.key_file).unwrap()
    }

    /// Entry points: A, B, C (and the router).
    pub fn entries(&self) -> Vec<&Node> {
        self.nodes.iter().chain(self.router.iter()).collect()
    }

    /// The sum of every series of metric `name` on `node` (0 when absent).
    pub async fn metric(&self, node: &Node, name: &str) -> f64 {
        let text = reqwest::get(node.url("/metrics")).await.unwrap().text().await.unwrap();
        metric_sum(&text, name)
    }

    /// [`metric`](Self::metric) summed over A, B and C.
    pub async fn metric_all(&self, name: &str) -> f64 {
        let mut sum = 0.0;
        for node in &self.nodes {
            sum += self.metric(node, name).await;
        }
        sum
    }

    /// Index (0 = A) of the node whose backend is `name`.
    pub fn index_of_backend(name: &str) -> usize {
        NAMES.iter().position(|n| *n == name).unwrap_or_else(|| panic!("no backend {name}"))
    }

    /// `/load-balancer/status?format=json` from node `i`.
    pub async fn status_json(&self, node: &Node) -> serde_json::Value {
        reqwest::get(node.url("/load-balancer/status?format=json")).await.unwrap().json().await.unwrap()
    }

    /// Wait until `viewer`'s status page shows `node` in offline mode.
    pub async fn wait_sees_offline_mode(&self, viewer: &Node, node: &Node, within: Duration, what: &str) {
        let address = node.address();
        eventually(within, what, || async {
            let s = reqwest::get(viewer.url("/load-balancer/status?format=json"))
                .await
                .ok()?
                .json::<serde_json::Value>()
                .await
                .ok()?;
            s["nodes"]
                .as_array()?
                .iter()
                .any(|n| n["address"].as_str() == Some(&address) && n["offline_mode"] == true)
                .then_some(())
        })
        .await;
    }
}

/// A signed-in user's browser whose session lives on node `want` (0 = A),
/// made by placing fresh users until one lands there, through A (the
/// cluster must trust the user header: [`TRUST_LOOPBACK`]).
pub async fn session_on(c: &Cluster, want: usize) -> Browser {
    for _ in 0..60 {
        let mut b = Browser::new_user();
        let reply = b.get(&c.nodes[0].url("/")).await;
        if reply.backend() == Some(NAMES[want]) {
            return b;
        }
    }
    panic!("no session landed on {}", NAMES[want]);
}

/// The sum of every series of metric `name` in Prometheus text (0 when absent).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if rest.starts_with('{') { rest.split_once("} ")?.1 } else { rest.strip_prefix(' ')? };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// Which backend answered (`X-Backend`), if one did.
    pub fn backend(&self) -> Option<&str> {
        self.headers.get("x-backend").and_then(|v| v.to_str().ok())
    }

    /// The value of the `sessionlb-affinity` cookie this response sets, if any.
    pub fn sets_pin(&self) -> Option<String> {
        self.headers
            .get_all(SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|c| c.split(';').next()?.trim().strip_prefix("sessionlb-affinity=").map(str::to_string))
    }
}

/// An HTTP client that keeps cookies like a browser (per name, no expiry
/// handling) and can present a user through the trusted header.
#[derive(Clone)]
pub struct Browser {
    client: reqwest::Client,
    pub cookies: BTreeMap<String, String>,
    pub user: Option<String>,
}

impl Default for Browser {
    fn default() -> Self {
        Browser::new()
    }
}

impl Browser {
    pub fn new() -> Browser {
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        Browser { client, cookies: BTreeMap::new(), user: None }
    }

    /// A browser that trusts only this CA (PEM) for https.
    pub fn trusting(ca_pem: &[u8]) -> Browser {
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca_pem).unwrap())
            .build()
            .unwrap();
        Browser { client, cookies: BTreeMap::new(), user: None }
    }

    /// A browser that accepts any certificate.
    pub fn insecure() -> Browser {
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .danger_accept_invalid_certs(true)
            .build()
            .unwrap();
        Browser { client, cookies: BTreeMap::new(), user: None }
    }

    pub fn as_user(user: &str) -> Browser {
        Browser { user: Some(user.into()), ..Browser::new() }
    }

    /// A signed-in user of a fresh, random name (see [`TRUST_LOOPBACK`]).
    pub fn new_user() -> Browser {
        Browser::as_user(&format!("u{}", hex::encode(rand::random::<[u8; 5]>())))
    }

    /// The user's registry session key, `user:<name>`.
    pub fn user_key(&self) -> String {
        format!("user:{}", self.user.as_deref().expect("a signed-in browser"))
    }

    pub fn cookie_header(&self) -> Option<String> {
        (!self.cookies.is_empty())
            .then(|| self.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; "))
    }

    pub fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let mut req = self.client.request(method, url);
        if let Some(c) = self.cookie_header() {
            req = req.header("cookie", c);
        }
        if let Some(u) = &self.user {
            req = req.header("x-forwarded-user", u);
        }
        req
    }

    /// Keep the cookies a response sets.
    pub fn absorb(&mut self, headers: &HeaderMap) {
        for value in headers.get_all(SET_COOKIE) {
            let Ok(text) = value.to_str() else { continue };
            let pair = text.split(';').next().unwrap_or("");
            if let Some((name, value)) = pair.split_once('=') {
                self.cookies.insert(name.trim().to_string(), value.trim().to_string());
            }
        }
    }

    pub async fn get(&mut self, url: &str) -> Reply {
        let resp = self.request(reqwest::Method::GET, url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        self.absorb(&headers);
        // A body that cannot be read is a failure of the request, never an empty page.
        let body = resp.text().await.unwrap_or_else(|e| panic!("GET {url}: reading the body: {e}"));
        Reply { status, headers, body }
    }

    /// POST a form (`application/x-www-form-urlencoded`).
    pub async fn post_form(&mut self, url: &str, form: &[(&str, &str)]) -> Reply {
        let resp = self
            .request(reqwest::Method::POST, url)
            .form(form)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        self.absorb(&headers);
        let body = resp.text().await.unwrap_or_else(|e| panic!("POST {url}: reading the body: {e}"));
        Reply { status, headers, body }
    }

    /// Open a WebSocket to `/ws` through `node`, with this browser's cookies.
    pub async fn websocket(&self, node: &Node) -> WebSocket {
        self.try_websocket(&node.address()).await.unwrap()
    }

    /// [`Browser::websocket`] to a node's `address` (host:port), with the
    /// handshake's error returned.
    pub async fn try_websocket(&self, address: &str) -> Result<WebSocket, tokio_tungstenite::tungstenite::Error> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{address}/ws").into_client_request().unwrap();
        if let Some(cookies) = self.cookie_header() {
            request.headers_mut().insert("cookie", cookies.parse().unwrap());
        }
        if let Some(user) = &self.user {
            request.headers_mut().insert("x-forwarded-user", user.parse().unwrap());
        }
        Ok(tokio_tungstenite::connect_async(request).await?.0)
    }

    /// The signed cookie (`sessionlb-affinity`: the pin), if set.
    pub fn pin(&self) -> Option<&str> {
        self.cookies.get("sessionlb-affinity").map(String::as_str)
    }

    /// The node id the browser's pin names (`v2.<id>.<node>.<issued>.<mac>`).
    pub fn pinned_node(&self) -> Option<i64> {
        let pin = self.pin()?;
        pin.starts_with("v2.").then(|| pin.split('.').nth(2)?.parse().ok()).flatten()
    }
}

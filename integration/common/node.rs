//! Real processes: `sessionlb serve` nodes and demo backends on 127.0.0.x,
//! each on a free port, killed on drop (their logs are printed when the
//! test fails), plus a runner for the admin commands.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::eventually;

pub const SESSIONLB: &str = env!("CARGO_BIN_EXE_sessionlb");
pub const DEMO_BACKEND: &str = env!("CARGO_BIN_EXE_sessionlb-demo-backend");

/// A free TCP port on `ip` (bound and released; a collision is unlikely and
/// shows up as a clear "cannot listen" start failure).
pub fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0)).expect("bind an ephemeral port").local_addr().unwrap().port()
}

/// Write a key file with the given content and mode.
pub fn write_key(path: &Path, content: &[u8], mode: u32) {
    fs::write(path, content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub child: Option<Child>,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let file = fs::File::create(&log).unwrap();
        cmd.stdout(Stdio::from(file.try_clone().unwrap())).stderr(Stdio::from(file)).stdin(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Proc { child: Some(child), name: name.into(), log }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        if let Some(c) = &self.child {
            let _ = rustix::process::kill_process(rustix::process::Pid::from_raw(c.id() as i32).unwrap(), sig);
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Wait for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!("{} did not exit within {timeout:?}; log:\n{}", self.name, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}", self.name, self.log_text());
        }
    }
}

/// A demo backend process.
pub struct Backend {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub name: String,
}

impl Backend {
    pub async fn start(dir: &Path, name: &str) -> Backend {
        Backend::start_with(dir, name, None).await
    }

    /// A backend that signs users in as Workbench does, with this key
    /// (`/` redirects to `/auth-sign-in` until a `user-id` cookie is set).
    pub async fn start_with(dir: &Path, name: &str, sign_in_key: Option<&Path>) -> Backend {
        let port = free_port("127.0.0.1");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut cmd = Command::new(DEMO_BACKEND);
        cmd.args(["--listen", &addr.to_string(), "--name", name]);
        if let Some(key) = sign_in_key {
            cmd.arg("--secure-cookie-key-file").arg(key);
        }
        let proc = Proc::spawn(&format!("backend {name}"), cmd, dir.join(format!("backend-{name}.log")));
        let url = format!("http://{addr}/bench");
        eventually(Duration::from_secs(20), &format!("backend {name} to answer"), || {
            let url = url.clone();
            async move { reqwest::get(&url).await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
        .await;
        Backend { proc, addr, name: name.into() }
    }
}

/// What a node is started with.
#[derive(Clone)]
pub struct NodeSpec {
    pub ip: String,
    pub port: u16,
    pub backend: Option<SocketAddr>,
    pub key_file: PathBuf,
    /// Extra TOML lines (top-level keys first, then sections).
    pub extra: String,
    /// The node serves TLS (`ssl-enabled` in `extra`): its URLs are https.
    pub tls: bool,
    /// The port of its own `metrics-address` (on `ip`), unless `extra` sets one.
    pub metrics_port: u16,
    /// Extra environment of the process (e.g. `LD_PRELOAD` of libfaketime).
    pub env: Vec<(String, String)>,
    /// Run the node inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
}

/// Everything nodes of one test share: a temp dir, a database, a key, shared storage.
pub struct ClusterFixture {
    pub dir: tempfile::TempDir,
    pub database_url: String,
    pub key_file: PathBuf,
}

impl ClusterFixture {
    pub fn new(database_url: &str) -> ClusterFixture {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("secure-cookie-key");
        write_key(&key_file, b"3f2504e0-4f89-11d3-9a0c-0305e82c3301\n", 0o600);
        fs::create_dir_all(dir.path().join("shared")).unwrap();
        ClusterFixture { dir, database_url: database_url.into(), key_file }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A spec for a node on `ip` with a fresh port and the shared key.
    pub fn spec(&self, ip: &str, backend: Option<SocketAddr>) -> NodeSpec {
        NodeSpec {
            ip: ip.into(),
            port: free_port(ip),
            backend,
            key_file: self.key_file.clone(),
            extra: String::new(),
            tls: false,
            metrics_port: free_port(ip),
            env: Vec::new(),
            netns: None,
        }
    }

    /// The node's config file contents.
    pub fn config_text(&self, spec: &NodeSpec) -> String {
        let (top, sections) = match spec.extra.find("\n[") {
            Some(i) => (&spec.extra[..i], &spec.extra[i..]),
            None => (spec.extra.as_str(), ""),
        };
        // Test defaults, unless `extra` sets the key itself.
        let metrics = format!("\"{}:{}\"", spec.ip, spec.metrics_port);
        let defaults: String = [
            ("metrics-address", metrics.as_str()),
            ("grace-period", "0"),
            ("shutdown-timeout", "1"),
            ("threads", "2"),
            ("poll-interval", "\"50ms\""),
            ("log-level", "\"info,sessionlb=debug\""),
        ]
        .iter()
        .filter(|(key, _)| !top.lines().any(|l| l.trim_start().starts_with(&format!("{key} ="))))
        .map(|(key, value)| format!("{key} = {value}\n"))
        .collect();
        format!(
            "www-address = \"{ip}\"\nwww-port = {port}\n{backend}database = \"{db}\"\nsecure-cookie-key-file = \"{key}\"\n\
             server-shared-storage-path = \"{shared}\"\nrun-dir = \"{run}\"\n{defaults}{top}\n{sections}\n",
            ip = spec.ip,
            port = spec.port,
            backend = spec.backend.map_or(String::new(), |b| format!("backend = \"{b}\"\n")),
            db = self.database_url,
            key = spec.key_file.display(),
            shared = self.path().join("shared").display(),
            run = self.path().display(),
        )
    }

    /// Write the node's config file and return its path.
    pub fn write_config(&self, spec: &NodeSpec) -> PathBuf {
        let path = self.path().join(format!("node-{}-{}.toml", spec.ip, spec.port));
        fs::write(&path, self.config_text(spec)).unwrap();
        path
    }

    /// Start `sessionlb serve` for `spec` (without waiting for it).
    pub fn spawn(&self, spec: &NodeSpec) -> Node {
        self.spawn_serve(spec, &[])
    }

    /// Start `sessionlb serve <serve_args>` for `spec` (without waiting for it).
    pub fn spawn_serve(&self, spec: &NodeSpec, serve_args: &[&str]) -> Node {
        let config = self.write_config(spec);
        let mut cmd = match &spec.netns {
            // `ip netns exec` execs the command: the child's pid is the node's.
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, SESSIONLB]);
                cmd
            }
            None => Command::new(SESSIONLB),
        };
        cmd.arg("--config").arg(&config).arg("serve").args(serve_args).env("NO_COLOR", "1");
        cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
        let log = self.path().join(format!("node-{}-{}.{}.log", spec.ip, spec.port, rand::random::<u32>()));
        let proc = Proc::spawn(&format!("node {}:{}", spec.ip, spec.port), cmd, log);
        Node { proc, spec: spec.clone(), config }
    }

    /// Start a node and wait until it answers `/health`.
    pub async fn start(&self, spec: &NodeSpec) -> Node {
        let mut node = self.spawn(spec);
        node.wait_healthy().await;
        node
    }

    /// Run an admin command with this node's configuration.
    pub fn admin(&self, config: &Path, args: &[&str]) -> Output {
        Command::new(SESSIONLB).arg("--config").arg(config).args(args).env("NO_COLOR", "1").output().unwrap()
    }
}

/// A running (or exited) `sessionlb serve`.
pub struct Node {
    pub proc: Proc,
    pub spec: NodeSpec,
    pub config: PathBuf,
}

impl Node {
    pub fn address(&self) -> String {
        format!("{}:{}", self.spec.ip, self.spec.port)
    }

    /// `/metrics` on the node's own metrics listener.
    pub fn metrics_url(&self) -> String {
        format!("http://{}:{}/metrics", self.spec.ip, self.spec.metrics_port)
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.spec.tls { "https" } else { "http" };
        format!("{scheme}://{}{}", self.address(), path)
    }

    /// `/health` as JSON, if the node answers (TLS certificates are not
    /// checked here: this is a readiness probe, not a test of TLS).
    pub async fn health(&self) -> Option<serde_json::Value> {
        static CLIENT: std::sync::LazyLock<reqwest::Client> = std::sync::LazyLock::new(|| {
            reqwest::Client::builder().danger_accept_invalid_certs(true).no_proxy().build().unwrap()
        });
        let resp = CLIENT.get(self.url("/health")).send().await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.json().await.ok()
    }

    pub async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.health().await.is_some() {
                return;
            }
            if !self.proc.is_running() {
                panic!("{} exited before becoming healthy; log:\n{}", self.proc.name, self.proc.log_text());
            }
            if Instant::now() > deadline {
                panic!("{} not healthy after 30s; log:\n{}", self.proc.name, self.proc.log_text());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// One row of `list-nodes`.
#[derive(Debug, Clone)]
pub struct NodeRow {
    pub id: i64,
    pub host: String,
    pub port: u16,
    pub status: String,
    pub sessions: u64,
    pub pins: u64,
    pub notes: String,
}

/// Run `list-nodes` and parse its table.
pub fn list_nodes(fx: &ClusterFixture, config: &Path) -> Vec<NodeRow> {
    let out = fx.admin(config, &["list-nodes"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "list-nodes failed: {}{}", text, String::from_utf8_lossy(&out.stderr));
    parse_list_nodes(&text)
}

pub fn parse_list_nodes(text: &str) -> Vec<NodeRow> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with("ID "));
    let header = lines.next().expect("a header line");
    let starts: Vec<usize> =
        ["ID", "Host", "IPv4", "Port", "Status", "Last Seen", "Version", "Clock Skew", "Sessions", "Pins", "Notes"]
            .iter()
            .map(|h| header.find(h).expect("column"))
            .collect();
    let cell = |line: &str, i: usize| -> String {
        let start = starts[i].min(line.len());
        let end = starts.get(i + 1).copied().unwrap_or(line.len()).min(line.len());
        line[start..end].trim().to_string()
    };
    lines
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| !l.starts_with('('))
        .map(|l| NodeRow {
            id: cell(l, 0).parse().expect("id"),
            host: cell(l, 1),
            port: cell(l, 3).parse().expect("port"),
            status: cell(l, 4),
            sessions: cell(l, 8).parse().expect("sessions"),
            pins: cell(l, 9).parse().expect("pins"),
            notes: cell(l, 10),
        })
        .collect()
}

impl NodeRow {
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// The row of `node` in `rows`.
pub fn row_of<'a>(rows: &'a [NodeRow], spec: &NodeSpec) -> Option<&'a NodeRow> {
    rows.iter().find(|r| r.host == spec.ip && r.port == spec.port)
}

//! The Workbench drop-in: real Workbench configuration directories
//! (`integration/fixtures/workbench`), `sessionlb` processes in front of demo
//! backends on rserver's internal port, a PostgreSQL database that also holds
//! another application's table, and the commands of docs/workbench.md.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::str::FromStr;
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

use crate::common::cluster::Browser;
use crate::common::db::{TestDb, admin_url};
use crate::common::eventually;
use crate::common::node::{DEMO_BACKEND, Proc, SESSIONLB, free_port, parse_list_nodes};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/integration/fixtures/workbench");

/// Where installed fixtures live: one `var` (the shared storage and, for
/// fixture c, the key: what `/var/lib/rstudio-server` holds on every node)
/// and one `/etc/rstudio` per node.
pub struct Site {
    tmp: tempfile::TempDir,
}

impl Site {
    pub fn new() -> Site {
        let site = Site { tmp: tempfile::tempdir().unwrap() };
        fs::create_dir_all(site.var()).unwrap();
        site
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    pub fn var(&self) -> PathBuf {
        self.path().join("var-lib-rstudio-server")
    }

    /// Copy fixture `name` as node `node`'s `/etc/rstudio`, with its absolute
    /// paths moved into this site; secrets get mode 0600 (git keeps no modes).
    pub fn install(&self, name: &str, node: &str) -> PathBuf {
        let etc = self.path().join(node).join("etc-rstudio");
        fs::create_dir_all(&etc).unwrap();
        for entry in fs::read_dir(Path::new(FIXTURES).join(name)).unwrap() {
            let entry = entry.unwrap();
            let text = fs::read_to_string(entry.path()).unwrap();
            let text = text
                .replace("/etc/rstudio", etc.to_str().unwrap())
                .replace("/var/lib/rstudio-server", self.var().to_str().unwrap());
            let target = etc.join(entry.file_name());
            fs::write(&target, text).unwrap();
            let private = ["secure-cookie-key", "database.conf"].contains(&entry.file_name().to_str().unwrap());
            fs::set_permissions(&target, fs::Permissions::from_mode(if private { 0o600 } else { 0o644 })).unwrap();
        }
        etc
    }
}

/// Set `key=value` lines of a Workbench file: in place where the key is,
/// appended otherwise (as an admin edits it).
pub fn set_keys(file: &Path, pairs: &[(&str, &str)]) {
    let mut lines: Vec<String> = fs::read_to_string(file).unwrap().lines().map(str::to_string).collect();
    for (key, value) in pairs {
        let line = format!("{key}={value}");
        match lines.iter_mut().find(|l| l.trim().split_once('=').is_some_and(|(k, _)| k.trim() == *key)) {
            Some(existing) => *existing = line,
            None => lines.push(line),
        }
    }
    fs::write(file, lines.join("\n") + "\n").unwrap();
}

/// The test database's coordinates, for a database.conf.
pub struct Pg {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub database: String,
}

impl Pg {
    pub fn of(db: &TestDb) -> Pg {
        let admin = PgConnectOptions::from_str(&admin_url()).unwrap();
        Pg {
            host: admin.get_host().to_string(),
            port: admin.get_port(),
            user: admin.get_username().to_string(),
            database: db.url.rsplit_once('/').unwrap().1.to_string(),
        }
    }

    /// Where the server's Unix socket is (a socket works from any network namespace).
    pub async fn socket_dir(db: &TestDb) -> PathBuf {
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        let dirs: String = sqlx::query_scalar("SHOW unix_socket_directories").fetch_one(&mut conn).await.unwrap();
        let dir = dirs.split(',').map(str::trim).find(|d| !d.is_empty() && d.starts_with('/'));
        PathBuf::from(dir.expect("this test needs the PostgreSQL server's Unix socket (unix_socket_directories)"))
    }
}

/// Another application's data in the same database, to be left alone.
async fn other_application_table(db: &TestDb) {
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    for sql in [
        "CREATE TABLE public.workbench_user_settings (id INTEGER PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT INTO public.workbench_user_settings VALUES (1, 'theme=dark'), (2, 'font=12')",
    ] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
}

/// The registry is in schema `sessionlb`; nothing of it is in `public`, and
/// the other application's table is as it was.
async fn assert_registry_in_its_schema(db: &TestDb) {
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema::text, table_name::text FROM information_schema.tables \
         WHERE table_schema IN ('public', 'sessionlb') ORDER BY 1, 2",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let expected: Vec<(String, String)> = [
        ("public", "workbench_user_settings"),
        ("sessionlb", "_sqlx_migrations"),
        ("sessionlb", "sessionlb_cluster"),
        ("sessionlb", "sessionlb_housekeeping"),
        ("sessionlb", "sessionlb_nodes"),
        ("sessionlb", "sessionlb_sessions"),
    ]
    .iter()
    .map(|(s, t)| (s.to_string(), t.to_string()))
    .collect();
    assert_eq!(tables, expected);
    let rows: Vec<(i32, String)> = sqlx::query_as("SELECT id, value FROM public.workbench_user_settings ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows, [(1, "theme=dark".to_string()), (2, "font=12".to_string())]);
    let functions: Vec<String> = sqlx::query_scalar(
        "SELECT n.nspname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.proname LIKE 'sessionlb%'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(!functions.is_empty() && functions.iter().all(|s| s == "sessionlb"), "{functions:?}");
}

fn sessionlb(args: &[&str]) -> Output {
    Command::new(SESSIONLB).args(args).env("NO_COLOR", "1").env_remove("WORKBENCH_POSTGRES_PASSWORD").output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The line of `out` that starts with `prefix`.
fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{out}"))
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().danger_accept_invalid_certs(true).no_proxy().build().unwrap()
}

async fn wait_healthy(proc: &mut Proc, url: &str) {
    let client = client();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if client.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        assert!(proc.is_running(), "{} exited before becoming healthy; log:\n{}", proc.name, proc.log_text());
        assert!(std::time::Instant::now() < deadline, "{} not healthy after 30s; log:\n{}", proc.name, proc.log_text());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn demo_backend(site: &Site, name: &str, listen: &str, tls: Option<(&Path, &Path)>) -> Proc {
    let mut cmd = Command::new(DEMO_BACKEND);
    cmd.args(["--listen", listen, "--name", name]);
    if let Some((cert, key)) = tls {
        cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
    }
    Proc::spawn(&format!("backend {name}"), cmd, site.path().join(format!("backend-{name}.log")))
}

/// A node's native file: process settings only (the Workbench directory
/// says the rest), and a metrics listener of its own (tests run side by side).
fn native_toml(site: &Site, node: &str, extra: &str) -> PathBuf {
    let run = site.path().join(node);
    let path = run.join("sessionlb.toml");
    fs::write(
        &path,
        format!(
            "{extra}run-dir = \"{}\"\nthreads = 2\ngrace-period = 0\nshutdown-timeout = 1\nlog-level = \"info,sessionlb=debug\"\n\
             metrics-address = \"127.0.0.1:{}\"\n",
            run.display(),
            free_port("127.0.0.1")
        ),
    )
    .unwrap();
    path
}

fn serve(site: &Site, name: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(SESSIONLB);
    cmd.args(args).arg("serve").env("NO_COLOR", "1").env_remove("WORKBENCH_POSTGRES_PASSWORD");
    Proc::spawn(&format!("node {name}"), cmd, site.path().join(format!("node-{name}.log")))
}

/// Start a session through `first` and reach it through both nodes: the
/// backend mints a key; the first request to it registers it on its node;
/// a browser without cookies then reaches it through either node.
async fn session_reached_from_both(first: &str, second: &str, mut browser: Browser) -> String {
    let minted = browser.get(&format!("{first}/new-session")).await;
    assert_eq!(minted.status, 200, "{}", minted.body);
    let json: serde_json::Value = serde_json::from_str(&minted.body).unwrap();
    let (url, backend) = (json["url"].as_str().unwrap().to_string(), json["backend"].as_str().unwrap().to_string());
    let reply = browser.get(&format!("{first}{url}")).await;
    assert_eq!((reply.status, reply.backend()), (200, Some(backend.as_str())), "{}", reply.body);
    for node in [second, first] {
        let target = format!("{node}{url}");
        let mut fresh = browser.clone();
        fresh.cookies.clear();
        eventually(Duration::from_secs(10), &format!("{target} to reach backend {backend}"), || {
            let (target, mut fresh) = (target.clone(), fresh.clone());
            let backend = backend.clone();
            async move {
                let reply = fresh.get(&target).await;
                (reply.status == 200 && reply.backend() == Some(backend.as_str())).then_some(())
            }
        })
        .await;
    }
    url.trim_start_matches("/s/").trim_end_matches('/').to_string()
}

/// Fixture a: the current format, PostgreSQL with an encrypted password and
/// pool-size, advisory locks, user-hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn current_workbench_directory_two_nodes_share_a_session_with_the_registry_in_its_own_schema() {
    let db = TestDb::postgres().await;
    other_application_table(&db).await;
    let pg = Pg::of(&db);
    let site = Site::new();
    let (l1, l2) = (free_port("127.0.0.2"), free_port("127.0.0.3"));
    let (b1, b2) = (free_port("127.0.0.2"), free_port("127.0.0.3"));
    let mut dirs = Vec::new();
    for (node, ip, backend_port) in [("n1", "127.0.0.2", b1), ("n2", "127.0.0.3", b2)] {
        let etc = site.install("a-postgres", node);
        // The node's own address (the one key that differs between nodes)...
        set_keys(&etc.join("load-balancer"), &[("www-host-name", ip)]);
        // ...the database of this test...
        set_keys(
            &etc.join("database.conf"),
            &[("host", &pg.host), ("port", &pg.port.to_string()), ("database", &pg.database), ("username", &pg.user)],
        );
        // ...and the drop-in's one change: rserver moves to an internal address.
        set_keys(&etc.join("rserver.conf"), &[("www-address", ip), ("www-port", &backend_port.to_string())]);
        dirs.push(etc);
    }
    let loadavg = site.path().join("loadavg");
    fs::write(&loadavg, "2.00 1.00 0.50 1/100 4242\n").unwrap();
    let toml1 = native_toml(
        &site,
        "n1",
        &format!("www-address = \"127.0.0.2\"\nwww-port = {l1}\nloadavg-path = \"{}\"\n", loadavg.display()),
    );
    let toml2 = native_toml(&site, "n2", "");
    let (etc1, etc2) = (dirs[0].to_str().unwrap(), dirs[1].to_str().unwrap());
    let listen2 = format!("127.0.0.3:{l2}");

    // check-config: where every value came from.
    let out = sessionlb(&["--config", toml1.to_str().unwrap(), "--rstudio-config", etc1, "check-config"]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    let toml1s = toml1.display().to_string();
    assert_eq!(
        line(&shown, "# listen address:"),
        format!("# listen address: 127.0.0.2:{l1} (www-address: {toml1s}:1; www-port: {toml1s}:2)")
    );
    assert_eq!(
        line(&shown, "# node address:"),
        format!(
            "# node address:   127.0.0.2:{l1} (www-host-name from {etc1}/load-balancer:3, port {l1} where sessionlb listens)"
        )
    );
    assert_eq!(
        line(&shown, "# backend:"),
        format!(
            "# backend:        http://127.0.0.2:{b1} ({etc1}/rserver.conf:2 (rserver's address: www-address=127.0.0.2 (line 13), www-port={b1} (line 2)))"
        )
    );
    assert_eq!(
        line(&shown, "# registry:"),
        format!(
            "# registry:       postgres://{}@{}:{}/{}, schema sessionlb, pool-size 6 (+1 for change notifications), connection timeout 10s",
            pg.user, pg.host, pg.port, pg.database
        )
    );
    assert_eq!(
        line(&shown, "# database password:"),
        format!("# database password: encrypted (from {etc1}/database.conf:8); decrypts with the secure cookie key")
    );
    assert_eq!(line(&shown, "# cluster protocol:"), "# cluster protocol: http");
    for (key, source) in [
        ("pool-size = 6 ", format!("# {etc1}/database.conf:9")),
        ("balancer = \"user-hash\" ", format!("# {etc1}/load-balancer:2")),
        ("lock-type = \"advisory\" ", format!("# {etc1}/file-locks:2")),
        ("database-connection-timeout = \"10s\" ", format!("# {etc1}/database.conf:10 (connection-timeout-seconds)")),
        ("session-idle-timeout = \"2h\" ", "# default".to_string()),
    ] {
        assert!(line(&shown, key).ends_with(&source), "{key}: {}", line(&shown, key));
    }
    assert!(
        shown.contains(&format!("warning: {etc1}/rserver.conf:4: `auth-timeout-minutes` is not used by sessionlb"))
    );
    assert!(shown.ends_with("Configuration OK\n"), "{shown}");
    // The second node: --listen, and says so.
    let out = sessionlb(&[
        "--config",
        toml2.to_str().unwrap(),
        "--rstudio-config",
        etc2,
        "--listen",
        &listen2,
        "check-config",
    ]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert_eq!(
        line(&shown, "# listen address:"),
        format!("# listen address: {listen2} (www-address: command line --listen; www-port: command line --listen)")
    );
    // Workbench's password variable wins over database.conf, and says so.
    let out = Command::new(SESSIONLB)
        .args(["--config", toml2.to_str().unwrap(), "--rstudio-config", etc2, "--listen", &listen2, "check-config"])
        .env("WORKBENCH_POSTGRES_PASSWORD", "from-the-environment")
        .output()
        .unwrap();
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(!shown.contains("from-the-environment"), "{shown}");
    assert_eq!(
        line(&shown, "# database password:"),
        "# database password: set (from environment WORKBENCH_POSTGRES_PASSWORD)"
    );
    assert!(line(&shown, "database-password = \"***\" ").ends_with("# environment WORKBENCH_POSTGRES_PASSWORD"));

    // Two nodes, each in front of its demo backend on the internal port.
    let _backend_a = demo_backend(&site, "A", &format!("127.0.0.2:{b1}"), None);
    let _backend_b = demo_backend(&site, "B", &format!("127.0.0.3:{b2}"), None);
    let mut n1 = serve(&site, "n1", &["--config", toml1.to_str().unwrap(), "--rstudio-config", etc1]);
    let mut n2 =
        serve(&site, "n2", &["--config", toml2.to_str().unwrap(), "--rstudio-config", etc2, "--listen", &listen2]);
    let (u1, u2) = (format!("http://127.0.0.2:{l1}"), format!("http://{listen2}"));
    wait_healthy(&mut n1, &format!("{u1}/health")).await;
    wait_healthy(&mut n2, &format!("{u2}/health")).await;
    eventually(Duration::from_secs(10), "node 1 to see both nodes", || async {
        let health: serde_json::Value = client().get(format!("{u1}/health")).send().await.ok()?.json().await.ok()?;
        (health["cluster_nodes"] == 2).then_some(())
    })
    .await;

    let key = session_reached_from_both(&u1, &u2, Browser::new()).await;
    assert_registry_in_its_schema(&db).await;
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let owner: Option<i64> = sqlx::query_scalar("SELECT node_id FROM sessionlb.sessionlb_sessions WHERE key = $1")
        .bind(&key)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(owner.is_some(), "the session {key} is in the registry, on a node");

    // The status page: load as a fraction of total CPU, raw values in JSON.
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    let fraction = |load: f64| format!("{}", (load / cpus * 1000.0).round() / 1000.0);
    let status = client().get(format!("{u1}/load-balancer/status")).send().await.unwrap().text().await.unwrap();
    assert!(
        status
            .lines()
            .any(|l| l == format!("127.0.0.2:{l1}  Load: {}, {}, {}", fraction(2.0), fraction(1.0), fraction(0.5))),
        "{status}"
    );
    let json: serde_json::Value =
        client().get(format!("{u1}/load-balancer/status?format=json")).send().await.unwrap().json().await.unwrap();
    let me = json["nodes"].as_array().unwrap().iter().find(|n| n["address"] == format!("127.0.0.2:{l1}")).unwrap();
    assert_eq!(me["load"], serde_json::json!([2.0, 1.0, 0.5]), "{json}");
    assert_eq!(me["cpus"], serde_json::json!(cpus as u32), "{json}");

    // list-nodes from the Workbench directory: Workbench's columns first, in its order.
    let out = sessionlb(&["--rstudio-config", etc2, "--listen", &listen2, "list-nodes"]);
    let listing = text(&out);
    assert!(out.status.success(), "{listing}");
    let header = listing.lines().find(|l| l.starts_with("ID ")).unwrap();
    let columns: Vec<&str> = header.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(columns[..6], ["ID", "Host", "IPv4", "Port", "Status", "Last Seen"], "{listing}");
    let rows = parse_list_nodes(&listing);
    let mut seen: Vec<(String, u16, String)> =
        rows.iter().map(|r| (r.host.clone(), r.port, r.status.clone())).collect();
    seen.sort();
    assert_eq!(seen, [("127.0.0.2".into(), l1, "Online".into()), ("127.0.0.3".into(), l2, "Online".into())]);
    n1.kill();
    n2.kill();
}

/// Fixture b: the legacy `[config]`/`[nodes]` format on Workbench's default
/// SQLite is refused: every node would keep a private registry. On
/// PostgreSQL the `[nodes]` list tells each node its own address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_nodes_list_with_sqlite_is_refused_and_with_postgres_finds_this_node() {
    let site = Site::new();
    let etc = site.install("b-legacy-sqlite", "n1");
    let (l1, l2, backend) = (free_port("127.0.0.2"), free_port("127.0.0.3"), free_port("127.0.0.3"));
    set_keys(&etc.join("rserver.conf"), &[("www-address", "127.0.0.3"), ("www-port", &backend.to_string())]);
    let etc_s = etc.to_str().unwrap();
    let toml = native_toml(&site, "n1", "");
    let listen = format!("127.0.0.3:{l2}");
    for command in ["check-config", "serve"] {
        let out =
            sessionlb(&["--config", toml.to_str().unwrap(), "--rstudio-config", etc_s, "--listen", &listen, command]);
        let shown = text(&out);
        assert_eq!(out.status.code(), Some(78), "{command}: {shown}");
        assert!(shown.contains(&format!("{etc_s}/load-balancer: {etc_s}/load-balancer lists 2 nodes in its legacy [nodes] section, but the registry is SQLite")), "{shown}");
        assert!(shown.contains(&format!("from {etc_s}/database.conf:2 (provider=sqlite)")), "{shown}");
        assert!(shown.contains("split brain") && shown.contains("provider=postgresql"), "{shown}");
    }

    // With PostgreSQL: no www-host-name; the [nodes] entry where this node listens is its address.
    let db = TestDb::postgres().await;
    let pg = Pg::of(&db);
    fs::write(
        etc.join("load-balancer"),
        format!("[config]\nbalancer=sessions\n\n[nodes]\n127.0.0.2:{l1}\n127.0.0.3:{l2}\n"),
    )
    .unwrap();
    fs::write(
        etc.join("database.conf"),
        format!(
            "provider=postgresql\nhost={}\nport={}\ndatabase={}\nusername={}\n",
            pg.host, pg.port, pg.database, pg.user
        ),
    )
    .unwrap();
    let out = sessionlb(&[
        "--config",
        toml.to_str().unwrap(),
        "--rstudio-config",
        etc_s,
        "--listen",
        &listen,
        "check-config",
    ]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert_eq!(
        line(&shown, "# node address:"),
        format!(
            "# node address:   {listen} (the legacy [nodes] entry {listen:?}, an address of this machine, its port as written)"
        )
    );
    let _b = demo_backend(&site, "B", &format!("127.0.0.3:{backend}"), None);
    let mut node =
        serve(&site, "n1", &["--config", toml.to_str().unwrap(), "--rstudio-config", etc_s, "--listen", &listen]);
    wait_healthy(&mut node, &format!("http://{listen}/health")).await;
    let rows = parse_list_nodes(&text(&sessionlb(&["--rstudio-config", etc_s, "--listen", &listen, "list-nodes"])));
    assert_eq!(rows.iter().map(|r| (r.address(), r.status.as_str())).collect::<Vec<_>>(), [(listen.clone(), "Online")]);
    node.kill();
}

/// A CA and one certificate for both node addresses (and the public name).
fn make_pki(dir: &Path) -> Vec<u8> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["rsw1.example.com".to_string()]).unwrap();
    params.subject_alt_names.extend(["127.0.0.2", "127.0.0.3"].map(|ip| SanType::IpAddress(ip.parse().unwrap())));
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    fs::write(dir.join("node.crt"), cert.pem()).unwrap();
    fs::write(dir.join("node.key"), key.serialize_pem()).unwrap();
    fs::set_permissions(dir.join("node.key"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    ca.pem().into_bytes()
}

/// Fixture c: rserver serves https, the database is a connection-uri with
/// sslmode, and the key lives outside the directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn https_workbench_directory_with_connection_uri_and_outside_key_two_nodes() {
    let db = TestDb::postgres().await;
    other_application_table(&db).await;
    let pg = Pg::of(&db);
    let site = Site::new();
    let key = site.var().join("secure-cookie-key");
    fs::write(&key, format!("{}\n", hex::encode(rand::random::<[u8; 18]>()))).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let (l1, l2) = (free_port("127.0.0.2"), free_port("127.0.0.3"));
    let (b1, b2) = (free_port("127.0.0.2"), free_port("127.0.0.3"));
    // One self-made CA and certificate (naming both node addresses), in
    // each node's /etc/rstudio/ssl where rserver.conf points.
    let pki = site.path().join("pki");
    let ca_pem = make_pki(&pki);
    let mut dirs = Vec::new();
    for (node, ip, backend_port) in [("n1", "127.0.0.2", b1), ("n2", "127.0.0.3", b2)] {
        let etc = site.install("c-https", node);
        fs::create_dir_all(etc.join("ssl")).unwrap();
        for file in ["node.crt", "node.key"] {
            fs::copy(pki.join(file), etc.join("ssl").join(file)).unwrap();
        }
        set_keys(&etc.join("load-balancer"), &[("www-host-name", ip)]);
        let uri = format!("postgresql://{}@{}:{}/{}?sslmode=prefer", pg.user, pg.host, pg.port, pg.database);
        set_keys(&etc.join("database.conf"), &[("connection-uri", &uri)]);
        set_keys(&etc.join("rserver.conf"), &[("www-address", ip), ("www-port", &backend_port.to_string())]);
        dirs.push(etc);
    }
    // Peers are verified against that CA (the native file's one addition).
    let native = format!("ssl-ca-file = \"{}\"\n", pki.join("ca.pem").display());
    let toml1 = native_toml(&site, "n1", &format!("www-address = \"127.0.0.2\"\nwww-port = {l1}\n{native}"));
    let toml2 = native_toml(&site, "n2", &native);
    let (etc1, etc2) = (dirs[0].to_str().unwrap(), dirs[1].to_str().unwrap());
    let listen2 = format!("127.0.0.3:{l2}");

    let out = sessionlb(&["--config", toml1.to_str().unwrap(), "--rstudio-config", etc1, "check-config"]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert_eq!(
        line(&shown, "# backend:"),
        format!(
            "# backend:        https://127.0.0.2:{b1} ({etc1}/rserver.conf:2 (rserver's address: www-address=127.0.0.2 (line 12), www-port={b1} (line 2)))"
        )
    );
    assert_eq!(
        line(&shown, "# node address:"),
        format!(
            "# node address:   127.0.0.2:{l1} (www-host-name from {etc1}/load-balancer:2, port {l1} where sessionlb listens)"
        )
    );
    assert_eq!(
        line(&shown, "# registry:"),
        format!(
            "# registry:       postgresql://{}@{}:{}/{}?sslmode=prefer, schema sessionlb, pool-size 3 (+1 for change notifications), connection timeout 5s",
            pg.user, pg.host, pg.port, pg.database
        )
    );
    assert_eq!(line(&shown, "# database password:"), format!("# database password: set (from {etc1}/database.conf:3)"));
    assert_eq!(
        line(&shown, "# cluster protocol:"),
        format!("# cluster protocol: https (TLS listener with {etc1}/ssl/node.crt)")
    );
    for (key, source) in [
        (format!("secure-cookie-key-file = \"{}\" ", key.display()), format!("# {etc1}/rserver.conf:7")),
        ("ssl-enabled = true ".into(), format!("# {etc1}/rserver.conf:3 (rserver.conf ssl-enabled)")),
        ("backend-tls = true ".into(), format!("# {etc1}/rserver.conf:3 (rserver.conf ssl-enabled)")),
        (
            "database-connection-timeout = \"5s\" ".into(),
            format!("# {etc1}/database.conf:4 (connnection-timeout-seconds)"),
        ),
    ] {
        assert!(line(&shown, &key).ends_with(&source), "{key}: {}", line(&shown, &key));
    }
    assert!(
        shown.contains(&format!("warning: {etc1}/rserver.conf:6: `ssl-protocols` is not used by sessionlb")),
        "{shown}"
    );

    let tls = (pki.join("node.crt"), pki.join("node.key"));
    let _backend_a = demo_backend(&site, "A", &format!("127.0.0.2:{b1}"), Some((&tls.0, &tls.1)));
    let _backend_b = demo_backend(&site, "B", &format!("127.0.0.3:{b2}"), Some((&tls.0, &tls.1)));
    let mut n1 = serve(&site, "n1", &["--config", toml1.to_str().unwrap(), "--rstudio-config", etc1]);
    let mut n2 =
        serve(&site, "n2", &["--config", toml2.to_str().unwrap(), "--rstudio-config", etc2, "--listen", &listen2]);
    let (u1, u2) = (format!("https://127.0.0.2:{l1}"), format!("https://{listen2}"));
    wait_healthy(&mut n1, &format!("{u1}/health")).await;
    wait_healthy(&mut n2, &format!("{u2}/health")).await;
    eventually(Duration::from_secs(10), "node 2 to see both nodes", || async {
        let health: serde_json::Value = client().get(format!("{u2}/health")).send().await.ok()?.json().await.ok()?;
        (health["cluster_nodes"] == 2).then_some(())
    })
    .await;
    session_reached_from_both(&u1, &u2, Browser::trusting(&ca_pem)).await;
    assert_registry_in_its_schema(&db).await;
    let listing = text(&sessionlb(&["--rstudio-config", etc1, "--config", toml1.to_str().unwrap(), "list-nodes"]));
    assert!(listing.contains("Protocol\nHttps\n"), "{listing}");
    n1.kill();
    n2.kill();
}

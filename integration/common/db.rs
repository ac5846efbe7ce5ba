//! Databases for tests: a fresh PostgreSQL database per test on the server
//! named by `SESSIONLB_TEST_PG` (default: the local server as `postgres`),
//! dropped afterwards; or a SQLite file in a temp dir.

use std::sync::Arc;
use std::time::Duration;

use sessionlb::cluster::{self, Registry};
use sessionlb::config::DatabaseUrl;
use sqlx::Connection;

/// Admin URL of the PostgreSQL server used by tests.
pub fn admin_url() -> String {
    std::env::var("SESSIONLB_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Which database a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A database that exists for one test.
pub struct TestDb {
    pub url: String,
    name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Postgres => TestDb::postgres().await,
            Backend::Sqlite => TestDb::sqlite(),
        }
    }

    /// A fresh, empty PostgreSQL database.
    pub async fn postgres() -> TestDb {
        let admin = admin_url();
        let name = format!("sessionlb_test_{}", hex::encode(rand::random::<[u8; 6]>()));
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("tests need PostgreSQL at {admin} (set SESSIONLB_TEST_PG): {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
        TestDb { url: format!("{base}/{name}"), name: Some(name), _dir: None }
    }

    /// A SQLite file in a fresh temp dir.
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("registry.db").display());
        TestDb { url, name: None, _dir: Some(dir) }
    }

    pub fn database_url(&self) -> DatabaseUrl {
        DatabaseUrl::parse(&self.url).unwrap()
    }

    /// Connect (and migrate) a registry to this database.
    pub async fn registry(&self) -> Arc<dyn Registry> {
        cluster::connect(&self.database_url(), Duration::from_millis(50)).await.unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.name.take() else { return };
        let admin = admin_url();
        // Drop may run inside a runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}

/// A PostgreSQL server of a test's own (initdb into a temp dir, its own
/// port), so that a test may stop and start it. As root it runs as `postgres`.
pub struct ThrowawayPostgres {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    pub port: u16,
    /// `listen_addresses`.
    listen: String,
}

impl ThrowawayPostgres {
    pub fn start() -> ThrowawayPostgres {
        ThrowawayPostgres::start_with(None)
    }

    /// A server that requires `password` (scram-sha-256) over TCP for `postgres`.
    pub fn start_with_password(password: &str) -> ThrowawayPostgres {
        ThrowawayPostgres::start_with(Some(password))
    }

    fn start_with(password: Option<&str>) -> ThrowawayPostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("an initdb under /usr/lib/postgresql/*/bin");
        let dir = tempfile::Builder::new().prefix("sessionlb-pg-test").tempdir().unwrap();
        let port = crate::common::node::free_port("127.0.0.1");
        let pg = ThrowawayPostgres { dir, bin, port, listen: "127.0.0.1".into() };
        if rustix::process::geteuid().is_root() {
            let status = std::process::Command::new("chown").arg("postgres").arg(pg.dir.path()).status().unwrap();
            assert!(status.success());
        }
        let data = pg.dir.path().join("data");
        let mut initdb = pg.command("initdb");
        initdb.arg("-D").arg(&data).args(["-U", "postgres", "-E", "UTF8", "--auth-local=trust"]);
        match password {
            None => {
                initdb.arg("--auth-host=trust");
            }
            Some(pw) => {
                let pwfile = pg.dir.path().join("pwfile");
                std::fs::write(&pwfile, pw).unwrap();
                if rustix::process::geteuid().is_root() {
                    std::process::Command::new("chown").arg("postgres").arg(&pwfile).status().unwrap();
                }
                initdb.arg("--auth-host=scram-sha-256").arg(format!("--pwfile={}", pwfile.display()));
            }
        }
        let out = initdb.output().unwrap();
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        pg.start_server();
        pg
    }

    fn command(&self, tool: &str) -> std::process::Command {
        let path = self.bin.join(tool);
        if rustix::process::geteuid().is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            std::process::Command::new(path)
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn start_server(&self) {
        let data = self.dir.path().join("data");
        let opts = format!(
            "-p {} -k {} -c listen_addresses={} -c fsync=off",
            self.port,
            self.dir.path().display(),
            self.listen
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-w", "-o", &opts, "start"])
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl start failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Also listen on `ip` and trust connections from `cidr` (clients in a
    /// network namespace); restarts the server.
    pub fn listen_also(&mut self, ip: &str, cidr: &str) {
        let hba = self.dir.path().join("data").join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba).unwrap();
        text.push_str(&format!("host all all {cidr} trust\n"));
        std::fs::write(&hba, text).unwrap();
        self.stop_server();
        self.listen = format!("127.0.0.1,{ip}");
        self.start_server();
    }

    pub fn stop_server(&self) {
        let data = self.dir.path().join("data");
        let out = self.command("pg_ctl").arg("-D").arg(&data).args(["-m", "fast", "-w", "stop"]).output().unwrap();
        assert!(out.status.success(), "pg_ctl stop failed: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self.command("pg_ctl").arg("-D").arg(&data).args(["-m", "immediate", "-w", "stop"]).output();
    }
}

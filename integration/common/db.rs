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
    std::env::var("SESSIONLB_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
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
            .unwrap_or_else(|e| {
                panic!("tests need PostgreSQL at {admin} (set SESSIONLB_TEST_PG): {e}")
            });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
        TestDb {
            url: format!("{base}/{name}"),
            name: Some(name),
            _dir: None,
        }
    }

    /// A SQLite file in a fresh temp dir.
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("registry.db").display());
        TestDb {
            url,
            name: None,
            _dir: Some(dir),
        }
    }

    pub fn database_url(&self) -> DatabaseUrl {
        DatabaseUrl::parse(&self.url).unwrap()
    }

    /// Connect (and migrate) a registry to this database.
    pub async fn registry(&self) -> Arc<dyn Registry> {
        cluster::connect(&self.database_url(), Duration::from_millis(50))
            .await
            .unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.name.take() else { return };
        let admin = admin_url();
        // Drop may run inside a runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        })
        .join();
    }
}

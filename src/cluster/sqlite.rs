//! SQLite registry: the embedded default for a single machine, so that
//! `sessionlb serve` runs with no database server. Several processes on one
//! machine share the file (WAL mode, busy timeout). SQLite cannot notify:
//! triggers append to `sessionlb_changes`, which every node polls.

use std::path::Path;
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::mpsc;

use super::model::*;
use super::registry::{ChangeStream, NewSession, Registry, RegistryError, Result};
use super::sql::impl_registry;

/// Change-log rows older than this are pruned; a poller further behind reloads everything.
const CHANGE_LOG_KEEP_MS: i64 = 10 * 60 * 1000;

/// The registry on SQLite.
pub struct SqliteRegistry {
    pool: SqlitePool,
    poll_interval: Duration,
}

impl SqliteRegistry {
    const KIND: &'static str = "sqlite";

    /// Open (creating if needed) the database file and run migrations.
    /// Migrations are serialised between processes with a `flock` on a
    /// sibling file, since SQLite migrations take no lock of their own.
    pub async fn connect(path: &Path, poll_interval: Duration) -> Result<SqliteRegistry> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|source| RegistryError::SqliteDir { path: dir.display().to_string(), source })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        let lock_path = path.with_extension("migrate.lock");
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| RegistryError::SqliteDir { path: lock_path.display().to_string(), source })?;
        let lock_file = tokio::task::spawn_blocking(move || {
            rustix::fs::flock(&lock_file, rustix::fs::FlockOperation::LockExclusive).map(|()| lock_file)
        })
        .await
        .expect("flock task")
        .map_err(|e| RegistryError::SqliteDir { path: lock_path.display().to_string(), source: e.into() })?;
        let migrated = sqlx::migrate!("./migrations/sqlite").run(&pool).await;
        drop(lock_file);
        migrated?;
        Ok(SqliteRegistry { pool, poll_interval })
    }

    async fn begin_cluster_lock(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        // IMMEDIATE takes the database write lock at once: the whole check is serialised.
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    async fn subscribe_changes(&self) -> Result<ChangeStream> {
        let (tx, rx) = mpsc::channel(4096);
        let pool = self.pool.clone();
        let interval = self.poll_interval;
        let mut last_id: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM sessionlb_changes").fetch_one(&pool).await?;
        tokio::spawn(async move {
            let mut polls: u64 = 0;
            let mut failed = false;
            loop {
                tokio::time::sleep(interval).await;
                if tx.is_closed() {
                    return;
                }
                polls += 1;
                if polls.is_multiple_of(120) {
                    let pruned = sqlx::query(
                        "DELETE FROM sessionlb_changes WHERE at < CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) - $1",
                    )
                    .bind(CHANGE_LOG_KEEP_MS)
                    .execute(&pool)
                    .await;
                    if let Err(e) = pruned {
                        tracing::debug!(error = %e, "pruning the change log failed");
                    }
                }
                let rows =
                    sqlx::query("SELECT id, payload, at FROM sessionlb_changes WHERE id > $1 ORDER BY id LIMIT 1000")
                        .bind(last_id)
                        .fetch_all(&pool)
                        .await;
                let rows = match rows {
                    Ok(rows) => rows,
                    Err(e) => {
                        tracing::warn!(error = %e, "polling registry changes failed");
                        failed = true;
                        continue;
                    }
                };
                let first = rows.first().and_then(|r| r.try_get::<i64, _>("id").ok());
                // Rows we never saw were pruned, or polling failed: reload.
                if failed || first.is_some_and(|id| id > last_id + 1 && last_id > 0) {
                    let min: Option<i64> = sqlx::query_scalar("SELECT MIN(id) FROM sessionlb_changes")
                        .fetch_one(&pool)
                        .await
                        .unwrap_or(None);
                    if failed || min.is_some_and(|m| m > last_id + 1) {
                        failed = false;
                        if tx.send(ChangeEvent::Resync).await.is_err() {
                            return;
                        }
                    }
                }
                for row in rows {
                    let (Ok(id), Ok(payload)) = (row.try_get::<i64, _>("id"), row.try_get::<String, _>("payload"))
                    else {
                        continue;
                    };
                    last_id = id;
                    if let Ok(at) = row.try_get::<i64, _>("at") {
                        crate::metrics::observe_notification_lag(at);
                    }
                    if tx.send(ChangeEvent::from_payload(&payload)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

impl_registry!(
    SqliteRegistry,
    sqlx::Sqlite,
    now = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    keys_in_json = "(SELECT value FROM json_each($1))",
    // One machine: no gate ($2 is bound for the shared statement shape).
    expire = "DELETE FROM sessionlb_sessions WHERE last_active < CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) - $1 AND $2 >= 0"
);

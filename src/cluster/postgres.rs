//! PostgreSQL registry: the cluster database. Migrations from
//! `migrations/postgres`; the cluster check serialises on a transaction-level
//! advisory lock; changes arrive by LISTEN/NOTIFY on channel `sessionlb`.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tokio::sync::mpsc;

use super::model::*;
use super::registry::{ChangeStream, NewSession, Registry, RegistryError, Result};
use super::sql::impl_registry;

/// Advisory lock id taken while the cluster record is checked (an arbitrary constant: "slb1").
const CLUSTER_LOCK_ID: i64 = 0x736c_6231;

/// The registry on PostgreSQL.
pub struct PgRegistry {
    pool: PgPool,
}

impl PgRegistry {
    const KIND: &'static str = "postgres";

    /// Connect and run migrations (which take their own advisory lock, so
    /// nodes starting together are safe).
    pub async fn connect(url: &str) -> Result<PgRegistry> {
        let pool = PgPoolOptions::new()
            // Workbench caps its pool at 6 per node so that many nodes fit in
            // PostgreSQL's default 100 connections; one more for LISTEN.
            .max_connections(7)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(PgRegistry { pool })
    }

    async fn begin_cluster_lock(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(CLUSTER_LOCK_ID).execute(&mut *tx).await?;
        Ok(tx)
    }

    async fn listen(pool: &PgPool) -> Result<PgListener> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen("sessionlb").await?;
        Ok(listener)
    }

    async fn subscribe_changes(&self) -> Result<ChangeStream> {
        let (tx, rx) = mpsc::channel(4096);
        let mut listener = Self::listen(&self.pool).await?;
        let pool = self.pool.clone();
        tokio::spawn(async move {
            loop {
                match listener.try_recv().await {
                    Ok(Some(n)) => {
                        if let Some(at) = payload_time(n.payload()) {
                            crate::metrics::observe_notification_lag(at);
                        }
                        if tx.send(ChangeEvent::from_payload(n.payload())).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Ok(None) => {
                        tracing::warn!("registry notification connection lost; reconnecting")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "registry notification connection failed; reconnecting")
                    }
                }
                // Start over on a fresh connection, then ask for a full reload:
                // notifications sent while we were away are gone.
                let mut backoff = Duration::from_millis(100);
                listener = loop {
                    if tx.is_closed() {
                        return;
                    }
                    match Self::listen(&pool).await {
                        Ok(l) => break l,
                        Err(e) => {
                            tracing::debug!(error = %e, "registry still unreachable");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                    }
                };
                tracing::info!("registry notifications re-established; reloading the registry");
                if tx.send(ChangeEvent::Resync).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

impl_registry!(
    PgRegistry,
    sqlx::Postgres,
    now = "CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT)",
    keys_in_json = "(SELECT json_array_elements_text(CAST($1 AS json)))"
);

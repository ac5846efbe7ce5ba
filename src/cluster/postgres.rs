//! PostgreSQL registry: the cluster database. Its tables, functions and
//! migration bookkeeping live in their own schema (`database-schema`,
//! default `sessionlb`), so the registry can share a database with
//! Workbench's own tables without touching them; every connection has that
//! schema as its `search_path`. Migrations from `migrations/postgres`; the
//! cluster check serialises on a transaction-level advisory lock; changes
//! arrive by LISTEN/NOTIFY on the schema's channel
//! ([`notify_channel`](crate::config::database::notify_channel)).
//!
//! Upgrading from versions that kept the tables in `public`: when the
//! schema has no registry yet and `public` has one, a node that starts while
//! no node of that registry is Online (and fresh) moves the tables and
//! functions into the schema, in one transaction, and copies the migration
//! bookkeeping (the rows in `public._sqlx_migrations` are left, so that an
//! older version started by mistake fails instead of creating a second
//! registry). While any node is online the registry stays in `public` — the
//! running nodes, old or new, keep working — and the move happens at the
//! next start with all nodes stopped.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::{Connection, Row};
use tokio::sync::mpsc;

use super::model::*;
use super::registry::{ChangeStream, NewSession, Registry, RegistryError, RegistryOptions, Result};
use super::sql::impl_registry;
use crate::config::database::{notify_channel, valid_schema_name};

/// Advisory lock id taken while the cluster record is checked (an arbitrary constant: "slb1").
const CLUSTER_LOCK_ID: i64 = 0x736c_6231;
/// Advisory lock id taken while the registry's schema is created or moved into ("slbS").
const SCHEMA_LOCK_ID: i64 = 0x736c_6253;

/// Pooled connections idle this long are closed. sqlx hands out idle
/// connections first in, first out, so periodic work (a load report every
/// few seconds) touches every idle connection in turn: a timeout of a
/// minute kept a whole pool open forever on an idle node (4 connections per
/// node at rest, 7 after a burst, in round 1 of issue 12); ten seconds still
/// kept two or three (an idle node's statements come every 2.5 s). Five
/// lets an idle node fall back to one or two pooled connections plus the
/// LISTEN one; connections are only opened when work runs concurrently.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// The registry on PostgreSQL.
pub struct PgRegistry {
    pool: PgPool,
    /// The schema that holds the registry (`public` for a registry not yet moved).
    schema: String,
    /// The LISTEN/NOTIFY channel of that schema.
    channel: String,
}

impl PgRegistry {
    const KIND: &'static str = "postgres";

    /// Connect with the default options (schema `sessionlb`) and run migrations.
    pub async fn connect(url: &str) -> Result<PgRegistry> {
        PgRegistry::connect_with(url, &RegistryOptions::default()).await
    }

    /// Connect, make sure the schema exists (moving a registry left in
    /// `public` when that is safe), and run migrations (which take their own
    /// advisory lock, so nodes starting together are safe). The pool holds
    /// at most `pool_size` connections for work plus one for LISTEN, keeps
    /// none open for their own sake, and closes idle ones after
    /// [`IDLE_TIMEOUT`]: `nodes × (pool_size + 1)` bounds the cluster's
    /// connections.
    pub async fn connect_with(url: &str, options: &RegistryOptions) -> Result<PgRegistry> {
        if !valid_schema_name(&options.schema) {
            return Err(RegistryError::Schema(format!("{:?} is not a valid schema name", options.schema)));
        }
        let base = connect_options(url)?;
        let timeout = options.connect_timeout;
        let mut conn = tokio::time::timeout(timeout, PgConnection::connect_with(&base))
            .await
            .map_err(|_| connect_timed_out(timeout))??;
        let schema = prepare_schema(&mut conn, &options.schema, options.freshness).await?;
        let _ = conn.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(options.pool_size.max(1) + 1)
            .min_connections(0)
            .idle_timeout(IDLE_TIMEOUT)
            .acquire_timeout(timeout)
            .connect_with(base.options([("search_path", schema.as_str())]))
            .await?;
        let mut migrator = sqlx::migrate!("./migrations/postgres");
        migrator.dangerous_set_table_name(format!("{schema}._sqlx_migrations"));
        migrator.run(&pool).await?;
        let channel = notify_channel(&schema);
        Ok(PgRegistry { pool, schema, channel })
    }

    /// The schema that holds this registry.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    async fn begin_cluster_lock(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(CLUSTER_LOCK_ID).execute(&mut *tx).await?;
        Ok(tx)
    }

    async fn listen(pool: &PgPool, channel: &str) -> Result<PgListener> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(channel).await?;
        Ok(listener)
    }

    async fn subscribe_changes(&self) -> Result<ChangeStream> {
        let (tx, rx) = mpsc::channel(4096);
        let mut listener = Self::listen(&self.pool, &self.channel).await?;
        let pool = self.pool.clone();
        let channel = self.channel.clone();
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
                    match Self::listen(&pool, &channel).await {
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

/// Parse the URL; an IPv6 host keeps no brackets (sqlx would try to resolve
/// `[::1]` as a name).
fn connect_options(url: &str) -> Result<PgConnectOptions> {
    let options: PgConnectOptions = url.parse()?;
    let host = options.get_host();
    if host.starts_with('[') && host.ends_with(']') {
        let bare = host[1..host.len() - 1].to_string();
        return Ok(options.host(&bare));
    }
    Ok(options)
}

fn connect_timed_out(timeout: Duration) -> RegistryError {
    RegistryError::Db(sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no connection within {} s (database-connection-timeout)", timeout.as_secs_f64()),
    )))
}

/// Make sure `schema` exists and say which schema holds the registry: the
/// wanted one, or `public` while a registry there is still in use (see the
/// module documentation). Serialised between nodes by an advisory lock.
async fn prepare_schema(conn: &mut PgConnection, schema: &str, freshness: Duration) -> Result<String> {
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(SCHEMA_LOCK_ID).execute(&mut *tx).await?;
    // Checked before creating: a user without CREATE on the database can
    // still use a schema an administrator made for it.
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(schema)
        .fetch_one(&mut *tx)
        .await?;
    if !exists {
        // The name is a checked plain identifier (valid_schema_name).
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&mut *tx).await.map_err(|e| {
            RegistryError::Schema(format!(
                "cannot create schema {schema} for the registry: {e}. Create it once as the database's owner \
                 (CREATE SCHEMA {schema} AUTHORIZATION <the registry's user>), or set database-schema to one that exists"
            ))
        })?;
    }
    let table_in = |s: &str| format!("{s}.sessionlb_nodes");
    let ours: bool =
        sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL").bind(table_in(schema)).fetch_one(&mut *tx).await?;
    let legacy: bool =
        sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL").bind(table_in("public")).fetch_one(&mut *tx).await?;
    if schema == "public" || ours || !legacy {
        tx.commit().await?;
        return Ok(schema.to_string());
    }
    let freshness_ms = i64::try_from(freshness.as_millis()).unwrap_or(i64::MAX);
    let live: Vec<String> = sqlx::query_scalar(
        "SELECT host || ':' || CAST(port AS TEXT) FROM public.sessionlb_nodes \
         WHERE status = 'Online' AND last_seen >= CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT) - $1 \
         ORDER BY id",
    )
    .bind(freshness_ms)
    .fetch_all(&mut *tx)
    .await?;
    if !live.is_empty() {
        tx.commit().await?;
        tracing::warn!(
            schema,
            online = %live.join(", "),
            "the registry is still in schema public, where versions before 0.2 kept it, and these nodes use it: \
             staying there; it moves to its own schema when a node starts while no node is online"
        );
        return Ok("public".to_string());
    }
    move_registry(&mut tx, schema).await?;
    tx.commit().await?;
    tracing::info!(schema, "moved the registry from schema public into its own schema");
    Ok(schema.to_string())
}

/// Move every `sessionlb_*` table, view, sequence and function from
/// `public` into `schema` (indexes, constraints, triggers and owned
/// sequences go with their tables), and copy the bookkeeping of this
/// program's migrations.
async fn move_registry(tx: &mut PgConnection, schema: &str) -> Result<()> {
    let quote = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
    let relations = sqlx::query(
        "SELECT c.relname, c.relkind::text AS kind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm') AND c.relname LIKE 'sessionlb\\_%' \
         ORDER BY c.relname",
    )
    .fetch_all(&mut *tx)
    .await?;
    for row in relations {
        let name: String = row.try_get("relname")?;
        let what = match row.try_get::<String, _>("kind")?.as_str() {
            "v" => "VIEW",
            "m" => "MATERIALIZED VIEW",
            _ => "TABLE",
        };
        let sql = format!("ALTER {what} public.{} SET SCHEMA {schema}", quote(&name));
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await?;
    }
    // Sequences that no moved table owned.
    let sequences: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND c.relkind = 'S' AND c.relname LIKE 'sessionlb\\_%'",
    )
    .fetch_all(&mut *tx)
    .await?;
    for name in sequences {
        let sql = format!("ALTER SEQUENCE public.{} SET SCHEMA {schema}", quote(&name));
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await?;
    }
    let functions: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = 'public' AND p.proname LIKE 'sessionlb\\_%'",
    )
    .fetch_all(&mut *tx)
    .await?;
    for signature in functions {
        // regprocedure text names the function with its argument types,
        // schema-qualified when public is not on the search path.
        let unqualified = signature.strip_prefix("public.").unwrap_or(&signature);
        let sql = format!("ALTER FUNCTION public.{unqualified} SET SCHEMA {schema}");
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await?;
    }
    let bookkeeping: bool =
        sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations') IS NOT NULL").fetch_one(&mut *tx).await?;
    if bookkeeping {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {schema}._sqlx_migrations (LIKE public._sqlx_migrations INCLUDING ALL)"
        );
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await?;
        // Only this program's migrations: another application's sqlx
        // bookkeeping in public is not ours to copy.
        for migration in sqlx::migrate!("./migrations/postgres").iter() {
            let sql = format!(
                "INSERT INTO {schema}._sqlx_migrations SELECT * FROM public._sqlx_migrations \
                 WHERE version = $1 AND checksum = $2 ON CONFLICT DO NOTHING"
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(migration.version)
                .bind(migration.checksum.as_ref())
                .execute(&mut *tx)
                .await?;
        }
    }
    Ok(())
}

impl_registry!(
    PgRegistry,
    sqlx::Postgres,
    now = "CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT)",
    keys_in_json = "(SELECT json_array_elements_text(CAST($1 AS json)))",
    // One node per period (the `expiry` row, migration 0007); the cutoff is
    // computed once (an init plan), not per row; no run, no scan.
    expire = "WITH gate AS (UPDATE sessionlb_housekeeping SET last_run = CAST(extract(epoch FROM now()) * 1000 AS BIGINT) \
              WHERE task = 'expiry' AND last_run <= CAST(extract(epoch FROM now()) * 1000 AS BIGINT) - $2 RETURNING last_run) \
              DELETE FROM sessionlb_sessions WHERE EXISTS (SELECT 1 FROM gate) AND last_active < (SELECT last_run FROM gate) - $1"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_hosts_lose_their_brackets_and_socket_directories_stay_sockets() {
        // sqlx would look up "[::1]" as a host name.
        let options = connect_options("postgres://rs@[::1]:5433/rstudio").unwrap();
        assert_eq!((options.get_host(), options.get_port()), ("::1", 5433));
        let options = connect_options("postgres://rs@localhost:5432/rstudio?host=%2Fvar%2Frun%2Fpostgresql").unwrap();
        assert_eq!(options.get_socket().map(|p| p.display().to_string()), Some("/var/run/postgresql".into()));
        let options = connect_options("postgres://r%40s@db:5432/work%20bench").unwrap();
        assert_eq!((options.get_username(), options.get_database()), ("r@s", Some("work bench")));
    }
}

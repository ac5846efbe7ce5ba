//! The registry interface: one trait, implemented for PostgreSQL (clusters)
//! and SQLite (single machine). All SQL lives in `sql.rs` and the two
//! dialect files; nothing else in the program talks to the database.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::model::*;
use crate::config::{Config, DatabaseUrl};

/// Registry failures.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    // The cause is part of the message, not a `source`, so that error
    // chains do not print it twice.
    #[error("registry database error: {0}")]
    Db(sqlx::Error),
    #[error("migrating the registry database: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    #[error("node {0} is not in the registry")]
    NodeNotFound(NodeId),
    #[error("session {0:?} is not in the registry")]
    SessionNotFound(String),
    #[error("registry row is corrupt: {0}")]
    Corrupt(String),
    #[error("registry schema: {0}")]
    Schema(String),
    #[error("cannot create the directory of the SQLite registry {path}: {source}")]
    SqliteDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

impl From<sqlx::Error> for RegistryError {
    fn from(e: sqlx::Error) -> Self {
        RegistryError::Db(e)
    }
}

impl From<sqlx::migrate::MigrateError> for RegistryError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        RegistryError::Migrate(e)
    }
}

/// A session to write: insert if absent (the database is the final guard
/// against two nodes placing one key).
#[derive(Debug, Clone)]
pub struct NewSession<'a> {
    pub key: &'a str,
    pub node_id: NodeId,
    pub user_name: Option<&'a str>,
    pub kind: SessionKind,
}

/// How often a node ends idle sessions (`idle-timeout` / 4, between 0.1
/// and 60 s); on PostgreSQL one node per period does it for the cluster.
pub fn expiry_period(idle: Duration) -> Duration {
    (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

/// Notifications of registry changes, in order; `Resync` when some may
/// have been lost.
pub type ChangeStream = mpsc::Receiver<ChangeEvent>;

/// The node registry shared by the cluster.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// `postgres` or `sqlite`.
    fn kind(&self) -> &'static str;

    /// The database's clock, in ms since the epoch.
    async fn now_ms(&self) -> Result<Millis>;

    // --- nodes

    /// Insert or reuse the row for `host:port`, set it `Starting` with this
    /// version and role. Offline mode is kept. Returns the node id.
    async fn register_node(&self, reg: &NodeRegistration) -> Result<NodeId>;
    /// A zero-downtime upgrade: the `Online` row for `host:port` records the
    /// new process's version, role and start time and stays `Online`.
    /// `None` (nothing written) when there is no such row.
    async fn take_over_node(&self, reg: &NodeRegistration) -> Result<Option<NodeId>>;
    async fn set_node_status(&self, id: NodeId, status: NodeStatus) -> Result<()>;
    async fn set_node_ipv4(&self, id: NodeId, ipv4: Option<std::net::IpAddr>) -> Result<()>;
    /// Check the key fingerprint and protocol against the cluster record,
    /// under a database-wide lock: define it if absent; redefine it if it
    /// differs and no *other* node is Online and seen within `freshness`;
    /// otherwise refuse and set this node `Invalid secure cookie key`.
    /// On success the node is `Online` and seen now.
    async fn join_cluster(
        &self,
        id: NodeId,
        fingerprint: &str,
        protocol: &str,
        freshness: Duration,
    ) -> Result<JoinOutcome>;
    /// Record a check-in: last seen = now (database clock) and the node's
    /// clock skew. `NodeNotFound` if the row was deleted.
    async fn check_in(&self, id: NodeId, clock_skew_ms: i64) -> Result<()>;
    /// Record the node's load averages, CPU count and the anonymous pins it
    /// issued recently (not announced: nodes re-read the table periodically).
    async fn report_load(&self, id: NodeId, load: [f64; 3], cpus: u32, pins_recent: u64) -> Result<()>;
    async fn set_offline_mode(&self, id: NodeId, offline: bool) -> Result<()>;
    async fn list_nodes(&self) -> Result<Vec<NodeRecord>>;
    async fn get_node(&self, id: NodeId) -> Result<Option<NodeRecord>>;
    async fn find_node(&self, host: &str, port: u16) -> Result<Option<NodeRecord>>;
    /// Set `Deleting`, release its sessions (node → none), remove the row.
    /// Refused for an Online node with sessions unless `force`.
    async fn delete_node(&self, id: NodeId, force: bool) -> Result<DeleteOutcome>;

    // --- cluster record

    async fn cluster(&self) -> Result<Option<ClusterRecord>>;
    /// Clear the cluster record; the next node to start defines it. Returns
    /// whether there was one.
    async fn reset_cluster(&self) -> Result<bool>;

    // --- sessions

    /// Insert the session if its key is absent, or claim it if its node
    /// was deleted; return the row as it now stands (possibly another
    /// node's placement: the caller must route to that one).
    async fn place_session(&self, session: &NewSession<'_>) -> Result<SessionRecord>;
    /// Move a session from `from` (its node as the caller saw it) to `to`,
    /// only if it is still on `from`; return the row as it now stands.
    async fn move_session(&self, key: &str, from: Option<NodeId>, to: NodeId) -> Result<SessionRecord>;
    /// Set last active = now for these keys (one batch).
    async fn touch_sessions(&self, keys: &[String]) -> Result<u64>;
    /// Set the user of a session whose user was unknown.
    async fn set_session_user(&self, key: &str, user: &str) -> Result<()>;
    /// End sessions idle for longer than `idle`; returns how many. On
    /// PostgreSQL one node per [`expiry_period`] does it for the cluster: a
    /// call within 90 % of that period of another node's does nothing (0).
    async fn expire_idle_sessions(&self, idle: Duration) -> Result<u64>;
    async fn delete_session(&self, key: &str) -> Result<bool>;
    async fn get_session(&self, key: &str) -> Result<Option<SessionRecord>>;
    async fn list_sessions(&self) -> Result<Vec<SessionRecord>>;
    async fn count_sessions(&self, node: NodeId) -> Result<u64>;

    // --- changes

    /// Start receiving change notifications (spawns a task on the current
    /// runtime). Subscribe *before* loading a snapshot.
    async fn subscribe(&self) -> Result<ChangeStream>;

    /// Close the pool.
    async fn close(&self);
}

/// How to connect to the registry.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// How often SQLite's change log is polled.
    pub poll_interval: Duration,
    /// PostgreSQL: most pooled connections for work (the LISTEN connection
    /// comes on top).
    pub pool_size: u32,
    /// PostgreSQL: how long connecting, or waiting for a pooled connection, may take.
    pub connect_timeout: Duration,
    /// PostgreSQL: the schema of the registry's tables and bookkeeping.
    pub schema: String,
    /// PostgreSQL: a node seen within this long counts as live (a registry
    /// left in `public` is moved only when none is).
    pub freshness: Duration,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            poll_interval: Duration::from_millis(500),
            pool_size: crate::config::schema::DEFAULT_POOL_SIZE,
            connect_timeout: Duration::from_secs(10),
            schema: crate::config::database::DEFAULT_SCHEMA.to_string(),
            freshness: Duration::from_secs(600),
        }
    }
}

impl RegistryOptions {
    /// The options a configuration asks for.
    pub fn from_config(config: &Config) -> RegistryOptions {
        let c = &config.cluster;
        RegistryOptions {
            poll_interval: c.poll_interval,
            pool_size: c.pool_size,
            connect_timeout: c.database_connection_timeout,
            schema: c.database_schema.clone(),
            freshness: 2 * c.checkin_interval,
        }
    }
}

/// Connect to the registry named by `url` with the default options and run
/// its migrations.
pub async fn connect(url: &DatabaseUrl, poll_interval: Duration) -> Result<Arc<dyn Registry>> {
    connect_with(url, &RegistryOptions { poll_interval, ..RegistryOptions::default() }).await
}

/// Connect to the registry named by `url` and run its migrations.
pub async fn connect_with(url: &DatabaseUrl, options: &RegistryOptions) -> Result<Arc<dyn Registry>> {
    match url {
        DatabaseUrl::Postgres(url) => Ok(Arc::new(super::postgres::PgRegistry::connect_with(url, options).await?)),
        DatabaseUrl::Sqlite(path) => {
            Ok(Arc::new(super::sqlite::SqliteRegistry::connect(path, options.poll_interval).await?))
        }
    }
}

//! What the registry's PostgreSQL sees: connections per node (each node
//! connects with `application_name` = its name), statements and
//! transactions executed in the registry database (`pg_stat_statements`,
//! `pg_stat_database`), and the bulk load of sessions.
//!
//! The driver's own queries run in the admin database, so they never count
//! against the registry's.

use std::collections::BTreeMap;

use sqlx::{Connection, PgConnection, Row};

/// Connections to the registry database at one moment.
#[derive(Debug, Default, Clone)]
pub struct Connections {
    /// application_name → (connections, of which active).
    pub per_app: BTreeMap<String, (u64, u64)>,
}

impl Connections {
    pub fn total(&self) -> u64 {
        self.per_app.values().map(|v| v.0).sum()
    }

    pub fn active(&self) -> u64 {
        self.per_app.values().map(|v| v.1).sum()
    }
}

/// Calls of one statement and the time PostgreSQL spent executing them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stat {
    pub calls: u64,
    pub ms: f64,
}

/// What one statement did between two moments.
#[derive(Debug, Clone)]
pub struct Delta {
    pub query: String,
    pub calls: u64,
    pub ms: f64,
}

/// Counters of the registry database at one moment.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// By normalised query text.
    pub statements: BTreeMap<String, Stat>,
    pub xacts: u64,
}

impl Counters {
    /// Statements run since `before`, most frequent first.
    pub fn since(&self, before: &Counters) -> Vec<Delta> {
        let mut d: Vec<Delta> = self
            .statements
            .iter()
            .map(|(q, s)| {
                let b = before.statements.get(q).copied().unwrap_or_default();
                Delta { query: q.clone(), calls: s.calls.saturating_sub(b.calls), ms: (s.ms - b.ms).max(0.0) }
            })
            .filter(|d| d.calls > 0)
            .collect();
        d.sort_by(|a, b| b.calls.cmp(&a.calls).then_with(|| a.query.cmp(&b.query)));
        d
    }
}

/// `"query" N/s` for the `n` most frequent, then the `n` that took most time.
pub fn describe(deltas: &[Delta], secs: f64, n: usize) -> String {
    let by_calls =
        deltas.iter().take(n).map(|d| format!("`{}` {:.1}/s", d.query, d.calls as f64 / secs)).collect::<Vec<_>>();
    let mut by_time: Vec<&Delta> = deltas.iter().collect();
    by_time.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    let by_time = by_time
        .iter()
        .take(n.min(3))
        .map(|d| format!("`{}` {:.1} ms/s ({:.2} ms each)", d.query, d.ms / secs, d.ms / d.calls as f64))
        .collect::<Vec<_>>();
    format!("most frequent: {}; most execution time: {}", by_calls.join("; "), by_time.join("; "))
}

/// The first `n` deltas as JSON.
pub fn deltas_json(deltas: &[Delta], secs: f64, n: usize) -> serde_json::Value {
    serde_json::Value::Array(
        deltas
            .iter()
            .take(n)
            .map(|d| {
                serde_json::json!({
                    "query": d.query,
                    "per_s": crate::stats::finite(d.calls as f64 / secs),
                    "exec_ms_per_s": crate::stats::finite(d.ms / secs),
                })
            })
            .collect(),
    )
}

/// A monitoring connection to the admin database.
pub struct Monitor {
    conn: PgConnection,
    database: String,
}

impl Monitor {
    /// `admin` is a URL of the admin database; `database` the registry's name.
    pub async fn connect(admin: &str, database: &str) -> anyhow::Result<Monitor> {
        let mut conn = PgConnection::connect(admin).await?;
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").execute(&mut conn).await?;
        Ok(Monitor { conn, database: database.to_string() })
    }

    pub async fn connections(&mut self) -> anyhow::Result<Connections> {
        let rows = sqlx::query(
            "SELECT application_name, count(*) AS n, count(*) FILTER (WHERE state = 'active') AS active \
             FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend' GROUP BY 1",
        )
        .bind(&self.database)
        .fetch_all(&mut self.conn)
        .await?;
        let mut c = Connections::default();
        for r in rows {
            let app: String = r.try_get("application_name")?;
            let n: i64 = r.try_get("n")?;
            let active: i64 = r.try_get("active")?;
            c.per_app.insert(app, (n as u64, active as u64));
        }
        Ok(c)
    }

    pub async fn counters(&mut self) -> anyhow::Result<Counters> {
        let rows = sqlx::query(
            "SELECT s.query, s.calls, s.total_exec_time FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
             WHERE d.datname = $1",
        )
        .bind(&self.database)
        .fetch_all(&mut self.conn)
        .await?;
        let mut statements = BTreeMap::new();
        for r in rows {
            let q: String = r.try_get("query")?;
            let calls: i64 = r.try_get("calls")?;
            let ms: f64 = r.try_get("total_exec_time")?;
            let e: &mut Stat = statements.entry(one_line(&q)).or_default();
            e.calls += calls as u64;
            e.ms += ms;
        }
        let xacts: i64 = sqlx::query_scalar(
            "SELECT CAST(xact_commit + xact_rollback AS BIGINT) FROM pg_stat_database WHERE datname = $1",
        )
        .bind(&self.database)
        .fetch_one(&mut self.conn)
        .await?;
        Ok(Counters { statements, xacts: xacts as u64 })
    }

    /// Notifications queued and not yet read by every listener, as a fraction.
    pub async fn notification_queue_usage(&mut self) -> anyhow::Result<f64> {
        Ok(sqlx::query_scalar("SELECT pg_notification_queue_usage()").fetch_one(&mut self.conn).await?)
    }
}

/// A query on one line, at most 110 characters.
fn one_line(q: &str) -> String {
    let q = q.split_whitespace().collect::<Vec<_>>().join(" ");
    if q.chars().count() > 110 { format!("{}…", q.chars().take(110).collect::<String>()) } else { q }
}

/// Sessions, nodes and users as they are in the registry database.
pub struct Registry {
    conn: PgConnection,
}

impl Registry {
    /// The registry's tables are in the nodes' `database-schema` (default
    /// `sessionlb`; `public` for a registry of before 0.2).
    pub async fn connect(url: &str) -> anyhow::Result<Registry> {
        let options: sqlx::postgres::PgConnectOptions = url.parse()?;
        let options = options.options([("search_path", "sessionlb, public")]);
        Ok(Registry { conn: PgConnection::connect_with(&options).await? })
    }

    pub async fn session_count(&mut self) -> anyhow::Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sessionlb_sessions").fetch_one(&mut self.conn).await?;
        Ok(n as u64)
    }

    /// Online nodes: id → `host:port`.
    pub async fn online_nodes(&mut self) -> anyhow::Result<BTreeMap<i64, String>> {
        let rows = sqlx::query("SELECT id, host, port FROM sessionlb_nodes WHERE status = 'Online' ORDER BY id")
            .fetch_all(&mut self.conn)
            .await?;
        let mut m = BTreeMap::new();
        for r in rows {
            let (id, host, port): (i64, String, i32) = (r.try_get("id")?, r.try_get("host")?, r.try_get("port")?);
            m.insert(id, format!("{host}:{port}"));
        }
        Ok(m)
    }

    /// Insert sessions `bulk-<from>` … `bulk-<to - 1>` (user `bulk-<i>`, an
    /// affinity session as the request path would have written it), spread
    /// over `nodes` round-robin, `chunk` rows per transaction. Each insert
    /// fires the registry's change notification, as a placement does.
    pub async fn bulk_insert(&mut self, from: u64, to: u64, nodes: &[i64], chunk: u64) -> anyhow::Result<()> {
        anyhow::ensure!(!nodes.is_empty(), "no Online node to put sessions on");
        let ids: Vec<i64> = nodes.to_vec();
        let mut start = from;
        while start < to {
            let end = (start + chunk).min(to);
            sqlx::query(
                "INSERT INTO sessionlb_sessions (key, node_id, user_name, kind, created, last_active) \
                 SELECT 'aff:bulk-' || i, ($3::bigint[])[1 + (i % cardinality($3::bigint[]))], 'bulk-' || i, 'affinity', \
                        CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT), \
                        CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT) \
                 FROM generate_series($1::bigint, $2::bigint - 1) AS i ON CONFLICT (key) DO NOTHING",
            )
            .bind(start as i64)
            .bind(end as i64)
            .bind(&ids)
            .execute(&mut self.conn)
            .await?;
            start = end;
        }
        Ok(())
    }

    /// When the sessions of users named `prefix…` were written: their
    /// `created` column (ms, the database's clock), taken at the insert just
    /// before the commit, ascending. (Commit timestamps would be closer, but
    /// a row's `xmin` moves to the last transaction that touched it, and
    /// every node writes its sessions' activity back every `touch-interval`.)
    pub async fn created_times(&mut self, prefix: &str) -> anyhow::Result<Vec<f64>> {
        let created: Vec<i64> = sqlx::query_scalar(
            "SELECT created FROM sessionlb_sessions WHERE starts_with(user_name, $1) ORDER BY created",
        )
        .bind(prefix)
        .fetch_all(&mut self.conn)
        .await?;
        Ok(created.into_iter().map(|t| t as f64).collect())
    }

    /// Insert one session (`aff:<name>`, user `<name>`) on `node` in a transaction of its own.
    pub async fn insert_one(&mut self, name: &str, node: i64) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO sessionlb_sessions (key, node_id, user_name, kind, created, last_active) \
             VALUES ('aff:' || $1, $2, $1, 'affinity', CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT), \
                     CAST(extract(epoch FROM clock_timestamp()) * 1000 AS BIGINT)) ON CONFLICT (key) DO NOTHING",
        )
        .bind(name)
        .bind(node)
        .execute(&mut self.conn)
        .await?;
        Ok(())
    }

    /// The `host:port` of the node holding `user`'s session.
    pub async fn node_of_user(&mut self, user: &str) -> anyhow::Result<Option<String>> {
        let row = sqlx::query(
            "SELECT n.host, n.port FROM sessionlb_sessions s JOIN sessionlb_nodes n ON n.id = s.node_id \
             WHERE s.user_name = $1 ORDER BY s.last_active DESC LIMIT 1",
        )
        .bind(user)
        .fetch_optional(&mut self.conn)
        .await?;
        Ok(match row {
            Some(r) => Some(format!("{}:{}", r.try_get::<String, _>("host")?, r.try_get::<i32, _>("port")?)),
            None => None,
        })
    }
}

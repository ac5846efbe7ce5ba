//! The registry's SQL, written once for both databases.
//!
//! sqlx binds `$N` parameters by number on PostgreSQL and SQLite alike, so
//! one set of statements serves both; [`impl_registry!`] expands them for a
//! concrete database type. Only the clock expression, the cluster lock and
//! change notifications differ; each dialect module supplies those as
//! inherent methods (`begin_cluster_lock`, `subscribe_changes`).

/// Expand `impl Registry for $ty` over pool type `$db`. `$now` is the SQL
/// expression for the database clock in ms; `$keys_in_json` a sub-select
/// yielding the elements of the JSON array bound as `$1`; `$expire` the
/// statement that ends sessions idle for more than `$1` ms, where `$2` ms is
/// how long after another node's expiry a node's is skipped.
macro_rules! impl_registry {
    ($ty:ty, $db:ty, now = $now:literal, keys_in_json = $keys:literal, expire = $expire:literal) => {
        const NODE_COLUMNS: &str = "id, host, port, ipv4, status, last_seen, load1, load5, load15, cpus, router, version, clock_skew_ms, offline_mode, started_at, pins_recent";

        fn node_from_row(row: &<$db as sqlx::Database>::Row) -> $crate::cluster::registry::Result<NodeRecord> {
            use sqlx::Row;
            let status: String = row.try_get("status")?;
            let ipv4: Option<String> = row.try_get("ipv4")?;
            let port: i32 = row.try_get("port")?;
            let cpus: i32 = row.try_get("cpus")?;
            Ok(NodeRecord {
                id: row.try_get("id")?,
                host: row.try_get("host")?,
                port: u16::try_from(port).map_err(|_| RegistryError::Corrupt(format!("port {port}")))?,
                ipv4: ipv4.and_then(|s| s.parse().ok()),
                status: NodeStatus::parse(&status).ok_or_else(|| RegistryError::Corrupt(format!("status {status:?}")))?,
                last_seen: row.try_get("last_seen")?,
                load: [row.try_get("load1")?, row.try_get("load5")?, row.try_get("load15")?],
                cpus: u32::try_from(cpus).unwrap_or(1).max(1),
                router: row.try_get("router")?,
                version: row.try_get("version")?,
                clock_skew_ms: row.try_get("clock_skew_ms")?,
                offline_mode: row.try_get("offline_mode")?,
                started_at: row.try_get("started_at")?,
                pins_recent: u64::try_from(row.try_get::<i64, _>("pins_recent")?).unwrap_or(0),
            })
        }

        fn session_from_row(row: &<$db as sqlx::Database>::Row) -> $crate::cluster::registry::Result<SessionRecord> {
            use sqlx::Row;
            let kind: String = row.try_get("kind")?;
            Ok(SessionRecord {
                key: row.try_get("key")?,
                node_id: row.try_get("node_id")?,
                user_name: row.try_get("user_name")?,
                kind: SessionKind::parse(&kind).ok_or_else(|| RegistryError::Corrupt(format!("session kind {kind:?}")))?,
                created: row.try_get("created")?,
                last_active: row.try_get("last_active")?,
            })
        }

        #[async_trait::async_trait]
        impl Registry for $ty {
            fn kind(&self) -> &'static str {
                Self::KIND
            }

            async fn now_ms(&self) -> Result<Millis> {
                Ok(sqlx::query_scalar(concat!("SELECT ", $now)).fetch_one(&self.pool).await?)
            }

            #[tracing::instrument(skip(self), fields(registry = Self::KIND))]
            async fn register_node(&self, reg: &NodeRegistration) -> Result<NodeId> {
                Ok(sqlx::query_scalar(concat!(
                    "INSERT INTO sessionlb_nodes (host, port, status, router, version, started_at) ",
                    "VALUES ($1, $2, 'Starting', $3, $4, ", $now, ") ",
                    "ON CONFLICT (host, port) DO UPDATE SET status = 'Starting', router = excluded.router, ",
                    "version = excluded.version, started_at = excluded.started_at RETURNING id"
                ))
                .bind(&reg.host)
                .bind(i32::from(reg.port))
                .bind(reg.router)
                .bind(&reg.version)
                .fetch_one(&self.pool)
                .await?)
            }

            #[tracing::instrument(skip(self), fields(registry = Self::KIND))]
            async fn take_over_node(&self, reg: &NodeRegistration) -> Result<Option<NodeId>> {
                Ok(sqlx::query_scalar(concat!(
                    "UPDATE sessionlb_nodes SET router = $3, version = $4, started_at = ", $now, " ",
                    "WHERE host = $1 AND port = $2 AND status = 'Online' RETURNING id"
                ))
                .bind(&reg.host)
                .bind(i32::from(reg.port))
                .bind(reg.router)
                .bind(&reg.version)
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn set_node_status(&self, id: NodeId, status: NodeStatus) -> Result<()> {
                let done = sqlx::query("UPDATE sessionlb_nodes SET status = $2 WHERE id = $1")
                    .bind(id)
                    .bind(status.as_str())
                    .execute(&self.pool)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(RegistryError::NodeNotFound(id));
                }
                Ok(())
            }

            async fn set_node_ipv4(&self, id: NodeId, ipv4: Option<std::net::IpAddr>) -> Result<()> {
                sqlx::query("UPDATE sessionlb_nodes SET ipv4 = $2 WHERE id = $1")
                    .bind(id)
                    .bind(ipv4.map(|ip| ip.to_string()))
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            #[tracing::instrument(skip(self, fingerprint), fields(registry = Self::KIND))]
            async fn join_cluster(&self, id: NodeId, fingerprint: &str, protocol: &str, freshness: Duration) -> Result<JoinOutcome> {
                use sqlx::Row;
                let mut tx = self.begin_cluster_lock().await?;
                let now: Millis = sqlx::query_scalar(concat!("SELECT ", $now)).fetch_one(&mut *tx).await?;
                let current = sqlx::query("SELECT key_fingerprint, protocol FROM sessionlb_cluster WHERE id = 1")
                    .fetch_optional(&mut *tx)
                    .await?;
                let outcome = match current {
                    None => {
                        sqlx::query("INSERT INTO sessionlb_cluster (id, key_fingerprint, protocol, defined_at, defined_by) VALUES (1, $1, $2, $3, $4)")
                            .bind(fingerprint).bind(protocol).bind(now).bind(id)
                            .execute(&mut *tx).await?;
                        JoinOutcome::Defined
                    }
                    Some(row) => {
                        let fp: String = row.try_get("key_fingerprint")?;
                        let proto: String = row.try_get("protocol")?;
                        // Constant-time: the fingerprint derives from the key.
                        let same_key = subtle::ConstantTimeEq::ct_eq(fp.as_bytes(), fingerprint.as_bytes()).into();
                        if same_key && proto == protocol {
                            JoinOutcome::Joined
                        } else {
                            let live: Vec<String> = sqlx::query_scalar(
                                "SELECT host || ':' || CAST(port AS TEXT) FROM sessionlb_nodes WHERE status = 'Online' AND id <> $1 AND last_seen >= $2 ORDER BY id",
                            )
                            .bind(id)
                            .bind(now - freshness.as_millis() as i64)
                            .fetch_all(&mut *tx)
                            .await?;
                            let reason = if !same_key {
                                "its secure cookie key differs from the cluster's".to_string()
                            } else {
                                format!("its protocol {protocol} differs from the cluster's {proto}")
                            };
                            if live.is_empty() {
                                sqlx::query("UPDATE sessionlb_cluster SET key_fingerprint = $1, protocol = $2, defined_at = $3, defined_by = $4 WHERE id = 1")
                                    .bind(fingerprint).bind(protocol).bind(now).bind(id)
                                    .execute(&mut *tx).await?;
                                JoinOutcome::Redefined { previous_protocol: proto }
                            } else {
                                JoinOutcome::Rejected { live_nodes: live, reason }
                            }
                        }
                    }
                };
                let status = match outcome {
                    JoinOutcome::Rejected { .. } => NodeStatus::InvalidSecureCookieKey,
                    _ => NodeStatus::Online,
                };
                let done = sqlx::query("UPDATE sessionlb_nodes SET status = $2, last_seen = $3 WHERE id = $1")
                    .bind(id).bind(status.as_str()).bind(now)
                    .execute(&mut *tx).await?;
                if done.rows_affected() == 0 {
                    return Err(RegistryError::NodeNotFound(id));
                }
                tx.commit().await?;
                Ok(outcome)
            }

            async fn check_in(&self, id: NodeId, clock_skew_ms: i64) -> Result<()> {
                let done = sqlx::query(concat!("UPDATE sessionlb_nodes SET last_seen = ", $now, ", clock_skew_ms = $2 WHERE id = $1"))
                    .bind(id)
                    .bind(clock_skew_ms)
                    .execute(&self.pool)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(RegistryError::NodeNotFound(id));
                }
                Ok(())
            }

            async fn report_load(&self, id: NodeId, load: [f64; 3], cpus: u32, pins_recent: u64) -> Result<()> {
                let done = sqlx::query("UPDATE sessionlb_nodes SET load1 = $2, load5 = $3, load15 = $4, cpus = $5, pins_recent = $6 WHERE id = $1")
                    .bind(id)
                    .bind(load[0])
                    .bind(load[1])
                    .bind(load[2])
                    .bind(i32::try_from(cpus).unwrap_or(i32::MAX))
                    .bind(i64::try_from(pins_recent).unwrap_or(i64::MAX))
                    .execute(&self.pool)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(RegistryError::NodeNotFound(id));
                }
                Ok(())
            }

            async fn set_offline_mode(&self, id: NodeId, offline: bool) -> Result<()> {
                let done = sqlx::query("UPDATE sessionlb_nodes SET offline_mode = $2 WHERE id = $1")
                    .bind(id)
                    .bind(offline)
                    .execute(&self.pool)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err(RegistryError::NodeNotFound(id));
                }
                Ok(())
            }

            async fn list_nodes(&self) -> Result<Vec<NodeRecord>> {
                let sql = sqlx::AssertSqlSafe(format!("SELECT {NODE_COLUMNS} FROM sessionlb_nodes ORDER BY id"));
                let rows = sqlx::query(sql).fetch_all(&self.pool).await?;
                rows.iter().map(node_from_row).collect()
            }

            async fn get_node(&self, id: NodeId) -> Result<Option<NodeRecord>> {
                let sql = sqlx::AssertSqlSafe(format!("SELECT {NODE_COLUMNS} FROM sessionlb_nodes WHERE id = $1"));
                let row = sqlx::query(sql).bind(id).fetch_optional(&self.pool).await?;
                row.as_ref().map(node_from_row).transpose()
            }

            async fn find_node(&self, host: &str, port: u16) -> Result<Option<NodeRecord>> {
                let sql = sqlx::AssertSqlSafe(format!("SELECT {NODE_COLUMNS} FROM sessionlb_nodes WHERE host = $1 AND port = $2"));
                let row = sqlx::query(sql).bind(host).bind(i32::from(port)).fetch_optional(&self.pool).await?;
                row.as_ref().map(node_from_row).transpose()
            }

            #[tracing::instrument(skip(self), fields(registry = Self::KIND))]
            async fn delete_node(&self, id: NodeId, force: bool) -> Result<DeleteOutcome> {
                let Some(node) = self.get_node(id).await? else {
                    return Ok(DeleteOutcome::NotFound);
                };
                let sessions = self.count_sessions(id).await?;
                if node.status == NodeStatus::Online && sessions > 0 && !force {
                    return Ok(DeleteOutcome::RefusedOnlineWithSessions { sessions });
                }
                // Announce `Deleting` first, so running nodes stop routing there.
                self.set_node_status(id, NodeStatus::Deleting).await?;
                let mut tx = self.pool.begin().await?;
                let released = sqlx::query("UPDATE sessionlb_sessions SET node_id = NULL WHERE node_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                sqlx::query("DELETE FROM sessionlb_nodes WHERE id = $1").bind(id).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(DeleteOutcome::Deleted { sessions_released: released })
            }

            async fn cluster(&self) -> Result<Option<ClusterRecord>> {
                use sqlx::Row;
                let row = sqlx::query("SELECT key_fingerprint, protocol, defined_at, defined_by FROM sessionlb_cluster WHERE id = 1")
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(|r| -> Result<ClusterRecord> {
                    Ok(ClusterRecord {
                        key_fingerprint: r.try_get("key_fingerprint")?,
                        protocol: r.try_get("protocol")?,
                        defined_at: r.try_get("defined_at")?,
                        defined_by: r.try_get("defined_by")?,
                    })
                })
                .transpose()
            }

            async fn reset_cluster(&self) -> Result<bool> {
                let done = sqlx::query("DELETE FROM sessionlb_cluster").execute(&self.pool).await?;
                Ok(done.rows_affected() > 0)
            }

            #[tracing::instrument(skip(self), fields(registry = Self::KIND))]
            async fn place_session(&self, s: &NewSession<'_>) -> Result<SessionRecord> {
                let row = sqlx::query(concat!(
                    "INSERT INTO sessionlb_sessions (key, node_id, user_name, kind, created, last_active) ",
                    "VALUES ($1, $2, $3, $4, ", $now, ", ", $now, ") ",
                    "ON CONFLICT (key) DO UPDATE SET node_id = excluded.node_id, last_active = excluded.last_active, ",
                    "user_name = COALESCE(sessionlb_sessions.user_name, excluded.user_name) ",
                    "WHERE sessionlb_sessions.node_id IS NULL ",
                    "RETURNING key, node_id, user_name, kind, created, last_active"
                ))
                .bind(s.key)
                .bind(s.node_id)
                .bind(s.user_name)
                .bind(s.kind.as_str())
                .fetch_optional(&self.pool)
                .await?;
                match row {
                    Some(row) => session_from_row(&row),
                    // Present and placed: the existing placement wins.
                    None => self.get_session(s.key).await?.ok_or_else(|| RegistryError::SessionNotFound(s.key.to_string())),
                }
            }

            #[tracing::instrument(skip(self), fields(registry = Self::KIND))]
            async fn move_session(&self, key: &str, from: Option<NodeId>, to: NodeId) -> Result<SessionRecord> {
                sqlx::query(concat!(
                    "UPDATE sessionlb_sessions SET node_id = $3, last_active = ", $now,
                    " WHERE key = $1 AND node_id IS NOT DISTINCT FROM $2"
                ))
                .bind(key)
                .bind(from)
                .bind(to)
                .execute(&self.pool)
                .await?;
                self.get_session(key).await?.ok_or_else(|| RegistryError::SessionNotFound(key.to_string()))
            }

            async fn touch_sessions(&self, keys: &[String]) -> Result<u64> {
                if keys.is_empty() {
                    return Ok(0);
                }
                let json = serde_json::to_string(keys).expect("strings serialise");
                let done = sqlx::query(concat!(
                    "UPDATE sessionlb_sessions SET last_active = ", $now, " WHERE key IN ", $keys
                ))
                .bind(json)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected())
            }

            async fn set_session_user(&self, key: &str, user: &str) -> Result<()> {
                sqlx::query("UPDATE sessionlb_sessions SET user_name = $2 WHERE key = $1 AND user_name IS NULL")
                    .bind(key)
                    .bind(user)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn expire_idle_sessions(&self, idle: Duration) -> Result<u64> {
                let gate = $crate::cluster::registry::expiry_period(idle) * 9 / 10;
                let done = sqlx::query($expire)
                    .bind(i64::try_from(idle.as_millis()).unwrap_or(i64::MAX))
                    .bind(i64::try_from(gate.as_millis()).unwrap_or(i64::MAX))
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn delete_session(&self, key: &str) -> Result<bool> {
                let done = sqlx::query("DELETE FROM sessionlb_sessions WHERE key = $1").bind(key).execute(&self.pool).await?;
                Ok(done.rows_affected() > 0)
            }

            async fn get_session(&self, key: &str) -> Result<Option<SessionRecord>> {
                let row = sqlx::query("SELECT key, node_id, user_name, kind, created, last_active FROM sessionlb_sessions WHERE key = $1")
                    .bind(key)
                    .fetch_optional(&self.pool)
                    .await?;
                row.as_ref().map(session_from_row).transpose()
            }

            async fn list_sessions(&self) -> Result<Vec<SessionRecord>> {
                let rows = sqlx::query("SELECT key, node_id, user_name, kind, created, last_active FROM sessionlb_sessions ORDER BY key")
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(session_from_row).collect()
            }

            async fn count_sessions(&self, node: NodeId) -> Result<u64> {
                let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sessionlb_sessions WHERE node_id = $1")
                    .bind(node)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(n as u64)
            }

            async fn subscribe(&self) -> Result<ChangeStream> {
                self.subscribe_changes().await
            }

            async fn close(&self) {
                self.pool.close().await;
            }
        }
    };
}

pub(crate) use impl_registry;

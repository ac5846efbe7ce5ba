//! The registry's data: node statuses, node, cluster and session records,
//! and the change events that keep every node's cache fresh.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

/// A node's row id in the registry.
pub type NodeId = i64;

/// Milliseconds since the Unix epoch (the database's clock unless noted).
pub type Millis = i64;

/// Status of a node as stored in the registry. The text of each is what
/// `list-nodes` prints and what the database holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeStatus {
    Offline,
    Starting,
    Deleting,
    FailedToResolve,
    InvalidSecureCookieKey,
    InvalidPermissionsOnSecureCookieKey,
    MissingSecureCookieKey,
    Online,
}

impl NodeStatus {
    pub const ALL: [NodeStatus; 8] = [
        NodeStatus::Offline,
        NodeStatus::Starting,
        NodeStatus::Deleting,
        NodeStatus::FailedToResolve,
        NodeStatus::InvalidSecureCookieKey,
        NodeStatus::InvalidPermissionsOnSecureCookieKey,
        NodeStatus::MissingSecureCookieKey,
        NodeStatus::Online,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Offline => "Offline",
            NodeStatus::Starting => "Starting",
            NodeStatus::Deleting => "Deleting",
            NodeStatus::FailedToResolve => "Failed to resolve",
            NodeStatus::InvalidSecureCookieKey => "Invalid secure cookie key",
            NodeStatus::InvalidPermissionsOnSecureCookieKey => "Invalid permissions on secure cookie key",
            NodeStatus::MissingSecureCookieKey => "Missing secure cookie key",
            NodeStatus::Online => "Online",
        }
    }

    pub fn parse(s: &str) -> Option<NodeStatus> {
        NodeStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `list-nodes` shows for an Online node that has not checked in for
/// twice the check-in interval.
pub const MISSED_CHECK_IN: &str = "Missed check-in";

/// One node's registry row.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRecord {
    pub id: NodeId,
    pub host: String,
    pub port: u16,
    pub ipv4: Option<IpAddr>,
    pub status: NodeStatus,
    pub last_seen: Option<Millis>,
    /// 1, 5 and 15 minute load averages as the node reported them.
    pub load: [f64; 3],
    pub cpus: u32,
    pub router: bool,
    pub version: String,
    /// The node's clock minus the database's, measured at check-in.
    pub clock_skew_ms: Option<i64>,
    /// Drain: serves its sessions, gets no new ones. Kept across restarts.
    pub offline_mode: bool,
    pub started_at: Option<Millis>,
    /// Anonymous pins the node issued within its recent window, as it last
    /// reported them with its load (an estimate; never a registry row).
    pub pins_recent: u64,
}

#[cfg(test)]
impl NodeRecord {
    /// A node row for tests: id 0, no address, Online, one CPU, nothing
    /// else set; tests override what they need (`..NodeRecord::for_test()`).
    pub(crate) fn for_test() -> NodeRecord {
        NodeRecord {
            id: 0,
            host: String::new(),
            port: 0,
            ipv4: None,
            status: NodeStatus::Online,
            last_seen: None,
            load: [0.0; 3],
            cpus: 1,
            router: false,
            version: String::new(),
            clock_skew_ms: None,
            offline_mode: false,
            started_at: None,
            pins_recent: 0,
        }
    }
}

impl NodeRecord {
    /// `host:port`, the address peers use.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Where the node is reached: its resolved IPv4, else its host if that
    /// is an IP address.
    pub fn socket_addr(&self) -> Option<std::net::SocketAddr> {
        let ip = self.ipv4.or_else(|| self.host.parse().ok())?;
        Some(std::net::SocketAddr::new(ip, self.port))
    }

    /// Online and checked in within `2 × checkin_interval` of `now`.
    pub fn is_fresh(&self, now: Millis, checkin_interval: Duration) -> bool {
        self.status == NodeStatus::Online
            && self.last_seen.is_some_and(|seen| now - seen <= 2 * checkin_interval.as_millis() as i64)
    }

    /// The status to display: `Missed check-in` for a stale Online node.
    pub fn display_status(&self, now: Millis, checkin_interval: Duration) -> &'static str {
        if self.status == NodeStatus::Online && !self.is_fresh(now, checkin_interval) {
            MISSED_CHECK_IN
        } else {
            self.status.as_str()
        }
    }

    /// Load average (1-minute) divided by CPU count.
    pub fn load_per_cpu(&self) -> f64 {
        self.load[0] / f64::from(self.cpus.max(1))
    }
}

/// Inter-node protocol recorded in the cluster record.
pub const PROTOCOLS: &[&str] = &["http", "https", "https-no-verify"];

/// How `list-nodes` prints a protocol (Workbench style).
pub fn protocol_display(protocol: &str) -> &str {
    match protocol {
        "http" => "Http",
        "https" => "Https",
        "https-no-verify" => "Https no verify",
        other => other,
    }
}

/// The cluster record written by the first node to come online.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterRecord {
    /// SHA-256-based fingerprint of the secure cookie key (never the key).
    pub key_fingerprint: String,
    pub protocol: String,
    pub defined_at: Millis,
    pub defined_by: Option<NodeId>,
}

/// What a session key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionKind {
    /// Minted by the IDE server, found in URLs by the session path pattern.
    Backend,
    /// A verified user bound to a node (key `user:<name>`).
    User,
    /// A version-1 affinity cookie (`aff:<id>`), from before anonymous
    /// browsers were pinned instead; routed until the cookie expires, never created.
    Affinity,
}

impl SessionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionKind::Backend => "backend",
            SessionKind::User => "user",
            SessionKind::Affinity => "affinity",
        }
    }

    pub fn parse(s: &str) -> Option<SessionKind> {
        match s {
            "backend" => Some(SessionKind::Backend),
            "user" => Some(SessionKind::User),
            "affinity" => Some(SessionKind::Affinity),
            _ => None,
        }
    }
}

/// Prefix of user session keys; `:` never occurs in backend keys.
pub const USER_KEY_PREFIX: &str = "user:";

/// The registry key of `user`'s session.
pub fn user_session_key(user: &str) -> String {
    format!("{USER_KEY_PREFIX}{user}")
}

/// A session: one key bound to one node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SessionRecord {
    pub key: String,
    /// `None` once its node was deleted: re-placed on its next request.
    pub node_id: Option<NodeId>,
    pub user_name: Option<String>,
    pub kind: SessionKind,
    pub created: Millis,
    pub last_active: Millis,
}

/// A registry change, as announced to every node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ChangeEvent {
    /// The cluster record changed (defined, redefined, reset).
    Cluster,
    /// A node row was inserted, updated or deleted.
    Node { id: NodeId },
    /// A session was added, moved, or its user changed.
    Session(SessionRecord),
    /// A session ended.
    SessionDelete { key: String },
    /// Sessions added, moved or given a user by one statement (PostgreSQL
    /// announces a statement that changes several rows in batches).
    Sessions { s: Vec<SessionRecord> },
    /// Sessions ended by one statement.
    SessionDeletes { keys: Vec<String> },
    /// Notifications may have been lost (connection lost, log pruned):
    /// reload everything.
    #[serde(skip)]
    Resync,
}

impl ChangeEvent {
    /// Parse a notification payload; unknown payloads ask for a resync.
    pub fn from_payload(payload: &str) -> ChangeEvent {
        serde_json::from_str(payload).unwrap_or_else(|e| {
            tracing::warn!(payload, error = %e, "unrecognised registry notification; reloading the registry");
            ChangeEvent::Resync
        })
    }
}

/// The database time (ms) at which the change a notification announces was
/// made, when the payload carries it (`at`).
pub fn payload_time(payload: &str) -> Option<Millis> {
    #[derive(Deserialize)]
    struct At {
        at: Option<Millis>,
    }
    serde_json::from_str::<At>(payload).ok()?.at
}

/// What a starting node tells the registry about itself.
#[derive(Debug, Clone)]
pub struct NodeRegistration {
    pub host: String,
    pub port: u16,
    pub router: bool,
    pub version: String,
}

/// Result of the cluster check at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinOutcome {
    /// No cluster record existed: this node wrote it.
    Defined,
    /// Key and protocol match the record.
    Joined,
    /// They differ, but no other node is online and fresh: this node
    /// rewrote the record.
    Redefined { previous_protocol: String },
    /// They differ and other nodes are live: refused (`Invalid secure cookie key`).
    Rejected { live_nodes: Vec<String>, reason: String },
}

/// Result of `delete-node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// Removed; this many sessions lost their node and will be re-placed.
    Deleted {
        sessions_released: u64,
    },
    /// Refused: the node is online and has sessions (use force).
    RefusedOnlineWithSessions {
        sessions: u64,
    },
    NotFound,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_through_their_text() {
        for st in NodeStatus::ALL {
            assert_eq!(NodeStatus::parse(st.as_str()), Some(st));
        }
        assert_eq!(NodeStatus::parse("online"), None);
    }

    #[test]
    fn missed_check_in_after_twice_the_interval() {
        let mut n = NodeRecord {
            id: 1,
            host: "a".into(),
            port: 1,
            status: NodeStatus::Online,
            last_seen: Some(1_000_000),
            ..NodeRecord::for_test()
        };
        let interval = Duration::from_secs(300);
        assert_eq!(n.display_status(1_000_000 + 600_000, interval), "Online");
        assert_eq!(n.display_status(1_000_000 + 600_001, interval), MISSED_CHECK_IN);
        n.status = NodeStatus::Offline;
        assert_eq!(n.display_status(1_000_000 + 900_000, interval), "Offline");
    }

    #[test]
    fn notification_payloads_parse() {
        assert_eq!(ChangeEvent::from_payload(r#"{"t":"node","id":7}"#), ChangeEvent::Node { id: 7 });
        assert_eq!(ChangeEvent::from_payload(r#"{"t":"cluster"}"#), ChangeEvent::Cluster);
        let ev = ChangeEvent::from_payload(
            r#"{"t":"session","key":"k","node_id":null,"user_name":"ann","kind":"backend","created":1,"last_active":2}"#,
        );
        assert!(matches!(ev, ChangeEvent::Session(SessionRecord { node_id: None, .. })));
        assert_eq!(ChangeEvent::from_payload("garbage"), ChangeEvent::Resync);
        // A statement that changed several rows (migration 0006), as PostgreSQL formats it.
        let ev = ChangeEvent::from_payload(
            r#"{"t":"sessions","at":5,"s":[{"key" : "a", "node_id" : 1, "user_name" : null, "kind" : "affinity", "created" : 1, "last_active" : 1},{"key" : "b", "node_id" : 2, "user_name" : "bo", "kind" : "user", "created" : 1, "last_active" : 2}]}"#,
        );
        let ChangeEvent::Sessions { s } = ev else { panic!("{ev:?}") };
        assert_eq!((s[0].key.as_str(), s[1].node_id, s[1].user_name.as_deref()), ("a", Some(2), Some("bo")));
        assert_eq!(
            ChangeEvent::from_payload(r#"{"t":"session_deletes","at":5,"keys":["a","b"]}"#),
            ChangeEvent::SessionDeletes { keys: vec!["a".into(), "b".into()] }
        );
        assert_eq!(
            ChangeEvent::from_payload(r#"{"t":"session_delete","at":5,"key":"a"}"#),
            ChangeEvent::SessionDelete { key: "a".into() }
        );
        // Payloads carry the time of the change; older ones do not.
        assert_eq!(ChangeEvent::from_payload(r#"{"t":"cluster","at":1700000000123}"#), ChangeEvent::Cluster);
        assert_eq!(ChangeEvent::from_payload(r#"{"t":"node","id":7,"at":5}"#), ChangeEvent::Node { id: 7 });
        assert_eq!(payload_time(r#"{"t":"node","id":7,"at":1700000000123}"#), Some(1_700_000_000_123));
        assert_eq!(payload_time(r#"{"t":"node","id":7}"#), None);
    }
}

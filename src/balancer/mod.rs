//! Placement of new sessions: one [`Balancer`] trait, one balancer per file.
//!
//! A balancer chooses from a snapshot of candidate nodes handed to it; it
//! touches no database and no HTTP, so each is testable as a function of its
//! input. Candidates are already filtered to the *eligible* nodes (Online,
//! reachable, not in offline mode, not routers) and sorted by id.
//!
//! Two questions, two methods:
//! - [`Balancer::choose`] places a registry session (a verified user, or a
//!   session whose node failed), under the cross-node lock; ties break
//!   deterministically (lowest id), so every node would choose alike.
//! - [`Balancer::choose_now`] answers from memory at once, without a plug-in
//!   process: for an anonymous browser's pin (`user` is `None`, `key` is the
//!   pin id) it counts the pins this node issued recently on top of the
//!   sessions and breaks ties with a hash of the pin id, so that anonymous
//!   browsers spread over equal nodes even where no request ever carries an
//!   identity; for a verified user while the registry cannot be reached it
//!   makes the choice [`Balancer::choose`] would make (`custom`: `sessions`'s).
//!
//! | `balancer=` | type | file |
//! |---|---|---|
//! | `sessions` (default) | [`SessionsBalancer`] | `sessions.rs` |
//! | `system-load` | [`SystemLoadBalancer`] | `system_load.rs` |
//! | `user-hash` | [`UserHashBalancer`] | `user_hash.rs` |
//! | `custom` | [`CustomBalancer`] | `custom.rs` (protocol: `plugins/README.md`) |
//!
//! [`build`] turns the configuration into the balancer to use.

use std::hash::Hasher;
use std::sync::Arc;

use async_trait::async_trait;

use crate::cluster::NodeId;
use crate::config::{BalancerConfig, BalancerKind};

pub mod custom;
pub mod sessions;
pub mod system_load;
pub mod user_hash;

pub use custom::{CustomBalancer, PluginError};
pub use sessions::SessionsBalancer;
pub use system_load::SystemLoadBalancer;
pub use user_hash::{HashKey, UserHashBalancer};

/// A node a new session may be placed on.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The node's registry id.
    pub id: NodeId,
    /// `host:port`, as peers and `RSTUDIO_NODES` name it.
    pub address: Arc<str>,
    /// Active sessions on the node, cluster-wide (from the registry).
    pub sessions: usize,
    /// Anonymous pins to the node issued recently by the node asking (a
    /// node-local estimate, see `cluster::pins`); only anonymous pins count it.
    pub recent_pins: usize,
    /// 1, 5 and 15 minute load averages as the node reported them.
    pub load: [f64; 3],
    /// CPUs of the node as it reported them (0 is taken as 1).
    pub cpus: u32,
}

/// What is being placed.
#[derive(Debug, Clone, Copy)]
pub struct PlacementRequest<'a> {
    /// The session key being placed (for an anonymous pin: the pin id).
    pub key: &'a str,
    /// The user, when known.
    pub user: Option<&'a str>,
    /// Eligible nodes, sorted by id; never empty when a balancer is called.
    pub candidates: &'a [Candidate],
}

/// A balancer's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The chosen node, one of the candidates.
    pub node: NodeId,
    /// Set when the balancer could not do its own job and fell back (e.g.
    /// the custom plug-in timed out), saying why; counted and logged by the caller.
    pub fallback: Option<String>,
}

/// Chooses a node for a new session.
#[async_trait]
pub trait Balancer: Send + Sync {
    /// The `balancer=` name.
    fn name(&self) -> &'static str;

    /// Choose one of `req.candidates`. Returns `None` only when there are no candidates.
    async fn choose(&self, req: &PlacementRequest<'_>) -> Option<Choice>;

    /// Choose one of `req.candidates` from memory, at once (no process, no
    /// I/O; see the module doc). Returns `None` only when there are no candidates.
    fn choose_now(&self, req: &PlacementRequest<'_>) -> Option<NodeId>;
}

/// Sessions plus recent pins: the anonymous load of a candidate.
pub fn anonymous_load(c: &Candidate) -> usize {
    c.sessions.saturating_add(c.recent_pins)
}

/// Tie-breaking scores for an anonymous pin: a fixed, fast hash of the pin
/// id, hashed once, mixed with each node id (SplitMix64's finaliser), so
/// that equal candidates are chosen evenly (pin ids are random). Not for
/// anything that must agree across builds.
#[derive(Debug, Clone, Copy)]
pub struct Spread(u64);

impl Spread {
    /// The scores of `key` (a pin id).
    pub fn of(key: &str) -> Spread {
        let mut h = std::hash::DefaultHasher::new();
        h.write(key.as_bytes());
        Spread(h.finish())
    }

    /// Node `node`'s score.
    pub fn score(self, node: NodeId) -> u64 {
        let mut z = self.0 ^ (node as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
/// The balancer `config` selects (`balancer=`), with its settings: the
/// custom plug-in's command, timeout and cap, the user-hash balance factor.
/// Cheap; build a new one when the configuration changes.
pub fn build(config: &BalancerConfig) -> Arc<dyn Balancer> {
    match config.kind {
        BalancerKind::Sessions => Arc::new(SessionsBalancer),
        BalancerKind::SystemLoad => Arc::new(SystemLoadBalancer),
        BalancerKind::UserHash => Arc::new(UserHashBalancer::new(config.user_hash_balance_factor)),
        BalancerKind::Custom => Arc::new(CustomBalancer::new(
            config.custom_command.clone(),
            config.custom_timeout,
            config.custom_max_running,
        )),
    }
}

#[cfg(test)]
mod test_support {
    use super::*;

    /// Node `id` at `10.0.0.<10+id>:8787` with `sessions` sessions, load 0.5
    /// on 4 CPUs.
    pub fn candidate(id: NodeId, sessions: usize) -> Candidate {
        Candidate {
            id,
            address: format!("10.0.0.{}:8787", 10 + id).into(),
            sessions,
            recent_pins: 0,
            load: [0.5, 0.5, 0.5],
            cpus: 4,
        }
    }

    /// What `balancer` pins for anonymous pin ids `pin-0`, `pin-1`, …:
    /// how many pins each candidate got, counting each pin as it goes (as
    /// the node's own estimate does).
    pub fn pin_many(balancer: &dyn Balancer, candidates: &[Candidate], pins: usize) -> Vec<usize> {
        let mut nodes = candidates.to_vec();
        let mut got = vec![0; nodes.len()];
        for i in 0..pins {
            let key = format!("pin-{i}");
            let req = PlacementRequest { key: &key, user: None, candidates: &nodes };
            let id = balancer.choose_now(&req).expect("a choice");
            let at = nodes.iter().position(|c| c.id == id).unwrap();
            nodes[at].recent_pins += 1;
            got[at] += 1;
        }
        got
    }

    /// What `balancer` chooses for an anonymous session among `candidates`,
    /// which it must not report as a fallback.
    pub async fn choose_node(balancer: &dyn Balancer, candidates: &[Candidate]) -> NodeId {
        let req = PlacementRequest { key: "session", user: None, candidates };
        let choice = balancer.choose(&req).await.expect("a choice");
        assert_eq!(choice.fallback, None);
        choice.node
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;

    #[test]
    fn build_maps_every_kind_to_its_balancer() {
        for (name, kind) in BalancerKind::CHOICES {
            let config = BalancerConfig {
                kind: *kind,
                custom_command: PathBuf::from("/bin/false"),
                custom_timeout: Duration::from_secs(2),
                custom_max_running: 8,
                user_hash_balance_factor: 1.25,
            };
            assert_eq!(build(&config).name(), *name);
        }
    }
}

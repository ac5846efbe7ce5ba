//! The `user-hash` balancer: consistent hashing of the user name (of the
//! session key for a session without a user) with bounded load. An anonymous
//! browser's pin hashes its random pin id with a fast hash instead (nothing
//! else needs to agree on it), bounded on sessions plus recent pins.
//!
//! Hashing is rendezvous (highest random weight): every candidate gets a
//! score `SHA-256(domain, key, node address)` truncated to 64 bits, and the
//! candidates are ranked by score. Keying on the node's `host:port` rather
//! than its registry id keeps assignments stable across registry resets and
//! node restarts; SHA-256 makes the ranking identical on every node and
//! every build. Removing a node moves only the keys ranked first on it;
//! adding one moves only the keys that now rank it first (about 1/(N+1)).
//!
//! Bounded load (after HAProxy's and Envoy's `hash-balance-factor`): walk
//! the ranking and take the first candidate for which
//! `sessions + 1 <= ceil(factor × (total_sessions + 1) / n)`, so that no
//! node goes above about `factor` times the mean. With `factor >= 1` some
//! candidate always qualifies (the least-loaded one); were none to, the
//! top-ranked candidate is taken.

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::{Balancer, Candidate, Choice, NodeId, PlacementRequest, Spread, anonymous_load};

/// Separates this hash from any other use of SHA-256; changing it moves every user.
const HASH_DOMAIN: &[u8] = b"sessionlb/user-hash/v1";

/// What a placement is hashed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKey<'a> {
    /// A known user: all of a user's sessions rank the nodes alike.
    User(&'a str),
    /// An anonymous session, hashed on its session key.
    Session(&'a str),
}

impl<'a> HashKey<'a> {
    /// The user when known, else the session key.
    pub fn of(req: &PlacementRequest<'a>) -> HashKey<'a> {
        match req.user {
            Some(user) => HashKey::User(user),
            None => HashKey::Session(req.key),
        }
    }

    /// The hasher state after the domain and this key; a node's score
    /// continues from a clone of it.
    fn hasher(self) -> Sha256 {
        let (tag, text) = match self {
            HashKey::User(user) => (b'u', user),
            HashKey::Session(key) => (b's', key),
        };
        let mut hasher = Sha256::new();
        hasher.update(HASH_DOMAIN);
        hasher.update([tag]);
        hasher.update((text.len() as u64).to_be_bytes());
        hasher.update(text.as_bytes());
        hasher
    }
}

/// The rendezvous score of `address` for `key`: the first 8 bytes, big
/// endian, of `SHA-256(domain ‖ tag ‖ len(key) ‖ key ‖ len(address) ‖ address)`
/// (tag `u` for a user, `s` for a session key; lengths as 8-byte big endian).
/// A fixed function: the same on every node, build and platform.
pub fn score(key: HashKey<'_>, address: &str) -> u64 {
    score_from(key.hasher(), address)
}

fn score_from(mut hasher: Sha256, address: &str) -> u64 {
    hasher.update((address.len() as u64).to_be_bytes());
    hasher.update(address.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The most sessions a node may have after taking one more:
/// `ceil(factor × (total_sessions + 1) / n)`, with `n >= 1`.
pub fn session_bound(total_sessions: usize, candidates: usize, factor: f64) -> usize {
    let exact = factor * (total_sessions as f64 + 1.0) / candidates.max(1) as f64;
    // Forgive rounding error in `factor` (1.1 × 10 = 11.000000000000002).
    (exact - exact * 1e-12).ceil() as usize
}

/// Consistent hashing of the user with bounded load (see the module doc).
/// Ties cannot occur in practice (64-bit scores); were two scores equal, the
/// lower address, then the lower id, ranks first.
#[derive(Debug, Clone, Copy)]
pub struct UserHashBalancer {
    balance_factor: f64,
}

impl UserHashBalancer {
    /// A balancer keeping every node at or below about `balance_factor` × the
    /// mean session count. A factor below 1 or not finite is taken as 1.
    pub fn new(balance_factor: f64) -> UserHashBalancer {
        let balance_factor = if balance_factor.is_finite() && balance_factor >= 1.0 { balance_factor } else { 1.0 };
        UserHashBalancer { balance_factor }
    }

    /// The factor in use.
    pub fn balance_factor(&self) -> f64 {
        self.balance_factor
    }

    /// The candidates in rendezvous order for `key`, best first; loads play no part.
    pub fn ranking<'c>(key: HashKey<'_>, candidates: &'c [Candidate]) -> Vec<&'c Candidate> {
        let base = key.hasher();
        let mut scored: Vec<(u64, &Candidate)> =
            candidates.iter().map(|c| (score_from(base.clone(), &c.address), c)).collect();
        scored.sort_by(|(sa, a), (sb, b)| sb.cmp(sa).then_with(|| a.address.cmp(&b.address)).then(a.id.cmp(&b.id)));
        scored.into_iter().map(|(_, c)| c).collect()
    }

    /// The first candidate in `key`'s ranking that stays within the bound
    /// after taking one more session, else the top-ranked one; `None` only
    /// when `candidates` is empty.
    pub fn pick<'c>(&self, key: HashKey<'_>, candidates: &'c [Candidate]) -> Option<&'c Candidate> {
        let total = candidates.iter().fold(0usize, |sum, c| sum.saturating_add(c.sessions));
        let bound = session_bound(total, candidates.len(), self.balance_factor);
        let ranking = Self::ranking(key, candidates);
        ranking.iter().find(|c| c.sessions.saturating_add(1) <= bound).or(ranking.first()).copied()
    }

    /// For an anonymous pin `pin_id`: candidates ranked by the [`Spread`]
    /// score of the pin id, the first within the bound on sessions plus recent pins.
    pub fn pick_anonymous<'c>(&self, pin_id: &str, candidates: &'c [Candidate]) -> Option<&'c Candidate> {
        let total = candidates.iter().fold(0usize, |sum, c| sum.saturating_add(anonymous_load(c)));
        let bound = session_bound(total, candidates.len(), self.balance_factor);
        let spread = Spread::of(pin_id);
        let mut best: Option<(u64, &Candidate)> = None;
        let mut top: Option<(u64, &Candidate)> = None;
        for c in candidates {
            let score = spread.score(c.id);
            if top.is_none_or(|(s, _)| score > s) {
                top = Some((score, c));
            }
            if anonymous_load(c).saturating_add(1) <= bound && best.is_none_or(|(s, _)| score > s) {
                best = Some((score, c));
            }
        }
        best.or(top).map(|(_, c)| c)
    }
}

#[async_trait]
impl Balancer for UserHashBalancer {
    fn name(&self) -> &'static str {
        "user-hash"
    }

    async fn choose(&self, req: &PlacementRequest<'_>) -> Option<Choice> {
        self.pick(HashKey::of(req), req.candidates).map(|c| Choice { node: c.id, fallback: None })
    }

    fn choose_now(&self, req: &PlacementRequest<'_>) -> Option<NodeId> {
        match req.user {
            Some(user) => self.pick(HashKey::User(user), req.candidates),
            None => self.pick_anonymous(req.key, req.candidates),
        }
        .map(|c| c.id)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::balancer::test_support::candidate;
    use crate::cluster::NodeId;

    const FACTOR: f64 = 1.25;

    fn users(count: usize) -> Vec<String> {
        (0..count).map(|i| format!("user{i:04}")).collect()
    }

    /// `n` nodes with ids 1..=n, addresses 10.0.0.11:8787…, `sessions` each.
    fn nodes(n: usize, sessions: usize) -> Vec<Candidate> {
        (1..=n as NodeId).map(|id| candidate(id, sessions)).collect()
    }

    /// Where each user goes, every choice made against the same loads.
    fn assign_fixed(balancer: &UserHashBalancer, users: &[String], nodes: &[Candidate]) -> HashMap<String, String> {
        users
            .iter()
            .map(|u| {
                let c = balancer.pick(HashKey::User(u), nodes).unwrap();
                (u.clone(), c.address.to_string())
            })
            .collect()
    }

    /// Places `users` one after another, counting each placement; returns
    /// user → address, and leaves the counts in `nodes`.
    fn place_sequentially(
        balancer: &UserHashBalancer,
        users: &[String],
        nodes: &mut [Candidate],
    ) -> Vec<(String, String)> {
        users
            .iter()
            .map(|u| {
                let id = balancer.pick(HashKey::User(u), nodes).unwrap().id;
                let node = nodes.iter_mut().find(|c| c.id == id).unwrap();
                node.sessions += 1;
                (u.clone(), node.address.to_string())
            })
            .collect()
    }

    fn max_over_mean(nodes: &[Candidate]) -> f64 {
        let total: usize = nodes.iter().map(|c| c.sessions).sum();
        let max = nodes.iter().map(|c| c.sessions).max().unwrap();
        max as f64 / (total as f64 / nodes.len() as f64)
    }

    #[test]
    fn scores_are_a_fixed_function_of_key_and_address() {
        // Known answers: a change here moves every user of every cluster.
        assert_eq!(score(HashKey::User("ann"), "10.0.0.11:8787"), KNOWN_ANN_10_0_0_11);
        assert_eq!(score(HashKey::Session("ann"), "10.0.0.11:8787"), KNOWN_SESSION_ANN_10_0_0_11);
        assert_ne!(score(HashKey::User("ann"), "10.0.0.11:8787"), score(HashKey::User("ann"), "10.0.0.12:8787"));
    }
    // Computed independently with Python's hashlib.
    const KNOWN_ANN_10_0_0_11: u64 = 7_387_884_607_505_631_038;
    const KNOWN_SESSION_ANN_10_0_0_11: u64 = 13_961_469_519_822_432_785;

    #[test]
    fn bound_formula() {
        assert_eq!(session_bound(0, 3, 1.25), 1);
        assert_eq!(session_bound(299, 3, 1.25), 125);
        assert_eq!(session_bound(300, 3, 1.25), 126);
        assert_eq!(session_bound(9, 1, 1.1), 11);
        assert_eq!(session_bound(5, 0, 1.0), 6);
        assert_eq!(UserHashBalancer::new(0.5).balance_factor(), 1.0);
        assert_eq!(UserHashBalancer::new(f64::NAN).balance_factor(), 1.0);
    }

    #[test]
    fn same_user_same_node_set_same_node_even_after_renumbering() {
        let balancer = UserHashBalancer::new(FACTOR);
        let users = users(300);
        let first = place_sequentially(&balancer, &users, &mut nodes(3, 0));
        let again = place_sequentially(&balancer, &users, &mut nodes(3, 0));
        assert_eq!(first, again);

        // A registry reset gives the same nodes new ids (and so a new order).
        let mut renumbered = nodes(3, 0);
        for (c, new_id) in renumbered.iter_mut().zip([30, 20, 10]) {
            c.id = new_id;
        }
        renumbered.sort_by_key(|c| c.id);
        let after_reset = place_sequentially(&balancer, &users, &mut renumbered);
        assert_eq!(first, after_reset);
    }

    #[test]
    fn anonymous_sessions_hash_on_the_key_users_on_the_name() {
        let balancer = UserHashBalancer::new(FACTOR);
        let nodes = nodes(3, 10);
        let key_choices: Vec<NodeId> = (0..60)
            .map(|i| {
                let key = format!("session{i}");
                let first = balancer.pick(HashKey::Session(&key), &nodes).unwrap().id;
                let again = balancer.pick(HashKey::Session(&key), &nodes).unwrap().id;
                assert_eq!(first, again);
                first
            })
            .collect();
        for id in 1..=3 {
            assert!(key_choices.contains(&id), "no anonymous session on node {id}");
        }
        // A user's sessions, whatever their keys, rank the nodes alike.
        let by_user: Vec<NodeId> = (0..60)
            .map(|i| {
                let key = format!("session{i}");
                let req = PlacementRequest { key: &key, user: Some("ann"), candidates: &nodes };
                balancer.pick(HashKey::of(&req), &nodes).unwrap().id
            })
            .collect();
        assert!(by_user.iter().all(|id| *id == by_user[0]));
    }

    #[test]
    fn a_full_top_node_passes_the_session_to_the_next_in_rank() {
        let balancer = UserHashBalancer::new(FACTOR);
        let mut nodes = nodes(3, 10);
        let ranking: Vec<NodeId> =
            UserHashBalancer::ranking(HashKey::User("ann"), &nodes).iter().map(|c| c.id).collect();
        assert_eq!(balancer.pick(HashKey::User("ann"), &nodes).unwrap().id, ranking[0]);
        // total 20 + 21 = 41 → bound ceil(1.25 × 42 / 3) = 18: the top node,
        // with 21, may take no more; the second, with 10, may.
        nodes.iter_mut().find(|c| c.id == ranking[0]).unwrap().sessions = 21;
        assert_eq!(balancer.pick(HashKey::User("ann"), &nodes).unwrap().id, ranking[1]);
        // With no bound to speak of, the top node keeps it.
        let loose = UserHashBalancer::new(100.0);
        assert_eq!(loose.pick(HashKey::User("ann"), &nodes).unwrap().id, ranking[0]);
    }

    #[test]
    fn removing_a_node_moves_only_its_users() {
        let balancer = UserHashBalancer::new(FACTOR);
        let users = users(3000);
        for n in 2..=5 {
            // Equal loads: every node within bounds.
            let all = nodes(n, 100);
            let before = assign_fixed(&balancer, &users, &all);
            for removed in &all {
                let rest: Vec<Candidate> = all.iter().filter(|c| c.id != removed.id).cloned().collect();
                let after = assign_fixed(&balancer, &users, &rest);
                let mut moved = 0;
                for u in &users {
                    if before[u] == *removed.address {
                        moved += 1;
                    } else {
                        assert_eq!(before[u], after[u], "{u} moved off a surviving node");
                    }
                }
                let share = moved as f64 / users.len() as f64;
                println!("remove 1 of {n}: {:.1}% of users moved", share * 100.0);
                assert!(share > 0.7 / n as f64 && share < 1.3 / n as f64, "removing 1 of {n} moved {share}");
            }
        }
    }

    #[test]
    fn adding_a_node_moves_about_its_share_all_to_it() {
        let balancer = UserHashBalancer::new(FACTOR);
        let users = users(3000);
        for n in 2..=5 {
            let before_nodes = nodes(n, 100);
            let after_nodes = nodes(n + 1, 100);
            let added = after_nodes[n].address.to_string();
            let before = assign_fixed(&balancer, &users, &before_nodes);
            let after = assign_fixed(&balancer, &users, &after_nodes);
            let moved: Vec<&String> = users.iter().filter(|u| before[*u] != after[*u]).collect();
            assert!(moved.iter().all(|u| after[*u] == added));
            let share = moved.len() as f64 / users.len() as f64;
            println!("add 1 to {n}: {:.1}% of users moved", share * 100.0);
            let expected = 1.0 / (n + 1) as f64;
            assert!(share > 0.7 * expected && share < 1.3 * expected, "adding to {n} moved {share}");
        }
    }

    #[test]
    fn three_hundred_users_on_three_nodes_stay_within_the_bound() {
        let balancer = UserHashBalancer::new(FACTOR);
        let mut three = nodes(3, 0);
        let placed = place_sequentially(&balancer, &users(300), &mut three);
        let counts: Vec<usize> = three.iter().map(|c| c.sessions).collect();
        println!("300 users on 3 nodes: {counts:?}");
        assert!(counts.iter().all(|&c| c <= 125), "{counts:?}");

        // On repeat, a user's next session goes where their first went,
        // except for the few the bound pushed down their ranking while the
        // cluster was nearly empty (the first 3 placements, with a bound of
        // 1, must all go to different nodes).
        let displaced = placed
            .iter()
            .filter(|(user, address)| *balancer.pick(HashKey::User(user), &three).unwrap().address != **address)
            .count();
        println!("300 users on 3 nodes: next session elsewhere for {displaced} users");
        assert!(displaced <= 10, "{displaced}");

        // Node 3 leaves: its users are placed again on nodes 1 and 2, which
        // keep their sessions.
        let mut survivors: Vec<Candidate> = three[..2].to_vec();
        let orphans: Vec<String> =
            placed.iter().filter(|(_, a)| **a == *three[2].address).map(|(u, _)| u.clone()).collect();
        place_sequentially(&balancer, &orphans, &mut survivors);
        println!(
            "remove 1 of 3 after 300 users: {} moved ({:.1}%), max/mean {:.3}",
            orphans.len(),
            orphans.len() as f64 / 3.0,
            max_over_mean(&survivors)
        );
        assert!(orphans.len() <= 120);

        // The same 300 users placed from scratch on the two survivors: the
        // bound may move a few users of the survivors too; count them.
        let fresh = place_sequentially(&balancer, &users(300), &mut nodes(2, 0));
        let moved_total = placed.iter().zip(&fresh).filter(|(a, b)| a.1 != b.1).count();
        let moved_survivors =
            placed.iter().zip(&fresh).filter(|(a, b)| *a.1 != *three[2].address && a.1 != b.1).count();
        println!(
            "300 users placed from scratch on 2 of the 3 nodes: {moved_total} moved, \
             {moved_survivors} of them from a surviving node"
        );
        assert!(moved_total <= 120, "{moved_total}");
    }

    #[test]
    fn one_user_with_many_sessions_is_spread_by_the_bound() {
        let one_user = vec!["ann".to_string(); 300];
        let mut bounded = nodes(3, 0);
        place_sequentially(&UserHashBalancer::new(FACTOR), &one_user, &mut bounded);
        let counts: Vec<usize> = bounded.iter().map(|c| c.sessions).collect();
        assert!(counts.iter().all(|&c| c <= 125), "{counts:?}");
        // Without the bound, every session lands on one node.
        let mut unbounded = nodes(3, 0);
        place_sequentially(&UserHashBalancer::new(1000.0), &one_user, &mut unbounded);
        assert!(unbounded.iter().any(|c| c.sessions == 300));
    }

    #[test]
    fn a_preloaded_node_takes_no_more_than_its_bound() {
        let balancer = UserHashBalancer::new(FACTOR);
        let mut three = nodes(3, 0);
        three[0].sessions = 200;
        place_sequentially(&balancer, &users(300), &mut three);
        // 500 sessions in all: the bound at the last placement is
        // ceil(1.25 × 500 / 3) = 209; without it node 1 would reach ~300.
        assert!(three[0].sessions <= 209, "{:?}", three[0]);
        assert!(max_over_mean(&three) <= FACTOR + 0.01);
    }

    #[test]
    fn spread_over_two_to_five_nodes() {
        let balancer = UserHashBalancer::new(FACTOR);
        let users = users(3000);
        for n in 2..=5 {
            // Hashing alone (loads equal, not updated).
            let assigned = assign_fixed(&balancer, &users, &nodes(n, 100));
            let mean = users.len() as f64 / n as f64;
            let shares: Vec<f64> = nodes(n, 0)
                .iter()
                .map(|c| assigned.values().filter(|a| ***a == *c.address).count() as f64 / mean)
                .collect();
            // Placed one after another with the bound.
            let mut counted = nodes(n, 0);
            place_sequentially(&balancer, &users, &mut counted);
            let bounded: Vec<f64> = counted.iter().map(|c| c.sessions as f64 / mean).collect();
            println!("{n} nodes, share/mean: hash only {shares:.3?}, bounded {bounded:.3?}");
            assert!(shares.iter().all(|s| (0.85..1.15).contains(s)), "{shares:?}");
            assert!(bounded.iter().all(|s| (0.85..=FACTOR).contains(s)), "{bounded:?}");
        }
    }

    #[test]
    fn anonymous_pins_hash_the_pin_id_within_the_bound() {
        let balancer = UserHashBalancer::new(FACTOR);
        // No identity anywhere: every node starts empty, pins spread.
        let got = crate::balancer::test_support::pin_many(&balancer, &nodes(3, 0), 300);
        assert!(got.iter().all(|n| (80..=125).contains(n)), "{got:?}");
        // One pin id always ranks the nodes alike.
        let nodes = nodes(3, 0);
        let req = PlacementRequest { key: "pin-x", user: None, candidates: &nodes };
        assert_eq!(balancer.choose_now(&req), balancer.choose_now(&req));
        // A verified user gets what a placement would give.
        let req = PlacementRequest { key: "user:ann", user: Some("ann"), candidates: &nodes };
        assert_eq!(balancer.choose_now(&req), Some(balancer.pick(HashKey::User("ann"), &nodes).unwrap().id));
    }
}

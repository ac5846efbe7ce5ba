//! The `sessions` balancer (the default): the candidate with the fewest
//! active sessions, counted cluster-wide from the registry (not per-proxy
//! connections) — users' sessions and backend keys, as Workbench counts R
//! sessions. Also the fallback of the `custom` balancer.

use async_trait::async_trait;

use super::{Balancer, Candidate, Choice, NodeId, PlacementRequest, Spread, anonymous_load};

/// Chooses the candidate with the fewest active sessions; ties go to the
/// lowest node id. An anonymous pin counts recent pins too, and its ties go
/// by a hash of the pin id.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionsBalancer;

impl SessionsBalancer {
    /// The candidate with the fewest sessions, lowest id among equals;
    /// `None` only when `candidates` is empty. Does not rely on the order of
    /// `candidates`.
    pub fn pick(candidates: &[Candidate]) -> Option<&Candidate> {
        candidates.iter().min_by_key(|c| (c.sessions, c.id))
    }

    /// For an anonymous pin `pin_id`: the fewest sessions plus recent pins;
    /// among equals, the highest [`Spread`] score of the pin id.
    pub fn pick_anonymous<'c>(pin_id: &str, candidates: &'c [Candidate]) -> Option<&'c Candidate> {
        let spread = Spread::of(pin_id);
        candidates.iter().min_by_key(|c| (anonymous_load(c), std::cmp::Reverse(spread.score(c.id))))
    }

    /// [`Balancer::choose_now`] of this balancer (also the `custom` balancer's).
    pub fn pick_now(req: &PlacementRequest<'_>) -> Option<NodeId> {
        match req.user {
            Some(_) => Self::pick(req.candidates),
            None => Self::pick_anonymous(req.key, req.candidates),
        }
        .map(|c| c.id)
    }
}

#[async_trait]
impl Balancer for SessionsBalancer {
    fn name(&self) -> &'static str {
        "sessions"
    }

    async fn choose(&self, req: &PlacementRequest<'_>) -> Option<Choice> {
        Self::pick(req.candidates).map(|c| Choice { node: c.id, fallback: None })
    }

    fn choose_now(&self, req: &PlacementRequest<'_>) -> Option<NodeId> {
        Self::pick_now(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::test_support::{candidate, choose_node, pin_many};

    #[tokio::test]
    async fn fewest_sessions_wins() {
        let nodes = [candidate(1, 4), candidate(2, 0), candidate(3, 2)];
        assert_eq!(choose_node(&SessionsBalancer, &nodes).await, 2);
    }

    #[tokio::test]
    async fn ties_go_to_the_lowest_id_whatever_the_order() {
        let nodes = [candidate(7, 1), candidate(3, 1), candidate(5, 1)];
        assert_eq!(choose_node(&SessionsBalancer, &nodes).await, 3);
        let nodes = [candidate(2, 5), candidate(9, 0), candidate(4, 0)];
        assert_eq!(choose_node(&SessionsBalancer, &nodes).await, 4);
    }

    #[tokio::test]
    async fn load_does_not_matter() {
        let mut busy = candidate(1, 0);
        busy.load = [50.0, 50.0, 50.0];
        let idle = candidate(2, 1);
        assert_eq!(choose_node(&SessionsBalancer, &[busy, idle]).await, 1);
    }

    #[tokio::test]
    async fn filling_4_0_2_with_6_placements_leaves_4_4_4() {
        let mut nodes = vec![candidate(1, 4), candidate(2, 0), candidate(3, 2)];
        for _ in 0..6 {
            let id = choose_node(&SessionsBalancer, &nodes).await;
            nodes.iter_mut().find(|c| c.id == id).unwrap().sessions += 1;
        }
        let counts: Vec<usize> = nodes.iter().map(|c| c.sessions).collect();
        assert_eq!(counts, [4, 4, 4]);
    }

    #[tokio::test]
    async fn no_candidates_no_choice() {
        let req = PlacementRequest { key: "k", user: None, candidates: &[] };
        assert_eq!(SessionsBalancer.choose(&req).await, None);
        assert_eq!(SessionsBalancer.choose_now(&req), None);
    }

    #[test]
    fn anonymous_pins_fill_the_emptiest_node_then_spread() {
        // Node 2 has 6 fewer sessions: it takes the first 6 pins, then all three share.
        let nodes = [candidate(1, 6), candidate(2, 0), candidate(3, 6)];
        let got = pin_many(&SessionsBalancer, &nodes, 6);
        assert_eq!(got, [0, 6, 0]);
        let got = pin_many(&SessionsBalancer, &nodes, 6 + 300);
        assert_eq!(got, [100, 106, 100]);
    }

    #[test]
    fn equal_nodes_are_chosen_by_the_pin_id_not_the_lowest_id() {
        let nodes = [candidate(1, 0), candidate(2, 0), candidate(3, 0)];
        let mut first_choice = [0; 3];
        for i in 0..300 {
            let key = format!("pin-{i}");
            let id = SessionsBalancer.choose_now(&PlacementRequest { key: &key, user: None, candidates: &nodes });
            first_choice[id.unwrap() as usize - 1] += 1;
        }
        assert!(first_choice.iter().all(|n| *n >= 70), "equal nodes share fresh pins: {first_choice:?}");
    }

    #[tokio::test]
    async fn a_user_is_chosen_now_as_a_placement_would_choose() {
        let mut nodes = [candidate(1, 2), candidate(2, 1), candidate(3, 1)];
        nodes[2].recent_pins = 100;
        for user in ["ann", "bob"] {
            let req = PlacementRequest { key: "user:x", user: Some(user), candidates: &nodes };
            assert_eq!(SessionsBalancer.choose_now(&req), Some(SessionsBalancer.choose(&req).await.unwrap().node));
            assert_eq!(SessionsBalancer.choose_now(&req), Some(2));
        }
    }
}

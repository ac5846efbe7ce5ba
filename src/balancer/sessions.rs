//! The `sessions` balancer (the default): the candidate with the fewest
//! active sessions, counted cluster-wide from the registry (not per-proxy
//! connections). Also the fallback of the `custom` balancer.

use async_trait::async_trait;

use super::{Balancer, Candidate, Choice, PlacementRequest};

/// Chooses the candidate with the fewest active sessions; ties go to the
/// lowest node id.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionsBalancer;

impl SessionsBalancer {
    /// The candidate with the fewest sessions, lowest id among equals;
    /// `None` only when `candidates` is empty. Does not rely on the order of
    /// `candidates`.
    pub fn pick(candidates: &[Candidate]) -> Option<&Candidate> {
        candidates.iter().min_by_key(|c| (c.sessions, c.id))
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::test_support::{candidate, choose_node};

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
    }
}

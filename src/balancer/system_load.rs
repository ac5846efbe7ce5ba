//! The `system-load` balancer: the candidate with the lowest 5-minute load
//! average per CPU, as each node reports it (Workbench's documented metric).

use std::cmp::Ordering;

use async_trait::async_trait;

use super::{Balancer, Candidate, Choice, NodeId, PlacementRequest, Spread, anonymous_load};

/// Chooses the candidate with the lowest `load[1] / max(cpus, 1)`; ties go
/// to fewer sessions, then the lowest node id (for an anonymous pin: fewer
/// sessions plus recent pins, then a hash of the pin id). A load that is not
/// a finite, non-negative number counts as the worst possible.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemLoadBalancer;

impl SystemLoadBalancer {
    /// The 5-minute load average divided by the CPU count (at least 1);
    /// `f64::INFINITY` when the reported load is NaN, infinite or negative.
    pub fn load_per_cpu(candidate: &Candidate) -> f64 {
        let load = candidate.load[1];
        if load.is_finite() && load >= 0.0 { load / f64::from(candidate.cpus.max(1)) } else { f64::INFINITY }
    }

    /// The least-loaded candidate (see the type's doc for the order); `None`
    /// only when `candidates` is empty.
    pub fn pick(candidates: &[Candidate]) -> Option<&Candidate> {
        candidates.iter().min_by(|a, b| Self::order(a, b))
    }

    fn order(a: &Candidate, b: &Candidate) -> Ordering {
        Self::load_per_cpu(a).total_cmp(&Self::load_per_cpu(b)).then(a.sessions.cmp(&b.sessions)).then(a.id.cmp(&b.id))
    }

    /// For an anonymous pin `pin_id` (see the type's doc).
    pub fn pick_anonymous<'c>(pin_id: &str, candidates: &'c [Candidate]) -> Option<&'c Candidate> {
        let spread = Spread::of(pin_id);
        candidates.iter().min_by(|a, b| {
            Self::load_per_cpu(a)
                .total_cmp(&Self::load_per_cpu(b))
                .then(anonymous_load(a).cmp(&anonymous_load(b)))
                .then(spread.score(b.id).cmp(&spread.score(a.id)))
        })
    }
}

#[async_trait]
impl Balancer for SystemLoadBalancer {
    fn name(&self) -> &'static str {
        "system-load"
    }

    async fn choose(&self, req: &PlacementRequest<'_>) -> Option<Choice> {
        Self::pick(req.candidates).map(|c| Choice { node: c.id, fallback: None })
    }

    fn choose_now(&self, req: &PlacementRequest<'_>) -> Option<NodeId> {
        match req.user {
            Some(_) => Self::pick(req.candidates),
            None => Self::pick_anonymous(req.key, req.candidates),
        }
        .map(|c| c.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::test_support::{candidate, choose_node, pin_many};

    fn loaded(id: i64, sessions: usize, load5: f64, cpus: u32) -> Candidate {
        Candidate { load: [9.0, load5, 0.0], cpus, ..candidate(id, sessions) }
    }

    #[tokio::test]
    async fn lowest_five_minute_load_per_cpu_wins() {
        // Node 1 has the lowest absolute load but the fewest CPUs; node 3
        // has the lowest 1-minute load (field 0 is ignored).
        let mut nodes = [loaded(1, 0, 1.0, 1), loaded(2, 5, 3.0, 8), loaded(3, 0, 2.0, 2)];
        nodes[2].load[0] = 0.0;
        assert_eq!(choose_node(&SystemLoadBalancer, &nodes).await, 2);
    }

    #[tokio::test]
    async fn follows_a_change_in_load() {
        let mut nodes = [loaded(1, 0, 0.5, 4), loaded(2, 0, 1.5, 4)];
        assert_eq!(choose_node(&SystemLoadBalancer, &nodes).await, 1);
        nodes[0].load[1] = 3.0;
        assert_eq!(choose_node(&SystemLoadBalancer, &nodes).await, 2);
    }

    #[tokio::test]
    async fn ties_go_to_fewer_sessions_then_lowest_id() {
        let nodes = [loaded(1, 3, 1.0, 2), loaded(2, 1, 2.0, 4), loaded(3, 1, 0.5, 1)];
        assert_eq!(choose_node(&SystemLoadBalancer, &nodes).await, 2);
        let nodes = [loaded(9, 2, 1.0, 2), loaded(4, 2, 0.5, 1)];
        assert_eq!(choose_node(&SystemLoadBalancer, &nodes).await, 4);
    }

    #[tokio::test]
    async fn zero_cpus_count_as_one() {
        let nodes = [loaded(1, 0, 1.0, 0), loaded(2, 0, 1.5, 1)];
        assert_eq!(SystemLoadBalancer::load_per_cpu(&nodes[0]), 1.0);
        assert_eq!(choose_node(&SystemLoadBalancer, &nodes).await, 1);
    }

    #[tokio::test]
    async fn non_finite_or_negative_load_counts_as_worst() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0] {
            let nodes = [loaded(1, 0, bad, 4), loaded(2, 9, 100.0, 1)];
            assert_eq!(choose_node(&SystemLoadBalancer, &nodes).await, 2, "{bad}");
        }
        // Among only bad reports, fewer sessions still decide.
        let nodes = [loaded(1, 3, f64::NAN, 4), loaded(2, 1, f64::INFINITY, 4)];
        assert_eq!(choose_node(&SystemLoadBalancer, &nodes).await, 2);
    }

    #[test]
    fn anonymous_pins_go_to_the_least_loaded_and_spread_among_equals() {
        let nodes = [loaded(1, 0, 2.0, 4), loaded(2, 0, 0.5, 4), loaded(3, 0, 0.5, 4)];
        let got = pin_many(&SystemLoadBalancer, &nodes, 200);
        assert_eq!(got[0], 0, "the loaded node gets no pins: {got:?}");
        assert_eq!(got[1], 100, "{got:?}");
        assert_eq!(got[2], 100, "{got:?}");
    }
}

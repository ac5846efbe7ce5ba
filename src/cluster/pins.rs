//! Anonymous pins this node issued recently, per target node: a node-local
//! estimate of anonymous load, kept in memory only.
//!
//! An anonymous browser gets a signed pin cookie instead of a registry
//! session, so nothing cluster-wide counts it. The balancers add this estimate
//! to a node's session count when they pin anonymous browsers (so that pins
//! spread instead of piling onto the node with the fewest sessions), and the
//! node reports its total with its load report (`list-nodes`) and on the
//! status page. Counts cover the last [`PIN_WINDOW`], in [`SLOTS`] slots:
//! a pin stops counting between `PIN_WINDOW - PIN_WINDOW / SLOTS` and
//! `PIN_WINDOW` after it was issued. Memory: one small array per node ever
//! pinned to, dropped once its count has decayed to zero.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::model::NodeId;

/// How long a pin counts as recent.
pub const PIN_WINDOW: Duration = Duration::from_secs(300);
/// Slots of the window (a pin expires with its slot).
pub const SLOTS: usize = 30;

const SLOT_MS: u128 = PIN_WINDOW.as_millis() / SLOTS as u128;

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    slots: [u32; SLOTS],
    sum: u64,
}

#[derive(Debug, Default)]
struct Window {
    /// The slot number (ms since `epoch` / slot length) counts were last added to.
    current: u64,
    per_target: HashMap<NodeId, Counts>,
    total: Counts,
}

impl Window {
    /// Forget the slots that left the window by `slot`.
    fn advance(&mut self, slot: u64) {
        if slot <= self.current {
            return;
        }
        let steps = (slot - self.current).min(SLOTS as u64);
        for k in 1..=steps {
            let i = ((self.current + k) % SLOTS as u64) as usize;
            for c in self.per_target.values_mut().chain(std::iter::once(&mut self.total)) {
                c.sum -= u64::from(c.slots[i]);
                c.slots[i] = 0;
            }
        }
        self.per_target.retain(|_, c| c.sum > 0);
        self.current = slot;
    }
}

/// Pins issued by this node within [`PIN_WINDOW`], per target node.
#[derive(Debug)]
pub struct RecentPins {
    epoch: Instant,
    window: Mutex<Window>,
}

impl Default for RecentPins {
    fn default() -> Self {
        RecentPins::new()
    }
}

impl RecentPins {
    pub fn new() -> RecentPins {
        RecentPins { epoch: Instant::now(), window: Mutex::new(Window::default()) }
    }

    fn slot(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.epoch).as_millis() / SLOT_MS) as u64
    }

    /// Count one pin to `target`, issued at `now`; returns the new total.
    pub fn record(&self, target: NodeId, now: Instant) -> u64 {
        let mut w = self.window.lock();
        // Callers race with slightly different clocks: an earlier `now`
        // counts in the current slot.
        let slot = self.slot(now).max(w.current);
        let i = (slot % SLOTS as u64) as usize;
        w.advance(slot);
        let c = w.per_target.entry(target).or_default();
        c.slots[i] = c.slots[i].saturating_add(1);
        c.sum += 1;
        w.total.slots[i] = w.total.slots[i].saturating_add(1);
        w.total.sum += 1;
        w.total.sum
    }

    /// Pins to `target` within the window.
    pub fn to(&self, target: NodeId, now: Instant) -> u64 {
        let mut w = self.window.lock();
        w.advance(self.slot(now));
        w.per_target.get(&target).map_or(0, |c| c.sum)
    }

    /// Pins per target node within the window (nodes with none are absent).
    pub fn per_target(&self, now: Instant) -> HashMap<NodeId, u64> {
        let mut w = self.window.lock();
        w.advance(self.slot(now));
        w.per_target.iter().map(|(id, c)| (*id, c.sum)).collect()
    }

    /// Calls `f` with the count of every target (under the lock: keep it short).
    pub fn each(&self, now: Instant, mut f: impl FnMut(NodeId, u64)) {
        let mut w = self.window.lock();
        w.advance(self.slot(now));
        for (id, c) in &w.per_target {
            f(*id, c.sum);
        }
    }

    /// All pins this node issued within the window.
    pub fn total(&self, now: Instant) -> u64 {
        let mut w = self.window.lock();
        w.advance(self.slot(now));
        w.total.sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLOT: Duration = Duration::from_millis(SLOT_MS as u64);

    #[test]
    fn counts_per_target_and_in_total() {
        let p = RecentPins::new();
        let t0 = p.epoch;
        assert_eq!(p.record(1, t0), 1);
        assert_eq!(p.record(2, t0), 2);
        assert_eq!(p.record(1, t0 + SLOT), 3);
        assert_eq!(p.to(1, t0 + SLOT), 2);
        assert_eq!(p.to(2, t0 + SLOT), 1);
        assert_eq!(p.to(3, t0 + SLOT), 0);
        assert_eq!(p.per_target(t0 + SLOT), HashMap::from([(1, 2), (2, 1)]));
    }

    #[test]
    fn pins_leave_the_window_with_their_slot() {
        let p = RecentPins::new();
        let t0 = p.epoch;
        p.record(1, t0);
        p.record(1, t0 + SLOT * 10);
        // Still inside the window just before the first slot comes round again.
        assert_eq!(p.to(1, t0 + PIN_WINDOW - Duration::from_millis(1)), 2);
        assert_eq!(p.to(1, t0 + PIN_WINDOW), 1, "the first pin's slot was reused");
        assert_eq!(p.total(t0 + PIN_WINDOW + SLOT * 10), 0);
        assert!(p.per_target(t0 + PIN_WINDOW + SLOT * 10).is_empty(), "decayed targets are dropped");
        // A long pause clears everything at once.
        p.record(2, t0 + PIN_WINDOW * 3);
        assert_eq!(p.total(t0 + PIN_WINDOW * 100), 0);
    }

    #[test]
    fn time_going_backwards_counts_in_the_current_slot() {
        let p = RecentPins::new();
        let t0 = p.epoch;
        p.record(1, t0 + SLOT * 5);
        p.record(1, t0);
        assert_eq!(p.to(1, t0 + SLOT * 5), 2);
    }
}

//! The registry breakers: after a registry call failed (or, for optional
//! calls, was too slow), requests skip such calls for [`BREAKER_OPEN`]
//! instead of each waiting out a database outage.
//!
//! A node has two: one for optional calls (backend-key lookups and
//! registrations, see `backend_keys`), one for placements, opened only by a
//! placement that failed or timed out. While the placement breaker is open a
//! verified user who must be placed is pinned from memory (`degraded`) and a
//! session whose node failed is routed without recording the move.
//!
//! Times are milliseconds of a monotonic clock ([`mono_ms`]): a step of the
//! wall clock neither holds a breaker open nor keeps a miss fresh.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::METRICS;

/// How long calls are skipped after one failed (or, optional ones, was too slow).
pub const BREAKER_OPEN: Duration = Duration::from_secs(2);

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Milliseconds since this process first asked, on a monotonic clock (≥ 1).
pub fn mono_ms() -> i64 {
    EPOCH.elapsed().as_millis() as i64 + 1
}

/// Open for [`BREAKER_OPEN`] after a failure; callers try again once it has
/// passed (there is no half-open state: the first answers close it again).
#[derive(Debug)]
pub struct RegistryBreaker {
    /// What the breaker guards, for the log.
    calls: &'static str,
    open_until_ms: AtomicI64,
    last_trip_ms: AtomicI64,
}

impl RegistryBreaker {
    pub fn new(calls: &'static str) -> RegistryBreaker {
        RegistryBreaker { calls, open_until_ms: AtomicI64::new(0), last_trip_ms: AtomicI64::new(0) }
    }

    pub fn is_open(&self, now_ms: i64) -> bool {
        now_ms < self.open_until_ms.load(Ordering::Relaxed)
    }

    /// Record a failure noticed at `now_ms`: skip these calls for [`BREAKER_OPEN`].
    /// A trip never shortens a later one.
    pub fn trip(&self, now_ms: i64) {
        let until = now_ms + BREAKER_OPEN.as_millis() as i64;
        self.last_trip_ms.fetch_max(now_ms, Ordering::Relaxed);
        if self.open_until_ms.fetch_max(until, Ordering::Relaxed) <= now_ms {
            METRICS.registry_breaker_trips.inc();
            tracing::warn!(
                calls = self.calls,
                open_for_ms = BREAKER_OPEN.as_millis() as u64,
                "registry unavailable: these calls are skipped for a while (known sessions keep routing)"
            );
        }
    }

    /// Record a success of a call started at `started_ms`: it closes the
    /// breaker unless a failure was noticed after that call began.
    pub fn succeeded(&self, started_ms: i64) {
        if self.last_trip_ms.load(Ordering::Relaxed) < started_ms {
            self.open_until_ms.fetch_min(started_ms, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: i64 = BREAKER_OPEN.as_millis() as i64;

    #[test]
    fn breaker_opens_on_failure_for_its_interval_and_closes_on_success() {
        let b = RegistryBreaker::new("test");
        assert!(!b.is_open(1_000));
        b.trip(1_000);
        assert!(b.is_open(1_000));
        assert!(b.is_open(1_000 + OPEN - 1));
        assert!(!b.is_open(1_000 + OPEN));
        b.trip(5_000);
        b.succeeded(5_001);
        assert!(!b.is_open(5_002));
    }

    #[test]
    fn a_late_report_never_shortens_or_clears_a_newer_trip() {
        let b = RegistryBreaker::new("test");
        b.trip(10_000);
        // A failure of a call that began earlier, noticed now: no shorter.
        b.trip(9_000);
        assert!(b.is_open(10_000 + OPEN - 1));
        // A success of a call that began before the trip does not close it.
        b.succeeded(9_500);
        assert!(b.is_open(10_001));
        // One that began after it does.
        b.succeeded(10_500);
        assert!(!b.is_open(10_501));
    }

    #[test]
    fn the_clock_is_monotonic_and_positive() {
        let a = mono_ms();
        let b = mono_ms();
        assert!(a >= 1 && b >= a);
    }
}

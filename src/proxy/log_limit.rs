//! Rate-limited logging of what unauthenticated clients can cause (forged
//! node-to-node headers, refused status requests): at most one line per
//! interval, saying how many were left out since the last one, so a client
//! cannot flood the log. Every occurrence is still counted in a metric by
//! the caller.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How often a rate-limited line may be written.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// One kind of rate-limited line.
pub struct LogLimit {
    interval: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl LogLimit {
    pub const fn new(interval: Duration) -> LogLimit {
        LogLimit { interval, last: Mutex::new(None), suppressed: AtomicU64::new(0) }
    }

    /// Whether to log this occurrence now: `Some(n)` with the number of
    /// occurrences left out since the last line, or `None` (left out).
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut last = self.last.lock();
        match *last {
            Some(at) if now.saturating_duration_since(at) < self.interval => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_left_out() {
        let limit = LogLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limit.allow(t0), Some(0));
        for i in 1..=1000 {
            assert_eq!(limit.allow(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(limit.allow(t0 + Duration::from_secs(10)), Some(1000));
        assert_eq!(limit.allow(t0 + Duration::from_secs(11)), None);
        assert_eq!(limit.allow(t0 + Duration::from_secs(25)), Some(1));
    }
}

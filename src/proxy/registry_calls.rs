//! The registry calls a request may wait for: looking up a backend key this
//! node has not heard of, registering a key its backend answered, and placing
//! a session; and the breakers that keep a database outage from stalling
//! every request.
//!
//! Lookups and registrations are optional for routing (an unknown key follows
//! the affinity key or the user's session), so neither may stall a request
//! for long:
//! - a request waits at most [`REQUEST_PATH_WAIT`] (or `timeout`, if
//!   shorter); a registration still running then finishes in the background;
//! - after such a call failed or was too slow, its [`RegistryBreaker`] opens
//!   for [`BREAKER_OPEN`]: requests skip those calls instead of each waiting
//!   out a database outage;
//! - a key looked up and not found is remembered for [`MISS_TTL`] so a client
//!   polling a dead or made-up key costs one lookup per interval, not one per
//!   request. A key registered meanwhile reaches the view by notification,
//!   which is consulted first.
//!
//! Placements have their own breaker, opened only by a placement that failed
//! (not by a slow optional call): while it is open, new sessions get 503 at
//! once and failed-over sessions are routed without recording the move.
//!
//! Times are milliseconds of a monotonic clock ([`mono_ms`]): a step of the
//! wall clock neither holds a breaker open nor keeps a miss fresh.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::Router;
use super::routing::control_timeout;
use crate::cluster::view::SessionEntry;
use crate::cluster::{NewSession, RegistryError, SessionKind};
use crate::metrics::METRICS;

/// The longest a request waits for an optional registry call.
pub const REQUEST_PATH_WAIT: Duration = Duration::from_millis(500);
/// How long calls are skipped after one failed (or, optional ones, was too slow).
pub const BREAKER_OPEN: Duration = Duration::from_secs(2);
/// How long a key found absent is not looked up again.
pub const MISS_TTL: Duration = Duration::from_secs(1);
/// Remembered misses at most (the table is cleared when full).
const MISS_CAPACITY: usize = 10_000;

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

/// Backend keys recently looked up and not found.
#[derive(Debug, Default)]
pub struct MissCache {
    seen: Mutex<HashMap<Box<str>, i64>>,
}

impl MissCache {
    /// Whether `key` was found absent less than [`MISS_TTL`] ago.
    pub fn recently_missed(&self, key: &str, now_ms: i64) -> bool {
        self.seen.lock().get(key).is_some_and(|at| now_ms - at < MISS_TTL.as_millis() as i64)
    }

    pub fn record(&self, key: &str, now_ms: i64) {
        let mut seen = self.seen.lock();
        if seen.len() >= MISS_CAPACITY {
            let ttl = MISS_TTL.as_millis() as i64;
            seen.retain(|_, at| now_ms - *at < ttl);
            if seen.len() >= MISS_CAPACITY {
                seen.clear();
            }
        }
        seen.insert(key.into(), now_ms);
    }

    pub fn forget(&self, key: &str) {
        self.seen.lock().remove(key);
    }
}

fn wait_limit(r: &Router) -> Duration {
    control_timeout(r).min(REQUEST_PATH_WAIT)
}

/// Look up a key this node's view does not know (yet). `None` when it is not
/// registered, or when the registry cannot tell quickly.
pub async fn lookup(r: &Router, key: &str) -> Option<Arc<SessionEntry>> {
    let started = mono_ms();
    if r.optional_calls.is_open(started) || r.key_misses.recently_missed(key, started) {
        return None;
    }
    let registry = r.registry.clone();
    let owned = key.to_string();
    let task = r.control.spawn(async move { registry.get_session(&owned).await });
    match tokio::time::timeout(wait_limit(r), task).await {
        Ok(Ok(Ok(Some(rec)))) => {
            r.optional_calls.succeeded(started);
            // A notification may have brought it meanwhile: keep that entry.
            r.view.session(&rec.key).or_else(|| {
                r.view.upsert_session(rec.clone());
                r.view.session(&rec.key)
            })
        }
        Ok(Ok(Ok(None))) => {
            r.optional_calls.succeeded(started);
            r.key_misses.record(key, mono_ms());
            None
        }
        outcome => {
            tracing::debug!(key, slow = outcome.is_err(), "registry lookup failed or too slow; routing by affinity");
            r.optional_calls.trip(mono_ms());
            None
        }
    }
}

/// Register a backend key on this node (its backend answered it below 400).
/// Skipped while optional calls are failing: a later answer registers it.
pub async fn register_backend_key(r: &Router, key: &str, user: Option<String>) {
    let started = mono_ms();
    if r.optional_calls.is_open(started) {
        tracing::debug!(key, "registry unavailable: backend key not registered yet");
        return;
    }
    let registry = r.registry.clone();
    let view = r.view.clone();
    let me = r.self_id;
    let owned = key.to_string();
    let task = r.control.spawn(async move {
        let rec = registry
            .place_session(&NewSession {
                key: &owned,
                node_id: me,
                user_name: user.as_deref(),
                kind: SessionKind::Backend,
            })
            .await?;
        view.upsert_session(rec.clone());
        Ok::<_, RegistryError>(rec)
    });
    r.key_misses.forget(key);
    match tokio::time::timeout(wait_limit(r), task).await {
        Ok(Ok(Ok(rec))) if rec.node_id == Some(me) => {
            r.optional_calls.succeeded(started);
            METRICS.backend_keys_registered.inc();
            tracing::debug!(key, "backend key registered on this node");
        }
        Ok(Ok(Ok(rec))) => {
            r.optional_calls.succeeded(started);
            tracing::warn!(key, node = ?rec.node_id, "backend key is already registered on another node")
        }
        Err(_) => {
            // Still running on the control runtime; it completes (or fails) there.
            r.optional_calls.trip(mono_ms());
            tracing::warn!(key, "registering a backend key is slow; the response is not held for it")
        }
        Ok(_) => {
            r.optional_calls.trip(mono_ms());
            tracing::warn!(
                key,
                "could not register a backend key (registry unavailable); it follows affinity meanwhile"
            )
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

    #[test]
    fn misses_expire_and_are_forgotten_on_registration() {
        let m = MissCache::default();
        assert!(!m.recently_missed("k", 0));
        m.record("k", 10_000);
        assert!(m.recently_missed("k", 10_000 + MISS_TTL.as_millis() as i64 - 1));
        assert!(!m.recently_missed("k", 10_000 + MISS_TTL.as_millis() as i64));
        assert!(!m.recently_missed("other", 10_000));
        m.record("k", 20_000);
        m.forget("k");
        assert!(!m.recently_missed("k", 20_000));
    }

    #[test]
    fn a_full_miss_table_keeps_only_fresh_entries() {
        let m = MissCache::default();
        for i in 0..MISS_CAPACITY {
            m.record(&format!("old-{i}"), 0);
        }
        let later = MISS_TTL.as_millis() as i64 * 5;
        m.record("fresh", later);
        assert!(m.recently_missed("fresh", later));
        assert!(!m.recently_missed("old-1", later));
        assert_eq!(m.seen.lock().len(), 1);
    }
}

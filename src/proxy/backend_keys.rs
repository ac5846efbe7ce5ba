//! Backend keys a request may wait for the registry about: looking up a key
//! this node has not heard of, and registering a key its local backend
//! answered with a 2xx status or 101 (redirects to a sign-in page and errors
//! register nothing).
//!
//! Both are optional for routing (an unknown key follows the user's session
//! or the browser's pin), so neither may stall a request for long:
//! - a request waits at most [`REQUEST_PATH_WAIT`] (or `timeout`, if
//!   shorter); a registration still running then finishes in the background;
//! - after such a call failed or was too slow, the optional-calls breaker
//!   (`breaker`) opens: requests skip these calls instead of each waiting
//!   out a database outage;
//! - a key looked up and not found is remembered for [`MISS_TTL`] so a client
//!   polling a dead or made-up key costs one lookup per interval, not one per
//!   request (at most [`MISS_CAPACITY`] remembered). A key registered
//!   meanwhile reaches the view by notification, which is consulted first;
//! - at most [`MAX_LOOKUPS_IN_FLIGHT`] lookups wait at once; a request past
//!   that routes without one, so a flood of made-up keys cannot queue
//!   unbounded work on the registry.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::Router;
use super::breaker::mono_ms;
use crate::cluster::view::SessionEntry;
use crate::cluster::{NewSession, RegistryError, SessionKind};
use crate::metrics::METRICS;

/// The longest a request waits for an optional registry call.
pub const REQUEST_PATH_WAIT: Duration = Duration::from_millis(500);
/// How long a key found absent is not looked up again.
pub const MISS_TTL: Duration = Duration::from_secs(1);
/// Remembered misses at most (the table is cleared when full).
pub const MISS_CAPACITY: usize = 10_000;
/// Lookups waiting for the registry at once, at most.
pub const MAX_LOOKUPS_IN_FLIGHT: usize = 64;

/// Whether a local backend's answer registers the backend key it was for.
pub fn registers(status: u16) -> bool {
    status == 101 || (200..300).contains(&status)
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

/// Lookups waiting for the registry now.
#[derive(Debug, Default)]
pub struct LookupsInFlight(AtomicUsize);

/// One waiting lookup; leaving frees its place.
struct LookupSlot<'a>(&'a AtomicUsize);

impl LookupsInFlight {
    fn enter(&self) -> Option<LookupSlot<'_>> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_LOOKUPS_IN_FLIGHT).then_some(n + 1))
            .ok()
            .map(|_| LookupSlot(&self.0))
    }
}

impl Drop for LookupSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn wait_limit(r: &Router) -> Duration {
    r.control_timeout().min(REQUEST_PATH_WAIT)
}

/// Look up a key this node's view does not know (yet). `None` when it is not
/// registered, or when the registry cannot tell quickly.
pub async fn lookup(r: &Router, key: &str) -> Option<Arc<SessionEntry>> {
    let started = mono_ms();
    if r.optional_calls.is_open(started) || r.key_misses.recently_missed(key, started) {
        return None;
    }
    let Some(_slot) = r.lookups.enter() else {
        tracing::debug!(key, "too many backend-key lookups waiting; routing without one");
        return None;
    };
    let registry = r.registry.clone();
    let owned = key.to_string();
    let task = r.control.spawn(async move { registry.get_session(&owned).await });
    match tokio::time::timeout(wait_limit(r), task).await {
        Ok(Ok(Ok(Some(rec)))) => {
            r.optional_calls.succeeded(started);
            // A notification may have brought it meanwhile: keep that entry.
            Some(r.view.session(&rec.key).unwrap_or_else(|| r.view.upsert_session(rec)))
        }
        Ok(Ok(Ok(None))) => {
            r.optional_calls.succeeded(started);
            r.key_misses.record(key, mono_ms());
            None
        }
        outcome => {
            tracing::debug!(key, slow = outcome.is_err(), "registry lookup failed or too slow; routing without it");
            r.optional_calls.trip(mono_ms());
            None
        }
    }
}

/// Register a backend key on this node (its backend answered it with a 2xx
/// status or 101). Skipped while optional calls are failing: a later answer
/// registers it.
pub async fn register(r: &Router, key: &str, user: Option<String>) {
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
                "could not register a backend key (registry unavailable); it follows the user or the pin meanwhile"
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_success_and_upgrades_register() {
        for status in [101, 200, 204, 299] {
            assert!(registers(status), "{status}");
        }
        for status in [100, 199, 301, 302, 304, 401, 404, 500, 503] {
            assert!(!registers(status), "{status}");
        }
    }

    #[test]
    fn lookups_in_flight_are_bounded_and_freed() {
        let l = LookupsInFlight::default();
        let slots: Vec<_> = (0..MAX_LOOKUPS_IN_FLIGHT).map(|_| l.enter().expect("room")).collect();
        assert!(l.enter().is_none(), "one past the bound");
        drop(slots);
        assert!(l.enter().is_some());
        assert_eq!(l.0.load(Ordering::Relaxed), 0, "the slot taken just now was freed");
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

//! sessionlb's affinity cookie: `v1.<id>.<issued>.<mac>`.
//!
//! `id` is a random 128-bit value (base64url), `issued` the issue time in
//! Unix seconds, and `mac` an HMAC-SHA256 with the secure cookie key over a
//! domain label, the version, id and issue time (base64url). It carries no
//! address: the registry maps the id to a node. A cookie that is malformed,
//! forged, or older than the maximum age is rejected (and counted by the
//! caller) — never trusted. MACs are compared in constant time.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::Mac;
use parking_lot::RwLock;

use crate::config::key::SecureKey;

/// Prefix of affinity keys in the registry; `:` never occurs in backend keys.
pub const AFFINITY_PREFIX: &str = "aff:";
/// Accepted clock difference for issue times in the future.
const FUTURE_SKEW_SECS: u64 = 300;

/// Why a cookie was rejected (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Malformed,
    BadMac,
    Expired,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::BadMac => "bad_mac",
            Rejection::Expired => "expired",
        }
    }
}

/// A verified affinity cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Affinity {
    /// The 128-bit id, base64url.
    pub id: String,
    /// Unix seconds.
    pub issued: u64,
    /// `aff:<id>`, the registry key (kept to avoid rebuilding it per request).
    key: String,
}

impl Affinity {
    pub fn new(id: String, issued: u64) -> Affinity {
        let key = format!("{AFFINITY_PREFIX}{id}");
        Affinity { id, issued, key }
    }

    /// The session key this cookie stands for in the registry.
    pub fn session_key(&self) -> &str {
        &self.key
    }

    /// The same id, issued at another time (a refreshed cookie).
    pub fn reissued(&self, issued: u64) -> Affinity {
        Affinity { issued, ..self.clone() }
    }
}

/// A cookie that verified: a second, independently keyed hash of its
/// value (the check), and what it verified to.
type CachedCookie = (u64, Arc<Affinity>);

/// Cookies verified recently, so that a session's every request does not
/// pay for an HMAC. An entry is found by one randomly keyed SipHash of the
/// cookie value and confirmed by a second, independently keyed one: a
/// value that is not the cached cookie would have to match two secret
/// 64-bit hashes (one integer comparison, no data-dependent timing). The
/// maximum age is checked on every use; only cookies that verified are
/// stored; the cache is emptied when full.
pub struct VerifiedCookies {
    index: std::collections::hash_map::RandomState,
    check: std::collections::hash_map::RandomState,
    entries: RwLock<HashMap<u64, CachedCookie>>,
    capacity: usize,
}

impl VerifiedCookies {
    pub fn new(capacity: usize) -> VerifiedCookies {
        VerifiedCookies {
            index: Default::default(),
            check: Default::default(),
            entries: RwLock::new(HashMap::new()),
            capacity,
        }
    }

    /// Verify `value`, from the cache when possible.
    pub fn verify(
        &self,
        key: &SecureKey,
        value: &str,
        now_secs: u64,
        max_age_secs: u64,
    ) -> Result<Arc<Affinity>, Rejection> {
        let h = self.index.hash_one(value);
        let c = self.check.hash_one(value);
        if let Some((check, affinity)) = self.entries.read().get(&h)
            && *check == c
        {
            check_age(affinity.issued, now_secs, max_age_secs)?;
            return Ok(affinity.clone());
        }
        let affinity = Arc::new(verify(key, value, now_secs, max_age_secs)?);
        let mut entries = self.entries.write();
        if entries.len() >= self.capacity {
            entries.clear();
        }
        entries.insert(h, (c, affinity.clone()));
        Ok(affinity)
    }

    pub fn len(&self) -> usize {
        self.entries.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn check_age(issued: u64, now_secs: u64, max_age_secs: u64) -> Result<(), Rejection> {
    if issued > now_secs + FUTURE_SKEW_SECS || now_secs.saturating_sub(issued) > max_age_secs {
        return Err(Rejection::Expired);
    }
    Ok(())
}

fn mac(key: &SecureKey, id: &str, issued: u64) -> hmac::Hmac<sha2::Sha256> {
    let mut m = key.mac();
    m.update(b"sessionlb affinity cookie\0v1\0");
    m.update(id.as_bytes());
    m.update(b"\0");
    m.update(issued.to_string().as_bytes());
    m
}

/// Issue a new cookie value for a fresh random id.
pub fn issue(key: &SecureKey, now_secs: u64) -> (Affinity, String) {
    let id = B64.encode(rand::random::<[u8; 16]>());
    let value = sign(key, &id, now_secs);
    (Affinity::new(id, now_secs), value)
}

/// The cookie value for `id` issued at `issued` (also used to refresh an id).
pub fn sign(key: &SecureKey, id: &str, issued: u64) -> String {
    let tag = mac(key, id, issued).finalize().into_bytes();
    format!("v1.{id}.{issued}.{}", B64.encode(tag))
}

/// Verify a cookie value.
pub fn verify(key: &SecureKey, value: &str, now_secs: u64, max_age_secs: u64) -> Result<Affinity, Rejection> {
    let mut parts = value.split('.');
    let (Some("v1"), Some(id), Some(issued), Some(tag), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Rejection::Malformed);
    };
    // 16 bytes of id: 22 base64url characters.
    if id.len() != 22 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(Rejection::Malformed);
    }
    let issued: u64 = issued.parse().map_err(|_| Rejection::Malformed)?;
    let tag = B64.decode(tag).map_err(|_| Rejection::Malformed)?;
    // `verify_slice` compares in constant time.
    mac(key, id, issued).verify_slice(&tag).map_err(|_| Rejection::BadMac)?;
    check_age(issued, now_secs, max_age_secs)?;
    Ok(Affinity::new(id.to_string(), issued))
}

/// The `Set-Cookie` header value.
pub fn set_cookie_header(name: &str, value: &str, max_age_secs: u64, secure: bool) -> String {
    format!(
        "{name}={value}; Path=/; Max-Age={max_age_secs}; HttpOnly; SameSite=Lax{}",
        if secure { "; Secure" } else { "" }
    )
}

/// Find a cookie by name in `Cookie` header values (no allocation).
pub fn find_cookie<'a>(headers: impl Iterator<Item = &'a [u8]>, name: &str) -> Option<&'a str> {
    find_cookies(headers, [name])[0]
}

/// Find several cookies by name in one pass over `Cookie` header values
/// (no allocation); the first occurrence of each wins.
pub fn find_cookies<'a, const N: usize>(
    headers: impl Iterator<Item = &'a [u8]>,
    names: [&str; N],
) -> [Option<&'a str>; N] {
    let mut found = [None; N];
    for header in headers {
        let Ok(text) = std::str::from_utf8(header) else { continue };
        for pair in text.split(';') {
            let pair = pair.trim_start();
            for (slot, name) in found.iter_mut().zip(names) {
                if slot.is_none()
                    && let Some(rest) = pair.strip_prefix(name)
                    && let Some(value) = rest.strip_prefix('=')
                {
                    *slot = Some(value.trim_end());
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecureKey {
        SecureKey::from_bytes(b"0123456789abcdef0123456789abcdef\n".to_vec())
    }

    #[test]
    fn issued_cookies_verify_until_they_expire() {
        let k = key();
        let (aff, value) = issue(&k, 1_000_000);
        assert!(value.starts_with("v1."));
        assert_eq!(verify(&k, &value, 1_000_000, 3600), Ok(aff.clone()));
        assert_eq!(verify(&k, &value, 1_003_600, 3600), Ok(aff.clone()));
        assert_eq!(verify(&k, &value, 1_003_601, 3600), Err(Rejection::Expired));
        assert_eq!(verify(&k, &value, 1_000_000 - FUTURE_SKEW_SECS - 1, 3600), Err(Rejection::Expired));
        assert!(aff.session_key().starts_with(AFFINITY_PREFIX));
        assert_ne!(issue(&k, 1).0.id, issue(&k, 1).0.id, "ids are random");
    }

    #[test]
    fn tampering_and_other_keys_are_rejected() {
        let k = key();
        let (aff, value) = issue(&k, 1_000_000);
        let other = SecureKey::from_bytes(b"another-key-another-key-another!\n".to_vec());
        assert_eq!(verify(&other, &value, 1_000_000, 3600), Err(Rejection::BadMac));
        // Same MAC, another id; same id, later issue time.
        let tag = value.rsplit('.').next().unwrap();
        let (victim, _) = issue(&k, 1_000_000);
        assert_eq!(verify(&k, &format!("v1.{}.1000000.{tag}", victim.id), 1_000_000, 3600), Err(Rejection::BadMac));
        assert_eq!(verify(&k, &format!("v1.{}.1000500.{tag}", aff.id), 1_000_500, 3600), Err(Rejection::BadMac));
        for bad in ["", "v1", "v2.a.b.c", "v1.short.1.AAAA", &format!("{value}.x"), &value.replace("v1.", "v1..")] {
            assert_eq!(verify(&k, bad, 1_000_000, 3600), Err(Rejection::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn the_cache_returns_only_verified_values_and_still_checks_age() {
        let k = key();
        let cache = VerifiedCookies::new(2);
        let (aff, value) = issue(&k, 1_000_000);
        assert_eq!(*cache.verify(&k, &value, 1_000_000, 3600).unwrap(), aff);
        assert_eq!(cache.len(), 1);
        assert_eq!(*cache.verify(&k, &value, 1_000_100, 3600).unwrap(), aff, "a hit");
        assert_eq!(cache.verify(&k, &value, 1_003_601, 3600), Err(Rejection::Expired), "age checked on hits");
        // Forgeries are never cached, whatever their value.
        let forged = format!("{}x", &value[..value.len() - 1]);
        assert!(cache.verify(&k, &forged, 1_000_000, 3600).is_err());
        assert_eq!(cache.len(), 1);
        // Full: emptied, then refilled.
        let (_, v2) = issue(&k, 1_000_000);
        let (_, v3) = issue(&k, 1_000_000);
        cache.verify(&k, &v2, 1_000_000, 3600).unwrap();
        cache.verify(&k, &v3, 1_000_000, 3600).unwrap();
        assert!(cache.len() <= 2);
    }

    #[test]
    fn several_cookies_in_one_pass() {
        let headers = [b"a=1; user-id=bob".as_slice(), b"sessionlb-affinity=v1.x; user-id=eve".as_slice()];
        assert_eq!(
            find_cookies(headers.iter().copied(), ["sessionlb-affinity", "user-id", "none"]),
            [Some("v1.x"), Some("bob"), None]
        );
    }

    #[test]
    fn cookies_are_found_among_others() {
        let headers = [b"a=1; sessionlb-affinity=v1.x; user-id=bob".as_slice(), b"z=2".as_slice()];
        assert_eq!(find_cookie(headers.iter().copied(), "sessionlb-affinity"), Some("v1.x"));
        assert_eq!(find_cookie(headers.iter().copied(), "user-id"), Some("bob"));
        assert_eq!(find_cookie(headers.iter().copied(), "z"), Some("2"));
        assert_eq!(find_cookie(headers.iter().copied(), "sessionlb"), None, "prefixes do not match");
        assert!(set_cookie_header("n", "v", 60, true).ends_with("; Secure"));
    }
}

//! sessionlb's signed cookie (`affinity-cookie-name`, default
//! `sessionlb-affinity`), in two versions:
//!
//! - **v2, a pin**: `v2.<id>.<node>.<issued>.<mac>`. An anonymous browser
//!   gets one instead of a registry session: `id` is a random 128-bit value
//!   (base64url; `user-hash` hashes it), `node` the registry id of the node
//!   the browser is pinned to, `issued` the issue time in Unix seconds. It is
//!   chosen from memory and kept only by the browser: no lock, no database
//!   write, no notification. A signed-in user's browser gets one pointing at
//!   the user's node.
//! - **v1, a legacy affinity cookie**: `v1.<id>.<issued>.<mac>`, whose id
//!   named a registry session `aff:<id>`. No longer issued; one that verifies
//!   is routed by its session while that exists, until the cookie expires.
//!
//! `mac` is an HMAC-SHA256 with the secure cookie key over a domain label
//! (one per version), the version and every field (base64url). A cookie that
//! is malformed, forged, or older than the maximum age is rejected (and
//! counted by the caller) — never trusted. MACs are compared in constant time.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::Mac;
use parking_lot::RwLock;

use crate::cluster::NodeId;
use crate::config::key::SecureKey;

/// Prefix of legacy (v1) affinity keys in the registry; `:` never occurs in backend keys.
pub const AFFINITY_PREFIX: &str = "aff:";
/// Accepted clock difference for issue times in the future.
const FUTURE_SKEW_SECS: u64 = 300;
/// Characters of a 128-bit id in base64url.
const ID_LEN: usize = 22;

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

/// A verified pin (v2): this browser goes to `node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The random 128-bit id, base64url.
    pub id: String,
    /// The node's registry id.
    pub node: NodeId,
    /// Unix seconds.
    pub issued: u64,
}

impl Pin {
    /// A fresh pin to `node` with a random id.
    pub fn new(node: NodeId, issued: u64) -> Pin {
        Pin { id: new_pin_id(), node, issued }
    }

    /// The same browser (same id) pinned to `node` at `issued`.
    pub fn moved_to(&self, node: NodeId, issued: u64) -> Pin {
        Pin { id: self.id.clone(), node, issued }
    }

    /// The cookie value.
    pub fn sign(&self, key: &SecureKey) -> String {
        let tag = pin_mac(key, &self.id, &self.node.to_string(), &self.issued.to_string()).finalize().into_bytes();
        format!("v2.{}.{}.{}.{}", self.id, self.node, self.issued, B64.encode(tag))
    }
}

/// A verified legacy (v1) affinity cookie.
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
}

/// A cookie that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AffinityCookie {
    Pin(Pin),
    Legacy(Affinity),
}

impl AffinityCookie {
    /// When it was issued (Unix seconds).
    pub fn issued(&self) -> u64 {
        match self {
            AffinityCookie::Pin(p) => p.issued,
            AffinityCookie::Legacy(a) => a.issued,
        }
    }

    /// The pin, for a v2 cookie.
    pub fn pin(&self) -> Option<&Pin> {
        match self {
            AffinityCookie::Pin(p) => Some(p),
            AffinityCookie::Legacy(_) => None,
        }
    }

    /// The legacy cookie, for a v1 cookie.
    pub fn legacy(&self) -> Option<&Affinity> {
        match self {
            AffinityCookie::Legacy(a) => Some(a),
            AffinityCookie::Pin(_) => None,
        }
    }
}

/// The `kind` label a rejected value of the cookie is counted under:
/// `affinity` for what claims to be a legacy v1 cookie, `pin` otherwise.
pub fn rejection_kind(value: &str) -> &'static str {
    if value.starts_with("v1.") { "affinity" } else { "pin" }
}

/// A cookie that verified: a second, independently keyed hash of its
/// value (the check), and what it verified to.
type CachedCookie = (u64, Arc<AffinityCookie>);

/// Cookies verified recently, so that a browser's every request does not
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
    ) -> Result<Arc<AffinityCookie>, Rejection> {
        let h = self.index.hash_one(value);
        let c = self.check.hash_one(value);
        if let Some((check, cookie)) = self.entries.read().get(&h)
            && *check == c
        {
            check_age(cookie.issued(), now_secs, max_age_secs)?;
            return Ok(cookie.clone());
        }
        let cookie = Arc::new(verify(key, value, now_secs, max_age_secs)?);
        let mut entries = self.entries.write();
        if entries.len() >= self.capacity {
            entries.clear();
        }
        entries.insert(h, (c, cookie.clone()));
        Ok(cookie)
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

/// A fresh random 128-bit id (base64url, 22 characters).
pub fn new_pin_id() -> String {
    B64.encode(rand::random::<[u8; 16]>())
}

/// 1–19 ASCII digits (fits a u64 or an i64 when parsed).
fn is_decimal(text: &str) -> bool {
    (1..=19).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit())
}

fn valid_id(id: &str) -> bool {
    id.len() == ID_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The MACs cover the fields as written (decimal, no sign or leading
/// zero when issued), so that no other spelling of a value verifies.
fn pin_mac(key: &SecureKey, id: &str, node: &str, issued: &str) -> hmac::Hmac<sha2::Sha256> {
    let mut m = key.mac();
    m.update(b"sessionlb pin cookie\0v2\0");
    m.update(id.as_bytes());
    m.update(b"\0");
    m.update(node.as_bytes());
    m.update(b"\0");
    m.update(issued.as_bytes());
    m
}

fn legacy_mac(key: &SecureKey, id: &str, issued: &str) -> hmac::Hmac<sha2::Sha256> {
    let mut m = key.mac();
    m.update(b"sessionlb affinity cookie\0v1\0");
    m.update(id.as_bytes());
    m.update(b"\0");
    m.update(issued.as_bytes());
    m
}

/// A legacy v1 cookie value for a fresh random id. sessionlb no longer
/// issues these; tests use it to stand for a cookie from an older version.
pub fn issue_v1(key: &SecureKey, now_secs: u64) -> (Affinity, String) {
    let id = new_pin_id();
    let value = sign_v1(key, &id, now_secs);
    (Affinity::new(id, now_secs), value)
}

/// The legacy v1 cookie value for `id` issued at `issued` (tests, see [`issue_v1`]).
pub fn sign_v1(key: &SecureKey, id: &str, issued: u64) -> String {
    let tag = legacy_mac(key, id, &issued.to_string()).finalize().into_bytes();
    format!("v1.{id}.{issued}.{}", B64.encode(tag))
}

/// Verify a cookie value of either version.
pub fn verify(key: &SecureKey, value: &str, now_secs: u64, max_age_secs: u64) -> Result<AffinityCookie, Rejection> {
    let mut parts = value.split('.');
    let version = parts.next();
    let fields: [Option<&str>; 5] = [parts.next(), parts.next(), parts.next(), parts.next(), parts.next()];
    match (version, fields) {
        (Some("v2"), [Some(id), Some(node_text), Some(issued_text), Some(tag), None]) => {
            if !valid_id(id) || !is_decimal(node_text) || !is_decimal(issued_text) {
                return Err(Rejection::Malformed);
            }
            let node: NodeId = node_text.parse().map_err(|_| Rejection::Malformed)?;
            let issued: u64 = issued_text.parse().map_err(|_| Rejection::Malformed)?;
            let tag = B64.decode(tag).map_err(|_| Rejection::Malformed)?;
            // `verify_slice` compares in constant time.
            pin_mac(key, id, node_text, issued_text).verify_slice(&tag).map_err(|_| Rejection::BadMac)?;
            check_age(issued, now_secs, max_age_secs)?;
            Ok(AffinityCookie::Pin(Pin { id: id.to_string(), node, issued }))
        }
        (Some("v1"), [Some(id), Some(issued_text), Some(tag), None, None]) => {
            if !valid_id(id) || !is_decimal(issued_text) {
                return Err(Rejection::Malformed);
            }
            let issued: u64 = issued_text.parse().map_err(|_| Rejection::Malformed)?;
            let tag = B64.decode(tag).map_err(|_| Rejection::Malformed)?;
            legacy_mac(key, id, issued_text).verify_slice(&tag).map_err(|_| Rejection::BadMac)?;
            check_age(issued, now_secs, max_age_secs)?;
            Ok(AffinityCookie::Legacy(Affinity::new(id.to_string(), issued)))
        }
        _ => Err(Rejection::Malformed),
    }
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

    fn pin_of(c: AffinityCookie) -> Pin {
        c.pin().cloned().expect("a pin")
    }

    #[test]
    fn pins_verify_until_they_expire() {
        let k = key();
        let pin = Pin::new(7, 1_000_000);
        let value = pin.sign(&k);
        assert!(value.starts_with("v2.") && value.contains(".7.1000000."), "{value}");
        assert_eq!(verify(&k, &value, 1_000_000, 3600).map(pin_of), Ok(pin.clone()));
        assert_eq!(verify(&k, &value, 1_003_600, 3600).map(pin_of), Ok(pin.clone()));
        assert_eq!(verify(&k, &value, 1_003_601, 3600), Err(Rejection::Expired));
        assert_eq!(verify(&k, &value, 1_000_000 - FUTURE_SKEW_SECS - 1, 3600), Err(Rejection::Expired));
        assert_ne!(Pin::new(7, 1).id, Pin::new(7, 1).id, "ids are random");
        let moved = pin.moved_to(9, 1_000_100);
        assert_eq!((moved.id.as_str(), moved.node, moved.issued), (pin.id.as_str(), 9, 1_000_100));
    }

    #[test]
    fn a_pin_cannot_be_pointed_at_another_node_or_forged() {
        let k = key();
        let pin = Pin::new(7, 1_000_000);
        let value = pin.sign(&k);
        let tag = value.rsplit('.').next().unwrap();
        // Same MAC, another node / another issue time / another id.
        for forged in [
            format!("v2.{}.8.1000000.{tag}", pin.id),
            format!("v2.{}.7.1000500.{tag}", pin.id),
            format!("v2.{}.7.1000000.{tag}", Pin::new(7, 0).id),
        ] {
            assert_eq!(verify(&k, &forged, 1_000_500, 3600), Err(Rejection::BadMac), "{forged}");
        }
        let other = SecureKey::from_bytes(b"another-key-another-key-another!\n".to_vec());
        assert_eq!(verify(&other, &value, 1_000_000, 3600), Err(Rejection::BadMac));
        for bad in [
            "",
            "v2",
            "v3.a.b.c.d",
            &format!("v2.{}.-7.1000000.{tag}", pin.id),
            &format!("v2.{}.+7.1000000.{tag}", pin.id),
            &format!("v2.{}..1000000.{tag}", pin.id),
            &format!("v2.short.7.1000000.{tag}"),
            &format!("{value}.x"),
            &format!("v2.{}.7.1000000.not*base64", pin.id),
        ] {
            assert_eq!(verify(&k, bad, 1_000_000, 3600), Err(Rejection::Malformed), "{bad:?}");
        }
        assert_eq!(rejection_kind(&value), "pin");
        assert_eq!(rejection_kind("garbage"), "pin");
    }

    #[test]
    fn legacy_cookies_still_verify_until_they_expire() {
        let k = key();
        let (aff, value) = issue_v1(&k, 1_000_000);
        assert!(value.starts_with("v1."));
        assert_eq!(verify(&k, &value, 1_003_600, 3600), Ok(AffinityCookie::Legacy(aff.clone())));
        assert_eq!(verify(&k, &value, 1_003_601, 3600), Err(Rejection::Expired));
        assert!(aff.session_key().starts_with(AFFINITY_PREFIX));
        // Same MAC, another id; same id, later issue time.
        let tag = value.rsplit('.').next().unwrap();
        let (victim, _) = issue_v1(&k, 1_000_000);
        assert_eq!(verify(&k, &format!("v1.{}.1000000.{tag}", victim.id), 1_000_000, 3600), Err(Rejection::BadMac));
        assert_eq!(verify(&k, &format!("v1.{}.1000500.{tag}", aff.id), 1_000_500, 3600), Err(Rejection::BadMac));
        for bad in ["v1", "v1.short.1.AAAA", &format!("{value}.x"), &value.replace("v1.", "v1..")] {
            assert_eq!(verify(&k, bad, 1_000_000, 3600), Err(Rejection::Malformed), "{bad:?}");
        }
        // A v1 MAC does not make a v2 pin, nor the other way round.
        let pin = Pin { id: aff.id.clone(), node: 1, issued: 1_000_000 };
        let pin_tag = pin.sign(&k).rsplit('.').next().unwrap().to_string();
        // And a value spelt differently (a leading zero) is not the one signed.
        let pin_value = pin.sign(&k);
        let respelt = pin_value.replacen(".1.", ".01.", 1);
        assert_eq!(verify(&k, &respelt, 1_000_000, 3600), Err(Rejection::BadMac), "{respelt}");
        assert_eq!(verify(&k, &format!("v1.{}.1000000.{pin_tag}", aff.id), 1_000_000, 3600), Err(Rejection::BadMac));
        assert_eq!(rejection_kind(&value), "affinity");
    }

    #[test]
    fn the_cache_returns_only_verified_values_and_still_checks_age() {
        let k = key();
        let cache = VerifiedCookies::new(2);
        let pin = Pin::new(3, 1_000_000);
        let value = pin.sign(&k);
        assert_eq!(cache.verify(&k, &value, 1_000_000, 3600).unwrap().pin(), Some(&pin));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.verify(&k, &value, 1_000_100, 3600).unwrap().pin(), Some(&pin), "a hit");
        assert_eq!(cache.verify(&k, &value, 1_003_601, 3600), Err(Rejection::Expired), "age checked on hits");
        // Forgeries are never cached, whatever their value.
        let forged = format!("{}x", &value[..value.len() - 1]);
        assert!(cache.verify(&k, &forged, 1_000_000, 3600).is_err());
        assert_eq!(cache.len(), 1);
        // Full: emptied, then refilled.
        let (_, v2) = issue_v1(&k, 1_000_000);
        let v3 = Pin::new(1, 1_000_000).sign(&k);
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

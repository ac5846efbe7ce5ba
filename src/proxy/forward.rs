//! The signed node-to-node forwarding header, and the replay cache.
//!
//! `X-Sessionlb-Forward: v2;<sender>;<target>;<time ms>;<nonce>;<key>;<user>;<mac>`
//! where nonce is 16 lowercase hex digits, random per request (so that two
//! equal requests forwarded in the same millisecond carry different headers),
//! key and user are base64url (user empty when anonymous) and mac is
//! HMAC-SHA256 with the secure cookie key over a domain label, every field,
//! the request's method, Host and path-and-query, and its body framing
//! (`Content-Length` value, chunked, or none). The target checks that it is
//! the target, that the sender is a cluster node, that the time is within the
//! forwarding window, and the MAC (constant time); the proxy then checks that
//! the connection comes from the sender's registered address and that the
//! header was not seen before within the window ([`ReplayCache`]) — otherwise
//! the request is refused with 403 and counted. A header moved to another
//! path, method, host or body length, replayed, or sent from elsewhere fails.
//!
//! The body itself is not covered: a signature over it would need the whole
//! body before the first byte is forwarded (uploads are streamed) or a
//! chunk-signing framing of our own between nodes. A captured header cannot
//! be reused with another body, though: it is accepted once, from its
//! sender's address, within the window (10 s by default); `ssl-enabled`
//! between nodes keeps it from being read at all.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::Mac;

use crate::cluster::NodeId;
use crate::config::key::SecureKey;

/// The header's name.
pub const HEADER: &str = "x-sessionlb-forward";
/// Set by a target whose backend is down, so that the sender fails over.
pub const BACKEND_DOWN_HEADER: &str = "x-sessionlb-backend-down";

/// What a verified header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    pub sender: NodeId,
    pub key: String,
    pub user: Option<String>,
}

/// Why a header was refused (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardRejection {
    Malformed,
    WrongTarget,
    UnknownSender,
    Stale,
    BadMac,
    /// The connection did not come from the sender's registered address.
    WrongPeer,
    /// The header was already used within the window.
    Replayed,
}

impl ForwardRejection {
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardRejection::Malformed => "malformed",
            ForwardRejection::WrongTarget => "wrong_target",
            ForwardRejection::UnknownSender => "unknown_sender",
            ForwardRejection::Stale => "stale",
            ForwardRejection::BadMac => "bad_mac",
            ForwardRejection::WrongPeer => "wrong_peer",
            ForwardRejection::Replayed => "replayed",
        }
    }
}

/// The request parts the MAC covers besides the header's own fields.
#[derive(Debug, Clone, Copy)]
pub struct RequestLine<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path_and_query: &'a str,
}

/// The version label of the header (and of its MAC's domain).
const VERSION: &str = "v2";

#[allow(clippy::too_many_arguments)]
fn mac(
    key: &SecureKey,
    sender: &str,
    target: &str,
    time: &str,
    nonce: &str,
    skey: &str,
    user: &str,
    req: &RequestLine<'_>,
    framing: &str,
) -> hmac::Hmac<sha2::Sha256> {
    let mut m = key.mac();
    m.update(b"sessionlb forward\0v2");
    for part in [sender, target, time, nonce, skey, user, req.method, req.host, req.path_and_query, framing] {
        m.update(b"\0");
        m.update(part.as_bytes());
    }
    m
}

/// A request's body framing as the MAC covers it: `length=<n>` with a
/// `Content-Length`, `chunked` with a `Transfer-Encoding`, else empty.
pub fn framing(content_length: Option<&[u8]>, transfer_encoding: bool) -> String {
    match (content_length, transfer_encoding) {
        (_, true) => "chunked".into(),
        (Some(n), false) => format!("length={}", String::from_utf8_lossy(n)),
        (None, false) => String::new(),
    }
}

/// Build the header value for a request without a body sent from `sender` to `target`.
pub fn sign(
    key: &SecureKey,
    sender: NodeId,
    target: NodeId,
    now_ms: i64,
    session_key: &str,
    user: Option<&str>,
    req: &RequestLine<'_>,
) -> String {
    sign_framed(key, sender, target, now_ms, session_key, user, req, "")
}

/// Build the header value for a request with body `framing` (see [`framing`]),
/// with a fresh random nonce.
#[allow(clippy::too_many_arguments)]
pub fn sign_framed(
    key: &SecureKey,
    sender: NodeId,
    target: NodeId,
    now_ms: i64,
    session_key: &str,
    user: Option<&str>,
    req: &RequestLine<'_>,
    framing: &str,
) -> String {
    sign_with_nonce(key, sender, target, now_ms, rand::random(), session_key, user, req, framing)
}

/// [`sign_framed`] with a given nonce (tests, and the fuzz target's check
/// that a verified header has no second spelling).
#[allow(clippy::too_many_arguments)]
pub fn sign_with_nonce(
    key: &SecureKey,
    sender: NodeId,
    target: NodeId,
    now_ms: i64,
    nonce: u64,
    session_key: &str,
    user: Option<&str>,
    req: &RequestLine<'_>,
    framing: &str,
) -> String {
    let skey = B64.encode(session_key);
    let user = user.map(|u| B64.encode(u)).unwrap_or_default();
    let (sender, target, time, nonce) =
        (sender.to_string(), target.to_string(), now_ms.to_string(), format!("{nonce:016x}"));
    let tag = mac(key, &sender, &target, &time, &nonce, &skey, &user, req, framing).finalize().into_bytes();
    format!("{VERSION};{sender};{target};{time};{nonce};{skey};{user};{}", B64.encode(tag))
}

/// The nonce of a header value (its fifth field), if it has one.
pub fn nonce_of(value: &str) -> Option<u64> {
    let nonce = value.split(';').nth(4)?;
    is_nonce(nonce).then(|| u64::from_str_radix(nonce, 16).ok()).flatten()
}

/// Exactly 16 lowercase hex digits: one spelling per nonce.
fn is_nonce(text: &str) -> bool {
    text.len() == 16 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Verify a header value of a request without a body received by node
/// `me`. `is_node` says whether a sender id is a cluster node.
pub fn verify(
    key: &SecureKey,
    value: &str,
    me: NodeId,
    is_node: impl Fn(NodeId) -> bool,
    now_ms: i64,
    window_ms: i64,
    req: &RequestLine<'_>,
) -> Result<Forwarded, ForwardRejection> {
    verify_framed(key, value, me, is_node, now_ms, window_ms, req, "")
}

/// [`verify`] for a request with body `framing` (see [`framing`]).
#[allow(clippy::too_many_arguments)]
pub fn verify_framed(
    key: &SecureKey,
    value: &str,
    me: NodeId,
    is_node: impl Fn(NodeId) -> bool,
    now_ms: i64,
    window_ms: i64,
    req: &RequestLine<'_>,
    framing: &str,
) -> Result<Forwarded, ForwardRejection> {
    let fields: Vec<&str> = value.split(';').collect();
    let [VERSION, sender, target, time, nonce, skey, user, tag] = fields[..] else {
        return Err(ForwardRejection::Malformed);
    };
    if !is_nonce(nonce) {
        return Err(ForwardRejection::Malformed);
    }
    let sender_id: NodeId = sender.parse().map_err(|_| ForwardRejection::Malformed)?;
    let target_id: NodeId = target.parse().map_err(|_| ForwardRejection::Malformed)?;
    let at: i64 = time.parse().map_err(|_| ForwardRejection::Malformed)?;
    let tag = B64.decode(tag).map_err(|_| ForwardRejection::Malformed)?;
    mac(key, sender, target, time, nonce, skey, user, req, framing)
        .verify_slice(&tag)
        .map_err(|_| ForwardRejection::BadMac)?;
    if target_id != me {
        return Err(ForwardRejection::WrongTarget);
    }
    if (now_ms - at).abs() > window_ms {
        return Err(ForwardRejection::Stale);
    }
    if !is_node(sender_id) {
        return Err(ForwardRejection::UnknownSender);
    }
    let decode = |s: &str| B64.decode(s).ok().and_then(|b| String::from_utf8(b).ok());
    let session_key = decode(skey).filter(|k| !k.is_empty()).ok_or(ForwardRejection::Malformed)?;
    let user = if user.is_empty() { None } else { Some(decode(user).ok_or(ForwardRejection::Malformed)?) };
    Ok(Forwarded { sender: sender_id, key: session_key, user })
}

/// The time and MAC of a header that verified: what the replay cache keeps.
pub fn replay_id(value: &str) -> Option<(i64, u128)> {
    let mut fields = value.rsplit(';');
    let tag = B64.decode(fields.next()?).ok()?;
    let at = value.split(';').nth(3)?.parse().ok()?;
    Some((at, u128::from_le_bytes(tag.get(..16)?.try_into().ok()?)))
}

/// Headers accepted within the window, so that each is accepted once.
///
/// Bounded: at most `capacity` entries. Entries older than the window are
/// dropped as new ones come; when the cache is full of entries still in the
/// window, the oldest is dropped and its time becomes the *horizon*: from
/// then on a header no newer than the horizon is refused as a possible
/// replay (it can no longer be checked). So a replay is never accepted; under
/// more forwarded requests per window than `capacity`, the window shrinks.
pub struct ReplayCache {
    inner: parking_lot::Mutex<ReplayInner>,
    capacity: usize,
}

#[derive(Default)]
struct ReplayInner {
    seen: std::collections::HashSet<u128>,
    /// (time, id) in insertion order.
    order: std::collections::VecDeque<(i64, u128)>,
    horizon: i64,
}

/// Default capacity: about 64 bytes an entry, so at most about 16 MiB.
pub const REPLAY_CACHE_CAPACITY: usize = 262_144;

impl ReplayCache {
    pub fn new(capacity: usize) -> ReplayCache {
        ReplayCache { inner: parking_lot::Mutex::new(ReplayInner::default()), capacity: capacity.max(1) }
    }

    /// Record header `id` signed at `at`; `Err(Replayed)` if it was seen
    /// (or can no longer be told apart from one that was).
    pub fn check(&self, at: i64, id: u128, now_ms: i64, window_ms: i64) -> Result<(), ForwardRejection> {
        let mut c = self.inner.lock();
        while let Some(&(t, old)) = c.order.front() {
            if t >= now_ms - window_ms {
                break;
            }
            c.order.pop_front();
            c.seen.remove(&old);
        }
        if at <= c.horizon || c.seen.contains(&id) {
            return Err(ForwardRejection::Replayed);
        }
        while c.order.len() >= self.capacity {
            let Some((t, old)) = c.order.pop_front() else { break };
            c.seen.remove(&old);
            c.horizon = c.horizon.max(t);
        }
        if at <= c.horizon {
            return Err(ForwardRejection::Replayed);
        }
        c.seen.insert(id);
        c.order.push_back((at, id));
        Ok(())
    }

    /// Entries held (tests, metrics).
    pub fn len(&self) -> usize {
        self.inner.lock().order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecureKey {
        SecureKey::from_bytes(b"0123456789abcdef0123456789abcdef\n".to_vec())
    }

    const REQ: RequestLine<'static> =
        RequestLine { method: "GET", host: "ide.example", path_and_query: "/s/abc/x?y=1" };

    #[test]
    fn round_trip() {
        let k = key();
        let h = sign(&k, 1, 2, 10_000, "aff:xyz", Some("ann"), &REQ);
        let f = verify(&k, &h, 2, |id| id == 1, 10_500, 30_000, &REQ).unwrap();
        assert_eq!(f, Forwarded { sender: 1, key: "aff:xyz".into(), user: Some("ann".into()) });
        let anon = sign(&k, 1, 2, 10_000, "k", None, &REQ);
        assert_eq!(verify(&k, &anon, 2, |_| true, 10_000, 30_000, &REQ).unwrap().user, None);
    }

    #[test]
    fn the_body_framing_is_covered_and_the_old_version_refused() {
        let k = key();
        let framed = framing(Some(b"42"), false);
        assert_eq!(framed, "length=42");
        assert_eq!(framing(Some(b"42"), true), "chunked");
        assert_eq!(framing(None, false), "");
        let h = sign_framed(&k, 1, 2, 10_000, "k", None, &REQ, &framed);
        assert!(verify_framed(&k, &h, 2, |_| true, 10_000, 30_000, &REQ, &framed).is_ok());
        for other in ["length=43", "chunked", ""] {
            assert_eq!(
                verify_framed(&k, &h, 2, |_| true, 10_000, 30_000, &REQ, other),
                Err(ForwardRejection::BadMac),
                "{other}"
            );
        }
        // A v1 header (no framing) is refused as malformed.
        let v1 = h.replacen("v2;", "v1;", 1);
        assert_eq!(verify(&k, &v1, 2, |_| true, 10_000, 30_000, &REQ), Err(ForwardRejection::Malformed));
    }

    #[test]
    fn equal_requests_in_the_same_millisecond_carry_different_headers() {
        // Two browsers of one session opening the same WebSocket at once are
        // two requests, not a replay.
        let cache = ReplayCache::new(100);
        let (a, b) = (sign(&key(), 1, 2, 10_000, "k", None, &REQ), sign(&key(), 1, 2, 10_000, "k", None, &REQ));
        assert_ne!(a, b);
        for h in [&a, &b] {
            assert!(verify(&key(), h, 2, |_| true, 10_000, 5_000, &REQ).is_ok());
            let (at, id) = replay_id(h).unwrap();
            assert_eq!(cache.check(at, id, 10_000, 5_000), Ok(()));
        }
        // The nonce is covered by the MAC and has one spelling.
        let nonce = nonce_of(&a).unwrap();
        assert_eq!(sign_with_nonce(&key(), 1, 2, 10_000, nonce, "k", None, &REQ, ""), a);
        let upper = a.replacen(&format!("{nonce:016x}"), &format!("{nonce:016X}"), 1);
        if upper != a {
            assert_eq!(verify(&key(), &upper, 2, |_| true, 10_000, 5_000, &REQ), Err(ForwardRejection::Malformed));
        }
        let other = a.replacen(&format!("{nonce:016x}"), &format!("{:016x}", nonce ^ 1), 1);
        assert_eq!(verify(&key(), &other, 2, |_| true, 10_000, 5_000, &REQ), Err(ForwardRejection::BadMac));
    }

    #[test]
    fn a_header_is_accepted_once_within_the_window() {
        let cache = ReplayCache::new(100);
        let h = sign(&key(), 1, 2, 10_000, "k", None, &REQ);
        let (at, id) = replay_id(&h).unwrap();
        assert_eq!(at, 10_000);
        assert_eq!(cache.check(at, id, 10_100, 5_000), Ok(()));
        assert_eq!(cache.check(at, id, 10_200, 5_000), Err(ForwardRejection::Replayed));
        // Another header at the same millisecond is another entry.
        let h2 = sign(&key(), 1, 2, 10_000, "k2", None, &REQ);
        let (at2, id2) = replay_id(&h2).unwrap();
        assert_ne!(id, id2);
        assert_eq!(cache.check(at2, id2, 10_200, 5_000), Ok(()));
        // Past the window, entries are dropped (the header is stale by then anyway).
        let (at3, id3) = replay_id(&sign(&key(), 1, 2, 20_000, "k", None, &REQ)).unwrap();
        assert_eq!(cache.check(at3, id3, 20_000, 5_000), Ok(()));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn the_replay_cache_is_bounded_and_never_forgets_into_acceptance() {
        let cache = ReplayCache::new(1000);
        let window = 5_000;
        // 10,000 distinct headers within one window: never more than 1,000 kept.
        for i in 0..10_000i64 {
            let at = 100_000 + i / 10;
            assert_eq!(cache.check(at, i as u128, 101_000, window), Ok(()), "header {i}");
            assert!(cache.len() <= 1000);
        }
        assert_eq!(cache.len(), 1000);
        // Every one of them, replayed, is refused: kept ones as seen, dropped
        // ones because they are no newer than the horizon.
        for i in 0..10_000i64 {
            let at = 100_000 + i / 10;
            assert_eq!(cache.check(at, i as u128, 101_000, window), Err(ForwardRejection::Replayed), "replay {i}");
        }
        // A new header newer than the horizon is still accepted.
        assert_eq!(cache.check(101_500, 99_999_999, 101_500, window), Ok(()));
    }

    #[test]
    fn every_forgery_is_refused() {
        let k = key();
        let h = sign(&k, 1, 2, 10_000, "aff:xyz", Some("ann"), &REQ);
        let ok = |_| true;
        assert_eq!(verify(&k, &h, 3, ok, 10_000, 30_000, &REQ), Err(ForwardRejection::WrongTarget));
        assert_eq!(verify(&k, &h, 2, |_| false, 10_000, 30_000, &REQ), Err(ForwardRejection::UnknownSender));
        assert_eq!(verify(&k, &h, 2, ok, 50_001, 30_000, &REQ), Err(ForwardRejection::Stale));
        let other_path = RequestLine { path_and_query: "/s/abc/admin", ..REQ };
        assert_eq!(verify(&k, &h, 2, ok, 10_000, 30_000, &other_path), Err(ForwardRejection::BadMac));
        let other_method = RequestLine { method: "POST", ..REQ };
        assert_eq!(verify(&k, &h, 2, ok, 10_000, 30_000, &other_method), Err(ForwardRejection::BadMac));
        let other_host = RequestLine { host: "evil.example", ..REQ };
        assert_eq!(verify(&k, &h, 2, ok, 10_000, 30_000, &other_host), Err(ForwardRejection::BadMac));
        let other_key = SecureKey::from_bytes(b"another-key-another-key-another!\n".to_vec());
        assert_eq!(verify(&other_key, &h, 2, ok, 10_000, 30_000, &REQ), Err(ForwardRejection::BadMac));
        // Changing the user or the target field breaks the MAC too.
        let swapped = h.replacen(";2;", ";3;", 1);
        assert_eq!(verify(&k, &swapped, 3, ok, 10_000, 30_000, &REQ), Err(ForwardRejection::BadMac));
        let mut fields: Vec<String> = h.split(';').map(String::from).collect();
        fields[5] = B64.encode("admin");
        assert_eq!(verify(&k, &fields.join(";"), 2, ok, 10_000, 30_000, &REQ), Err(ForwardRejection::BadMac));
        for bad in ["", "v2;1;2", "v3;1;2;3;a;b;c", "v2;x;2;3;a;;c"] {
            assert_eq!(verify(&k, bad, 2, ok, 10_000, 30_000, &REQ), Err(ForwardRejection::Malformed), "{bad}");
        }
    }
}

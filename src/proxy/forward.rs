//! The signed node-to-node forwarding header.
//!
//! `X-Sessionlb-Forward: v1;<sender>;<target>;<time ms>;<key>;<user>;<mac>`
//! where key and user are base64url (user empty when anonymous) and mac is
//! HMAC-SHA256 with the secure cookie key over a domain label, every field,
//! and the request's method, Host and path-and-query. The target checks that
//! it is the target, that the sender is a cluster node, that the time is
//! within the forwarding window, and the MAC (constant time) — otherwise the
//! request is refused with 403 and counted. A header moved to another path,
//! method or host, or replayed after the window, fails.

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
}

impl ForwardRejection {
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardRejection::Malformed => "malformed",
            ForwardRejection::WrongTarget => "wrong_target",
            ForwardRejection::UnknownSender => "unknown_sender",
            ForwardRejection::Stale => "stale",
            ForwardRejection::BadMac => "bad_mac",
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

#[allow(clippy::too_many_arguments)]
fn mac(
    key: &SecureKey,
    sender: &str,
    target: &str,
    time: &str,
    skey: &str,
    user: &str,
    req: &RequestLine<'_>,
) -> hmac::Hmac<sha2::Sha256> {
    let mut m = key.mac();
    m.update(b"sessionlb forward\0v1");
    for part in [sender, target, time, skey, user, req.method, req.host, req.path_and_query] {
        m.update(b"\0");
        m.update(part.as_bytes());
    }
    m
}

/// Build the header value for a request sent from `sender` to `target`.
pub fn sign(
    key: &SecureKey,
    sender: NodeId,
    target: NodeId,
    now_ms: i64,
    session_key: &str,
    user: Option<&str>,
    req: &RequestLine<'_>,
) -> String {
    let skey = B64.encode(session_key);
    let user = user.map(|u| B64.encode(u)).unwrap_or_default();
    let (sender, target, time) = (sender.to_string(), target.to_string(), now_ms.to_string());
    let tag = mac(key, &sender, &target, &time, &skey, &user, req).finalize().into_bytes();
    format!("v1;{sender};{target};{time};{skey};{user};{}", B64.encode(tag))
}

/// Verify a header value received by node `me`. `is_node` says whether a
/// sender id is a cluster node.
pub fn verify(
    key: &SecureKey,
    value: &str,
    me: NodeId,
    is_node: impl Fn(NodeId) -> bool,
    now_ms: i64,
    window_ms: i64,
    req: &RequestLine<'_>,
) -> Result<Forwarded, ForwardRejection> {
    let fields: Vec<&str> = value.split(';').collect();
    let ["v1", sender, target, time, skey, user, tag] = fields[..] else {
        return Err(ForwardRejection::Malformed);
    };
    let sender_id: NodeId = sender.parse().map_err(|_| ForwardRejection::Malformed)?;
    let target_id: NodeId = target.parse().map_err(|_| ForwardRejection::Malformed)?;
    let at: i64 = time.parse().map_err(|_| ForwardRejection::Malformed)?;
    let tag = B64.decode(tag).map_err(|_| ForwardRejection::Malformed)?;
    mac(key, sender, target, time, skey, user, req).verify_slice(&tag).map_err(|_| ForwardRejection::BadMac)?;
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
        for bad in ["", "v1;1;2", "v2;1;2;3;a;b;c", "v1;x;2;3;a;;c"] {
            assert_eq!(verify(&k, bad, 2, ok, 10_000, 30_000, &REQ), Err(ForwardRejection::Malformed), "{bad}");
        }
    }
}

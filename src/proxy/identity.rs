//! Who a request belongs to, in order (each switchable in `[identity]`):
//! Workbench's signed `user-id` cookie, verified with the secure cookie key;
//! a trusted header accepted only from `trusted-cidrs`; else anonymous.
//!
//! Workbench's cookie is `urlenc(value)|urlenc(expires)|urlenc(base64(mac))`
//! with `mac = HMAC-SHA256(key, value + expires)` over the decoded strings,
//! `expires` an RFC 1123 date (newer builds append `;<login expiry>`), and
//! the key passed as a C string (so truncated at its first NUL byte).

use std::net::IpAddr;
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use ipnet::IpNet;
use percent_encoding::percent_decode_str;
use sha2::Sha256;

use crate::config::key::SecureKey;

/// Why a Workbench cookie was rejected (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserCookieRejection {
    Malformed,
    BadMac,
    Expired,
}

impl UserCookieRejection {
    pub fn as_str(self) -> &'static str {
        match self {
            UserCookieRejection::Malformed => "malformed",
            UserCookieRejection::BadMac => "bad_mac",
            UserCookieRejection::Expired => "expired",
        }
    }
}

/// HMAC state for Workbench cookies: the key up to its first NUL byte
/// (`SecureKey::load` refuses a key with fewer than 16 bytes of it).
pub fn workbench_mac(key: &SecureKey) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key.workbench_bytes()).expect("HMAC accepts any key length")
}

/// Verify a Workbench `user-id` cookie value and return the user name.
pub fn verify_workbench_cookie(
    mac: &Hmac<Sha256>,
    cookie: &str,
    now: SystemTime,
) -> Result<String, UserCookieRejection> {
    // boost::char_separator drops empty tokens.
    let parts: Vec<&str> = cookie.split('|').filter(|p| !p.is_empty()).collect();
    let [value, expires, tag] = parts[..] else {
        return Err(UserCookieRejection::Malformed);
    };
    let decode = |s: &str| {
        percent_decode_str(s).decode_utf8().map(|c| c.into_owned()).map_err(|_| UserCookieRejection::Malformed)
    };
    let (value, expires, tag) = (decode(value)?, decode(expires)?, decode(tag)?);
    let tag = B64.decode(tag.as_bytes()).map_err(|_| UserCookieRejection::Malformed)?;
    let mut m = mac.clone();
    m.update(value.as_bytes());
    m.update(expires.as_bytes());
    m.verify_slice(&tag).map_err(|_| UserCookieRejection::BadMac)?;
    for date in expires.split(';') {
        let at = httpdate::parse_http_date(date.trim()).map_err(|_| UserCookieRejection::Malformed)?;
        if at <= now {
            return Err(UserCookieRejection::Expired);
        }
    }
    if value.is_empty() {
        return Err(UserCookieRejection::Malformed);
    }
    Ok(value)
}

/// Make a Workbench cookie (tests, and tools that need one).
pub fn sign_workbench_cookie(mac: &Hmac<Sha256>, value: &str, expires: &str) -> String {
    let mut m = mac.clone();
    m.update(value.as_bytes());
    m.update(expires.as_bytes());
    let tag = B64.encode(m.finalize().into_bytes());
    let enc = |s: &str| percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string();
    format!("{}|{}|{}", enc(value), enc(expires), enc(&tag))
}

/// Whether `addr` is inside one of `cidrs`.
pub fn is_trusted(addr: IpAddr, cidrs: &[IpNet]) -> bool {
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    };
    cidrs.iter().any(|c| c.contains(&addr))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const KEY: &[u8] = b"d3161166-e89b-4158-af3b-5980e3056cc6\n";
    // Known-answer vector from the reference notes (same algorithm as Workbench).
    const VECTOR: &str =
        "testuser|Wed%2C%2008%20Jun%202022%2021%3A22%3A21%20GMT|gBFkMy%2FCFEzBh0XIxgixY5tPlcDy1HFH6Eu%2F0Azq%2FLs%3D";

    fn before_expiry() -> SystemTime {
        httpdate::parse_http_date("Wed, 08 Jun 2022 21:00:00 GMT").unwrap()
    }

    #[test]
    fn workbench_test_vector_verifies() {
        let mac = workbench_mac(&SecureKey::from_bytes(KEY.to_vec()));
        assert_eq!(verify_workbench_cookie(&mac, VECTOR, before_expiry()).as_deref(), Ok("testuser"));
        assert_eq!(sign_workbench_cookie(&mac, "testuser", "Wed, 08 Jun 2022 21:22:21 GMT"), VECTOR);
    }

    #[test]
    fn expired_forged_and_malformed_cookies_are_rejected() {
        let mac = workbench_mac(&SecureKey::from_bytes(KEY.to_vec()));
        let after = before_expiry() + Duration::from_secs(3600);
        assert_eq!(verify_workbench_cookie(&mac, VECTOR, after), Err(UserCookieRejection::Expired));
        let forged = VECTOR.replacen("testuser", "admin", 1);
        assert_eq!(verify_workbench_cookie(&mac, &forged, before_expiry()), Err(UserCookieRejection::BadMac));
        let other = workbench_mac(&SecureKey::from_bytes(b"ffffffff-e89b-4158-af3b-5980e3056cc6\n".to_vec()));
        assert_eq!(verify_workbench_cookie(&other, VECTOR, before_expiry()), Err(UserCookieRejection::BadMac));
        for bad in ["", "a|b", "a|b|c|d", "testuser|not a date|x"] {
            assert!(verify_workbench_cookie(&mac, bad, before_expiry()).is_err(), "{bad}");
        }
        // The login-expiry suffix is honoured too.
        let both = sign_workbench_cookie(&mac, "ann", "Wed, 08 Jun 2022 23:00:00 GMT;Wed, 08 Jun 2022 21:10:00 GMT");
        assert_eq!(verify_workbench_cookie(&mac, &both, before_expiry()).as_deref(), Ok("ann"));
        let later = before_expiry() + Duration::from_secs(1200);
        assert_eq!(verify_workbench_cookie(&mac, &both, later), Err(UserCookieRejection::Expired));
    }

    #[test]
    fn key_is_truncated_at_nul_like_a_c_string() {
        let with_nul = workbench_mac(&SecureKey::from_bytes(b"0123456789abcdef\0ignored-part".to_vec()));
        let without = workbench_mac(&SecureKey::from_bytes(b"0123456789abcdef".to_vec()));
        let c = sign_workbench_cookie(&without, "u", "Wed, 08 Jun 2022 21:22:21 GMT");
        assert!(verify_workbench_cookie(&with_nul, &c, before_expiry()).is_ok());
    }

    #[test]
    fn trusted_cidrs() {
        let cidrs: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "127.0.0.1/32".parse().unwrap()];
        assert!(is_trusted("10.1.2.3".parse().unwrap(), &cidrs));
        assert!(is_trusted("::ffff:127.0.0.1".parse().unwrap(), &cidrs));
        assert!(!is_trusted("127.0.0.2".parse().unwrap(), &cidrs));
        assert!(!is_trusted("10.0.0.1".parse().unwrap(), &[]));
    }
}

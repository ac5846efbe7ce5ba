//! Lock names → safe file names.
//!
//! A lock is named after what it protects (a session key, a user name), and
//! those come from requests: they may hold `/`, `..`, control characters or
//! be very long. [`file_stem`] maps any byte string to a file-name stem that
//!
//! - stays inside the lock directory: only `[A-Za-z0-9_-]` appear, so there is
//!   no `/`, no `.` (hence no `.`/`..` and no hidden files that could clash
//!   with the lock module's own `.sessionlb-*` files), no NUL;
//! - never collides for different keys: it ends in 128 bits of the SHA-256 of
//!   the exact key bytes, after a readable (lossy) prefix for operators;
//! - is bounded: at most [`MAX_STEM_LEN`] bytes whatever the key's length.
//!
//! Each lock implementation adds its own extension (`.lock`, `.flock`).

use sha2::{Digest, Sha256};

/// Longest readable prefix kept from a key, in bytes.
pub const MAX_PREFIX_LEN: usize = 40;
/// Hex digits of the key's SHA-256 in every stem (128 bits).
pub const HASH_HEX_LEN: usize = 32;
/// Upper bound of the length of a stem returned by [`file_stem`].
pub const MAX_STEM_LEN: usize = MAX_PREFIX_LEN + 1 + HASH_HEX_LEN;

/// The file-name stem for the lock named `key`: a sanitised prefix of the key
/// (every byte outside `[A-Za-z0-9_-]` becomes `_`, a leading `-` too, at most
/// [`MAX_PREFIX_LEN`] bytes), `-`, and the first [`HASH_HEX_LEN`] hex digits
/// of SHA-256(`key`). An empty key gives the hash alone.
///
/// Deterministic: every node maps one key to the same stem.
pub fn file_stem(key: &[u8]) -> String {
    let mut stem = String::with_capacity(MAX_STEM_LEN);
    for &byte in key.iter().take(MAX_PREFIX_LEN) {
        let keep = byte.is_ascii_alphanumeric() || byte == b'_' || (byte == b'-' && !stem.is_empty());
        stem.push(if keep { char::from(byte) } else { '_' });
    }
    if !stem.is_empty() {
        stem.push('-');
    }
    let digest = Sha256::digest(key);
    stem.push_str(&hex::encode(&digest[..HASH_HEX_LEN / 2]));
    stem
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn is_safe(stem: &str) -> bool {
        !stem.is_empty()
            && stem.len() <= MAX_STEM_LEN
            && !stem.starts_with('-')
            && stem.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    }

    #[test]
    fn readable_keys_keep_a_readable_prefix() {
        let stem = file_stem(b"alice");
        assert!(stem.starts_with("alice-"), "{stem}");
        assert_eq!(stem.len(), "alice-".len() + HASH_HEX_LEN);
        assert_eq!(stem, file_stem(b"alice"), "deterministic");
    }

    #[test]
    fn hostile_keys_map_to_safe_distinct_stems() {
        let long_a = vec![b'a'; 10_000];
        let mut long_b = long_a.clone();
        long_b[9_999] = b'b';
        let keys: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b".".to_vec(),
            b"..".to_vec(),
            b"../../etc/passwd".to_vec(),
            b"/etc/passwd".to_vec(),
            b"a/b".to_vec(),
            b"a_b".to_vec(),
            b"a?b".to_vec(),
            b"-rf".to_vec(),
            b"_rf".to_vec(),
            b".sessionlb-proxy-x".to_vec(),
            b"\x00".to_vec(),
            b"a\x00b".to_vec(),
            b"\xff\xfe\x01\n\t\r ".to_vec(),
            "ünïcødé/会话".as_bytes().to_vec(),
            long_a,
            long_b,
        ];
        let mut seen = HashSet::new();
        for key in &keys {
            let stem = file_stem(key);
            assert!(is_safe(&stem), "unsafe stem {stem:?} for {key:?}");
            assert!(seen.insert(stem.clone()), "collision on {stem:?}");
        }
    }

    #[test]
    fn sanitised_prefixes_that_collide_still_differ_by_hash() {
        let a = file_stem(b"a/b");
        let b = file_stem(b"a_b");
        assert_eq!(a[..4], b[..4]);
        assert_ne!(a, b);
    }

    #[test]
    fn long_keys_are_bounded() {
        let stem = file_stem(&vec![b'x'; 1 << 20]);
        assert_eq!(stem.len(), MAX_STEM_LEN);
    }
}

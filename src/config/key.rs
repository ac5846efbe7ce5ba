//! The secure cookie key: reading and checking the key file, its cluster
//! fingerprint, and generating one for the quick start.
//!
//! The key is the raw file bytes — trailing newline included — the way
//! Workbench reads it, so the same file works for both. It is never logged,
//! printed or stored: [`SecureKey`]'s `Debug` shows only its length, and the
//! cluster record holds a SHA-256-based fingerprint.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Shortest key accepted (128 bits).
pub const MIN_KEY_BYTES: usize = 16;
/// Below this length (256 bits, Workbench's minimum) a warning is logged.
pub const RECOMMENDED_KEY_BYTES: usize = 32;

/// Why a key file cannot be used. Each maps to a node status.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{}", missing_message(path, tried))]
    Missing {
        path: PathBuf,
        /// Every place looked at, in order, when the path came from a
        /// lookup (Workbench's); empty when it was configured.
        tried: Vec<PathBuf>,
    },
    #[error(
        "secure cookie key file {path} has mode {mode:04o}; it must not be readable or writable by group or others (e.g. 0600: chmod 0600 {path})"
    )]
    BadPermissions { path: PathBuf, mode: u32 },
    #[error("{}", too_short_message(path, *len, *nul_at))]
    TooShort {
        path: PathBuf,
        /// Bytes usable as the key: the whole file, or the part before its
        /// first NUL byte when it has one (`nul_at`).
        len: usize,
        /// Where the first NUL byte is, when it cut the key short: Workbench
        /// signs `user-id` cookies with the key as a C string, so only the
        /// bytes before it count.
        nul_at: Option<usize>,
    },
    #[error("cannot read secure cookie key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn too_short_message(path: &Path, len: usize, nul_at: Option<usize>) -> String {
    match nul_at {
        Some(at) => format!(
            "secure cookie key file {} has a NUL byte at offset {at}: Workbench signs cookies with the key up to its first NUL byte, which leaves {len} bytes; at least {MIN_KEY_BYTES} bytes (128 bits) before any NUL are required, 32 recommended (a text key such as `uuidgen` output has none)",
            path.display()
        ),
        None => format!(
            "secure cookie key file {} holds {len} bytes; at least {MIN_KEY_BYTES} bytes (128 bits) are required, 32 recommended",
            path.display()
        ),
    }
}

fn missing_message(path: &Path, tried: &[PathBuf]) -> String {
    let create = format!("create it with: `uuidgen > {p} && chmod 0600 {p}`", p = path.display());
    if tried.len() > 1 {
        let places: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
        format!("no secure cookie key file found; looked at, in order: {} ({create})", places.join(", "))
    } else {
        format!("secure cookie key file {} does not exist ({create})", path.display())
    }
}

/// The shared secret that signs cookies and node-to-node requests.
#[derive(Clone)]
pub struct SecureKey {
    bytes: Vec<u8>,
    /// HMAC state keyed once; cloning it is cheaper than re-keying per use.
    mac: Hmac<Sha256>,
}

impl fmt::Debug for SecureKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecureKey(<redacted>, {} bytes)", self.bytes.len())
    }
}

impl SecureKey {
    /// Build a key from raw bytes (tests, and keys already read).
    pub fn from_bytes(bytes: Vec<u8>) -> SecureKey {
        let mac = Hmac::<Sha256>::new_from_slice(&bytes).expect("HMAC accepts keys of any length");
        SecureKey { bytes, mac }
    }

    /// Read and check the key file: it must exist, must not be readable or
    /// writable by group or others (e.g. 0600; owner-only modes such as 0400
    /// or 0700 pass, any group/other permission bit is refused), and hold at
    /// least 16 bytes.
    pub fn load(path: &Path) -> Result<SecureKey, KeyError> {
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(KeyError::Missing { path: path.to_path_buf(), tried: Vec::new() });
            }
            Err(source) => {
                return Err(KeyError::Io { path: path.to_path_buf(), source });
            }
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::BadPermissions { path: path.to_path_buf(), mode });
        }
        let bytes = fs::read(path).map_err(|source| KeyError::Io { path: path.to_path_buf(), source })?;
        // What Workbench's cookies are signed with (the key as a C string)
        // must itself be long enough: a binary key with an early NUL would
        // leave a short or empty HMAC key and forgeable `user-id` cookies.
        let usable = workbench_part(&bytes).len();
        if usable < MIN_KEY_BYTES {
            let nul_at = (usable < bytes.len()).then_some(usable);
            return Err(KeyError::TooShort { path: path.to_path_buf(), len: usable, nul_at });
        }
        if usable < RECOMMENDED_KEY_BYTES {
            tracing::warn!(
                path = %path.display(),
                len = usable,
                "secure cookie key is shorter than 32 bytes (256 bits), which Workbench itself requires; use a longer key"
            );
        }
        Ok(SecureKey::from_bytes(bytes))
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false: keys are at least 16 bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The cluster fingerprint: `sha256:` + hex of SHA-256 over a domain
    /// label and the key. It identifies the key without revealing it.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"sessionlb cluster key fingerprint v1\0");
        h.update(&self.bytes);
        format!("sha256:{}", hex::encode(h.finalize()))
    }

    /// A fresh HMAC-SHA256 keyed with this key.
    pub fn mac(&self) -> Hmac<Sha256> {
        self.mac.clone()
    }

    /// Raw bytes, for the few algorithms that need them (Workbench cookies
    /// truncate at NUL; see `proxy::identity`).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The part of the key Workbench signs `user-id` cookies with: up to
    /// its first NUL byte. A loaded key has at least 16 bytes of it.
    pub fn workbench_bytes(&self) -> &[u8] {
        workbench_part(&self.bytes)
    }
}

/// `bytes` up to the first NUL byte (a C string's view of them).
pub fn workbench_part(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

/// Create a key file for the quick start if none exists: a random UUID-like
/// 36-character value plus newline, mode 0600, written atomically.
/// Returns whether a key was created.
pub fn generate_if_missing(path: &Path) -> io::Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let bytes: [u8; 16] = rand::random();
    let h = hex::encode(bytes);
    let value = format!("{}-{}-{}-{}-{}\n", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32]);
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    f.write_all(value.as_bytes())?;
    f.sync_all()?;
    drop(f);
    match fs::hard_link(&tmp, path) {
        Ok(()) => {
            fs::remove_file(&tmp)?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(&tmp)?;
            Ok(false)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_key(dir: &Path, content: &[u8], mode: u32) -> PathBuf {
        let path = dir.join("key");
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn key_is_raw_bytes_including_newline() {
        let dir = tempfile::tempdir().unwrap();
        let a = SecureKey::load(&write_key(dir.path(), b"d3161166-e89b-4158-af3b-5980e3056cc6\n", 0o600)).unwrap();
        let b = SecureKey::from_bytes(b"d3161166-e89b-4158-af3b-5980e3056cc6".to_vec());
        assert_eq!(a.len(), 37);
        assert_ne!(a.fingerprint(), b.fingerprint(), "the trailing newline is part of the key");
        assert!(a.fingerprint().starts_with("sha256:"));
        assert!(!format!("{a:?}").contains("d3161166"), "Debug must not reveal the key");
    }

    #[test]
    fn refuses_missing_open_and_short_keys() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(SecureKey::load(&dir.path().join("nope")), Err(KeyError::Missing { .. })));
        let open = write_key(dir.path(), b"0123456789abcdef0123456789abcdef", 0o644);
        assert!(matches!(SecureKey::load(&open), Err(KeyError::BadPermissions { mode: 0o644, .. })));
        let short = write_key(dir.path(), b"0123456789abcde", 0o600);
        assert!(matches!(SecureKey::load(&short), Err(KeyError::TooShort { len: 15, .. })));
        let ok = write_key(dir.path(), b"0123456789abcdef", 0o600);
        assert_eq!(SecureKey::load(&ok).unwrap().len(), 16);
    }

    #[test]
    fn refuses_a_key_cut_short_by_an_early_nul() {
        let dir = tempfile::tempdir().unwrap();
        // 64 bytes in the file, but Workbench's HMAC key would be 4 (or 0).
        for (content, usable) in
            [(b"abcd\0".iter().chain(&[7u8; 59]).copied().collect::<Vec<u8>>(), 4), ([0u8; 40].to_vec(), 0)]
        {
            let path = write_key(dir.path(), &content, 0o600);
            match SecureKey::load(&path) {
                Err(e @ KeyError::TooShort { .. }) => {
                    let KeyError::TooShort { len, nul_at, .. } = &e else { unreachable!() };
                    assert_eq!((*len, *nul_at), (usable, Some(usable)));
                    let msg = e.to_string();
                    assert!(msg.contains(&path.display().to_string()), "{msg}");
                    assert!(msg.contains(&format!("NUL byte at offset {usable}")), "{msg}");
                    assert!(msg.contains("at least 16 bytes"), "{msg}");
                }
                other => panic!("a key with {usable} bytes before its NUL must be refused, got {other:?}"),
            }
        }
        // A NUL after 16 usable bytes is fine: Workbench's key is those 16.
        let ok: Vec<u8> = b"0123456789abcdef\0tail-bytes".to_vec();
        let key = SecureKey::load(&write_key(dir.path(), &ok, 0o600)).unwrap();
        assert_eq!(key.workbench_bytes(), b"0123456789abcdef");
        assert_eq!(key.len(), ok.len());
    }

    #[test]
    fn only_owner_permissions_matter() {
        let dir = tempfile::tempdir().unwrap();
        let key = b"0123456789abcdef0123456789abcdef\n";
        for mode in [0o400, 0o600, 0o700] {
            let path = write_key(dir.path(), key, mode);
            assert!(SecureKey::load(&path).is_ok(), "mode {mode:04o} is owner-only and must be accepted");
        }
        for mode in [0o640, 0o604, 0o620, 0o602, 0o610] {
            let path = write_key(dir.path(), key, mode);
            match SecureKey::load(&path) {
                Err(e @ KeyError::BadPermissions { .. }) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains(&format!(
                            "has mode {mode:04o}; it must not be readable or writable by group or others (e.g. 0600"
                        )),
                        "{msg}"
                    );
                }
                other => panic!("mode {mode:04o} must be refused, got {other:?}"),
            }
        }
    }

    #[test]
    fn generated_key_is_private_and_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/key");
        assert!(generate_if_missing(&path).unwrap());
        let first = fs::read(&path).unwrap();
        assert_eq!(first.len(), 37);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!generate_if_missing(&path).unwrap());
        assert_eq!(fs::read(&path).unwrap(), first);
        SecureKey::load(&path).unwrap();
    }
}

//! The bodies of the fuzz targets. Each takes arbitrary bytes, feeds them to
//! a public entry point of sessionlb that reads untrusted input (cookies,
//! node-to-node headers, request paths) or operator-written files (the TOML
//! and Workbench configuration readers), and asserts what must hold for
//! *every* input — not only "does not panic":
//!
//! - `toml_config`, `workbench_files`: the configuration is accepted, or
//!   refused with problems that each name one of the files read and a line
//!   inside it; an accepted configuration renders (`check-config`) as TOML.
//! - `affinity_cookie` (legacy v1) and `pin_cookie` (v2), each a
//!   [`SignedCookieFormat`]: what verifies is exactly a
//!   value sessionlb itself would issue (no second spelling of a valid
//!   cookie), nothing verifies under another key, a cookie signed from the
//!   input's fields verifies, and no single changed byte of it does.
//! - `user_id_cookie`: Workbench's `user-id` cookie verifier; signed cookies
//!   verify until they expire, never under another key.
//! - `forward_header`: the node-to-node header verifier; only a header
//!   sessionlb signed for this node, this request line and this time window
//!   verifies, with exactly the rejection reason the fields call for.
//! - `session_key`: the backend key extracted from a path obeys the pattern
//!   and the key alphabet; cookies found in `Cookie` headers are really there.
//!
//! `cargo +nightly fuzz run <name>` runs one (see `scripts/fuzz.sh`); the
//! stable test `integration/fuzz_corpus.rs` replays `fuzz/corpus/<name>/`
//! and `fuzz/regressions/<name>/` through the same functions.

use std::path::Path;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sessionlb::cluster::NodeId;
use sessionlb::config::key::SecureKey;
use sessionlb::config::{Config, ConfigError, ConfigProblem, SessionPathPattern};
use sessionlb::proxy::forward::{self, ForwardRejection, Forwarded, RequestLine};
use sessionlb::proxy::identity::{self, UserCookieRejection};
use sessionlb::proxy::{cookie, routing};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target by name; `fuzz/corpus/<name>/` holds its corpus.
pub const TARGETS: &[(&str, Target)] = &[
    ("toml_config", toml_config),
    ("workbench_files", workbench_files),
    ("affinity_cookie", affinity_cookie),
    ("pin_cookie", pin_cookie),
    ("user_id_cookie", user_id_cookie),
    ("forward_header", forward_header),
    ("session_key", session_key),
];

/// The key everything is signed with here: the key of Workbench's published
/// `user-id` test vector, which is in the corpus (so that mutations of a
/// valid cookie reach the code behind the MAC check).
pub const KEY_BYTES: &[u8] = b"d3161166-e89b-4158-af3b-5980e3056cc6\n";
static KEY: LazyLock<SecureKey> = LazyLock::new(|| SecureKey::from_bytes(KEY_BYTES.to_vec()));
/// Another key: nothing signed with [`KEY_BYTES`] may verify with it.
static OTHER_KEY: LazyLock<SecureKey> =
    LazyLock::new(|| SecureKey::from_bytes(b"ffffffff-e89b-4158-af3b-5980e3056cc6\n".to_vec()));

/// The targets' clock: 2022-06-08 21:00:00 UTC, before the test vector expires.
pub const NOW_SECS: u64 = 1_654_722_000;
const NOW_MS: i64 = NOW_SECS as i64 * 1000;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW_SECS)
}

/// Reads fields off the front of the fuzz input; an exhausted input yields zeros.
pub struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input(data)
    }

    pub fn byte(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        first
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    /// Up to `max` bytes as text (invalid UTF-8 replaced).
    pub fn text(&mut self, max: usize) -> String {
        let n = usize::from(self.byte()) % (max + 1);
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        String::from_utf8_lossy(head).into_owned()
    }
}

// --- configuration readers ---------------------------------------------------

/// The checks on a configuration result: every problem names one of the
/// `files` and a line within it (`lines` gives a file's line count); an
/// accepted configuration renders as TOML.
fn check_config(result: Result<Config, ConfigError>, files: &[&Path], lines: impl Fn(&Path) -> usize) {
    match result {
        Ok(config) => {
            let text = config.render();
            if let Err(e) = text.parse::<toml::Table>() {
                panic!("check-config's rendering of an accepted configuration is not TOML: {e}\n{text}");
            }
        }
        Err(ConfigError::Invalid(problems)) => {
            assert!(!problems.is_empty(), "refused without a problem");
            for ConfigProblem { file, line, message, .. } in &problems {
                assert!(
                    files.contains(&file.as_path()),
                    "a problem names {}, not a file read: {message}",
                    file.display()
                );
                assert!(!message.trim().is_empty(), "a problem without a message in {}", file.display());
                if let Some(line) = line {
                    let max = lines(file) + 1;
                    assert!((1..=max).contains(line), "{}:{line}: line out of 1..={max}: {message}", file.display());
                }
            }
        }
        Err(e @ ConfigError::Read { .. }) => panic!("unexpected read error: {e}"),
    }
}

fn line_count(text: &[u8]) -> usize {
    text.split(|b| *b == b'\n').count()
}

/// The native TOML reader and validation (`Config::from_toml`).
pub fn toml_config(data: &[u8]) {
    let Ok(src) = std::str::from_utf8(data) else { return };
    let file = Path::new("fuzz.toml");
    check_config(Config::from_toml(file, src), &[file], |_| line_count(data));
}

/// Files of a Workbench directory, in the order the input gives them.
const WORKBENCH_FILES: [&str; 4] = ["load-balancer", "rserver.conf", "file-locks", "database.conf"];

/// The Workbench directory reader (`--rstudio-config`): the input is split
/// at NUL bytes into `load-balancer`, `rserver.conf`, `file-locks` and
/// `database.conf` (fewer parts: the later files are absent), written to a
/// directory and read with `Config::load`, as `serve` does.
pub fn workbench_files(data: &[u8]) {
    // A fresh directory per input, removed afterwards (nothing left behind);
    // in memory where there is /dev/shm (a disk costs most of the time here).
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
    let temp = tempfile::Builder::new().prefix("sessionlb-fuzz-rstudio").tempdir_in(base).unwrap();
    let dir = temp.path();
    let mut parts = data.splitn(WORKBENCH_FILES.len(), |b| *b == 0);
    let mut contents: Vec<(std::path::PathBuf, &[u8])> = Vec::new();
    for name in WORKBENCH_FILES {
        let path = dir.join(name);
        if let Some(part) = parts.next() {
            std::fs::write(&path, part).unwrap();
            contents.push((path, part));
        }
    }
    let files: Vec<&Path> = contents.iter().map(|(p, _)| p.as_path()).collect();
    let lines = |file: &Path| contents.iter().find(|(p, _)| p == file).map_or(0, |(_, text)| line_count(text));
    check_config(Config::load(None, Some(dir)), &files, lines);
}

// --- signed cookies ---------------------------------------------------------

/// A signed cookie format as the cookie targets see it. The affinity cookie
/// is one; a pin cookie is added as one more impl and one more target.
pub trait SignedCookieFormat {
    /// A cookie for fields taken from `input`, issued at `now_secs`.
    fn sign_from(key: &SecureKey, input: &mut Input<'_>, now_secs: u64) -> String;
    /// Verify `value` at `now_secs`: `Ok` with the value signed anew from what
    /// it verified to, or `Err` with the rejection reason.
    fn verify_and_resign(key: &SecureKey, value: &str, now_secs: u64) -> Result<String, &'static str>;
}

/// The legacy `sessionlb-affinity` cookie: `v1.<id>.<issued>.<mac>` (still
/// verified until such cookies expire; no longer issued).
pub struct AffinityCookie;

/// The maximum age the cookie targets verify with (the default, 12 h).
const AFFINITY_MAX_AGE: u64 = 12 * 3600;

/// A 22-character base64url id from the input.
fn id_from(input: &mut Input<'_>) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    (0..22).map(|_| char::from(ALPHABET[usize::from(input.byte() % 64)])).collect()
}

impl SignedCookieFormat for AffinityCookie {
    fn sign_from(key: &SecureKey, input: &mut Input<'_>, now_secs: u64) -> String {
        let id = id_from(input);
        let age = u64::from(input.u32()) % (AFFINITY_MAX_AGE + 1);
        cookie::sign_v1(key, &id, now_secs - age)
    }

    fn verify_and_resign(key: &SecureKey, value: &str, now_secs: u64) -> Result<String, &'static str> {
        match cookie::verify(key, value, now_secs, AFFINITY_MAX_AGE).map_err(|r| r.as_str())? {
            cookie::AffinityCookie::Legacy(a) => Ok(cookie::sign_v1(key, &a.id, a.issued)),
            cookie::AffinityCookie::Pin(p) => Ok(p.sign(key)),
        }
    }
}

/// The pin cookie of an anonymous browser: `v2.<id>.<node>.<issued>.<mac>`.
pub struct PinCookie;

impl SignedCookieFormat for PinCookie {
    fn sign_from(key: &SecureKey, input: &mut Input<'_>, now_secs: u64) -> String {
        let id = id_from(input);
        let node = NodeId::from(input.u32() % 100_000);
        let age = u64::from(input.u32()) % (AFFINITY_MAX_AGE + 1);
        cookie::Pin { id, node, issued: now_secs - age }.sign(key)
    }

    fn verify_and_resign(key: &SecureKey, value: &str, now_secs: u64) -> Result<String, &'static str> {
        // Both versions share one verifier; re-signing what it verified to
        // must give back the value exactly, whichever version it was.
        AffinityCookie::verify_and_resign(key, value, now_secs)
    }
}

/// The checks every signed cookie format must pass (see the module doc).
pub fn signed_cookie<F: SignedCookieFormat>(data: &[u8]) {
    if let Ok(value) = std::str::from_utf8(data) {
        if let Ok(canonical) = F::verify_and_resign(&KEY, value, NOW_SECS) {
            assert_eq!(canonical, value, "a second spelling of a valid cookie verified");
        }
        assert!(F::verify_and_resign(&OTHER_KEY, value, NOW_SECS).is_err(), "verified under another key: {value:?}");
    }
    let mut input = Input::new(data);
    let signed = F::sign_from(&KEY, &mut input, NOW_SECS);
    assert_eq!(F::verify_and_resign(&KEY, &signed, NOW_SECS), Ok(signed.clone()), "a fresh cookie must verify");
    assert!(F::verify_and_resign(&OTHER_KEY, &signed, NOW_SECS).is_err());
    let mut changed = signed.clone().into_bytes();
    let at = input.u32() as usize % changed.len();
    changed[at] ^= input.byte().max(1);
    if let Ok(changed) = String::from_utf8(changed) {
        assert!(
            F::verify_and_resign(&KEY, &changed, NOW_SECS).is_err(),
            "{signed:?} changed at byte {at} into {changed:?} still verifies"
        );
    }
}

/// The cookie verifier (`proxy::cookie::verify`) on legacy v1 cookies.
pub fn affinity_cookie(data: &[u8]) {
    signed_cookie::<AffinityCookie>(data);
}

/// The cookie verifier (`proxy::cookie::verify`) on v2 pin cookies.
pub fn pin_cookie(data: &[u8]) {
    signed_cookie::<PinCookie>(data);
}

/// Workbench's `user-id` cookie verifier (`proxy::identity`).
pub fn user_id_cookie(data: &[u8]) {
    let mac = identity::workbench_mac(&KEY);
    let other = identity::workbench_mac(&OTHER_KEY);
    if let Ok(value) = std::str::from_utf8(data) {
        if let Ok(user) = identity::verify_workbench_cookie(&mac, value, now()) {
            assert!(!user.is_empty(), "an empty user verified");
        }
        assert!(identity::verify_workbench_cookie(&other, value, now()).is_err(), "verified under another key");
    }
    let mut input = Input::new(data);
    let user = Some(input.text(64)).filter(|u| !u.is_empty()).unwrap_or_else(|| "u".into());
    let ttl = u64::from(input.u32()) % (10 * 365 * 86_400);
    let expires = httpdate::fmt_http_date(now() + Duration::from_secs(ttl));
    let signed = identity::sign_workbench_cookie(&mac, &user, &expires);
    let expected = if ttl == 0 { Err(UserCookieRejection::Expired) } else { Ok(user.clone()) };
    assert_eq!(identity::verify_workbench_cookie(&mac, &signed, now()), expected, "{signed:?}");
    assert_eq!(identity::verify_workbench_cookie(&other, &signed, now()), Err(UserCookieRejection::BadMac));
}

// --- node-to-node header ----------------------------------------------------

/// This node's id in the forwarding target; nodes 1–3 exist.
const ME: NodeId = 2;
const WINDOW_MS: i64 = 30_000;
const REQUEST: RequestLine<'static> =
    RequestLine { method: "GET", host: "10.0.0.12:8787", path_and_query: "/s/3a9e1f/p/x?y=1" };

fn is_node(id: NodeId) -> bool {
    (1..=3).contains(&id)
}

/// The forwarding-header verifier (`proxy::forward::verify`).
pub fn forward_header(data: &[u8]) {
    if let Ok(value) = std::str::from_utf8(data) {
        if let Ok(f) = forward::verify(&KEY, value, ME, is_node, NOW_MS, WINDOW_MS, &REQUEST) {
            let time: i64 = value.split(';').nth(3).and_then(|t| t.parse().ok()).expect("a verified header has a time");
            let nonce = forward::nonce_of(value).expect("a verified header has a nonce");
            let again =
                forward::sign_with_nonce(&KEY, f.sender, ME, time, nonce, &f.key, f.user.as_deref(), &REQUEST, "");
            assert_eq!(again, value, "a second spelling of a valid header verified");
        }
        assert!(forward::verify(&OTHER_KEY, value, ME, is_node, NOW_MS, WINDOW_MS, &REQUEST).is_err());
    }
    let mut input = Input::new(data);
    let sender: NodeId = 1 + NodeId::from(input.byte() % 4); // 4 is no node
    let target: NodeId = if input.byte().is_multiple_of(4) { 3 } else { ME };
    let skew = i64::from(input.u32() % 120_001) - 60_000;
    let key = input.text(160);
    let user = Some(input.text(64)).filter(|_| input.byte().is_multiple_of(2));
    let signed = forward::sign(&KEY, sender, target, NOW_MS + skew, &key, user.as_deref(), &REQUEST);
    let expected = if target != ME {
        Err(ForwardRejection::WrongTarget)
    } else if skew.abs() > WINDOW_MS {
        Err(ForwardRejection::Stale)
    } else if !is_node(sender) {
        Err(ForwardRejection::UnknownSender)
    } else if key.is_empty() {
        Err(ForwardRejection::Malformed)
    } else {
        Ok(Forwarded { sender, key: key.clone(), user: user.clone().filter(|u| !u.is_empty()) })
    };
    assert_eq!(forward::verify(&KEY, &signed, ME, is_node, NOW_MS, WINDOW_MS, &REQUEST), expected, "{signed:?}");
    // Moved to another request line, or changed in one byte, it fails.
    let moved = RequestLine { path_and_query: "/s/3a9e1f/p/x?y=2", ..REQUEST };
    assert_eq!(forward::verify(&KEY, &signed, ME, is_node, NOW_MS, WINDOW_MS, &moved), Err(ForwardRejection::BadMac));
    let mut changed = signed.clone().into_bytes();
    let at = input.u32() as usize % changed.len();
    changed[at] ^= input.byte().max(1);
    if let Ok(changed) = String::from_utf8(changed) {
        assert!(
            forward::verify(&KEY, &changed, ME, is_node, NOW_MS, WINDOW_MS, &REQUEST).is_err(),
            "{signed:?} changed at byte {at} into {changed:?} still verifies"
        );
    }
}

// --- session keys -----------------------------------------------------------

/// The session-key extractor (`proxy::routing::path_key`) and the cookie
/// finder (`proxy::cookie::find_cookies`). Input lines: a
/// `session-path-pattern` (the default when it does not parse), a path,
/// then `Cookie` header values.
pub fn session_key(data: &[u8]) {
    let mut lines = data.split(|b| *b == b'\n');
    let pattern = lines
        .next()
        .and_then(|l| std::str::from_utf8(l).ok())
        .and_then(SessionPathPattern::parse)
        .unwrap_or_else(|| SessionPathPattern::parse("/s/{key}/").unwrap());
    if let Some(path) = lines.next().and_then(|l| std::str::from_utf8(l).ok())
        && let Some(key) = routing::path_key(&pattern, path)
    {
        assert!((1..=routing::MAX_KEY_LEN).contains(&key.len()), "key length {}", key.len());
        assert!(key.bytes().all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b)), "key {key:?}");
        assert!(key != "." && key != "..", "traversal key {key:?}");
        let after = path.strip_prefix(pattern.prefix.as_str()).and_then(|r| r.strip_prefix(key.as_str()));
        let after = after.unwrap_or_else(|| panic!("key {key:?} is not right after the prefix in {path:?}"));
        assert!(after.is_empty() || after.starts_with(pattern.suffix.as_str()), "{path:?} → {key:?}");
    }
    let headers: Vec<&[u8]> = lines.collect();
    let names = ["sessionlb-affinity", "user-id"];
    let found = cookie::find_cookies(headers.iter().copied(), names);
    for (name, value) in names.iter().zip(found) {
        assert_eq!(cookie::find_cookie(headers.iter().copied(), name), value);
        let Some(value) = value else { continue };
        assert!(!value.contains(';'), "{name}={value:?} spans a separator");
        let pair = format!("{name}={value}");
        assert!(
            headers.iter().any(|h| std::str::from_utf8(h).is_ok_and(|h| h.contains(&pair))),
            "{pair:?} is in no header"
        );
    }
}

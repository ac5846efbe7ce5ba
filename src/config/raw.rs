//! The raw, untyped view of configuration: every setting found in any file,
//! keyed by its canonical dotted name (`www-port`, `locks.lock-type`) with the
//! file and line it came from.
//!
//! Both the native TOML file and the Workbench-style `key=value` files are
//! flattened into a [`RawConfig`]; validation (in `schema.rs`) then walks one
//! map and reports every problem with its origin, whatever the format.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Where a setting was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file the setting was read from.
    pub file: PathBuf,
    /// 1-based line number in that file.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// A value as written, before it is checked against the key's type.
#[derive(Debug, Clone, PartialEq)]
pub enum RawValue {
    /// A TOML string.
    Str(String),
    /// A TOML integer.
    Int(i64),
    /// A TOML float.
    Float(f64),
    /// A TOML boolean.
    Bool(bool),
    /// A TOML array.
    Array(Vec<RawValue>),
    /// Untyped text from a `key=value` file: each key parses it as its own type.
    Text(String),
    /// Something no key accepts here (a table, a date): the name of its kind.
    Unsupported(&'static str),
}

impl RawValue {
    /// A short description for error messages: `string "abc"`, `integer 5`.
    pub fn describe(&self) -> String {
        match self {
            RawValue::Str(s) | RawValue::Text(s) => format!("{s:?}"),
            RawValue::Int(i) => format!("integer {i}"),
            RawValue::Float(x) => format!("float {x}"),
            RawValue::Bool(b) => format!("boolean {b}"),
            RawValue::Array(_) => "an array".to_string(),
            RawValue::Unsupported(kind) => format!("a {kind}"),
        }
    }

    /// This value as written under `key`, with secrets hidden: any string
    /// given as `database-password`, and the passwords in a `database` URL.
    pub fn redacted(&self, key: &str) -> RawValue {
        match (key, self) {
            ("database-password", RawValue::Str(_)) => RawValue::Str("***".into()),
            ("database-password", RawValue::Text(_)) => RawValue::Text("***".into()),
            ("database", RawValue::Str(s)) => RawValue::Str(super::redact_url_password(s)),
            ("database", RawValue::Text(s)) => RawValue::Text(super::redact_url_password(s)),
            _ => self.clone(),
        }
    }
}

/// One setting: its value and where it was written.
#[derive(Debug, Clone)]
pub struct RawEntry {
    pub value: RawValue,
    pub origin: Origin,
}

/// All settings found, by canonical dotted key. A later source overrides an
/// earlier one key by key. Its `Debug` hides secrets (see [`RawValue::redacted`]).
#[derive(Default, Clone)]
pub struct RawConfig {
    pub entries: BTreeMap<String, RawEntry>,
    /// Every file that contributed, in the order read.
    pub files: Vec<PathBuf>,
}

impl fmt::Debug for RawConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries: BTreeMap<&str, RawEntry> = self
            .entries
            .iter()
            .map(|(k, e)| (k.as_str(), RawEntry { value: e.value.redacted(k), origin: e.origin.clone() }))
            .collect();
        f.debug_struct("RawConfig").field("entries", &entries).field("files", &self.files).finish()
    }
}

impl RawConfig {
    /// Insert or override one setting.
    pub fn set(&mut self, key: impl Into<String>, value: RawValue, file: &Path, line: usize) {
        self.entries.insert(key.into(), RawEntry { value, origin: Origin { file: file.to_path_buf(), line } });
    }

    /// Merge `other` over `self` (its keys win).
    pub fn overlay(&mut self, other: RawConfig) {
        self.entries.extend(other.entries);
        self.files.extend(other.files);
    }
}

/// Line number (1-based) of a byte offset in `src`.
pub fn line_of(src: &str, offset: usize) -> usize {
    let end = offset.min(src.len());
    src.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

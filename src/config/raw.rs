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

use super::ConfigProblem;

/// Where a setting came from: `check-config` prints it next to every value,
/// and problems name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Written in a file at a 1-based line (0: the file as a whole, for a
    /// value derived from what it does not say). `via` names the Workbench
    /// setting(s) it was derived from when they differ from the native key
    /// (`backend` from rserver.conf's `www-address` and `www-port`).
    File { file: PathBuf, line: usize, via: Option<String> },
    /// A command-line flag, such as `--listen`.
    Flag(String),
    /// An environment variable.
    Env(String),
    /// Found by a search (Workbench's secure cookie key lookup); the text
    /// says what was looked at.
    Lookup(String),
}

impl Origin {
    /// A setting written at `line` of `file`.
    pub fn file(file: &Path, line: usize) -> Origin {
        Origin::File { file: file.to_path_buf(), line, via: None }
    }

    /// The file and line, for problems (flags and variables have neither).
    pub fn file_and_line(&self) -> (PathBuf, Option<usize>) {
        match self {
            Origin::File { file, line, .. } => (file.clone(), (*line > 0).then_some(*line)),
            Origin::Flag(flag) => (PathBuf::from(format!("command line {flag}")), None),
            Origin::Env(var) => (PathBuf::from(format!("environment {var}")), None),
            Origin::Lookup(_) => (PathBuf::from("secure cookie key lookup"), None),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { file, line: 0, via: None } => write!(f, "{}", file.display()),
            Origin::File { file, line: 0, via: Some(via) } => write!(f, "{} ({via})", file.display()),
            Origin::File { file, line, via: None } => write!(f, "{}:{line}", file.display()),
            Origin::File { file, line, via: Some(via) } => write!(f, "{}:{line} ({via})", file.display()),
            Origin::Flag(flag) => write!(f, "command line {flag}"),
            Origin::Env(var) => write!(f, "environment {var}"),
            Origin::Lookup(text) => f.write_str(text),
        }
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
            ("database", RawValue::Str(s)) => RawValue::Str(super::database::redact_url_password(s)),
            ("database", RawValue::Text(s)) => RawValue::Text(super::database::redact_url_password(s)),
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
    /// Things worth telling that do not stop the node (a Workbench key
    /// sessionlb does not use, a database.conf readable by others).
    pub warnings: Vec<ConfigProblem>,
    /// What a Workbench directory says beyond its settings, when one was read.
    pub workbench: Option<WorkbenchFacts>,
}

/// Facts from a Workbench directory that are not settings of their own.
#[derive(Debug, Default, Clone)]
pub struct WorkbenchFacts {
    /// The directory (`--rstudio-config`).
    pub dir: PathBuf,
    /// Why this directory describes a load-balanced cluster (the
    /// load-balancer file, `load-balancing-enabled=1`, or a legacy `[nodes]`
    /// list of several nodes), with where it says so.
    pub cluster: Option<(Origin, String)>,
    /// The entries of a legacy `[nodes]` list, in order.
    pub legacy_nodes: Vec<String>,
    /// Every place the secure cookie key was looked for, in order.
    pub key_tried: Vec<PathBuf>,
}

impl fmt::Debug for RawConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries: BTreeMap<&str, RawEntry> = self
            .entries
            .iter()
            .map(|(k, e)| (k.as_str(), RawEntry { value: e.value.redacted(k), origin: e.origin.clone() }))
            .collect();
        f.debug_struct("RawConfig")
            .field("entries", &entries)
            .field("files", &self.files)
            .field("warnings", &self.warnings)
            .field("workbench", &self.workbench)
            .finish()
    }
}

impl RawConfig {
    /// Insert or override one setting written at `line` of `file`.
    pub fn set(&mut self, key: impl Into<String>, value: RawValue, file: &Path, line: usize) {
        self.set_from(key, value, Origin::file(file, line));
    }

    /// Insert or override one setting with its origin.
    pub fn set_from(&mut self, key: impl Into<String>, value: RawValue, origin: Origin) {
        self.entries.insert(key.into(), RawEntry { value, origin });
    }

    /// Merge `other` over `self` (its keys win).
    pub fn overlay(&mut self, other: RawConfig) {
        self.entries.extend(other.entries);
        self.files.extend(other.files);
        self.warnings.extend(other.warnings);
        if other.workbench.is_some() {
            self.workbench = other.workbench;
        }
    }
}

/// Line number (1-based) of a byte offset in `src`.
pub fn line_of(src: &str, offset: usize) -> usize {
    let end = offset.min(src.len());
    src.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

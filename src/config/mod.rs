//! Configuration: the validated settings every other module reads.
//!
//! Sources, later ones winning key by key: built-in defaults, the native
//! TOML file (`toml_file`), a Workbench directory (`rstudio`, with
//! `--rstudio-config`), then command-line flags (`--listen`). Each value
//! keeps where it came from, and `check-config` prints it.
//!
//! By concern: `settings` (the types), `database` (the registry URL,
//! password splicing, redaction), `reader` (typed reading of raw settings),
//! `schema` (every key with its type and default), `layout` (cross-key rules
//! of the drop-in layout), `render` (the effective configuration as TOML),
//! `rstudio` (the Workbench mapping), `key` and `password` (the secure
//! cookie key and Workbench-encrypted passwords). Loading collects *every*
//! problem — each naming its file, line, key and the allowed values —
//! before failing. [`Config`] is plain data: nobody writes it back.

pub mod database;
pub mod key;
mod layout;
pub mod password;
pub mod raw;
pub mod reader;
mod render;
pub mod rstudio;
pub mod schema;
pub mod settings;
pub mod toml_file;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use self::database::{DatabaseUrl, PASSWORD_ENV};
pub use self::schema::valid_host_port;
pub use self::settings::*;

use self::key::{KeyError, SecureKey};
use self::raw::{Origin, RawConfig, RawValue};

/// Default location of the native configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/sessionlb/sessionlb.toml";

/// One thing wrong with the configuration (or, as a warning, worth telling).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl ConfigProblem {
    /// A problem about `key`, located where the setting came from.
    pub fn at(origin: &Origin, key: &str, message: String) -> ConfigProblem {
        let (file, line) = origin.file_and_line();
        ConfigProblem { file, line, key: Some(key.to_string()), message }
    }
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// Loading the configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration ({} problem{}):\n{}", .0.len(), if .0.len() == 1 { "" } else { "s" },
        .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigProblem>),
}

/// What to read: the native file, a Workbench directory, and flags that
/// override both.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The native TOML file.
    pub config_file: Option<PathBuf>,
    /// A Workbench configuration directory (`--rstudio-config /etc/rstudio`).
    pub rstudio_dir: Option<PathBuf>,
    /// Where sessionlb listens (`--listen`), over `www-address`/`www-port`.
    pub listen: Option<SocketAddr>,
}

/// Everything sessionlb is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The files this configuration was read from.
    pub files: Vec<PathBuf>,
    /// Where each value that is not a default came from, by key.
    pub sources: BTreeMap<String, Origin>,
    /// Things worth telling that do not stop the node, each with its file
    /// and line (a Workbench key sessionlb does not use, a database.conf
    /// readable by others).
    pub warnings: Vec<ConfigProblem>,
    pub node: NodeConfig,
    pub cluster: ClusterConfig,
    pub balancer: BalancerConfig,
    pub proxy: ProxyConfig,
    pub sessions: SessionsConfig,
    pub identity: IdentityConfig,
    pub locks: LockSettings,
    pub server: ServerSettings,
}

impl Config {
    /// The protocol this node speaks to its peers; part of the cluster record.
    pub fn protocol(&self) -> &'static str {
        match (self.proxy.ssl_enabled, self.proxy.verify_ssl_certs) {
            (false, _) => "http",
            (true, true) => "https",
            (true, false) => "https-no-verify",
        }
    }

    /// The address sessionlb listens on.
    pub fn listen_address(&self) -> SocketAddr {
        SocketAddr::new(self.node.www_address, self.node.www_port)
    }

    /// The registry URL with the database password filled in: the
    /// environment's [`PASSWORD_ENV`] (as Workbench reads it) or else
    /// `database-password`; decrypted with the secure cookie key when it was
    /// encrypted.
    pub fn registry_url(&self) -> Result<DatabaseUrl, String> {
        self.registry_url_with(std::env::var(PASSWORD_ENV).ok())
    }

    /// [`registry_url`](Self::registry_url) with the environment's password given.
    pub fn registry_url_with(&self, env_password: Option<String>) -> Result<DatabaseUrl, String> {
        // The variable only concerns a PostgreSQL registry (a node on SQLite
        // may share its environment with a Workbench that uses it).
        let env_password = env_password.filter(|p| !p.is_empty() && self.cluster.database.is_postgres());
        let Some(configured) = env_password.as_ref().or(self.cluster.database_password.as_ref()) else {
            return Ok(self.cluster.database.clone());
        };
        let DatabaseUrl::Postgres(url) = &self.cluster.database else {
            return Err("`database-password` goes with a postgres:// database".into());
        };
        let plain = if password::looks_encrypted(configured) {
            // The same checks (existence, mode, length) as when the node starts.
            let key = self
                .secure_key()
                .map_err(|e| format!("cannot use the secure cookie key to decrypt database-password: {e}"))?;
            password::decrypt(key.bytes(), configured).map_err(|e| format!("database-password: {e}"))?
        } else {
            configured.clone()
        };
        database::with_password(url, &plain).map(DatabaseUrl::Postgres)
    }

    /// Read and check the secure cookie key; when it is missing, the error
    /// names every place it was looked for.
    pub fn secure_key(&self) -> Result<SecureKey, KeyError> {
        match SecureKey::load(&self.cluster.secure_cookie_key_file) {
            Err(KeyError::Missing { path, .. }) => {
                Err(KeyError::Missing { path, tried: self.cluster.secure_cookie_key_tried.clone() })
            }
            other => other,
        }
    }

    /// Whether this node is a router (no local backend).
    pub fn is_router(&self) -> bool {
        self.node.backend.is_none()
    }

    /// Load the native TOML file, optionally overlaid by a Workbench directory.
    pub fn load(path: Option<&Path>, rstudio_dir: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_with(&LoadOptions {
            config_file: path.map(Path::to_path_buf),
            rstudio_dir: rstudio_dir.map(Path::to_path_buf),
            listen: None,
        })
    }

    /// Load the native TOML file, the Workbench directory over it, and the
    /// flags over both.
    pub fn load_with(options: &LoadOptions) -> Result<Config, ConfigError> {
        let mut raw = RawConfig::default();
        let mut problems = Vec::new();
        if let Some(path) = &options.config_file {
            let src = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
            match toml_file::parse(path, &src) {
                Ok(r) => raw = r,
                Err(mut errs) => problems.append(&mut errs),
            }
        }
        if let Some(dir) = &options.rstudio_dir {
            match rstudio::read_dir(dir, &raw) {
                Ok(r) => raw.overlay(r),
                Err(mut errs) => problems.append(&mut errs),
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        if let Some(listen) = options.listen {
            let flag = Origin::Flag("--listen".into());
            raw.set_from("www-address", RawValue::Text(listen.ip().to_string()), flag.clone());
            raw.set_from("www-port", RawValue::Int(i64::from(listen.port())), flag);
        }
        let mut config = Config::from_raw(raw)?;
        if config.cluster.database.is_postgres() && std::env::var(PASSWORD_ENV).is_ok_and(|v| !v.is_empty()) {
            config.sources.insert("database-password".into(), Origin::Env(PASSWORD_ENV.into()));
        }
        Ok(config)
    }

    /// Parse TOML text (as if read from `file`).
    pub fn from_toml(file: &Path, src: &str) -> Result<Config, ConfigError> {
        let raw = toml_file::parse(file, src).map_err(ConfigError::Invalid)?;
        Config::from_raw(raw)
    }

    /// Validate raw settings, collecting every problem.
    pub fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
        schema::read(raw)
    }
}

#[cfg(test)]
mod tests;

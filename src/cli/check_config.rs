//! `sessionlb check-config`: validate and print the effective configuration,
//! each value with where it came from, after a summary of the layout this
//! node would run with (listen address, node address, backend, registry,
//! protocol). It fails where `serve` would: no usable key, an address that
//! does not resolve, a database password that does not decrypt.

use anyhow::{Context, bail};

use sessionlb::cluster::address::{self, AddressSource, SystemResolver};
use sessionlb::config::password;
use sessionlb::config::raw::Origin;
use sessionlb::config::{Config, PASSWORD_ENV};

use super::{GlobalOpts, show};

pub fn run(config: &Config, global: &GlobalOpts) -> anyhow::Result<()> {
    let files: Vec<String> = config.files.iter().map(|p| show(p)).collect();
    if files.is_empty() {
        println!("# no configuration file given: built-in defaults");
    } else {
        println!("# read from: {}", files.join(", "));
    }
    if global.rstudio_config.is_some() {
        println!("# (Workbench files override the native file key by key; rserver.conf describes the backend)");
    }
    for warning in &config.warnings {
        println!("warning: {warning}");
    }
    let source = |key: &str| config.sources.get(key).map_or("default".to_string(), Origin::to_string);

    let listen = config.listen_address();
    println!("# listen address: {listen} (www-address: {}; www-port: {})", source("www-address"), source("www-port"));
    let node = address::determine(&config.node, &SystemResolver)
        .context("configuration is valid, but this node's address cannot be determined")?;
    println!("# node address:   {} ({})", node.host_port(), explain_address(config, &node));
    match &config.node.backend {
        Some(backend) => println!(
            "# backend:        {}://{backend} ({})",
            if config.node.backend_tls { "https" } else { "http" },
            source("backend")
        ),
        None => println!("# backend:        none: a router node, which hosts no sessions"),
    }
    let c = &config.cluster;
    if c.database.is_postgres() {
        println!(
            "# registry:       {}, schema {}, pool-size {} (+1 for change notifications), connection timeout {}s",
            c.database.redacted(),
            c.database_schema,
            c.pool_size,
            c.database_connection_timeout.as_secs_f64()
        );
    } else {
        println!("# registry:       {} (SQLite: this machine only)", c.database.redacted());
    }
    print_password(config)?;
    match (&config.proxy.ssl_certificate, config.proxy.ssl_enabled) {
        (Some(cert), true) => {
            println!("# cluster protocol: {} (TLS listener with {})", config.protocol(), cert.display())
        }
        _ => println!("# cluster protocol: {}", config.protocol()),
    }
    print!("{}", config.render_with_sources());
    // The node would refuse to start without a usable key: say so now. The
    // key's bytes are never printed.
    match config.secure_key() {
        Ok(key) => {
            println!(
                "# secure cookie key: {}, {} bytes, fingerprint {}",
                c.secure_cookie_key_file.display(),
                key.len(),
                key.fingerprint()
            );
            println!("Configuration OK");
            Ok(())
        }
        Err(e) => bail!("configuration is valid, but {e}"),
    }
}

/// Which rule gave the node address, and from where.
fn explain_address(config: &Config, node: &address::NodeAddress) -> String {
    let named_port =
        |name: &str| name.rsplit_once(':').is_some_and(|(h, p)| !h.ends_with(':') && p.parse::<u16>().is_ok());
    let port = |has_port: bool| {
        if has_port { "its port as written".to_string() } else { format!("port {} where sessionlb listens", node.port) }
    };
    let from = |key: &str| config.sources.get(key).map_or("default".to_string(), Origin::to_string);
    match node.source {
        AddressSource::WwwHostName => {
            let name = config.node.www_host_name.as_deref().unwrap_or("");
            format!("www-host-name from {}, {}", from("www-host-name"), port(named_port(name)))
        }
        AddressSource::LegacyNodes => {
            let entry = config.node.legacy_nodes.iter().find(|e| e.starts_with(&node.host)).map_or("", String::as_str);
            format!("the legacy [nodes] entry {entry:?}, an address of this machine, {}", port(named_port(entry)))
        }
        AddressSource::WwwAddress => format!("www-address from {}", from("www-address")),
        AddressSource::HostName => "this machine's host name: set www-host-name to choose".into(),
        AddressSource::Interfaces => {
            "the last IPv4 address of this machine's interfaces: set www-host-name to choose".into()
        }
    }
}

/// Say whether a database password is set, from where, and that an
/// encrypted one decrypts with this key (or fail as `serve` would).
fn print_password(config: &Config) -> anyhow::Result<()> {
    let c = &config.cluster;
    let from_env = std::env::var(PASSWORD_ENV).ok().filter(|v| !v.is_empty() && c.database.is_postgres());
    let (value, from) = match (&from_env, &c.database_password) {
        (Some(v), _) => (v, format!("environment {PASSWORD_ENV}")),
        (None, Some(v)) => (v, config.sources.get("database-password").map_or("default".into(), Origin::to_string)),
        (None, None) => return Ok(()),
    };
    config.registry_url().map_err(|e| anyhow::anyhow!("configuration is valid, but {e}"))?;
    if password::looks_encrypted(value) {
        println!("# database password: encrypted (from {from}); decrypts with the secure cookie key");
    } else {
        println!("# database password: set (from {from})");
    }
    Ok(())
}

//! Cross-key rules of the drop-in layout: sessionlb takes the public port,
//! the IDE server (rserver) moves to an internal address, and the node is
//! known to its peers by sessionlb's address — plus "no silent split brain":
//! a cluster configuration on a private SQLite registry is refused.

use std::net::{IpAddr, Ipv4Addr};

use super::database::DatabaseUrl;
use super::raw::WorkbenchFacts;
use super::reader::Reader;
use super::{Config, ConfigProblem};

/// Where the admin finds the layout explained.
const LAYOUT_DOC: &str = "docs/workbench.md";

pub(super) fn check(config: &mut Config, workbench: Option<&WorkbenchFacts>, r: &mut Reader) {
    backend_is_not_the_listen_address(config, workbench, r);
    node_address_is_not_the_backend(config, r);
    no_split_brain(config, workbench, r);
}

/// `host:port` split, with brackets removed from an IPv6 host.
fn split(host_port: &str) -> Option<(&str, u16)> {
    let (host, port) = host_port.rsplit_once(':')?;
    Some((host.trim_start_matches('[').trim_end_matches(']'), port.parse().ok()?))
}

/// The address a backend host stands for, when it can be told without
/// resolving (an address literal or `localhost`).
fn literal(host: &str) -> Option<IpAddr> {
    if host.eq_ignore_ascii_case("localhost") {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    host.parse().ok()
}

/// Whether connecting to `backend` would reach a socket listening on `listen`.
fn same_socket(listen: IpAddr, backend: IpAddr) -> bool {
    listen == backend || listen.is_unspecified() || backend.is_unspecified()
}

fn backend_is_not_the_listen_address(config: &Config, workbench: Option<&WorkbenchFacts>, r: &mut Reader) {
    let node = &config.node;
    let Some((host, port)) = node.backend.as_deref().and_then(split) else { return };
    let Some(ip) = literal(host) else { return };
    if port != node.www_port || !same_socket(node.www_address, ip) {
        return;
    }
    let listen = format!("{}:{}", node.www_address, node.www_port);
    let backend_from = r.origin("backend").map_or("the default".to_string(), ToString::to_string);
    let listen_from = match (r.origin("www-address"), r.origin("www-port")) {
        (_, Some(o)) | (Some(o), None) => o.to_string(),
        (None, None) => "the defaults www-address = 0.0.0.0, www-port = 8787".to_string(),
    };
    let fix = if workbench.is_some() {
        "In the drop-in layout rserver keeps running on an internal address (for example \
         www-address=127.0.0.1 and www-port=8788 in rserver.conf: with --rstudio-config, rserver.conf \
         describes the backend) and sessionlb takes the public port (www-address/www-port in sessionlb.toml, \
         or --listen)"
    } else {
        "Run the IDE server on another port (for example 127.0.0.1:8788) and point `backend` at it, or let \
         sessionlb listen elsewhere (www-address/www-port, or --listen)"
    };
    r.problem_at(
        "backend",
        format!(
            "the backend {host}:{port} (from {backend_from}) is the address sessionlb itself listens on \
             ({listen}, from {listen_from}): sessionlb would proxy to itself, and one of the two could not \
             bind the port. {fix}; see {LAYOUT_DOC}"
        ),
    );
}

/// A `www-host-name` that names the backend's port would send peers past
/// sessionlb, straight to the IDE server.
fn node_address_is_not_the_backend(config: &mut Config, r: &mut Reader) {
    let node = &config.node;
    let Some(name) = node.www_host_name.as_deref() else { return };
    let Some((_, named_port)) = split(name).filter(|(h, _)| !h.is_empty() && name.contains(':')) else { return };
    let backend = node.backend.as_deref().and_then(split);
    if let Some((backend_host, backend_port)) = backend
        && backend_port == named_port
        && named_port != node.www_port
    {
        r.problem_at(
            "www-host-name",
            format!(
                "`www-host-name` {name:?} names port {named_port}, the backend's ({backend_host}:{backend_port}): \
                 peers would reach the IDE server directly, past sessionlb. The node's address is where sessionlb \
                 listens (port {}); write www-host-name without a port, or with :{}; see {LAYOUT_DOC}",
                node.www_port, node.www_port
            ),
        );
    } else if named_port != node.www_port {
        let origin = r.origin("www-host-name").cloned();
        let message = format!(
            "`www-host-name` {name:?} names port {named_port}, but sessionlb listens on port {}: peers reach this \
             node at {name}, which is right only if something forwards that port to sessionlb",
            node.www_port
        );
        config.warnings.push(match origin {
            Some(o) => ConfigProblem::at(&o, "www-host-name", message),
            None => ConfigProblem { file: Default::default(), line: None, key: Some("www-host-name".into()), message },
        });
    }
}

fn no_split_brain(config: &Config, workbench: Option<&WorkbenchFacts>, r: &mut Reader) {
    let Some((origin, why)) = workbench.and_then(|w| w.cluster.as_ref()) else { return };
    let DatabaseUrl::Sqlite(path) = &config.cluster.database else { return };
    let database_from = r
        .origin("database")
        .map_or_else(|| "no database.conf: Workbench's default provider=sqlite".to_string(), |o| format!("from {o}"));
    r.problem(ConfigProblem::at(
        origin,
        "database",
        format!(
            "{why}, but the registry is SQLite ({}, {database_from}): every node would keep a private registry \
             of its own, and a user would find a session only on the node that created it (split brain). A \
             cluster needs one PostgreSQL database shared by all nodes: in database.conf set provider=postgresql, \
             host=, port=, database=, username= and password= (or connection-uri=), as Workbench's own load \
             balancing requires; see {LAYOUT_DOC}",
            path.display()
        ),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_reaches_the_listener_only_on_the_same_port_and_a_covering_address() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(same_socket(ip("0.0.0.0"), ip("127.0.0.1")));
        assert!(same_socket(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(same_socket(ip("10.0.0.5"), ip("0.0.0.0")));
        assert!(!same_socket(ip("10.0.0.5"), ip("127.0.0.1")), "another address, same port: a valid layout");
        assert!(!same_socket(ip("127.0.0.2"), ip("127.0.0.1")));
        assert_eq!(literal("localhost"), Some(ip("127.0.0.1")));
        assert_eq!(literal("rstudio.internal"), None);
        assert_eq!(split("[::1]:8788"), Some(("::1", 8788)));
    }
}

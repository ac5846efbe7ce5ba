//! Which address this node is known by, in the ordered strategies of the
//! design (first that succeeds):
//!
//! 1. `www-host-name` (with `www-port` appended when it has no port),
//!    resolved to an address; without it, the entry of a legacy Workbench
//!    `[nodes]` list that is an address of this machine (same port rule);
//! 2. `www-address` + `www-port`, when `www-address` is set to a specific address;
//! 3. the first non-loopback, non-multicast address of the resolved host name;
//! 4. the last non-loopback IPv4 address of the system's interfaces.
//!
//! The [`Resolver`] is a trait so that tests can inject name lookups.

use std::io;
use std::net::{IpAddr, ToSocketAddrs};

use crate::config::NodeConfig;

/// Name lookups, injectable for tests.
pub trait Resolver: Send + Sync {
    /// Addresses of a host name (or the address itself, for an IP literal).
    fn lookup(&self, host: &str) -> io::Result<Vec<IpAddr>>;
    /// This machine's host name.
    fn hostname(&self) -> io::Result<String>;
    /// Addresses of the system's network interfaces, in interface order.
    fn interface_addresses(&self) -> io::Result<Vec<IpAddr>>;
    /// Whether `ip` is an address of this machine: one a socket can be
    /// bound to (every 127.x address is, on Linux).
    fn is_local(&self, ip: IpAddr) -> bool {
        std::net::UdpSocket::bind((ip, 0)).is_ok()
    }
}

/// The operating system's resolver (getaddrinfo, uname, getifaddrs).
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn lookup(&self, host: &str) -> io::Result<Vec<IpAddr>> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        Ok((bare, 0).to_socket_addrs()?.map(|sa| sa.ip()).collect())
    }

    fn hostname(&self) -> io::Result<String> {
        Ok(rustix::system::uname().nodename().to_string_lossy().into_owned())
    }

    fn interface_addresses(&self) -> io::Result<Vec<IpAddr>> {
        Ok(if_addrs::get_if_addrs()?.into_iter().map(|i| i.ip()).collect())
    }
}

/// Which strategy produced the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressSource {
    WwwHostName,
    /// The legacy `[nodes]` entry that is an address of this machine.
    LegacyNodes,
    WwwAddress,
    HostName,
    Interfaces,
}

/// This node's address as peers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddress {
    /// The name or address recorded in the registry's Host column.
    pub host: String,
    pub port: u16,
    /// The resolved address (IPv4 preferred).
    pub ip: IpAddr,
    pub source: AddressSource,
}

impl NodeAddress {
    /// `host:port`.
    pub fn host_port(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// The address could not be determined.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot resolve this node's address {host}:{port}: {reason}")]
pub struct AddressError {
    /// The host the node would be known by (recorded with `Failed to resolve`).
    pub host: String,
    pub port: u16,
    pub reason: String,
}

/// The host and port this node is known by, without resolving anything
/// when the configuration names them (strategies 1 and 2). Admin commands
/// use this to find their node's row.
pub fn configured_host_port(node: &NodeConfig) -> Option<(String, u16)> {
    if let Some(name) = &node.www_host_name {
        return Some(split_host_port(name, node.www_port));
    }
    if let Some(entry) = legacy_entry(node, &SystemResolver) {
        return Some(split_host_port(&entry, node.www_port));
    }
    if node.www_address_set && !node.www_address.is_unspecified() {
        return Some((node.www_address.to_string(), node.www_port));
    }
    None
}

/// Determine this node's address.
pub fn determine(node: &NodeConfig, resolver: &dyn Resolver) -> Result<NodeAddress, AddressError> {
    // 1. www-host-name
    if let Some(name) = &node.www_host_name {
        let (host, port) = split_host_port(name, node.www_port);
        let fail = |reason: String| AddressError { host: host.clone(), port, reason };
        let ips = resolver.lookup(&host).map_err(|e| fail(format!("www-host-name {host:?} does not resolve: {e}")))?;
        let ip = prefer_ipv4(&ips).ok_or_else(|| fail(format!("www-host-name {host:?} resolves to no address")))?;
        return Ok(NodeAddress { host, port, ip, source: AddressSource::WwwHostName });
    }
    // 1b. the legacy [nodes] entry that is this machine
    if let Some(entry) = legacy_entry(node, resolver) {
        let (host, port) = split_host_port(&entry, node.www_port);
        if let Some(ip) = resolver.lookup(&host).ok().and_then(|ips| ips.into_iter().find(|ip| resolver.is_local(*ip)))
        {
            return Ok(NodeAddress { host, port, ip, source: AddressSource::LegacyNodes });
        }
    }
    if !node.legacy_nodes.is_empty() {
        tracing::warn!(
            nodes = %node.legacy_nodes.join(", "),
            "no entry of the legacy [nodes] list is an address of this machine; set www-host-name in the load-balancer file"
        );
    }
    // 2. www-address + www-port
    if node.www_address_set && !node.www_address.is_unspecified() {
        return Ok(NodeAddress {
            host: node.www_address.to_string(),
            port: node.www_port,
            ip: node.www_address,
            source: AddressSource::WwwAddress,
        });
    }
    let port = node.www_port;
    let hostname = resolver.hostname().unwrap_or_default();
    // 3. the host name's first non-loopback, non-multicast address
    if !hostname.is_empty()
        && let Ok(ips) = resolver.lookup(&hostname)
        && let Some(ip) = ips.iter().copied().find(|ip| !ip.is_loopback() && !ip.is_multicast() && !ip.is_unspecified())
    {
        return Ok(NodeAddress { host: hostname, port, ip, source: AddressSource::HostName });
    }
    // 4. the last non-loopback IPv4 interface address
    let interfaces = resolver.interface_addresses().unwrap_or_default();
    if let Some(ip) =
        interfaces.iter().rev().copied().find(|ip| ip.is_ipv4() && !ip.is_loopback() && !ip.is_unspecified())
    {
        return Ok(NodeAddress { host: ip.to_string(), port, ip, source: AddressSource::Interfaces });
    }
    Err(AddressError {
        host: if hostname.is_empty() { "unknown".into() } else { hostname },
        port,
        reason: "no www-host-name or www-address is set, the host name has no non-loopback address, \
                 and no interface has a non-loopback IPv4 address; set www-host-name"
            .into(),
    })
}

/// The legacy `[nodes]` entry that is this node: of the entries whose host
/// is an address of this machine, the one whose address is the listen
/// address, else the first whose port is the listen port, else the first
/// (several nodes on one machine tell themselves apart by where they listen).
fn legacy_entry(node: &NodeConfig, resolver: &dyn Resolver) -> Option<String> {
    let local: Vec<(&String, Vec<IpAddr>, u16)> = node
        .legacy_nodes
        .iter()
        .filter_map(|entry| {
            let (host, port) = split_host_port(entry, node.www_port);
            let ips: Vec<IpAddr> = resolver.lookup(&host).ok()?;
            ips.iter().any(|ip| !ip.is_unspecified() && resolver.is_local(*ip)).then_some((entry, ips, port))
        })
        .collect();
    let listen_ip = (node.www_address_set && !node.www_address.is_unspecified()).then_some(node.www_address);
    local
        .iter()
        .find(|(_, ips, port)| *port == node.www_port && listen_ip.is_some_and(|l| ips.contains(&l)))
        .or_else(|| local.iter().find(|(_, _, port)| *port == node.www_port))
        .or_else(|| local.first())
        .map(|(entry, _, _)| (*entry).clone())
}

fn split_host_port(name: &str, default_port: u16) -> (String, u16) {
    match name.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => match port.parse() {
            Ok(p) => (host.to_string(), p),
            Err(_) => (name.to_string(), default_port),
        },
        _ => (name.to_string(), default_port),
    }
}

fn prefer_ipv4(ips: &[IpAddr]) -> Option<IpAddr> {
    ips.iter().copied().find(IpAddr::is_ipv4).or_else(|| ips.first().copied())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::Config;

    struct FakeResolver {
        names: HashMap<&'static str, Vec<IpAddr>>,
        hostname: &'static str,
        interfaces: Vec<IpAddr>,
    }

    impl FakeResolver {
        fn local(&self) -> Vec<IpAddr> {
            self.interfaces.clone()
        }
    }

    impl Resolver for FakeResolver {
        fn lookup(&self, host: &str) -> io::Result<Vec<IpAddr>> {
            if let Ok(ip) = host.parse() {
                return Ok(vec![ip]);
            }
            self.names.get(host).cloned().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such host"))
        }
        fn hostname(&self) -> io::Result<String> {
            Ok(self.hostname.to_string())
        }
        fn interface_addresses(&self) -> io::Result<Vec<IpAddr>> {
            Ok(self.interfaces.clone())
        }
        fn is_local(&self, ip: IpAddr) -> bool {
            self.local().contains(&ip)
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn node(toml: &str) -> NodeConfig {
        Config::from_toml(std::path::Path::new("t.toml"), toml).unwrap().node
    }

    fn resolver() -> FakeResolver {
        FakeResolver {
            names: HashMap::from([
                ("rsw1", vec![ip("10.0.0.7")]),
                ("vm", vec![ip("127.0.0.1"), ip("224.0.0.1"), ip("192.168.1.5"), ip("192.168.1.6")]),
                ("loopy", vec![ip("127.0.1.1")]),
            ]),
            hostname: "vm",
            interfaces: vec![ip("127.0.0.1"), ip("10.1.0.1"), ip("fe80::1"), ip("10.2.0.1"), ip("::1")],
        }
    }

    #[test]
    fn www_host_name_wins_and_takes_its_port_or_www_port() {
        let a = determine(&node("www-host-name = \"rsw1\"\nwww-port = 8790"), &resolver()).unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.ip, a.source),
            ("rsw1", 8790, ip("10.0.0.7"), AddressSource::WwwHostName)
        );
        let b = determine(&node("www-host-name = \"rsw1:9000\"\nwww-address = \"10.9.9.9\""), &resolver()).unwrap();
        assert_eq!((b.port, b.source), (9000, AddressSource::WwwHostName));
        // Loopback is fine when configured explicitly (several nodes on one machine).
        let c = determine(&node("www-host-name = \"127.0.0.3\""), &resolver()).unwrap();
        assert_eq!(c.host_port(), "127.0.0.3:8787");
    }

    #[test]
    fn a_legacy_nodes_entry_of_this_machine_is_the_address_when_www_host_name_is_absent() {
        let mut n = node("www-port = 8790");
        n.legacy_nodes = vec!["10.9.9.9:8787".into(), "rsw1".into(), "10.2.0.1:8787".into()];
        let mut r = resolver();
        // 10.2.0.1 is an interface of this machine; rsw1 (10.0.0.7) is not.
        let a = determine(&n, &r).unwrap();
        assert_eq!(
            (a.host_port(), a.ip, a.source),
            ("10.2.0.1:8787".into(), ip("10.2.0.1"), AddressSource::LegacyNodes)
        );
        // A bare host takes the listen port.
        r.interfaces.push(ip("10.0.0.7"));
        n.legacy_nodes.remove(0);
        let b = determine(&n, &r).unwrap();
        assert_eq!((b.host_port(), b.source), ("rsw1:8790".into(), AddressSource::LegacyNodes));
        // www-host-name wins; no matching entry falls through to the host name.
        let mut with_name = n.clone();
        with_name.www_host_name = Some("rsw1:9000".into());
        assert_eq!(determine(&with_name, &r).unwrap().source, AddressSource::WwwHostName);
        n.legacy_nodes = vec!["10.9.9.9:8787".into()];
        assert_eq!(determine(&n, &r).unwrap().source, AddressSource::HostName);
    }

    #[test]
    fn nodes_on_one_machine_pick_their_legacy_entry_by_listen_address_then_port() {
        let r = resolver();
        let mut n = node("www-address = \"10.1.0.1\"\nwww-port = 9002");
        n.legacy_nodes = vec!["10.2.0.1:9001".into(), "10.1.0.1:9001".into(), "10.1.0.1:9002".into()];
        assert_eq!(determine(&n, &r).unwrap().host_port(), "10.1.0.1:9002");
        let mut n = node("www-port = 9001");
        n.legacy_nodes = vec!["10.2.0.1:9002".into(), "10.1.0.1:9001".into()];
        assert_eq!(determine(&n, &r).unwrap().host_port(), "10.1.0.1:9001");
    }

    #[test]
    fn the_system_resolver_knows_loopback_addresses_as_local() {
        assert!(SystemResolver.is_local(ip("127.0.0.3")));
        assert!(!SystemResolver.is_local(ip("192.0.2.77")), "TEST-NET-1 is nobody's address");
    }

    #[test]
    fn unresolvable_www_host_name_fails_with_its_host_and_port() {
        let e = determine(&node("www-host-name = \"nowhere\"\nwww-port = 8001"), &resolver()).unwrap_err();
        assert_eq!((e.host.as_str(), e.port), ("nowhere", 8001));
        assert!(e.to_string().contains("does not resolve"));
    }

    #[test]
    fn www_address_is_second() {
        let a = determine(&node("www-address = \"127.0.0.2\"\nwww-port = 8001"), &resolver()).unwrap();
        assert_eq!((a.host.as_str(), a.source), ("127.0.0.2", AddressSource::WwwAddress));
        // 0.0.0.0 is a listen address, not an identity: fall through.
        let b = determine(&node("www-address = \"0.0.0.0\""), &resolver()).unwrap();
        assert_eq!(b.source, AddressSource::HostName);
    }

    #[test]
    fn host_name_skips_loopback_and_multicast() {
        let a = determine(&node(""), &resolver()).unwrap();
        assert_eq!((a.host.as_str(), a.ip, a.source), ("vm", ip("192.168.1.5"), AddressSource::HostName));
    }

    #[test]
    fn interfaces_are_last_and_take_the_last_non_loopback_ipv4() {
        let mut r = resolver();
        r.hostname = "loopy";
        let a = determine(&node(""), &r).unwrap();
        assert_eq!((a.host.as_str(), a.source), ("10.2.0.1", AddressSource::Interfaces));
        r.interfaces = vec![ip("127.0.0.1")];
        let e = determine(&node(""), &r).unwrap_err();
        assert_eq!(e.host, "loopy");
    }
}

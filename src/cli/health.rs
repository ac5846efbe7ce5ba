//! `sessionlb health`: ask the node running on this machine for `/health`
//! (on its listen address; loopback when it listens on all addresses) and
//! exit 0 only if it answers 200 — for container health checks and probes.
//! A draining node, or one whose backend is down, is unhealthy.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;

use sessionlb::config::Config;

pub async fn run(config: &Config) -> anyhow::Result<()> {
    let ip = match config.node.www_address {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let scheme = if config.proxy.ssl_enabled { "https" } else { "http" };
    let url = format!("{scheme}://{}/health", SocketAddr::new(ip, config.node.www_port));
    // A local liveness probe: the certificate names the node's public name, not this address.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .danger_accept_invalid_certs(true)
        .no_proxy()
        .build()
        .context("building the HTTP client")?;
    let resp = client.get(&url).send().await.with_context(|| format!("is this node running? cannot reach {url}"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    println!("{}", body.trim());
    if !status.is_success() {
        anyhow::bail!("{url} answered {status}");
    }
    Ok(())
}

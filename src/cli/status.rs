//! `sessionlb status`: print the cluster status page of this node
//! (every node and its sessions, gathered by the node from all nodes).

use anyhow::Context;
use clap::Args;

use sessionlb::cluster::address::{self, SystemResolver};
use sessionlb::config::Config;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the JSON form (with counters) instead of the text form.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: &Config, args: StatusArgs) -> anyhow::Result<()> {
    let (host, port) = match address::configured_host_port(&config.node) {
        Some(hp) => hp,
        None => {
            let a = address::determine(&config.node, &SystemResolver)
                .context("cannot tell this node's address; set www-host-name")?;
            (a.host, a.port)
        }
    };
    let scheme = if config.proxy.ssl_enabled { "https" } else { "http" };
    let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host };
    let url = format!("{scheme}://{host}:{port}/load-balancer/status{}", if args.json { "?format=json" } else { "" });
    let client = sessionlb::proxy::control_client(config).map_err(anyhow::Error::msg)?;
    let resp = client.get(&url).send().await.with_context(|| format!("is this node running? cannot reach {url}"))?;
    let status = resp.status();
    let body = resp.text().await.context("reading the status page")?;
    if !status.is_success() {
        anyhow::bail!("{url} answered {status}: {}", body.trim());
    }
    print!("{body}");
    Ok(())
}

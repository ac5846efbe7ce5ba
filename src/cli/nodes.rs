//! Admin commands on the registry: `list-nodes`, `delete-node`,
//! `reset-cluster`, `offline`, `online`.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, bail};
use chrono::{Local, TimeZone};
use clap::Args;

use sessionlb::cluster::address::{self, SystemResolver};
use sessionlb::cluster::node::VERSION;
use sessionlb::cluster::{self, DeleteOutcome, NodeId, NodeRecord, NodeStatus, Registry, protocol_display};
use sessionlb::config::Config;

#[derive(Debug, Args)]
pub struct DeleteNodeArgs {
    /// The node's ID as shown by `list-nodes`.
    pub id: NodeId,
    /// Delete even an Online node that still has sessions (they are re-placed on their next request).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct ModeArgs {
    /// Act on this node ID instead of the node this configuration describes.
    #[arg(long, value_name = "ID")]
    pub node: Option<NodeId>,
}

async fn registry(config: &Config) -> anyhow::Result<Arc<dyn Registry>> {
    let database = config.registry_url().map_err(anyhow::Error::msg)?;
    cluster::connect_with(&database, &cluster::RegistryOptions::from_config(config))
        .await
        .with_context(|| format!("connecting to the registry at {}", config.cluster.database.redacted()))
}

/// The most common version among Online nodes (highest on ties).
fn cluster_version(nodes: &[NodeRecord]) -> Option<String> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for n in nodes.iter().filter(|n| n.status == NodeStatus::Online) {
        *counts.entry(n.version.as_str()).or_default() += 1;
    }
    counts.into_iter().max_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(b.0))).map(|(v, _)| v.to_string())
}

pub async fn list_nodes(config: &Config) -> anyhow::Result<()> {
    let r = registry(config).await?;
    let cluster = r.cluster().await?;
    let mut nodes = r.list_nodes().await?;
    let now = r.now_ms().await?;
    nodes.sort_by_key(|n| (n.status != NodeStatus::Online, n.id));
    let interval = config.cluster.checkin_interval;
    let majority = cluster_version(&nodes);

    println!("Cluster");
    println!("-------");
    match &cluster {
        Some(c) => {
            println!("Protocol");
            println!("{}", protocol_display(&c.protocol));
            println!("Key fingerprint");
            println!("{}", &c.key_fingerprint);
        }
        None => println!("(not defined: the next node to start defines it)"),
    }
    println!();
    println!("Nodes");
    println!("-----");
    let header =
        ["ID", "Host", "IPv4", "Port", "Status", "Last Seen", "Version", "Clock Skew", "Sessions", "Pins", "Notes"];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    let mut notes_seen = false;
    for n in &nodes {
        let mut notes = Vec::new();
        if n.offline_mode {
            notes.push("offline mode (draining)".to_string());
        }
        if n.router {
            notes.push("router".to_string());
        }
        if majority.as_deref().is_some_and(|v| v != n.version) {
            notes.push(format!("VERSION MISMATCH (cluster runs {})", majority.as_deref().unwrap_or("?")));
        }
        if n.clock_skew_ms.is_some_and(|s| s.abs() > 1000) {
            notes.push("CLOCK SKEW over 1s".to_string());
        }
        notes_seen |= !notes.is_empty();
        let sessions = r.count_sessions(n.id).await?;
        rows.push(vec![
            n.id.to_string(),
            n.host.clone(),
            n.ipv4.map_or("-".into(), |ip| ip.to_string()),
            n.port.to_string(),
            n.display_status(now, interval).to_string(),
            n.last_seen.map_or("never".into(), format_local),
            n.version.clone(),
            n.clock_skew_ms.map_or("-".into(), |s| format!("{s}ms")),
            sessions.to_string(),
            n.pins_recent.to_string(),
            notes.join("; "),
        ]);
    }
    let widths: Vec<usize> = (0..header.len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    for row in &rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
    if nodes.is_empty() {
        println!("(no nodes)");
    } else {
        println!();
        println!(
            "Sessions: registry sessions on the node (signed-in users and backend sessions). Pins: anonymous browsers the node pinned in the last 5 minutes, as of its last load report."
        );
    }
    if notes_seen && majority.is_some() {
        println!();
        println!(
            "This command is version {VERSION}. Nodes of different versions or with clock skew over a second are flagged: locks and check-ins depend on both."
        );
    }
    Ok(())
}

/// Workbench's format, in the local time zone: `2021-Sep-20 17:08:53`.
fn format_local(ms: i64) -> String {
    Local
        .timestamp_millis_opt(ms)
        .single()
        .map_or_else(|| ms.to_string(), |t| t.format("%Y-%b-%d %H:%M:%S").to_string())
}

pub async fn delete_node(config: &Config, args: DeleteNodeArgs) -> anyhow::Result<()> {
    let r = registry(config).await?;
    let node = r.get_node(args.id).await?;
    let name =
        node.as_ref().map_or_else(|| format!("node {}", args.id), |n| format!("node {} ({})", n.id, n.address()));
    match r.delete_node(args.id, args.force).await? {
        DeleteOutcome::Deleted { sessions_released } => {
            println!("Deleted {name}; {sessions_released} session(s) will be re-placed on their next request.");
            Ok(())
        }
        DeleteOutcome::RefusedOnlineWithSessions { sessions } => bail!(
            "refusing to delete {name}: it is Online with {sessions} session(s). Stop it first (its sessions are re-placed on their next request), or use --force"
        ),
        DeleteOutcome::NotFound => bail!("there is no node with ID {} (see `sessionlb list-nodes`)", args.id),
    }
}

pub async fn reset_cluster(config: &Config) -> anyhow::Result<()> {
    let r = registry(config).await?;
    if r.reset_cluster().await? {
        println!("Cluster record cleared; the next node to start defines the key fingerprint and protocol.");
    } else {
        println!("No cluster record was defined; the next node to start defines it.");
    }
    Ok(())
}

pub async fn set_offline_mode(config: &Config, args: ModeArgs, offline: bool) -> anyhow::Result<()> {
    let r = registry(config).await?;
    let node = match args.node {
        Some(id) => r.get_node(id).await?.with_context(|| format!("there is no node with ID {id}"))?,
        None => {
            let (host, port) = match address::configured_host_port(&config.node) {
                Some(hp) => hp,
                None => {
                    let a = address::determine(&config.node, &SystemResolver)
                        .context("cannot tell which node this is; set www-host-name or use --node ID")?;
                    (a.host, a.port)
                }
            };
            r.find_node(&host, port)
                .await?
                .with_context(|| format!("this node ({host}:{port}) is not in the registry; has it ever started? Use --node ID to name another node"))?
        }
    };
    r.set_offline_mode(node.id, offline).await?;
    let sessions = r.count_sessions(node.id).await?;
    if offline {
        println!(
            "Node {} ({}) is in offline mode: it keeps serving its {sessions} session(s) and takes no new ones. `sessionlb online` reverses it.",
            node.id,
            node.address()
        );
    } else {
        println!("Node {} ({}) is out of offline mode and takes new sessions again.", node.id, node.address());
    }
    Ok(())
}

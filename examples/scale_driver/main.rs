//! The load driver and meter of `bench/scale.sh` (issue 12): cluster-scale
//! figures of real `sessionlb serve` processes sharing one PostgreSQL.
//!
//! `bench/scale.sh` starts PostgreSQL, the demo backends and the nodes,
//! writes the node list (`name ip port pid`, one per line), and runs the
//! phases below; each appends a Markdown section to `--md` and writes its
//! figures as JSON to `--json`:
//!
//! ```text
//! scale_driver [COMMON] rest  --label TEXT --seconds S
//! scale_driver [COMMON] storm --rate R --duration S --busy M --busy-interval-ms I --observers K --poll-ms P
//! scale_driver [COMMON] notify --rate 200 --count 2000
//! scale_driver [COMMON] bulk  --total N [--chunk C]
//! scale_driver [COMMON] join  --join-node NAME --started-ns T --user bulk-7
//! ```
//!
//! COMMON: `--nodes FILE --pg-admin URL --pg-registry URL --pg-database NAME
//! [--pg-pid PID] [--backend-pids P,P,…] --key FILE [--hz 100] --md FILE --json FILE`.

mod cluster;
mod costs;
mod pg;
mod phases;
mod procfs;
mod stats;
mod storm;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Cluster-scale load driver and meter for bench/scale.sh")]
struct Cli {
    /// Node list: `name ip port pid` per line.
    #[arg(long)]
    nodes: PathBuf,
    /// Admin database URL (monitoring queries run there).
    #[arg(long)]
    pg_admin: String,
    /// The registry database URL.
    #[arg(long)]
    pg_registry: String,
    /// The registry database's name.
    #[arg(long, default_value = "sessionlb")]
    pg_database: String,
    /// PID of the postmaster (its backends' CPU is counted).
    #[arg(long)]
    pg_pid: Option<u32>,
    /// PIDs of the demo backends, comma-separated.
    #[arg(long, value_delimiter = ',')]
    backend_pids: Vec<u32>,
    /// The cluster's secure cookie key (signs the users' `user-id` cookies).
    #[arg(long)]
    key: PathBuf,
    #[arg(long, default_value = "user-id")]
    user_cookie_name: String,
    /// Clock ticks per second (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100.0)]
    hz: f64,
    /// Markdown report (appended).
    #[arg(long)]
    md: PathBuf,
    /// JSON figures of this phase (written).
    #[arg(long)]
    json: PathBuf,
    #[command(subcommand)]
    phase: Phase,
}

#[derive(Debug, Subcommand)]
enum Phase {
    /// The cluster left alone.
    Rest {
        #[arg(long)]
        label: String,
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
    },
    /// New users at a set rate while busy sessions keep working.
    Storm {
        /// Placements per second (new users).
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        #[arg(long, default_value_t = 30.0)]
        duration: f64,
        /// Sessions kept busy during the storm.
        #[arg(long, default_value_t = 500)]
        busy: usize,
        #[arg(long, default_value_t = 1000)]
        busy_interval_ms: u64,
        /// Nodes (the last ones of the list) that get no traffic and are watched for notification lag.
        #[arg(long, default_value_t = 2)]
        observers: usize,
        #[arg(long, default_value_t = 5)]
        poll_ms: u64,
        /// Prefix of the user names (unique per run).
        #[arg(long, default_value = "user")]
        run: String,
        /// Every node has its own backend named after it: check stickiness by `x-backend`.
        #[arg(long)]
        per_node_backends: bool,
    },
    /// Changes written one at a time straight into the registry: CPU per notification.
    Notify {
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        #[arg(long, default_value_t = 2000)]
        count: u64,
    },
    /// Fill the registry up to `total` sessions and time their absorption.
    Bulk {
        #[arg(long)]
        total: u64,
        #[arg(long, default_value_t = 10_000)]
        chunk: u64,
    },
    /// Time a node (already started) joining the cluster.
    Join {
        /// The joining node's name in the node list (the others are the cluster).
        #[arg(long)]
        join_node: String,
        /// When the joining process was started (`date +%s%N`).
        #[arg(long)]
        started_ns: u128,
        /// Sessions its view must hold.
        #[arg(long)]
        sessions: u64,
        /// A user of the bulk load to route through it.
        #[arg(long, default_value = "bulk-7")]
        user: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let nodes = cluster::read_nodes(&cli.nodes)?;
    let mut monitor =
        pg::Monitor::connect(&cli.pg_admin, &cli.pg_database).await.context("connecting to the admin database")?;
    let mut registry = pg::Registry::connect(&cli.pg_registry).await.context("connecting to the registry")?;
    let cookies = cluster::UserCookies::new(&cli.key, &cli.user_cookie_name)?;
    let procs = |nodes: Vec<cluster::Node>| costs::Processes {
        nodes,
        postgres: cli.pg_pid,
        backends: cli.backend_pids.clone(),
        hz: cli.hz,
    };
    let (md, json) = match cli.phase {
        Phase::Rest { label, seconds } => phases::rest(&procs(nodes), &mut monitor, &label, seconds).await?,
        Phase::Storm { rate, duration, busy, busy_interval_ms, observers, poll_ms, run, per_node_backends } => {
            anyhow::ensure!(rate > 0.0 && duration > 0.0, "--rate and --duration must be positive");
            storm::Storm {
                procs: procs(nodes),
                cookies: Arc::new(cookies),
                monitor,
                run,
                rate,
                duration: Duration::from_secs_f64(duration),
                busy,
                busy_interval: Duration::from_millis(busy_interval_ms),
                observers,
                poll: Duration::from_millis(poll_ms),
                per_node_backends,
            }
            .run(&mut registry)
            .await?
        }
        Phase::Notify { rate, count } => {
            anyhow::ensure!(rate > 0.0 && count > 0, "--rate and --count must be positive");
            phases::notify(&procs(nodes), &mut registry, rate, count).await?
        }
        Phase::Bulk { total, chunk } => phases::bulk(&procs(nodes), &mut registry, &mut monitor, total, chunk).await?,
        Phase::Join { join_node, started_ns, sessions, user } => {
            let (joining, others): (Vec<_>, Vec<_>) = nodes.into_iter().partition(|n| n.name == join_node);
            let node = joining.first().with_context(|| format!("{join_node} is not in the node list"))?;
            phases::join(node, &others, &mut registry, &cookies, started_ns, sessions, &user).await?
        }
    };
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&cli.md)?;
    writeln!(f, "{md}")?;
    std::fs::write(&cli.json, serde_json::to_string_pretty(&json)? + "\n")?;
    print!("{md}");
    Ok(())
}

//! The backend and the client of `bench/wire.sh` (issue 12): what an IDE's
//! traffic feels through a proxy — WebSocket echo round trips with 1, 100
//! or 1,000 sockets open, and 1 GiB uploads and downloads.
//!
//! ```text
//! wire_driver backend --listen 127.0.0.1:18800 [--threads 1]
//! wire_driver ws   --url ws://127.0.0.1:18801/ws [--cookie C] --sockets 100 [--rate 1000] [--size 100]
//!                  [--warmup 2] [--duration 10]
//! wire_driver bulk --base http://127.0.0.1:18801 [--cookie C] --direction up|down [--bytes 1073741824]
//! ```
//!
//! `ws` and `bulk` print one line of tab-separated figures (see `--help`)
//! for the script to record; errors go to stderr with a non-zero exit.

mod backend;
mod bulk;
mod ws;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(about = "WebSocket and bulk-transfer backend and client for bench/wire.sh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Direction {
    Up,
    Down,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve /bench, /ws (echo), /upload and /download.
    Backend {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Echo round trips; prints `p50_us p90_us p99_us p999_us max_us messages msgs_per_s late errors`.
    Ws {
        #[arg(long)]
        url: String,
        #[arg(long)]
        cookie: Option<String>,
        #[arg(long)]
        sockets: usize,
        /// Messages per second over all sockets.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Message size in bytes (a keystroke's JSON is about 100).
        #[arg(long, default_value_t = 100)]
        size: usize,
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
    /// One large transfer; prints `bytes seconds MiB_per_s`.
    Bulk {
        #[arg(long)]
        base: String,
        #[arg(long)]
        cookie: Option<String>,
        #[arg(long, value_enum)]
        direction: Direction,
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Backend { listen, threads } = cli.command {
        return backend::serve(listen, threads);
    }
    // The client: one thread (it shares a core with the backend).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Ws { url, cookie, sockets, rate, size, warmup, duration } => {
                anyhow::ensure!(sockets > 0 && rate > 0.0, "--sockets and --rate must be positive");
                let o = ws::run(
                    &url,
                    cookie.as_deref(),
                    sockets,
                    rate,
                    size,
                    Duration::from_secs_f64(warmup),
                    Duration::from_secs_f64(duration),
                )
                .await?;
                anyhow::ensure!(o.errors == 0, "{} sockets failed", o.errors);
                let mut rtt = o.rtt_us;
                anyhow::ensure!(!rtt.is_empty(), "no round trip recorded");
                rtt.sort_by(f64::total_cmp);
                let q = |p: f64| rtt[((rtt.len() as f64 * p).ceil() as usize).clamp(1, rtt.len()) - 1];
                println!(
                    "{:.1}\t{:.1}\t{:.1}\t{:.1}\t{:.1}\t{}\t{:.0}\t{}\t{}",
                    q(0.5),
                    q(0.9),
                    q(0.99),
                    q(0.999),
                    rtt[rtt.len() - 1],
                    rtt.len(),
                    rtt.len() as f64 / o.seconds,
                    o.late,
                    o.errors
                );
            }
            Command::Bulk { base, cookie, direction, bytes } => {
                let secs = match direction {
                    Direction::Up => bulk::upload(&base, cookie.as_deref(), bytes).await?,
                    Direction::Down => bulk::download(&base, cookie.as_deref(), bytes).await?,
                };
                println!("{bytes}\t{secs:.3}\t{:.1}", bytes as f64 / 1048576.0 / secs);
            }
            Command::Backend { .. } => unreachable!("handled above"),
        }
        Ok(())
    })
}

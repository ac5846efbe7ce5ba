//! `sessionlb locktester` (placeholder; see issue 3).

use clap::Args;

use sessionlb::config::Config;

/// Options of `sessionlb locktester`.
#[derive(Debug, Args)]
pub struct LocktesterArgs {
    /// Folder on the shared storage to test (default: server-shared-storage-path).
    #[arg(long)]
    pub path: Option<std::path::PathBuf>,
}

pub async fn run(_args: LocktesterArgs, _config: &Config) -> anyhow::Result<()> {
    anyhow::bail!("locktester is not built yet")
}

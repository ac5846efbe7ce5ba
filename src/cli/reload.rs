//! `sessionlb reload`: check the configuration, then tell the node running
//! with it to reload (SIGHUP, as `systemctl reload` does).
//!
//! The configuration is loaded first (by `main`): a file that does not load
//! fails here with its file, line and key, and the node is not disturbed.
//! The node is found through its pid file in `run-dir`, named after
//! `www-address` and `www-port` (as `serve --upgrade` finds it).

use sessionlb::config::Config;
use sessionlb::ops::reload;

pub fn run(config: &Config) -> anyhow::Result<()> {
    let pid = reload::signal_running(config)?;
    println!(
        "sent SIGHUP to sessionlb (process {pid}) for {}: it reloads its configuration; its log names what changed",
        config.listen_address()
    );
    Ok(())
}

//! `sessionlb check-config`: validate and print the effective configuration.

use sessionlb::config::Config;
use sessionlb::config::key::SecureKey;

use super::{GlobalOpts, show};

pub fn run(config: &Config, global: &GlobalOpts) -> anyhow::Result<()> {
    let files: Vec<String> = config.files.iter().map(|p| show(p)).collect();
    if files.is_empty() {
        println!("# no configuration file given: built-in defaults");
    } else {
        println!("# read from: {}", files.join(", "));
    }
    if global.rstudio_config.is_some() {
        println!("# (Workbench files override the native file key by key)");
    }
    println!("# cluster protocol: {}", config.protocol());
    print!("{}", config.render());
    // The node would refuse to start without a usable key: say so now. The
    // key's bytes are never printed.
    match SecureKey::load(&config.cluster.secure_cookie_key_file) {
        Ok(key) => {
            println!("# secure cookie key: {} bytes, fingerprint {}", key.len(), key.fingerprint());
            println!("Configuration OK");
            Ok(())
        }
        Err(e) => anyhow::bail!("configuration is valid, but {e}"),
    }
}

//! `sessionlb encrypt-password`: encrypt the registry database password with
//! the secure cookie key, in Workbench's format, for `database-password` (or
//! `password=` in a Workbench database.conf).

use std::io::{BufRead, IsTerminal, Write};

use anyhow::Context;
use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};

use sessionlb::config::Config;
use sessionlb::config::password;

/// Read one line from stdin; on a terminal, prompt and do not echo it.
fn read_password() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    let mut line = String::new();
    if stdin.is_terminal() {
        eprint!("Password to encrypt: ");
        std::io::stderr().flush()?;
        let saved = tcgetattr(&stdin).context("reading the terminal's settings")?;
        let mut quiet = saved.clone();
        quiet.local_modes.remove(LocalModes::ECHO);
        tcsetattr(&stdin, OptionalActions::Now, &quiet).context("turning echo off")?;
        let read = stdin.lock().read_line(&mut line);
        tcsetattr(&stdin, OptionalActions::Now, &saved).context("restoring the terminal")?;
        eprintln!();
        read?;
    } else {
        stdin.lock().read_line(&mut line)?;
    }
    let password = line.trim_end_matches(['\r', '\n']).to_string();
    anyhow::ensure!(!password.is_empty(), "no password given");
    Ok(password)
}

pub fn run(config: &Config) -> anyhow::Result<()> {
    // The same checks as a starting node: the key must be usable.
    let key = config.secure_key()?;
    let password = read_password()?;
    let encrypted = password::encrypt(key.bytes(), &password)?;
    println!("{encrypted}");
    eprintln!(
        "Put it in the configuration as `database-password = \"{encrypted}\"` (or `password={encrypted}` in a Workbench database.conf); every node with this secure cookie key can decrypt it."
    );
    Ok(())
}

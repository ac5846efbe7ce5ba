//! The `sessionlb` command line: `serve` and the admin commands.
mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}

//! The `sessionlb` command line: `serve` and the admin commands.
mod cli;

/// mimalloc: Pingora spends a measurable share of its time in the
/// allocator, and glibc's malloc was the slowest option measured here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}

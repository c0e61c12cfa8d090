//! `oak-addons`: the command-line tool of the Oakestra addons system.

use std::process::ExitCode;

use clap::Parser as _;

/// Operate the Oakestra addons marketplace and manager.
///
/// The subcommands (publish, install, watch, ...) are not implemented yet.
#[derive(Debug, clap::Parser)]
#[command(name = "oak-addons", version)]
struct Cli {}

fn main() -> ExitCode {
    let _cli = Cli::parse();
    eprintln!("error: oak-addons has no subcommands yet; use grpcurl against the servers for now");
    ExitCode::from(2)
}

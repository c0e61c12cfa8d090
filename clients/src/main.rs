//! `oak-addons`: the command-line tool of the Oakestra addons system.

use std::{process::ExitCode, time::Duration};

use clap::Parser as _;

/// Operate the Oakestra addons marketplace and manager.
///
/// Exit codes: 0 success, 1 the server answered with an error or could not
/// be reached, 2 bad usage.
#[derive(Debug, clap::Parser)]
#[command(name = "oak-addons", version)]
enum Cli {
    /// List a server's gRPC services and the health of each, as
    /// `grpcurl -plaintext ADDR list` plus a health check would.
    Probe {
        /// gRPC URL of the server, such as http://127.0.0.1:11102.
        url: String,
    },
}

fn main() -> ExitCode {
    let Cli::Probe { url } = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let channel = oak_addons::channel(&url, Duration::from_secs(5))
            .map_err(|err| format!("invalid URL `{url}`: {err}"))?;
        oak_addons::probe(channel)
            .await
            .map_err(|status| format!("{url}: {:?}: {}", status.code(), status.message()))
    });
    match result {
        Ok(services) => {
            let width = services.iter().map(|s| s.name.len()).max().unwrap_or(0);
            for service in services {
                println!("{:width$}  {}", service.name, service.status);
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

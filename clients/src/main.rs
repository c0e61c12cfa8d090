//! `oak-addons`: the command-line tool of the Oakestra addons system.

mod cli;

use std::process::ExitCode;

use clap::{Parser as _, error::ErrorKind};

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err)
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            err.exit()
        }
        Err(err) => {
            // One line, as every other error: clap's first line, without
            // its usage block.
            let text = err.render().to_string();
            let line = text.lines().next().unwrap_or("error: bad usage");
            eprintln!("{line} (see --help)");
            return ExitCode::from(cli::EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(cli::EXIT_ERROR);
        }
    };
    let structured = cli.structured_errors();
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            // Server messages may carry what strangers wrote.
            eprintln!("error: {}", cli::output::shown(&err.to_string()));
            if structured && let Some(details) = err.details_json() {
                eprintln!("{details:#}");
            }
            ExitCode::from(err.exit_code())
        }
    }
}

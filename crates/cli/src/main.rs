//! `migrun`: the command line. Parses runc's flags, calls the libraries,
//! prints results and maps errors to exit codes. One module per command.

mod cli;
mod commands;
mod logging;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let log = match logging::init(
        cli.global.log.as_deref(),
        cli.global.log_format,
        cli.global.debug,
    ) {
        Ok(log) => log,
        Err(err) => {
            eprintln!("migrun: open log file: {err}");
            std::process::exit(1);
        }
    };
    // Commands that enter a container run from a sealed copy (CVE-2019-5736).
    if matches!(
        cli.command,
        Command::Create(_) | Command::Run { .. } | Command::Exec(_)
    ) {
        if let Err(err) = migrun_runtime::sealed_exe::ensure_sealed() {
            tracing::warn!("running unsealed: {err}");
        }
    }
    match commands::dispatch(cli) {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            let msg = format!("{err:#}");
            if !log.is_stderr() {
                log.write(&tracing::Level::ERROR, &msg);
            }
            eprintln!("migrun: {msg}");
            std::process::exit(1);
        }
    }
}

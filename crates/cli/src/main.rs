//! `migrun`: the command line. Parses runc's flags, calls the libraries,
//! prints results and maps errors to exit codes. One module per command.

mod cli;
mod commands;
mod logging;
mod render;

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::PathBuf;

use clap::{CommandFactory, Parser};

use crate::cli::{Cli, Command};

/// Rewrites Go-style single-dash long flags (`-no-subreaper`, which
/// containerd's go-runc passes) to `--no-subreaper`, for every long flag
/// name migrun knows. Short flags and clusters (`-d`, `-it`) are untouched.
fn normalize_args(args: Vec<OsString>) -> Vec<OsString> {
    let mut longs = HashSet::new();
    collect_long_names(&Cli::command(), &mut longs);
    let mut out = Vec::with_capacity(args.len());
    let mut passthrough = false;
    for arg in args {
        let text = arg.to_string_lossy();
        if text == "--" {
            passthrough = true;
        }
        if !passthrough && text.starts_with('-') && !text.starts_with("--") && text.len() > 2 {
            let name = text[1..].split('=').next().unwrap_or_default();
            if longs.contains(name) {
                out.push(OsString::from(format!("-{text}")));
                continue;
            }
        }
        out.push(arg);
    }
    out
}

/// Every long flag name of `cmd` and its subcommands.
fn collect_long_names(cmd: &clap::Command, names: &mut HashSet<String>) {
    for arg in cmd.get_arguments() {
        if let Some(long) = arg.get_long() {
            names.insert(long.to_string());
        }
        for alias in arg.get_all_aliases().unwrap_or_default() {
            names.insert(alias.to_string());
        }
    }
    for sub in cmd.get_subcommands() {
        collect_long_names(sub, names);
    }
}

/// Writes a command-line error to the `--log` file, if one was given, so
/// that containerd can report it.
fn log_usage_error(args: &[OsString], msg: &str) {
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
    };
    if let Some(path) = value_of("--log") {
        let format = match value_of("--log-format").as_deref().and_then(|p| p.to_str()) {
            Some("json") => cli::LogFormat::Json,
            _ => cli::LogFormat::Text,
        };
        if let Ok(log) = logging::init(Some(&path), format, false) {
            log.write(&tracing::Level::ERROR, msg);
        }
    }
}

/// The error and its causes on one line, without repeating a cause that a
/// message already includes.
fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Whether `command` changes containers (or runs their hooks), rather than
/// only printing: those ignore SIGPIPE.
///
/// A hook that exits without reading the state on its stdin (`/bin/true`)
/// makes the write of the state an EPIPE, which libcontainer takes as the
/// end of the hook (its exit status decides, as with runc); with SIGPIPE at
/// its default, migrun died instead, half-way through a create or delete.
/// Container processes get the default back before their `execve`
/// (`migrun_runtime::workload`), and so does every program migrun spawns
/// (Rust's `Command` resets it). Commands that print keep the default, so
/// that `migrun events | head` ends quietly.
fn changes_containers(command: &Command) -> bool {
    match command {
        Command::Create(_)
        | Command::Run { .. }
        | Command::Start { .. }
        | Command::Kill { .. }
        | Command::Delete { .. }
        | Command::Exec(_)
        | Command::Pause { .. }
        | Command::Resume { .. }
        | Command::Update(_)
        | Command::Checkpoint(_)
        | Command::Restore(_)
        | Command::MigrateIn { .. }
        | Command::MigrateOut { .. }
        | Command::MigrateRecover { .. } => true,
        Command::Spec { .. }
        | Command::State { .. }
        | Command::List { .. }
        | Command::Ps { .. }
        | Command::Events { .. }
        | Command::Features
        | Command::Keygen { .. } => false,
    }
}

fn main() {
    // Like runc and every C tool: a closed pipe on stdout ends the program
    // quietly (`migrun events | head`), instead of a panic; commands that
    // change containers ignore it again once parsed (`changes_containers`).
    // SAFETY: setting a signal disposition to SIG_DFL has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = normalize_args(std::env::args_os().collect());
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(err) => {
            if err.use_stderr() {
                let first = err.to_string();
                log_usage_error(&args, first.lines().next().unwrap_or_default());
            }
            err.exit();
        }
    };
    if changes_containers(&cli.command) {
        // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
    }
    let log = match logging::init(
        cli.global.log.as_deref(),
        cli.global.log_format,
        cli.global.debug,
    ) {
        Ok(log) => log,
        Err(err) => {
            logging::error_to_stderr(&format!("open log file: {err}"));
            std::process::exit(1);
        }
    };
    // Commands that enter a container run from a write-protected copy of
    // this binary (CVE-2019-5736).
    if matches!(
        cli.command,
        Command::Create(_) | Command::Run { .. } | Command::Exec(_)
    ) {
        if let Err(err) = migrun_runtime::sealed_exe::ensure_protected(&cli.global.root) {
            log.error(&one_line(&err.into()));
            std::process::exit(1);
        }
    }
    match commands::dispatch(cli) {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            log.error(&one_line(&err));
            std::process::exit(1);
        }
    }
}

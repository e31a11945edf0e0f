//! One module per command; each turns parsed flags into library calls.

mod checkpoint;
mod create;
mod exec;
mod info;
mod lifecycle;
mod migrate;
mod ps;
mod update;

use anyhow::Result;
use migrun_runtime::StateRoot;

use crate::cli::{Cli, Command, Rootless};

/// Opens the state root named by the global options.
fn state_root(cli: &Cli) -> Result<StateRoot> {
    Ok(StateRoot::open(
        &cli.global.root,
        cli.global.systemd_cgroup,
    )?)
}

/// Runs the parsed command and returns the process exit code.
pub fn dispatch(cli: Cli) -> Result<i32> {
    if cli.global.rootless == Rootless::True && nix::unistd::geteuid().is_root() {
        tracing::debug!("--rootless=true as root: cgroup errors are not ignored");
    }
    let root = state_root(&cli)?;
    let criu = cli.global.criu.clone();
    match cli.command {
        Command::Spec { bundle, rootless } => info::spec(&bundle, rootless),
        Command::Create(args) => create::create(&root, &args),
        Command::Run { detach, create } => create::run(&root, &create, detach),
        Command::Start { id } => lifecycle::start(&root, &id),
        Command::State { id } => info::state(&root, &id),
        Command::List { format, quiet } => info::list(&root, format, quiet),
        Command::Kill { all, id, signal } => lifecycle::kill(&root, &id, &signal, all),
        Command::Delete { force, ids } => lifecycle::delete(&root, &ids, force),
        Command::Exec(args) => exec::exec(&root, &args),
        Command::Ps {
            format,
            id,
            ps_args,
        } => ps::ps(&root, &id, format, &ps_args),
        Command::Pause { id } => lifecycle::pause(&root, &id),
        Command::Resume { id } => lifecycle::resume(&root, &id),
        Command::Events {
            stats,
            interval,
            id,
        } => info::events(&root, &id, stats, &interval),
        Command::Update(args) => update::update(&root, &args),
        Command::Features => info::features(),
        Command::Checkpoint(args) => checkpoint::checkpoint(&root, &args, &criu),
        Command::Restore(args) => checkpoint::restore(&root, &args, &criu),
        Command::Keygen { out } => migrate::keygen(&out),
        Command::MigrateIn {
            listen,
            key,
            once,
            work_dir,
            no_lazy_restore,
            bridge,
            docker_host,
            peer_timeout,
            inject_fault,
        } => migrate::migrate_in(
            &root,
            migrun_migrate::target::InOptions {
                listen,
                key,
                once,
                work_dir,
                criu,
                lazy_restore: !no_lazy_restore,
                bridge,
                docker_host,
                peer_timeout: migrate::seconds(peer_timeout, "--peer-timeout")?,
                fault: migrate::fault(inject_fault.as_deref())?,
                events: crate::render::stderr_events(),
            },
        ),
        Command::MigrateOut {
            id,
            to,
            key,
            max_rounds,
            max_downtime,
            bandwidth,
            no_precopy,
            stats_json,
            work_dir,
            docker_host,
            peer_timeout,
            inject_fault,
        } => migrate::migrate_out(
            &root,
            migrun_migrate::source::OutOptions {
                id,
                to,
                key,
                max_rounds,
                max_downtime_ms: max_downtime,
                bandwidth_mbit: bandwidth,
                no_precopy,
                criu,
                work_dir,
                docker_host,
                peer_timeout: migrate::seconds(peer_timeout, "--peer-timeout")?,
                fault: migrate::fault(inject_fault.as_deref())?,
                events: crate::render::stderr_events(),
            },
            stats_json.as_deref(),
        ),
        Command::MigrateRecover {
            id,
            peer,
            listen,
            key,
            winner,
            peer_timeout,
            docker_host,
        } => migrate::migrate_recover(
            &root,
            migrun_migrate::recover::RecoverOptions {
                id,
                peer,
                listen,
                key,
                winner: winner.as_deref().map(|w| {
                    if w == "target" {
                        migrun_migrate::journal::Winner::Target
                    } else {
                        migrun_migrate::journal::Winner::Source
                    }
                }),
                peer_timeout: migrate::seconds(peer_timeout, "--peer-timeout")?,
                docker_host,
                events: crate::render::stderr_events(),
            },
        ),
    }
}

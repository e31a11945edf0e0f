//! `checkpoint` and `restore`.

use std::path::Path;

use anyhow::{Context, Result};
use migrun_runtime::checkpoint::{self, CheckpointOptions, RestoreOptions};
use migrun_runtime::{foreground, lifecycle, StateRoot};

use crate::cli::{CheckpointArgs, RestoreArgs};

/// `migrun checkpoint [flags] ID`.
pub fn checkpoint(root: &StateRoot, args: &CheckpointArgs, criu: &Path) -> Result<i32> {
    let c = &args.criu;
    checkpoint::checkpoint(
        root,
        &CheckpointOptions {
            id: args.id.clone(),
            image_path: c.image_path.clone(),
            work_path: c.work_path.clone(),
            parent_path: args.parent_path.clone(),
            leave_running: args.leave_running,
            tcp_established: c.tcp_established,
            ext_unix_sk: c.ext_unix_sk,
            shell_job: c.shell_job,
            file_locks: c.file_locks,
            pre_dump: args.pre_dump,
            page_server: args.page_server.clone(),
            lazy_pages: c.lazy_pages,
            status_fd: args.status_fd,
            manage_cgroups_mode: c.manage_cgroups_mode.clone(),
            empty_ns: c.empty_ns.clone(),
            auto_dedup: c.auto_dedup,
            criu: criu.to_path_buf(),
        },
    )?;
    Ok(0)
}

/// `migrun restore [flags] ID`: in the foreground, waits for the restored
/// container and returns its exit status, then deletes it.
pub fn restore(root: &StateRoot, args: &RestoreArgs, criu: &Path) -> Result<i32> {
    let c = &args.criu;
    if args.console_socket.is_some() {
        tracing::warn!("--console-socket: the restored terminal stays with the checkpointed one");
    }
    let opts = RestoreOptions {
        id: args.id.clone(),
        bundle: args.bundle.clone(),
        image_path: c.image_path.clone(),
        work_path: c.work_path.clone(),
        pid_file: args.pid_file.clone(),
        tcp_established: c.tcp_established,
        ext_unix_sk: c.ext_unix_sk,
        shell_job: c.shell_job,
        file_locks: c.file_locks,
        manage_cgroups_mode: c.manage_cgroups_mode.clone(),
        lazy_pages: c.lazy_pages,
        empty_ns: c.empty_ns.clone(),
        auto_dedup: c.auto_dedup,
        criu: criu.to_path_buf(),
        leave_stopped: false,
        bridge: args.bridge.clone(),
    };
    let signals = if args.detach {
        None
    } else {
        Some(foreground::block_signals()?)
    };
    let container = checkpoint::restore(root, &opts)?;
    let Some(signals) = signals else {
        return Ok(0);
    };
    let pid = container.pid().context("restored container has no pid")?;
    let code = foreground::wait_forwarding(pid, &signals)?;
    if let Err(err) = lifecycle::delete(root, &args.id, true) {
        tracing::error!("delete container {} after restore: {err}", args.id);
    }
    Ok(code)
}

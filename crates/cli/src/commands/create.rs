//! `create` and `run`.

use anyhow::{Context, Result};
use migrun_runtime::lifecycle::{self, CreateOptions};
use migrun_runtime::{foreground, StateRoot};

use crate::cli::CreateArgs;

/// Library options from the command line.
///
/// Relative paths are runc's: the bundle and `--pid-file` are the caller's
/// (its working directory), `--console-socket` is in the bundle (runc
/// changes into the bundle before it connects).
fn options(args: &CreateArgs, detach: bool) -> CreateOptions {
    CreateOptions {
        id: args.id.clone(),
        bundle: args.bundle.clone(),
        pid_file: args.pid_file.clone(),
        console_socket: args.console_socket.as_ref().map(|s| args.bundle.join(s)),
        no_pivot: args.no_pivot,
        no_new_keyring: args.no_new_keyring,
        preserve_fds: args.preserve_fds,
        detach,
    }
}

/// `migrun create`: the container waits for `start`.
pub fn create(root: &StateRoot, args: &CreateArgs) -> Result<i32> {
    lifecycle::create(root, &options(args, true))?;
    Ok(0)
}

/// `migrun run`: create and start; in the foreground, wait and return the
/// container's exit status, then delete it.
pub fn run(root: &StateRoot, args: &CreateArgs, detach: bool) -> Result<i32> {
    let container = lifecycle::create(root, &options(args, detach))?;
    if detach {
        lifecycle::start(root, &args.id)?;
        return Ok(0);
    }
    let pid = container
        .pid()
        .context("container has no init pid after create")?;
    // Block (and so keep) SIGCHLD before the container can run and exit.
    let signals = foreground::block_signals()?;
    if let Err(err) = lifecycle::start(root, &args.id) {
        let _ = lifecycle::delete(root, &args.id, true);
        return Err(err.into());
    }
    let code = foreground::wait_forwarding(pid, &signals)?;
    if let Err(err) = lifecycle::delete(root, &args.id, true) {
        tracing::error!("delete container {} after run: {err}", args.id);
    }
    Ok(code)
}

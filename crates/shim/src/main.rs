//! `containerd-shim-migrun-v1`: containerd's shim v2 for migrun
//! (runtime name `io.containerd.migrun.v1`).
//!
//! containerd runs this binary with `start` (the shim forks its daemon and
//! prints the daemon's ttrpc address), with `delete` (cleanup after a shim
//! died), and as the daemon itself, which serves the task API. Containers
//! are driven in process through `migrun-runtime`: no runtime binary is
//! executed per operation.

mod error;
mod io;
mod metrics;
mod mount;
mod reaper;
mod service;

use containerd_shim::Config;

/// The runtime name containerd knows this shim by.
const RUNTIME_ID: &str = "io.containerd.migrun.v1";

/// Carries the daemon's working directory across its protected re-exec.
const CWD_ENV: &str = "_MIGRUN_SHIM_CWD";

/// Whether this invocation is the long-running daemon (no action, a socket).
fn daemon_namespace() -> Option<String> {
    let args: Vec<_> = std::env::args_os().collect();
    let flags = containerd_shim::parse(args.get(1..).unwrap_or_default()).ok()?;
    (flags.action.is_empty() && !flags.socket.is_empty() && !flags.namespace.is_empty())
        .then_some(flags.namespace)
}

fn main() {
    if let Some(namespace) = daemon_namespace() {
        // Container processes start as clones of the daemon: it must run
        // from a copy of its binary that a container cannot write
        // (CVE-2019-5736), as migrun itself does.
        let root = service::state_root_path(&namespace);
        // The protected re-exec returns to the host's mount namespace with
        // setns(2), which moves the working directory to `/`; the daemon
        // works in its bundle (containerd's `log` FIFO, the `address` file).
        if std::env::var_os(CWD_ENV).is_none() {
            if let Ok(cwd) = std::env::current_dir() {
                std::env::set_var(CWD_ENV, cwd);
            }
        }
        if let Err(e) = std::fs::create_dir_all(&root)
            .map_err(|e| e.to_string())
            .and_then(|_| {
                migrun_runtime::sealed_exe::ensure_protected(&root).map_err(|e| e.to_string())
            })
        {
            eprintln!("{RUNTIME_ID}: cannot protect the shim binary: {e}");
            std::process::exit(1);
        }
        if let Some(cwd) = std::env::var_os(CWD_ENV) {
            std::env::remove_var(CWD_ENV);
            if let Err(e) = std::env::set_current_dir(&cwd) {
                eprintln!(
                    "{RUNTIME_ID}: cannot return to {}: {e}",
                    cwd.to_string_lossy()
                );
                std::process::exit(1);
            }
        }
    }
    containerd_shim::run::<service::MigrunShim>(
        RUNTIME_ID,
        Some(Config {
            // The shim reaps its children itself (see `reaper`).
            no_reaper: true,
            ..Default::default()
        }),
    );
}

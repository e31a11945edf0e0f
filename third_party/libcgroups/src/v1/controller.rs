use std::fs;
use std::path::Path;

use nix::unistd::Pid;

use crate::common::{self, CGROUP_PROCS, ControllerOpt, WrapIoResult, WrappedIoError};

pub(super) trait Controller {
    type Error: From<WrappedIoError>;
    type Resource;

    /// Adds a new task specified by its pid to the cgroup
    fn add_task(pid: Pid, cgroup_path: &Path) -> Result<(), Self::Error> {
        fs::create_dir_all(cgroup_path).wrap_create_dir(cgroup_path)?;
        write_task(pid, cgroup_path)?;
        Ok(())
    }

    /// Applies resource restrictions to the cgroup
    fn apply(controller_opt: &ControllerOpt, cgroup_root: &Path) -> Result<(), Self::Error>;

    /// Checks if the controller needs to handle this request
    fn needs_to_handle<'a>(controller_opt: &'a ControllerOpt) -> Option<&'a Self::Resource>;
}

/// Moves process `pid` into the v1 cgroup at `cgroup_path`.
///
/// migrun change (see third_party/README.md): a single-threaded process
/// moving itself writes `0` to `tasks` instead of its pid to `cgroup.procs`.
/// Both move the same (only) thread, but the kernel takes the global
/// threadgroup rwsem for a `cgroup.procs` write, or a `tasks` write naming a
/// pid, and taking that rwsem for writing waits for an RCU grace period:
/// about 10 ms on an idle host, on every container start. Writing `0` to
/// `tasks` moves `current`, which cannot exit or exec under the writer, and
/// the kernel skips the rwsem.
pub(super) fn write_task(pid: Pid, cgroup_path: &Path) -> Result<(), WrappedIoError> {
    if pid == nix::unistd::getpid() && (CALLING_THREAD_ONLY.get() || single_threaded()) {
        common::write_cgroup_file_str(cgroup_path.join(CGROUP_TASKS), "0")
    } else {
        common::write_cgroup_file(cgroup_path.join(CGROUP_PROCS), pid)
    }
}

thread_local! {
    /// Set by `Manager::add_calling_thread` (migrun change): move only the
    /// calling thread, whatever other threads the process has.
    pub(super) static CALLING_THREAD_ONLY: std::cell::Cell<bool> =
        const { std::cell::Cell::new(false) };
}

/// The v1 file listing a cgroup's threads.
const CGROUP_TASKS: &str = "tasks";

/// Whether the calling process has exactly one thread (the caller), from
/// the `Threads:` line of /proc/thread-self/status; false when unknown.
fn single_threaded() -> bool {
    nix::unistd::gettid() == nix::unistd::getpid()
        && fs::read_to_string("/proc/thread-self/status").is_ok_and(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Threads:"))
                .is_some_and(|n| n.trim() == "1")
        })
}

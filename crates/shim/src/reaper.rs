//! Reaping children: the containers' processes (init and exec, which
//! libcontainer makes children of the shim), CRIU-restored trees, and
//! orphans the shim inherits as a subreaper.
//!
//! One thread waits, without reaping (`WNOWAIT`), until some child has
//! exited, then takes the reap lock and reaps every exited child. Whoever
//! forks and waits for a child of its own (libcontainer's intermediate
//! process, CRIU, hooks) holds the reap lock meanwhile, so its child is
//! never taken from it. `__WALL` also reaps children that report their exit
//! with no signal (libcontainer clones the init with `CLONE_PARENT` and no
//! exit signal; until it execs, its exit raises no SIGCHLD).

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

use crate::service::Inner;

/// Starts the reaper thread.
pub fn start(inner: Arc<Inner>) {
    let spawned = std::thread::Builder::new()
        .name("reaper".into())
        .stack_size(128 * 1024)
        .spawn(move || run(&inner));
    if let Err(e) = spawned {
        log::error!("start reaper thread: {e}");
    }
}

/// Blocks until some child has exited (without reaping it), or with
/// `nohang` only checks whether there is a child. Returns false when there
/// is no child at all.
fn wait_any(nohang: bool) -> bool {
    let flags =
        libc::WEXITED | libc::WNOWAIT | libc::__WALL | if nohang { libc::WNOHANG } else { 0 };
    loop {
        // SAFETY: siginfo_t is plain old data; zeroed is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes into `info`, a valid siginfo_t.
        let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, flags) };
        if rc == 0 {
            return true;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            _ => return false,
        }
    }
}

/// Reaps every exited child; the reap lock is held.
fn reap_all(inner: &Arc<Inner>) {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(pid, code)) => inner.on_exit(pid.as_raw(), code),
            Ok(WaitStatus::Signaled(pid, sig, _)) => inner.on_exit(pid.as_raw(), 128 + sig as i32),
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn run(inner: &Arc<Inner>) {
    loop {
        if wait_any(false) {
            let _guard = inner
                .reap_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            reap_all(inner);
        } else {
            // No children: sleep until one is made (or a second passes,
            // for orphans the shim inherits as a subreaper).
            let guard = inner
                .reap_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Children are only made under the lock: checked again here,
            // none can appear unseen before the wait.
            if !wait_any(true) {
                let _ = inner.spawned.wait_timeout(guard, Duration::from_secs(1));
            }
        }
    }
}

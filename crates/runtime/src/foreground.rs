//! Waiting for a container's init process in the foreground (`run`, `exec`).
//!
//! All signals are blocked and forwarded to the container's process, as runc
//! does. Children that already exited are reaped before the first wait, so a
//! container that exits at once (`true`) is never missed: its SIGCHLD may have
//! been discarded before the signals were blocked.

use nix::sys::signal::{kill, Signal};
use nix::sys::signalfd::SigSet;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::error::{Context, Result};

/// Exit code of a wait status the way a shell reports it (128 + signal).
fn exit_code(status: WaitStatus) -> Option<(Pid, i32)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid, code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid, 128 + sig as i32)),
        _ => None,
    }
}

/// Reaps every exited child; returns `pid`'s exit code once it is among them.
fn reap(pid: Pid) -> Result<Option<i32>> {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return Ok(None),
            Ok(status) => {
                if let Some((reaped, code)) = exit_code(status) {
                    if reaped == pid {
                        return Ok(Some(code));
                    }
                }
            }
            Err(nix::Error::ECHILD) => return Ok(None),
            Err(e) => return Err(e).ctx(|| "wait for container process".to_string()),
        }
    }
}

/// Blocks every signal in this thread; call before the container may exit.
pub fn block_signals() -> Result<SigSet> {
    let set = SigSet::all();
    set.thread_block().ctx(|| "block signals".to_string())?;
    Ok(set)
}

/// Waits for `pid` (a child of this process) to exit, forwarding signals to it,
/// and returns its exit code (128 + signal when it was killed).
pub fn wait_forwarding(pid: Pid, signals: &SigSet) -> Result<i32> {
    if let Some(code) = reap(pid)? {
        return Ok(code);
    }
    loop {
        let sig = signals.wait().ctx(|| "wait for signals".to_string())?;
        match sig {
            Signal::SIGCHLD => {
                if let Some(code) = reap(pid)? {
                    return Ok(code);
                }
            }
            Signal::SIGURG | Signal::SIGWINCH => {}
            other => {
                let _ = kill(pid, other);
            }
        }
    }
}

#[cfg(test)]
// The children spawned here are reaped by `wait_forwarding`, which is what is tested.
#[allow(clippy::zombie_processes)]
mod tests {
    use super::*;
    use std::process::Command;

    // Runs in a forked child so that the signal mask of the test harness is untouched.
    fn in_child(f: fn() -> i32) -> i32 {
        // SAFETY: the child only runs `f` and exits; it does not return into the harness.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                let code = f();
                // SAFETY: _exit is always safe to call.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, code)) => code,
                other => panic!("child ended with {other:?}"),
            },
        }
    }

    #[test]
    fn child_that_exits_at_once_is_not_missed() {
        let code = in_child(|| {
            let child = Command::new("sh")
                .args(["-c", "exit 7"])
                .spawn()
                .expect("spawn");
            let pid = Pid::from_raw(child.id() as i32);
            std::thread::sleep(std::time::Duration::from_millis(200));
            let set = block_signals().expect("block");
            wait_forwarding(pid, &set).unwrap_or(99)
        });
        assert_eq!(code, 7);
    }

    #[test]
    fn forwarded_signal_kills_child() {
        let code = in_child(|| {
            let child = Command::new("sleep").arg("30").spawn().expect("spawn");
            let pid = Pid::from_raw(child.id() as i32);
            let set = block_signals().expect("block");
            let me = nix::unistd::getpid();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(100));
                let _ = kill(me, Signal::SIGTERM);
            });
            wait_forwarding(pid, &set).unwrap_or(99)
        });
        assert_eq!(code, 128 + Signal::SIGTERM as i32);
    }
}

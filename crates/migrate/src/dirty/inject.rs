//! Running system calls inside another process with ptrace, and freezing
//! a process for a moment.
//!
//! # How a syscall is injected
//!
//! 1. `PTRACE_SEIZE` one thread of the target (the main thread unless it is
//!    a zombie), `PTRACE_INTERRUPT` it and wait for the `PTRACE_EVENT_STOP`.
//!    The other threads keep running: the userfaultfd and the other
//!    resources we create are per process, one thread is enough.
//! 2. Save its registers and signal mask, then block every signal
//!    (`PTRACE_SETSIGMASK`), so no signal handler runs on the borrowed
//!    thread and no signal is consumed while we use it.
//! 3. Point `rip` at an existing `syscall` instruction (found in the
//!    target's vDSO), set `rax` to the syscall number, the argument
//!    registers, and `orig_rax = -1` so the kernel does not apply the
//!    restart logic of a syscall the thread may have been sleeping in (e.g.
//!    `nanosleep`), then `PTRACE_SYSCALL` to the syscall-entry and
//!    syscall-exit stops and read the result from `rax`. No code is
//!    written into the target: patching text at `rip` would be unsafe while
//!    other threads run, as they may execute the same code at that moment.
//! 4. To finish, `PTRACE_INTERRUPT` again and continue, so the thread stops
//!    in `PTRACE_EVENT_STOP` inside the kernel's signal handling, restore
//!    the registers and the mask there, and `PTRACE_DETACH`. On the way
//!    out the kernel applies its syscall-restart logic to the restored
//!    registers, exactly as if the thread had never been stopped
//!    (`nanosleep` continues with the remaining time, `pause` keeps
//!    waiting, a signal arriving meanwhile gets `EINTR` semantics right).
//!    Detaching straight from the syscall-exit stop happens to work too
//!    today (detach wakes the thread with `TIF_SIGPENDING` set), but the
//!    extra stop makes it not depend on that detail.
//!
//! Before running anything the target's seccomp filters are fetched
//! (`PTRACE_SECCOMP_GET_FILTER`) and evaluated for the call: a syscall the
//! filter would refuse, or punish by killing the target, is not run.
//! If the thread was preempted inside an rseq critical section, it is
//! restored at the section's abort handler, as the kernel would have done.
//!
//! Every ptrace session runs on its own short-lived thread: ptrace binds a
//! tracee to the tracer *thread*, and if the target never stops (an
//! uninterruptible sleep, a cgroup-v1 freezer) the session gives up after
//! a timeout and the thread exits, which makes the kernel detach the target
//! instead of leaving it stopped forever. That is safe only before the
//! registers are changed; afterwards every stop is waited for as long as it
//! takes.
//!
//! While the process is in a group stop (SIGSTOP), injection works too:
//! the borrowed thread runs just for the syscalls and the kernel puts it
//! back into the group stop on detach.

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use libc::{c_long, user_regs_struct};
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::unistd::Pid;

use super::{io_err, sys, sys_err, DirtyError, ProcessMaps, Result};

/// How long a session waits for the target to reach a ptrace stop.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

const PTRACE_EVENT_STOP: i32 = 128;
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const PTRACE_SYSCALL_INFO_ENTRY: u8 = 1;
const PTRACE_SYSCALL_INFO_EXIT: u8 = 2;
/// The user code segment of 64-bit processes on x86-64.
const USER_CS_64: u64 = 0x33;
/// The x86 trap flag (single-step) in `eflags`.
const EFLAGS_TF: u64 = 0x100;

/// Runs the system call `nr` with `args` inside process `pid` and returns
/// its raw result (a negative value is `-errno`).
///
/// The target is seized, borrowed for the call and released; see the
/// [module documentation](self) for the exact steps. Fails without running
/// the call if the target cannot be traced, if its seccomp filter would not
/// allow the call, or if it does not stop within [`DEFAULT_TIMEOUT`].
pub fn inject_syscall(pid: i32, nr: i64, args: [u64; 6]) -> Result<i64> {
    with_injector(pid, |inj| inj.syscall(nr, args))
}

/// Seizes `pid`, runs `f` with the [`Injector`] (which can run several
/// syscalls in one stop), then restores and releases the target.
///
/// Runs on a dedicated thread (see the [module documentation](self)).
/// An error of `f` is returned after the target was released.
pub fn with_injector<T: Send>(
    pid: i32,
    f: impl FnOnce(&mut Injector) -> Result<T> + Send,
) -> Result<T> {
    with_injector_timeout(pid, DEFAULT_TIMEOUT, f)
}

/// [`with_injector`] waiting at most `timeout` for the target to stop.
///
/// If the target does not stop in time (an uninterruptible sleep, a
/// cgroup-v1 freezer), this fails with [`DirtyError::Timeout`] and the
/// target is left as it was: the kernel drops the pending interrupt when
/// the session's thread exits. The timeout covers only that first stop:
/// once the thread runs with injected registers, giving up would let the
/// kernel release it in that state, so the later stops are waited for as
/// long as it takes (with a warning every [`DEFAULT_TIMEOUT`]; a target
/// frozen in the middle of a session stops when thawed).
pub fn with_injector_timeout<T: Send>(
    pid: i32,
    timeout: Duration,
    f: impl FnOnce(&mut Injector) -> Result<T> + Send,
) -> Result<T> {
    on_own_thread(pid, move || {
        let mut inj = Injector::attach(pid, timeout)?;
        let result = f(&mut inj);
        let detached = inj.detach();
        let value = result?;
        detached?;
        Ok(value)
    })
}

/// Runs `f` on a new scoped thread and returns its result.
fn on_own_thread<T: Send>(pid: i32, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("migrun-ptrace".into())
            .spawn_scoped(s, f)
            .map_err(io_err("spawn ptrace thread"))?;
        handle.join().unwrap_or_else(|_| {
            Err(DirtyError::Injection {
                pid,
                reason: "ptrace thread panicked".into(),
            })
        })
    })
}

/// One ptrace stop of one thread of the target, decoded from a wait status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// `PTRACE_EVENT_*` stop (`PTRACE_EVENT_STOP` for an interrupt or a
    /// group stop) with the reported signal.
    Event(i32, i32),
    /// Syscall-entry or -exit stop (`SIGTRAP | 0x80`).
    Syscall,
    /// Signal-delivery stop.
    Signal(i32),
    /// The thread exited or was killed.
    Gone,
}

/// How long to wait for a ptrace stop.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// Give up at this instant (nothing in the target was changed yet, so
    /// giving up is harmless).
    Until(Instant),
    /// Wait as long as it takes, warning every `DEFAULT_TIMEOUT`: the
    /// thread runs with injected registers, and giving up would let the
    /// kernel release it like that.
    Forever,
}

/// Waits for the next stop of `tid`.
fn wait_stop(pid: i32, tid: i32, wait: Wait, started: Instant) -> Result<Stop> {
    let mut delay = Duration::from_micros(10);
    let mut next_warning = started + DEFAULT_TIMEOUT;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes the status into the valid local `status`.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
        if r < 0 {
            let errno = Errno::last();
            match errno {
                Errno::EINTR => continue,
                Errno::ECHILD => return Ok(Stop::Gone),
                e => return Err(sys_err(format!("waitpid {tid}"))(e)),
            }
        }
        if r == tid {
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                return Ok(Stop::Gone);
            }
            if libc::WIFSTOPPED(status) {
                let sig = libc::WSTOPSIG(status);
                let event = (status >> 16) & 0xffff;
                return Ok(if sig == (libc::SIGTRAP | 0x80) {
                    Stop::Syscall
                } else if event != 0 {
                    Stop::Event(event, sig)
                } else {
                    Stop::Signal(sig)
                });
            }
            continue;
        }
        let now = Instant::now();
        match wait {
            Wait::Until(deadline) if now >= deadline => {
                return Err(DirtyError::Timeout {
                    pid,
                    waited_ms: now.duration_since(started).as_millis() as u64,
                });
            }
            Wait::Forever if now >= next_warning => {
                tracing::warn!(
                    pid,
                    tid,
                    waited_ms = now.duration_since(started).as_millis() as u64,
                    "thread borrowed for syscall injection does not stop; still waiting (is it frozen?)"
                );
                next_warning = now + DEFAULT_TIMEOUT;
            }
            _ => {}
        }
        // The stop usually comes within microseconds: yield first, then
        // back off to sleeping.
        if now.duration_since(started) < Duration::from_micros(200) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(1));
        }
    }
}

/// `ptrace(req, tid, addr, data)` for requests nix does not wrap.
fn ptrace_raw(req: libc::c_uint, tid: i32, addr: usize, data: usize) -> nix::Result<c_long> {
    Errno::clear();
    // SAFETY: callers pass requests whose `addr`/`data` are integers or
    // pointers to buffers valid for what the request reads or writes.
    let r = unsafe {
        libc::ptrace(
            req,
            tid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    };
    if r == -1 {
        let e = Errno::last();
        if e != Errno::UnknownErrno {
            return Err(e);
        }
    }
    Ok(r)
}

fn get_sigmask(tid: i32) -> nix::Result<u64> {
    let mut mask: u64 = 0;
    ptrace_raw(
        libc::PTRACE_GETSIGMASK,
        tid,
        std::mem::size_of::<u64>(),
        &mut mask as *mut u64 as usize,
    )?;
    Ok(mask)
}

fn set_sigmask(tid: i32, mask: u64) -> nix::Result<()> {
    let mut mask = mask;
    ptrace_raw(
        libc::PTRACE_SETSIGMASK,
        tid,
        std::mem::size_of::<u64>(),
        &mut mask as *mut u64 as usize,
    )
    .map(drop)
}

/// `struct ptrace_syscall_info`, enough of it for `op` and the entry number.
#[repr(C)]
#[derive(Default)]
struct SyscallInfo {
    op: u8,
    pad: [u8; 3],
    arch: u32,
    instruction_pointer: u64,
    stack_pointer: u64,
    /// `entry.nr`, `entry.args[6]` / `exit.rval`, `exit.is_error`.
    data: [u64; 8],
}

fn syscall_info(tid: i32) -> nix::Result<SyscallInfo> {
    let mut info = SyscallInfo::default();
    ptrace_raw(
        libc::PTRACE_GET_SYSCALL_INFO,
        tid,
        std::mem::size_of::<SyscallInfo>(),
        &mut info as *mut SyscallInfo as usize,
    )?;
    Ok(info)
}

/// Picks the thread to borrow: the main thread unless it is a zombie (or
/// dead), else any live thread not in an uninterruptible sleep.
fn pick_thread(pid: i32) -> Result<i32> {
    let state = |tid: i32| -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.trim_start().chars().next()
    };
    match state(pid) {
        Some('Z' | 'X' | 'D') | None => {}
        Some(_) => return Ok(pid),
    }
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DirtyError::ProcessGone { pid }
        } else {
            io_err(format!("list /proc/{pid}/task"))(e)
        }
    })?;
    let mut fallback = None;
    for entry in dir.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        match state(tid) {
            Some('Z' | 'X') | None => {}
            Some('D') => fallback = fallback.or(Some(tid)),
            Some(_) => return Ok(tid),
        }
    }
    fallback.ok_or(DirtyError::ProcessGone { pid })
}

/// A seized, stopped thread of a target process, borrowed to run system
/// calls; see the [module documentation](self).
///
/// Created by [`with_injector`]. Not `Send`: ptrace requests must come from
/// the thread that seized the target.
pub struct Injector {
    pid: i32,
    tid: i32,
    saved: user_regs_struct,
    restore_rip: u64,
    saved_mask: u64,
    syscall_ip: u64,
    seccomp: Seccomp,
    resumed: bool,
    swallowed: Vec<i32>,
    detached: bool,
    _not_send: PhantomData<*const ()>,
}

impl Injector {
    /// Seizes a thread of `pid` and prepares it (see the module docs).
    fn attach(pid: i32, timeout: Duration) -> Result<Self> {
        let tid = pick_thread(pid)?;
        let t = Pid::from_raw(tid);
        ptrace::seize(t, ptrace::Options::PTRACE_O_TRACESYSGOOD).map_err(|e| match e {
            Errno::ESRCH => DirtyError::ProcessGone { pid },
            Errno::EPERM => DirtyError::Injection {
                pid,
                reason: "ptrace seize not permitted (already traced, or ptrace restricted)".into(),
            },
            e => sys_err(format!("ptrace seize {tid}"))(e),
        })?;
        if let Err(e) = ptrace::interrupt(t) {
            // Not stopped yet, so it cannot be detached; our thread's exit
            // releases it.
            return Err(if e == Errno::ESRCH {
                DirtyError::ProcessGone { pid }
            } else {
                sys_err(format!("ptrace interrupt {tid}"))(e)
            });
        }
        let started = Instant::now();
        let wait = Wait::Until(started + timeout);
        loop {
            match wait_stop(pid, tid, wait, started)? {
                Stop::Event(PTRACE_EVENT_STOP, _) => break,
                Stop::Signal(sig) => {
                    // A signal arrived before the interrupt took effect:
                    // deliver it as if we were not there and wait on.
                    ptrace_raw(libc::PTRACE_CONT, tid, 0, sig as usize)
                        .map_err(sys_err(format!("ptrace cont {tid}")))?;
                }
                Stop::Event(..) | Stop::Syscall => {
                    ptrace_raw(libc::PTRACE_CONT, tid, 0, 0)
                        .map_err(sys_err(format!("ptrace cont {tid}")))?;
                }
                Stop::Gone => return Err(DirtyError::ProcessGone { pid }),
            }
        }
        match Self::prepare(pid, tid) {
            Ok(inj) => Ok(inj),
            Err(e) => {
                let _ = ptrace::detach(t, None);
                Err(e)
            }
        }
    }

    /// Saves the thread's state, finds a syscall instruction, reads the
    /// seccomp filters, and blocks all signals. Nothing is changed in the
    /// target until the last step.
    fn prepare(pid: i32, tid: i32) -> Result<Self> {
        let t = Pid::from_raw(tid);
        let saved = ptrace::getregs(t).map_err(sys_err(format!("ptrace getregs {tid}")))?;
        if saved.cs != USER_CS_64 {
            return Err(DirtyError::Injection {
                pid,
                reason: format!(
                    "thread {tid} is not running 64-bit code (cs {:#x})",
                    saved.cs
                ),
            });
        }
        let saved_mask = get_sigmask(tid).map_err(sys_err(format!("ptrace getsigmask {tid}")))?;
        let syscall_ip = find_syscall_instruction(pid)?;
        let seccomp = Seccomp::load(pid, tid)?;
        let restore_rip = if saved.orig_rax as i64 >= 0 {
            saved.rip
        } else {
            rseq_abort_ip(pid, tid, saved.rip).unwrap_or(saved.rip)
        };
        set_sigmask(tid, !0u64).map_err(sys_err(format!("ptrace setsigmask {tid}")))?;
        Ok(Injector {
            pid,
            tid,
            saved,
            restore_rip,
            saved_mask,
            syscall_ip,
            seccomp,
            resumed: false,
            swallowed: Vec::new(),
            detached: false,
            _not_send: PhantomData,
        })
    }

    /// The target process.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The borrowed thread.
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// Fails if the target's seccomp filter would not let the system call
    /// `nr` with `args` run (checked before any syscall is injected, e.g.
    /// to make sure a resource created by one call can be closed by
    /// another).
    pub fn check_allowed(&self, nr: i64, args: [u64; 6]) -> Result<()> {
        self.seccomp.check(self.pid, nr, &args, self.syscall_ip)
    }

    /// Runs the system call `nr` with `args` in the target and returns its
    /// raw result (a negative value is `-errno`). Fails without running it
    /// if the target's seccomp filter would not allow it.
    pub fn syscall(&mut self, nr: i64, args: [u64; 6]) -> Result<i64> {
        self.seccomp.check(self.pid, nr, &args, self.syscall_ip)?;
        let t = Pid::from_raw(self.tid);
        let mut regs = self.saved;
        regs.rip = self.syscall_ip;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        regs.r10 = args[3];
        regs.r8 = args[4];
        regs.r9 = args[5];
        regs.eflags &= !EFLAGS_TF;
        ptrace::setregs(t, regs).map_err(sys_err(format!("ptrace setregs {}", self.tid)))?;
        self.resumed = true;
        let entry = self.run_to_syscall_stop(PTRACE_SYSCALL_INFO_ENTRY)?;
        if entry.data[0] != nr as u64 || entry.instruction_pointer != self.syscall_ip + 2 {
            return Err(DirtyError::Injection {
                pid: self.pid,
                reason: format!(
                    "thread {} entered syscall {} at {:#x}, expected {nr} at {:#x}",
                    self.tid,
                    entry.data[0] as i64,
                    entry.instruction_pointer,
                    self.syscall_ip + 2
                ),
            });
        }
        self.run_to_syscall_stop(PTRACE_SYSCALL_INFO_EXIT)?;
        let regs = ptrace::getregs(t).map_err(sys_err(format!("ptrace getregs {}", self.tid)))?;
        Ok(regs.rax as i64)
    }

    /// Resumes with `PTRACE_SYSCALL` until the syscall stop `op`.
    fn run_to_syscall_stop(&mut self, op: u8) -> Result<SyscallInfo> {
        let started = Instant::now();
        let tid = self.tid;
        let resume = || {
            ptrace_raw(libc::PTRACE_SYSCALL, tid, 0, 0)
                .map_err(sys_err(format!("ptrace syscall {tid}")))
        };
        resume()?;
        loop {
            match wait_stop(self.pid, tid, Wait::Forever, started)? {
                Stop::Syscall => {
                    let info = syscall_info(tid)
                        .map_err(sys_err(format!("ptrace get_syscall_info {tid}")))?;
                    if info.op == op {
                        return Ok(info);
                    }
                    return Err(DirtyError::Injection {
                        pid: self.pid,
                        reason: format!("unexpected syscall stop {} of thread {tid}", info.op),
                    });
                }
                Stop::Signal(
                    sig @ (libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGTRAP),
                ) => {
                    return Err(DirtyError::Injection {
                        pid: self.pid,
                        reason: format!(
                            "thread {tid} got signal {sig} running the injected syscall"
                        ),
                    });
                }
                Stop::Signal(sig) => {
                    // Only unblockable signals get here (SIGSTOP); hold it
                    // back and raise it again after detaching.
                    self.swallowed.push(sig);
                    resume()?;
                }
                // A group stop or a stray trap: keep going.
                Stop::Event(..) => {
                    resume()?;
                }
                Stop::Gone => return Err(DirtyError::ProcessGone { pid: self.pid }),
            }
        }
    }

    /// Restores the thread and detaches (see the module docs).
    fn detach(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        if self.detached {
            return Ok(());
        }
        let tid = self.tid;
        let t = Pid::from_raw(tid);
        if self.resumed {
            // Leave the syscall stop through an interrupt trap inside the
            // kernel's signal handling, where the restored registers still
            // get the syscall-restart treatment.
            ptrace::interrupt(t).map_err(sys_err(format!("ptrace interrupt {tid}")))?;
            ptrace_raw(libc::PTRACE_CONT, tid, 0, 0)
                .map_err(sys_err(format!("ptrace cont {tid}")))?;
            let started = Instant::now();
            loop {
                match wait_stop(self.pid, tid, Wait::Forever, started)? {
                    // The interrupt trap; while the process is in a group
                    // stop (SIGSTOP) the kernel reports it with the stop
                    // signal instead of SIGTRAP. Either is a stop inside
                    // the kernel's signal handling, where we want to be.
                    Stop::Event(PTRACE_EVENT_STOP, _) => break,
                    Stop::Signal(sig) => {
                        self.swallowed.push(sig);
                        ptrace_raw(libc::PTRACE_CONT, tid, 0, 0)
                            .map_err(sys_err(format!("ptrace cont {tid}")))?;
                    }
                    Stop::Event(..) | Stop::Syscall => {
                        ptrace_raw(libc::PTRACE_CONT, tid, 0, 0)
                            .map_err(sys_err(format!("ptrace cont {tid}")))?;
                    }
                    Stop::Gone => {
                        self.detached = true;
                        return Err(DirtyError::ProcessGone { pid: self.pid });
                    }
                }
            }
            self.resumed = false;
        }
        let mut regs = self.saved;
        regs.rip = self.restore_rip;
        ptrace::setregs(t, regs).map_err(sys_err(format!("ptrace setregs {tid}")))?;
        set_sigmask(tid, self.saved_mask).map_err(sys_err(format!("ptrace setsigmask {tid}")))?;
        ptrace::detach(t, None).map_err(sys_err(format!("ptrace detach {tid}")))?;
        self.detached = true;
        for sig in self.swallowed.drain(..) {
            // SAFETY: tgkill takes plain integers.
            unsafe { libc::syscall(libc::SYS_tgkill, self.pid, tid, sig) };
        }
        Ok(())
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        if !self.detached {
            if let Err(e) = self.release() {
                tracing::warn!(pid = self.pid, tid = self.tid, error = %e, "releasing injected thread failed");
            }
        }
    }
}

/// Finds a `syscall` instruction (`0f 05`) in the target's executable
/// memory: in the vDSO, else in any readable executable mapping.
fn find_syscall_instruction(pid: i32) -> Result<u64> {
    let maps = ProcessMaps::read(pid)?;
    let vdso = maps.by_path("[vdso]").filter(|m| m.read && m.exec);
    let others = maps
        .entries()
        .iter()
        .filter(|m| m.read && m.exec && m.path != "[vdso]" && !m.is_special());
    for m in vdso.into_iter().chain(others) {
        let mut addr = m.start;
        while addr < m.end {
            let len = (m.end - addr).min(1 << 20) as usize;
            let mut buf = vec![0u8; len];
            let n = match sys::read_remote(pid, addr, &mut buf) {
                Ok(n) if n >= 2 => n,
                _ => break,
            };
            if let Some(i) = buf[..n].windows(2).position(|w| w == [0x0f, 0x05]) {
                return Ok(addr + i as u64);
            }
            // Keep the last byte in case the instruction straddles chunks.
            addr += (n - 1) as u64;
            if n < len {
                break;
            }
        }
    }
    Err(DirtyError::Injection {
        pid,
        reason: "no syscall instruction found in the target's executable memory".into(),
    })
}

/// If `rip` is inside the rseq critical section the thread is registered
/// in, the section's abort address (where the kernel would send a
/// preempted thread).
fn rseq_abort_ip(pid: i32, tid: i32, rip: u64) -> Option<u64> {
    #[repr(C)]
    #[derive(Default)]
    struct RseqConfiguration {
        rseq_abi_pointer: u64,
        rseq_abi_size: u32,
        signature: u32,
        flags: u32,
        pad: u32,
    }
    let mut conf = RseqConfiguration::default();
    ptrace_raw(
        libc::PTRACE_GET_RSEQ_CONFIGURATION,
        tid,
        std::mem::size_of::<RseqConfiguration>(),
        &mut conf as *mut RseqConfiguration as usize,
    )
    .ok()?;
    if conf.rseq_abi_pointer == 0 {
        return None;
    }
    let read_u64 = |addr: u64| -> Option<u64> {
        let mut b = [0u8; 8];
        (sys::read_remote(pid, addr, &mut b).ok()? == 8).then(|| u64::from_ne_bytes(b))
    };
    // struct rseq { u32 cpu_id_start; u32 cpu_id; u64 rseq_cs; ... }
    let cs = read_u64(conf.rseq_abi_pointer + 8)?;
    if cs == 0 {
        return None;
    }
    // struct rseq_cs { u32 version; u32 flags; u64 start_ip;
    //                  u64 post_commit_offset; u64 abort_ip; }
    let start_ip = read_u64(cs + 8)?;
    let post_commit_offset = read_u64(cs + 16)?;
    let abort_ip = read_u64(cs + 24)?;
    (rip.wrapping_sub(start_ip) < post_commit_offset).then_some(abort_ip)
}

/// Freezes every thread of `pid` with ptrace (seize and interrupt each,
/// repeating until no new thread appears), runs `f`, and releases them.
///
/// Nothing of the process changes: the threads see at most a restarted
/// system call. Used where a backend must read and reset state without
/// the process writing in between (soft-dirty).
pub fn with_frozen<T: Send>(pid: i32, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    on_own_thread(pid, move || {
        let mut frozen = Frozen {
            tids: Vec::new(),
            stopped: Vec::new(),
        };
        frozen.freeze(pid, DEFAULT_TIMEOUT)?;
        let result = f();
        frozen.thaw();
        result
    })
}

/// The threads seized by [`with_frozen`].
struct Frozen {
    tids: Vec<i32>,
    stopped: Vec<bool>,
}

impl Frozen {
    fn freeze(&mut self, pid: i32, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        let wait = Wait::Until(started + timeout);
        for _pass in 0..100 {
            let mut new = 0;
            let dir = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    DirtyError::ProcessGone { pid }
                } else {
                    io_err(format!("list /proc/{pid}/task"))(e)
                }
            })?;
            for entry in dir.flatten() {
                let Some(tid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<i32>().ok())
                else {
                    continue;
                };
                if self.tids.contains(&tid) {
                    continue;
                }
                let t = Pid::from_raw(tid);
                match ptrace::seize(t, ptrace::Options::empty()) {
                    Ok(()) => {}
                    Err(Errno::ESRCH) => continue,
                    Err(e) => return Err(sys_err(format!("ptrace seize {tid}"))(e)),
                }
                self.tids.push(tid);
                self.stopped.push(false);
                new += 1;
                match ptrace::interrupt(t) {
                    Ok(()) => {}
                    Err(Errno::ESRCH) => {
                        if let Some(s) = self.stopped.last_mut() {
                            *s = true; // gone: nothing to wait for
                        }
                    }
                    Err(e) => return Err(sys_err(format!("ptrace interrupt {tid}"))(e)),
                }
            }
            for i in 0..self.tids.len() {
                if self.stopped[i] {
                    continue;
                }
                let tid = self.tids[i];
                loop {
                    match wait_stop(pid, tid, wait, started)? {
                        Stop::Event(PTRACE_EVENT_STOP, _) | Stop::Gone => break,
                        Stop::Signal(sig) => {
                            ptrace_raw(libc::PTRACE_CONT, tid, 0, sig as usize)
                                .map_err(sys_err(format!("ptrace cont {tid}")))?;
                        }
                        Stop::Event(..) | Stop::Syscall => {
                            ptrace_raw(libc::PTRACE_CONT, tid, 0, 0)
                                .map_err(sys_err(format!("ptrace cont {tid}")))?;
                        }
                    }
                }
                self.stopped[i] = true;
            }
            if new == 0 {
                return Ok(());
            }
        }
        Err(DirtyError::Injection {
            pid,
            reason: "threads keep appearing, cannot freeze the process".into(),
        })
    }

    fn thaw(&mut self) {
        for &tid in &self.tids {
            let _ = ptrace::detach(Pid::from_raw(tid), None);
        }
        self.tids.clear();
        self.stopped.clear();
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw();
    }
}

/// One classic BPF instruction (`struct sock_filter`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SockFilter {
    pub(crate) code: u16,
    pub(crate) jt: u8,
    pub(crate) jf: u8,
    pub(crate) k: u32,
}

/// The seccomp state of the borrowed thread.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seccomp {
    /// No seccomp.
    Disabled,
    /// `SECCOMP_MODE_STRICT`: only read, write, exit and sigreturn.
    Strict,
    /// `SECCOMP_MODE_FILTER` with these programs.
    Filters(Vec<Vec<SockFilter>>),
}

const SECCOMP_RET_ACTION_FULL: u32 = 0xffff_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_LOG: u32 = 0x7ffc_0000;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

impl Seccomp {
    /// Reads the thread's seccomp mode and, in filter mode, its filters.
    fn load(pid: i32, tid: i32) -> Result<Self> {
        let path = format!("/proc/{pid}/task/{tid}/status");
        let status = std::fs::read_to_string(&path).map_err(io_err(format!("read {path}")))?;
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "0".into());
        match mode.as_str() {
            "0" => Ok(Seccomp::Disabled),
            "1" => Ok(Seccomp::Strict),
            _ => {
                let mut filters = Vec::new();
                for index in 0usize.. {
                    let n = match ptrace_raw(PTRACE_SECCOMP_GET_FILTER, tid, index, 0) {
                        Ok(n) => n as usize,
                        Err(Errno::ENOENT) => break,
                        Err(e) => {
                            return Err(DirtyError::Injection {
                                pid,
                                reason: format!(
                                    "cannot read the seccomp filters of thread {tid}: {e}"
                                ),
                            })
                        }
                    };
                    let mut prog = vec![SockFilter::default(); n];
                    let got = ptrace_raw(
                        PTRACE_SECCOMP_GET_FILTER,
                        tid,
                        index,
                        prog.as_mut_ptr() as usize,
                    )
                    .map_err(sys_err(format!("ptrace seccomp_get_filter {tid}")))?;
                    prog.truncate(got as usize);
                    filters.push(prog);
                }
                Ok(Seccomp::Filters(filters))
            }
        }
    }

    /// Fails if the thread's seccomp state would not let the syscall run.
    fn check(&self, pid: i32, nr: i64, args: &[u64; 6], ip: u64) -> Result<()> {
        let action = match self {
            Seccomp::Disabled => return Ok(()),
            Seccomp::Strict => {
                if [0, 1, 60, 15].contains(&nr) {
                    return Ok(());
                }
                SECCOMP_RET_KILL_PROCESS
            }
            Seccomp::Filters(filters) => evaluate_filters(filters, nr, args, ip),
        };
        match action & SECCOMP_RET_ACTION_FULL {
            SECCOMP_RET_ALLOW | SECCOMP_RET_LOG => Ok(()),
            _ => Err(DirtyError::SeccompDenied { pid, nr, action }),
        }
    }
}

/// The combined verdict of seccomp filters for a syscall: every filter
/// runs, the most restrictive action wins (the lowest as a signed value,
/// as the kernel orders them).
pub(crate) fn evaluate_filters(
    filters: &[Vec<SockFilter>],
    nr: i64,
    args: &[u64; 6],
    ip: u64,
) -> u32 {
    // struct seccomp_data { int nr; u32 arch; u64 instruction_pointer;
    //                       u64 args[6]; }
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&(nr as i32).to_ne_bytes());
    data[4..8].copy_from_slice(&AUDIT_ARCH_X86_64.to_ne_bytes());
    data[8..16].copy_from_slice(&ip.to_ne_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
    }
    let mut verdict = SECCOMP_RET_ALLOW;
    for prog in filters {
        let r = run_bpf(prog, &data);
        if ((r & SECCOMP_RET_ACTION_FULL) as i32) < ((verdict & SECCOMP_RET_ACTION_FULL) as i32) {
            verdict = r;
        }
    }
    verdict
}

/// Runs a classic BPF program over `data`; a malformed program yields
/// `SECCOMP_RET_KILL_PROCESS` (the kernel would not have accepted it, so
/// refusing is the safe answer).
pub(crate) fn run_bpf(prog: &[SockFilter], data: &[u8; 64]) -> u32 {
    const KILL: u32 = SECCOMP_RET_KILL_PROCESS;
    let (mut a, mut x): (u32, u32) = (0, 0);
    let mut mem = [0u32; 16];
    let mut pc = 0usize;
    let load = |k: u32| -> Option<u32> {
        let k = k as usize;
        let b = data.get(k..k + 4)?;
        k.is_multiple_of(4)
            .then(|| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    for _ in 0..=prog.len() {
        let Some(ins) = prog.get(pc) else {
            return KILL;
        };
        let k = ins.k;
        pc += 1;
        match ins.code {
            0x20 => match load(k) {
                Some(v) => a = v, // LD W ABS
                None => return KILL,
            },
            0x80 => a = 64, // LD W LEN
            0x81 => x = 64, // LDX W LEN
            0x00 => a = k,  // LD IMM
            0x01 => x = k,  // LDX IMM
            0x60 | 0x61 | 0x02 | 0x03 => {
                let Some(slot) = mem.get_mut(k as usize) else {
                    return KILL;
                };
                match ins.code {
                    0x60 => a = *slot, // LD MEM
                    0x61 => x = *slot, // LDX MEM
                    0x02 => *slot = a, // ST
                    _ => *slot = x,    // STX
                }
            }
            0x06 => return k, // RET K
            0x16 => return a, // RET A
            0x07 => x = a,    // MISC TAX
            0x87 => a = x,    // MISC TXA
            code if code & 0x07 == 0x04 => {
                // ALU
                let src = if code & 0x08 != 0 { x } else { k };
                a = match code & 0xf0 {
                    0x00 => a.wrapping_add(src),
                    0x10 => a.wrapping_sub(src),
                    0x20 => a.wrapping_mul(src),
                    0x30 if src != 0 => a / src,
                    0x40 => a | src,
                    0x50 => a & src,
                    0x60 => a.checked_shl(src).unwrap_or(0),
                    0x70 => a.checked_shr(src).unwrap_or(0),
                    0x80 => a.wrapping_neg(),
                    0x90 if src != 0 => a % src,
                    0xa0 => a ^ src,
                    _ => return KILL,
                };
            }
            code if code & 0x07 == 0x05 => {
                // JMP
                let src = if code & 0x08 != 0 { x } else { k };
                let taken = match code & 0xf0 {
                    0x00 => {
                        pc += k as usize; // JA
                        continue;
                    }
                    0x10 => a == src,
                    0x20 => a > src,
                    0x30 => a >= src,
                    0x40 => a & src != 0,
                    _ => return KILL,
                };
                pc += if taken { ins.jt } else { ins.jf } as usize;
            }
            _ => return KILL,
        }
    }
    KILL
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stmt(code: u16, k: u32) -> SockFilter {
        SockFilter {
            code,
            jt: 0,
            jf: 0,
            k,
        }
    }
    fn jump(code: u16, k: u32, jt: u8, jf: u8) -> SockFilter {
        SockFilter { code, jt, jf, k }
    }

    /// A typical filter: check the arch, kill on syscall 323
    /// (userfaultfd), EPERM on 165 (mount) when arg0 has bit 0 set, allow
    /// the rest.
    fn sample() -> Vec<SockFilter> {
        vec![
            stmt(0x20, 4),                       // A = arch
            jump(0x15, AUDIT_ARCH_X86_64, 1, 0), // if A == x86_64 skip
            stmt(0x06, SECCOMP_RET_KILL_PROCESS),
            stmt(0x20, 0),         // A = nr
            jump(0x15, 323, 0, 1), // userfaultfd?
            stmt(0x06, SECCOMP_RET_KILL_PROCESS),
            jump(0x15, 165, 0, 3),   // mount?
            stmt(0x20, 16),          // A = low half of arg0
            jump(0x45, 1, 0, 1),     // JSET 1
            stmt(0x06, 0x0005_0001), // ERRNO(EPERM)
            stmt(0x06, SECCOMP_RET_ALLOW),
        ]
    }

    #[test]
    fn bpf_filter_verdicts() {
        let f = vec![sample()];
        let args = [0u64; 6];
        assert_eq!(
            evaluate_filters(&f, 323, &args, 0),
            SECCOMP_RET_KILL_PROCESS
        );
        assert_eq!(evaluate_filters(&f, 3, &args, 0), SECCOMP_RET_ALLOW);
        assert_eq!(evaluate_filters(&f, 165, &args, 0), SECCOMP_RET_ALLOW);
        assert_eq!(
            evaluate_filters(&f, 165, &[1, 0, 0, 0, 0, 0], 0),
            0x0005_0001
        );
        // The most restrictive of several filters wins.
        let log_all = vec![stmt(0x06, SECCOMP_RET_LOG)];
        let errno_3 = vec![
            stmt(0x20, 0),
            jump(0x15, 3, 0, 1),
            stmt(0x06, 0x0005_0009),
            stmt(0x06, SECCOMP_RET_ALLOW),
        ];
        let both = vec![log_all, errno_3, sample()];
        assert_eq!(evaluate_filters(&both, 3, &args, 0), 0x0005_0009);
        assert_eq!(evaluate_filters(&both, 4, &args, 0), SECCOMP_RET_LOG);
        assert_eq!(
            evaluate_filters(&both, 323, &args, 0),
            SECCOMP_RET_KILL_PROCESS
        );
        let s = Seccomp::Filters(both);
        assert!(s.check(1, 4, &args, 0).is_ok());
        assert!(matches!(
            s.check(1, 323, &args, 0),
            Err(DirtyError::SeccompDenied { nr: 323, .. })
        ));
        assert!(Seccomp::Strict.check(1, 1, &args, 0).is_ok());
        assert!(Seccomp::Strict.check(1, 3, &args, 0).is_err());
    }

    #[test]
    fn bpf_alu_memory_and_bad_programs() {
        let data = [0u8; 64];
        // A = 5; M[3] = A; A = 7; X = M[3]; A += X; A *= 3; RET A  => 36
        let prog = vec![
            stmt(0x00, 5),
            stmt(0x02, 3),
            stmt(0x00, 7),
            stmt(0x61, 3),
            stmt(0x0c, 0),
            stmt(0x24, 3),
            stmt(0x16, 0),
        ];
        assert_eq!(run_bpf(&prog, &data), 36);
        // Falling off the end, bad loads and division by zero are refused.
        assert_eq!(run_bpf(&[stmt(0x00, 1)], &data), SECCOMP_RET_KILL_PROCESS);
        assert_eq!(
            run_bpf(&[stmt(0x20, 62), stmt(0x06, 0)], &data),
            SECCOMP_RET_KILL_PROCESS
        );
        assert_eq!(
            run_bpf(&[stmt(0x34, 0), stmt(0x06, 0)], &data),
            SECCOMP_RET_KILL_PROCESS
        );
        assert_eq!(run_bpf(&[], &data), SECCOMP_RET_KILL_PROCESS);
        // JA skips.
        assert_eq!(
            run_bpf(&[stmt(0x05, 1), stmt(0x06, 1), stmt(0x06, 2)], &data),
            2
        );
    }
}

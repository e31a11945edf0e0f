//! Protection against CVE-2019-5736: never let a container reach a writable
//! copy of this binary.
//!
//! A process inside a container can open `/proc/<pid>/exe` of a runtime
//! process that joins the container and, once that process has exited,
//! reopen it for writing and overwrite the runtime on the host. Before it
//! touches a container, migrun therefore re-executes itself from a copy that
//! cannot be written:
//!
//! 1. cheap path: a read-only bind mount of the binary, made in a private
//!    mount namespace; after the re-exec the process returns to the host's
//!    mount namespace (and to its working directory, which that move
//!    resets), so containers and hooks see the host's mounts as with
//!    runc, while `/proc/self/exe` stays on the now detached read-only mount
//!    that nobody can remount;
//! 2. fallback (e.g. without the privilege to mount): a sealed memfd copy,
//!    as runc and youki do.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::{fcntl, FcntlArg, OFlag, SealFlag};
use nix::mount::{mount, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::stat::Mode;

use crate::error::{Context, Result};

/// Environment variable carrying the host mount namespace's descriptor
/// across the re-exec (set only between the two halves of this module).
const HOST_MNTNS_ENV: &str = "_MIGRUN_HOST_MNTNS_FD";
/// Name of the (empty) file the read-only bind mount goes onto, in the state root.
const MOUNTPOINT_NAME: &str = ".migrun-exe";

/// Seals that make a memfd copy immutable.
fn required_seals() -> SealFlag {
    SealFlag::F_SEAL_SEAL | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE
}

/// Whether this process runs from a sealed memfd copy.
pub fn is_sealed() -> bool {
    File::open("/proc/self/exe")
        .ok()
        .and_then(|f| fcntl(f.as_raw_fd(), FcntlArg::F_GET_SEALS).ok())
        .map(SealFlag::from_bits_truncate)
        .is_some_and(|seals| seals.contains(required_seals()))
}

/// C strings of this process's arguments and environment, without `skip_env`.
fn argv_envp(skip_env: &str) -> (Vec<CString>, Vec<CString>) {
    let to_c = |s: &OsStr| CString::new(s.as_bytes()).unwrap_or_default();
    let args = std::env::args_os().map(|a| to_c(&a)).collect();
    let env = std::env::vars_os()
        .filter(|(k, _)| k != skip_env)
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).unwrap_or_default()
        })
        .collect();
    (args, env)
}

/// Makes sure this process runs from a write-protected copy of its binary,
/// re-executing itself when it does not. `state_root` holds the empty file
/// the read-only bind mount is made on.
pub fn ensure_protected(state_root: &Path) -> Result<()> {
    if let Some(fd) = std::env::var_os(HOST_MNTNS_ENV) {
        // Second half: back to the host's mount namespace.
        std::env::remove_var(HOST_MNTNS_ENV);
        let fd: i32 = fd.to_string_lossy().parse().unwrap_or(-1);
        if fd < 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EBADF))
                .ctx(|| "protected re-exec lost the host mount namespace".to_string());
        }
        // SAFETY: the first half opened this descriptor for us and nothing else owns it.
        let ns = unsafe { OwnedFd::from_raw_fd(fd) };
        // setns(CLONE_NEWNS) moves the working directory to the namespace's
        // root; relative paths of the command line (`create` in a bundle
        // directory, `-b dir`, `--pid-file`) are the caller's, so go back to
        // it: the same path, since this namespace is a copy of the host's.
        let cwd = std::env::current_dir();
        setns(&ns, CloneFlags::CLONE_NEWNS)
            .ctx(|| "return to the host mount namespace".to_string())?;
        return match cwd {
            Ok(cwd) => std::env::set_current_dir(&cwd)
                .ctx(|| format!("return to the working directory {}", cwd.display())),
            Err(err) => {
                // A deleted working directory: only absolute paths work,
                // as they would have before the re-exec.
                tracing::debug!("working directory unknown before the re-exec: {err}");
                Ok(())
            }
        };
    }
    if is_sealed() {
        return Ok(());
    }
    if let Err(err) = reexec_read_only(state_root) {
        tracing::debug!("read-only bind re-exec unavailable ({err}): using a sealed memfd");
    }
    reexec_sealed()
}

/// First half of the cheap path: private mount namespace, read-only bind
/// mount of the binary, exec from it. Returns only on failure, in which case
/// the mount namespace is unchanged.
fn reexec_read_only(state_root: &Path) -> Result<()> {
    let exe = std::fs::read_link("/proc/self/exe").ctx(|| "resolve /proc/self/exe".to_string())?;
    let mountpoint = state_root.join(MOUNTPOINT_NAME);
    if !mountpoint.exists() {
        std::fs::write(&mountpoint, b"").ctx(|| format!("create {}", mountpoint.display()))?;
    }
    // Not close-on-exec: the re-executed process needs it to come back.
    let host_ns = nix::fcntl::open("/proc/self/ns/mnt", OFlag::O_RDONLY, Mode::empty())
        .ctx(|| "open host mount namespace".to_string())?;
    // SAFETY: `open` returned a fresh descriptor that nothing else owns.
    let host_ns = unsafe { OwnedFd::from_raw_fd(host_ns) };
    unshare(CloneFlags::CLONE_NEWNS).ctx(|| "unshare mount namespace".to_string())?;
    let done = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .and_then(|_| {
        mount(
            Some(&exe),
            &mountpoint,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    })
    .and_then(|_| {
        mount(
            None::<&str>,
            &mountpoint,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
    });
    let back_home = |ns: &OwnedFd| {
        let _ = setns(ns, CloneFlags::CLONE_NEWNS);
    };
    if let Err(e) = done {
        back_home(&host_ns);
        return Err(e).ctx(|| "read-only bind mount of migrun".to_string());
    }
    let (args, mut env) = argv_envp(HOST_MNTNS_ENV);
    let raw = host_ns.into_raw_fd();
    env.push(CString::new(format!("{HOST_MNTNS_ENV}={raw}")).unwrap_or_default());
    let path = CString::new(mountpoint.as_os_str().as_bytes()).unwrap_or_default();
    let err = nix::unistd::execve(&path, &args, &env);
    // SAFETY: exec failed, so `raw` is still ours to reclaim.
    let host_ns = unsafe { OwnedFd::from_raw_fd(raw) };
    back_home(&host_ns);
    err.map(|_| ())
        .ctx(|| format!("exec {}", mountpoint.display()))
}

/// The fallback: re-exec from a sealed memfd copy. Returns only on error.
fn reexec_sealed() -> Result<()> {
    let name = CString::new("migrun").unwrap_or_default();
    let memfd: OwnedFd = memfd_create(
        &name,
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .ctx(|| "create memfd for sealed executable".to_string())?;
    let mut copy = File::from(memfd);
    let mut exe = File::open("/proc/self/exe").ctx(|| "open /proc/self/exe".to_string())?;
    std::io::copy(&mut exe, &mut copy).ctx(|| "copy executable into memfd".to_string())?;
    fcntl(copy.as_raw_fd(), FcntlArg::F_ADD_SEALS(required_seals()))
        .ctx(|| "seal executable memfd".to_string())?;
    let (args, env) = argv_envp(HOST_MNTNS_ENV);
    // An ELF binary runs from a close-on-exec memfd: the kernel holds the file.
    nix::unistd::fexecve(copy.as_raw_fd(), &args, &env)
        .ctx(|| "re-execute from sealed memfd".to_string())?;
    Ok(())
}

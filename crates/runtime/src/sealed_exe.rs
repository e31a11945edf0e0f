//! Protection against CVE-2019-5736: run from a sealed in-memory copy.
//!
//! A process inside a container can open `/proc/<pid>/exe` of a runtime that
//! joins the container and overwrite the runtime's binary on the host. Like
//! runc and youki, migrun re-executes itself from a sealed memfd before it
//! touches a container, so what a container can reach is an immutable copy.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

use crate::error::{Context, Result};

/// Seals that make the copy immutable.
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

/// Re-executes this program from a sealed memfd copy unless it already runs
/// from one. Returns only when it already does (or on error).
pub fn ensure_sealed() -> Result<()> {
    if is_sealed() {
        return Ok(());
    }
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
    let to_c = |s: &std::ffi::OsStr| CString::new(s.as_bytes()).unwrap_or_default();
    let args: Vec<CString> = std::env::args_os().map(|a| to_c(&a)).collect();
    let env: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).unwrap_or_default()
        })
        .collect();
    // An ELF binary runs from a close-on-exec memfd: the kernel holds the file.
    nix::unistd::fexecve(copy.as_raw_fd(), &args, &env)
        .ctx(|| "re-execute from sealed memfd".to_string())?;
    Ok(())
}

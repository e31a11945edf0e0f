//! Kernel interfaces Debian 12's headers and the libc crate lack:
//! userfaultfd ioctls, the `PAGEMAP_SCAN` ioctl, `/proc/PID/pagemap`
//! entries, and thin safe wrappers around the raw calls.
//!
//! Values checked against Linux's `include/uapi/linux/userfaultfd.h` and
//! `include/uapi/linux/fs.h` (6.7+).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;

use libc::{c_int, c_ulong};
use nix::errno::Errno;

const IOC_WRITE: c_ulong = 1;
const IOC_READ: c_ulong = 2;

/// `_IOC(dir, type, nr, size)`.
const fn ioc(dir: c_ulong, ty: u8, nr: u8, size: usize) -> c_ulong {
    (dir << 30) | ((size as c_ulong) << 16) | ((ty as c_ulong) << 8) | nr as c_ulong
}

/// The userfaultfd API version.
pub(crate) const UFFD_API: u64 = 0xAA;
/// The userfaultfd ioctl type.
const UFFDIO: u8 = 0xAA;

/// `UFFDIO_API = _IOWR(UFFDIO, 0x3F, struct uffdio_api)`.
pub(crate) const UFFDIO_API: c_ulong = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x3F, 24);
/// `UFFDIO_REGISTER = _IOWR(UFFDIO, 0x00, struct uffdio_register)`.
pub(crate) const UFFDIO_REGISTER: c_ulong = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x00, 32);
/// `UFFDIO_UNREGISTER = _IOR(UFFDIO, 0x01, struct uffdio_range)`.
pub(crate) const UFFDIO_UNREGISTER: c_ulong = ioc(IOC_READ, UFFDIO, 0x01, 16);
/// `UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, 0x06, struct uffdio_writeprotect)`.
pub(crate) const UFFDIO_WRITEPROTECT: c_ulong = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x06, 24);

/// `UFFDIO_REGISTER_MODE_WP`.
pub(crate) const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
pub(crate) const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `UFFD_FEATURE_EVENT_REMOVE`: `madvise(MADV_DONTNEED/REMOVE)` on a
/// registered range is reported as a message.
pub(crate) const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`.
#[allow(dead_code)] // the complete ABI list; unused
pub(crate) const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED` (6.4+): unpopulated anonymous pages can be
/// write-protected too (pte markers).
pub(crate) const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC` (6.7+): write faults on protected pages are
/// resolved by the kernel itself, leaving the page marked written.
pub(crate) const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

/// `UFFD_USER_MODE_ONLY`: flag of `userfaultfd(2)`; lets a process without
/// `CAP_SYS_PTRACE` create one when `vm.unprivileged_userfaultfd` is 0.
/// Asynchronous write protection is resolved before the user-mode check,
/// so kernel-mode writes are still tracked.
pub(crate) const UFFD_USER_MODE_ONLY: u64 = 1;

/// `UFFD_EVENT_REMOVE`.
pub(crate) const UFFD_EVENT_REMOVE: u8 = 0x15;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioApi {
    pub(crate) api: u64,
    pub(crate) features: u64,
    pub(crate) ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioRange {
    pub(crate) start: u64,
    pub(crate) len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioRegister {
    pub(crate) range: UffdioRange,
    pub(crate) mode: u64,
    pub(crate) ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioWriteprotect {
    pub(crate) range: UffdioRange,
    pub(crate) mode: u64,
}

/// `struct uffd_msg` (packed in C, but every field is naturally aligned, so
/// `repr(C)` gives the same 32-byte layout). `arg` is the union; for
/// `UFFD_EVENT_REMOVE` it holds `start`, `end`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdMsg {
    pub(crate) event: u8,
    pub(crate) reserved1: u8,
    pub(crate) reserved2: u16,
    pub(crate) reserved3: u32,
    pub(crate) arg: [u64; 3],
}

/// `PAGE_IS_WPALLOWED`.
#[cfg_attr(not(test), allow(dead_code))] // used by tests
pub(crate) const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// `PAGE_IS_WRITTEN`.
pub(crate) const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGE_IS_FILE`.
#[allow(dead_code)] // the complete ABI list; unused
pub(crate) const PAGE_IS_FILE: u64 = 1 << 2;
/// `PAGE_IS_PRESENT`.
pub(crate) const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PAGE_IS_SWAPPED`.
pub(crate) const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// `PAGE_IS_PFNZERO`.
#[allow(dead_code)] // the complete ABI list; unused
pub(crate) const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// `PAGE_IS_HUGE`.
#[allow(dead_code)] // the complete ABI list; unused
pub(crate) const PAGE_IS_HUGE: u64 = 1 << 6;
/// `PAGE_IS_SOFT_DIRTY`.
#[allow(dead_code)] // the complete ABI list; unused
pub(crate) const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;

/// `PM_SCAN_WP_MATCHING`: write-protect the matched pages.
pub(crate) const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail with `EPERM` on a range that is not
/// registered for asynchronous write protection.
pub(crate) const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct page_region`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageRegion {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PmScanArg {
    pub(crate) size: u64,
    pub(crate) flags: u64,
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) walk_end: u64,
    pub(crate) vec: u64,
    pub(crate) vec_len: u64,
    pub(crate) max_pages: u64,
    pub(crate) category_inverted: u64,
    pub(crate) category_mask: u64,
    pub(crate) category_anyof_mask: u64,
    pub(crate) return_mask: u64,
}

/// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`.
pub(crate) const PAGEMAP_SCAN: c_ulong = ioc(
    IOC_READ | IOC_WRITE,
    b'f',
    16,
    std::mem::size_of::<PmScanArg>(),
);

const _: () = {
    assert!(std::mem::size_of::<UffdioApi>() == 24);
    assert!(std::mem::size_of::<UffdioRegister>() == 32);
    assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);
    assert!(std::mem::size_of::<UffdMsg>() == 32);
    assert!(std::mem::size_of::<PmScanArg>() == 96);
    assert!(std::mem::size_of::<PageRegion>() == 24);
    assert!(PAGEMAP_SCAN == 0xC060_6610);
    assert!(UFFDIO_API == 0xC018_AA3F);
    assert!(UFFDIO_REGISTER == 0xC020_AA00);
    assert!(UFFDIO_UNREGISTER == 0x8010_AA01);
    assert!(UFFDIO_WRITEPROTECT == 0xC018_AA06);
};

/// `/proc/PID/pagemap` bit 63: page present in RAM.
pub(crate) const PM_PRESENT: u64 = 1 << 63;
/// `/proc/PID/pagemap` bit 62: page swapped out.
pub(crate) const PM_SWAP: u64 = 1 << 62;
/// `/proc/PID/pagemap` bit 55: pte soft-dirty.
pub(crate) const PM_SOFT_DIRTY: u64 = 1 << 55;

/// `ioctl(fd, req, arg)` for the fixed-size structures above.
///
/// # Safety
///
/// `req` must be an ioctl whose argument is a `T` (the kernel reads and
/// writes at most `size_of::<T>()` bytes through the pointer), and `T` must
/// not contain pointers the kernel writes through.
unsafe fn ioctl_struct<T>(fd: RawFd, req: c_ulong, arg: &mut T) -> nix::Result<c_int> {
    // SAFETY: per this function's contract the kernel only accesses the
    // `T` behind `arg`, which is a valid exclusive reference.
    let r = unsafe { libc::ioctl(fd, req, arg as *mut T) };
    Errno::result(r)
}

/// `UFFDIO_API`.
pub(crate) fn uffdio_api(uffd: RawFd, api: &mut UffdioApi) -> nix::Result<()> {
    // SAFETY: UFFDIO_API takes a `struct uffdio_api`, which `UffdioApi` is.
    unsafe { ioctl_struct(uffd, UFFDIO_API, api) }.map(drop)
}

/// `UFFDIO_REGISTER`.
pub(crate) fn uffdio_register(uffd: RawFd, reg: &mut UffdioRegister) -> nix::Result<()> {
    // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`.
    unsafe { ioctl_struct(uffd, UFFDIO_REGISTER, reg) }.map(drop)
}

/// `UFFDIO_UNREGISTER`.
pub(crate) fn uffdio_unregister(uffd: RawFd, range: &mut UffdioRange) -> nix::Result<()> {
    // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range`.
    unsafe { ioctl_struct(uffd, UFFDIO_UNREGISTER, range) }.map(drop)
}

/// `UFFDIO_WRITEPROTECT`.
pub(crate) fn uffdio_writeprotect(uffd: RawFd, wp: &mut UffdioWriteprotect) -> nix::Result<()> {
    // SAFETY: UFFDIO_WRITEPROTECT takes a `struct uffdio_writeprotect`.
    unsafe { ioctl_struct(uffd, UFFDIO_WRITEPROTECT, wp) }.map(drop)
}

/// `PAGEMAP_SCAN` with `out` as the result vector (`arg.vec` and
/// `arg.vec_len` are set from it; an empty `out` asks for no output).
/// Returns how many entries of `out` the kernel filled.
pub(crate) fn pagemap_scan(
    pagemap: &File,
    arg: &mut PmScanArg,
    out: &mut [PageRegion],
) -> nix::Result<usize> {
    arg.size = std::mem::size_of::<PmScanArg>() as u64;
    arg.vec = if out.is_empty() {
        0
    } else {
        out.as_mut_ptr() as u64
    };
    arg.vec_len = out.len() as u64;
    // SAFETY: PAGEMAP_SCAN takes a `struct pm_scan_arg`; the only pointer in
    // it, `vec`, points to `out`, valid for `vec_len` exclusive
    // `struct page_region` entries, and the kernel writes at most that many.
    let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, arg as *mut PmScanArg) };
    let n = Errno::result(n)?;
    Ok((n as usize).min(out.len()))
}

/// `userfaultfd(flags)` in this process.
pub(crate) fn userfaultfd(flags: c_int) -> nix::Result<OwnedFd> {
    // SAFETY: userfaultfd takes one integer argument and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    let fd = Errno::result(fd)?;
    // SAFETY: the syscall succeeded, so `fd` is a new descriptor owned by
    // nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_open(pid, 0)`.
pub(crate) fn pidfd_open(pid: i32) -> nix::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = Errno::result(fd)?;
    // SAFETY: the syscall succeeded, so `fd` is a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_getfd(pidfd, targetfd, 0)`: a duplicate of another process's
/// descriptor (sharing its open file description).
pub(crate) fn pidfd_getfd(pidfd: &OwnedFd, targetfd: i32) -> nix::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes two fds and flags and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), targetfd, 0) };
    let fd = Errno::result(fd)?;
    // SAFETY: the syscall succeeded, so `fd` is a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The system page size.
pub(crate) fn page_size() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(n)) if n > 0 => n as u64,
        _ => 4096,
    }
}

/// Reads `buf.len()` bytes at `addr` of process `pid` with
/// `process_vm_readv`; returns how many bytes were read (fewer at the first
/// unreadable page).
pub(crate) fn read_remote(pid: i32, addr: u64, buf: &mut [u8]) -> nix::Result<usize> {
    use nix::sys::uio::{process_vm_readv, RemoteIoVec};
    let len = buf.len();
    let remote = [RemoteIoVec {
        base: addr as usize,
        len,
    }];
    let mut local = [std::io::IoSliceMut::new(buf)];
    process_vm_readv(nix::unistd::Pid::from_raw(pid), &mut local, &remote)
}

/// Reads the pagemap entries of the pages in `[start, end)` from an open
/// `/proc/PID/pagemap`.
pub(crate) fn read_pagemap(
    pagemap: &File,
    start: u64,
    end: u64,
    page_size: u64,
) -> std::io::Result<Vec<u64>> {
    let n = ((end - start) / page_size) as usize;
    let mut bytes = vec![0u8; n * 8];
    // A pagemap whose address space is gone (the process exited, or
    // execve gave it a new one) reads as empty: that is ESRCH, as for the
    // other calls on it, not a short file.
    pagemap
        .read_exact_at(&mut bytes, start / page_size * 8)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => std::io::Error::from_raw_os_error(libc::ESRCH),
            _ => e,
        })?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_ne_bytes(b)
        })
        .collect())
}

/// Whether a pagemap entry is a populated page (present or swapped).
pub(crate) fn pagemap_populated(entry: u64) -> bool {
    entry & (PM_PRESENT | PM_SWAP) != 0
}

/// An anonymous private mapping in this process, unmapped on drop. Used to
/// probe kernel features on scratch memory.
pub(crate) struct ScratchMapping {
    addr: std::ptr::NonNull<libc::c_void>,
    len: usize,
}

impl ScratchMapping {
    /// Maps `pages` pages, read-write, not populated.
    pub(crate) fn new(pages: usize) -> nix::Result<Self> {
        use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
        let len = pages * page_size() as usize;
        let nz = std::num::NonZeroUsize::new(len).ok_or(Errno::EINVAL)?;
        // SAFETY: an anonymous mapping at an address of the kernel's
        // choosing does not alias any existing Rust object.
        let addr = unsafe {
            mmap_anonymous(
                None,
                nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }?;
        Ok(ScratchMapping { addr, len })
    }

    /// The address of the mapping.
    pub(crate) fn addr(&self) -> u64 {
        self.addr.as_ptr() as u64
    }

    /// Writes `value` at the start of page `page`.
    pub(crate) fn write(&self, page: usize, value: u64) {
        let off = page * page_size() as usize;
        if off + 8 > self.len {
            return;
        }
        // SAFETY: the offset is inside the mapping, which is readable and
        // writable, page aligned (so aligned for u64), and no Rust
        // reference to it exists.
        unsafe {
            std::ptr::write_volatile(
                self.addr.as_ptr().cast::<u8>().add(off).cast::<u64>(),
                value,
            )
        };
    }
}

impl Drop for ScratchMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `new` and is unmapped only here.
        let _ = unsafe { nix::sys::mman::munmap(self.addr, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_mapping_and_pagemap() {
        let ps = page_size();
        assert!(ps >= 4096 && ps.is_power_of_two());
        let m = ScratchMapping::new(4).expect("mmap");
        m.write(1, 42);
        m.write(99, 1); // out of range: ignored
        let pm = File::open("/proc/self/pagemap").expect("pagemap");
        let e = read_pagemap(&pm, m.addr(), m.addr() + 4 * ps, ps).expect("read pagemap");
        assert_eq!(e.len(), 4);
        assert!(!pagemap_populated(e[0]));
        assert!(pagemap_populated(e[1]));
        let mut buf = [0u8; 8];
        let n = read_remote(std::process::id() as i32, m.addr() + ps, &mut buf).expect("read");
        assert_eq!(n, 8);
        assert_eq!(u64::from_ne_bytes(buf), 42);
    }
}

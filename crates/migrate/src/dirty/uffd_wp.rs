//! Dirty tracking with asynchronous userfaultfd write protection, read back
//! and re-armed atomically with the `PAGEMAP_SCAN` ioctl (Linux 6.7+).
//!
//! # How it works
//!
//! A userfaultfd belongs to the memory of the process that created it, so
//! it is created *inside the target* by syscall injection
//! ([`inject`](super::inject)): `userfaultfd(O_CLOEXEC | O_NONBLOCK |
//! UFFD_USER_MODE_ONLY)` runs in the target, the tracker copies the new
//! descriptor with `pidfd_getfd`, and `close` runs in the target. From then
//! on only the tracker holds it, and the target's descriptor table is as
//! before. (`UFFD_USER_MODE_ONLY` lets a target without `CAP_SYS_PTRACE`
//! create it while `vm.unprivileged_userfaultfd` is 0; asynchronous write
//! protection is resolved before that flag matters, so writes the kernel
//! makes for the target, e.g. `read(2)` into a buffer, are tracked too.)
//!
//! The tracker enables `UFFD_FEATURE_WP_ASYNC` (a write to a protected page
//! is resolved by the kernel itself, without a message, leaving the page
//! marked "written") and `UFFD_FEATURE_WP_UNPOPULATED` (needed for anonymous
//! memory to count as write-protectable), registers every tracked mapping
//! in write-protect mode and arms it with `UFFDIO_WRITEPROTECT`.
//!
//! `collect` runs `PAGEMAP_SCAN` on `/proc/PID/pagemap` over the registered
//! ranges with `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`,
//! `category_mask = return_mask = PAGE_IS_WRITTEN`: the kernel returns the
//! written pages and write-protects each again under the page-table lock,
//! so a write racing with the scan is either reported now or left marked
//! for the next scan. A full result buffer is handled by continuing from
//! `walk_end`.
//!
//! What counts as written: a present page without the uffd-wp bit, and
//! also any page that is not protected at all, i.e. unpopulated without a
//! pte marker, with or without a page table. Arming puts a marker on every
//! unpopulated page (allocating the page tables to hold them: about 2 MiB
//! of kernel memory per GiB of tracked address space, until the mapping
//! goes), so untouched pages are not reported later; and a page zapped by
//! `madvise(MADV_DONTNEED)` loses its marker, so it *is* reported, as it
//! must be (it reads as zeros now). [`probe`] checks this on a scratch
//! mapping; on a kernel where zapped pages are not reported, the tracker
//! instead listens for `UFFD_EVENT_REMOVE` on a background thread and
//! reports the removed ranges in the next two collects (the zap follows the
//! event). The kernel makes the `madvise` caller wait until the event is
//! read, so the thread answers at once; it stops with the tracker.
//!
//! Mappings created after `start` are found by re-reading
//! `/proc/PID/maps` in every `collect`; they are registered and armed there
//! by one scan that protects every page and reports the populated ones
//! (they were never sent). A registered range that was unmapped and
//! replaced makes the scan fail with `EPERM`; all of its pages are then
//! reported (the replacement may look exactly like the old mapping in
//! `/proc/PID/maps`, so only the tracker knows that every page may differ
//! from what was sent) and it is registered anew. A mapping that cannot be
//! registered (e.g. one the target registered with its own userfaultfd) has
//! its populated pages reported in every collect.
//!
//! `stop` unregisters everything and closes the userfaultfd: the kernel
//! then drops the protection bits and markers, and nothing of the tracking
//! remains in the target (`criu dump` works again; it refuses processes
//! with a registered userfaultfd).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use nix::errno::Errno;

use super::inject::with_injector;
use super::ranges::RangeSet;
use super::sys::{
    self, PageRegion, PmScanArg, UffdioApi, UffdioRange, UffdioRegister, UffdioWriteprotect,
    PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING,
    UFFDIO_REGISTER_MODE_WP, UFFDIO_WRITEPROTECT_MODE_WP, UFFD_API, UFFD_EVENT_REMOVE,
    UFFD_FEATURE_EVENT_REMOVE, UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED,
    UFFD_USER_MODE_ONLY,
};
use super::{io_err, sys_err, DirtyError, DirtySet, DirtyTracker, ProcessMaps, Result};

/// The backend name.
pub const NAME: &str = "uffd-wp";

/// Features the backend cannot work without.
const REQUIRED: u64 = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;

/// Entries of the `PAGEMAP_SCAN` result buffer.
const SCAN_BUFFER: usize = 4096;

/// What [`probe`] found out about this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Support {
    /// The userfaultfd features the kernel offers (`UFFD_FEATURE_*`).
    pub features: u64,
    /// Whether a page zapped by `madvise(MADV_DONTNEED)` after arming is
    /// reported as written by the scan. If not, the tracker needs
    /// `UFFD_EVENT_REMOVE` messages to see zapped pages.
    pub zapped_pages_reported: bool,
}

/// Checks that this kernel supports the backend: asks for the userfaultfd
/// features, then tracks writes (and a zap) on a scratch mapping of this
/// process. The result is cached.
pub fn probe() -> Result<Support> {
    static PROBE: OnceLock<std::result::Result<Support, String>> = OnceLock::new();
    PROBE
        .get_or_init(probe_uncached)
        .clone()
        .map_err(|reason| DirtyError::Unsupported {
            backend: NAME,
            reason,
        })
}

fn new_local_uffd() -> std::result::Result<OwnedFd, String> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    sys::userfaultfd(flags | UFFD_USER_MODE_ONLY as i32)
        .or_else(|e| {
            if e == Errno::EINVAL {
                sys::userfaultfd(flags)
            } else {
                Err(e)
            }
        })
        .map_err(|e| format!("userfaultfd: {e}"))
}

fn probe_uncached() -> std::result::Result<Support, String> {
    let query = new_local_uffd()?;
    let mut api = UffdioApi {
        api: UFFD_API,
        ..Default::default()
    };
    sys::uffdio_api(query.as_raw_fd(), &mut api).map_err(|e| format!("UFFDIO_API: {e}"))?;
    let features = api.features;
    if features & REQUIRED != REQUIRED {
        return Err(format!(
            "the kernel lacks UFFD_FEATURE_WP_ASYNC/WP_UNPOPULATED (Linux 6.7+), features {features:#x}"
        ));
    }
    drop(query);

    let ps = sys::page_size();
    let uffd = new_local_uffd()?;
    let fd = uffd.as_raw_fd();
    let mut api = UffdioApi {
        api: UFFD_API,
        features: REQUIRED,
        ioctls: 0,
    };
    sys::uffdio_api(fd, &mut api).map_err(|e| format!("UFFDIO_API: {e}"))?;
    let scratch = sys::ScratchMapping::new(4).map_err(|e| format!("mmap: {e}"))?;
    for i in 0..4 {
        scratch.write(i, 1);
    }
    let (start, end) = (scratch.addr(), scratch.addr() + 4 * ps);
    register(fd, start, end).map_err(|e| format!("UFFDIO_REGISTER: {e}"))?;
    writeprotect(fd, start, end).map_err(|e| format!("UFFDIO_WRITEPROTECT: {e}"))?;
    let pagemap = File::open("/proc/self/pagemap").map_err(|e| format!("open pagemap: {e}"))?;
    let mut buf = vec![PageRegion::default(); 16];
    let mut look = |what: &str| -> std::result::Result<Vec<(u64, u64)>, String> {
        let mut found = Vec::new();
        scan(
            &pagemap,
            &mut buf,
            start,
            end,
            ScanKind::Written,
            &mut found,
        )
        .map_err(|e| format!("PAGEMAP_SCAN ({what}): {e}"))?;
        Ok(found
            .iter()
            .map(|&(s, e)| ((s - start) / ps, (e - start) / ps))
            .collect())
    };
    for page in [2u64, 1] {
        scratch.write(page as usize, 2);
        let found = look("after a write")?;
        if found != [(page, page + 1)] {
            return Err(format!(
                "PAGEMAP_SCAN reported pages {found:?} instead of page {page}"
            ));
        }
        let found = look("without writes")?;
        if !found.is_empty() {
            return Err(format!("PAGEMAP_SCAN did not re-protect: pages {found:?}"));
        }
    }
    // SAFETY: the range is the scratch mapping's last page, which no Rust
    // reference points into.
    let zapped = unsafe {
        libc::madvise(
            (start + 3 * ps) as *mut libc::c_void,
            ps as usize,
            libc::MADV_DONTNEED,
        )
    };
    let zapped_pages_reported = zapped == 0 && look("after a zap")? == [(3, 4)];
    Ok(Support {
        features,
        zapped_pages_reported,
    })
}

/// How a [`UffdWpTracker`] handles pages zapped by `madvise`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RemoveEvents {
    /// Listen for `UFFD_EVENT_REMOVE` only if [`probe`] found that the scan
    /// does not report zapped pages.
    #[default]
    Auto,
    /// Always listen (costs the target a round trip to the tracker per
    /// `madvise(MADV_DONTNEED)` on tracked memory).
    On,
    /// Never listen.
    Off,
}

fn register(uffd: RawFd, start: u64, end: u64) -> nix::Result<()> {
    let mut reg = UffdioRegister {
        range: UffdioRange {
            start,
            len: end - start,
        },
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    sys::uffdio_register(uffd, &mut reg)
}

fn unregister(uffd: RawFd, start: u64, end: u64) -> nix::Result<()> {
    let mut range = UffdioRange {
        start,
        len: end - start,
    };
    sys::uffdio_unregister(uffd, &mut range)
}

fn writeprotect(uffd: RawFd, start: u64, end: u64) -> nix::Result<()> {
    let mut wp = UffdioWriteprotect {
        range: UffdioRange {
            start,
            len: end - start,
        },
        mode: UFFDIO_WRITEPROTECT_MODE_WP,
    };
    sys::uffdio_writeprotect(uffd, &mut wp)
}

/// The scans the tracker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScanKind {
    /// Report written pages and protect them again, with exactly the flags
    /// that select the kernel's fast path.
    Written,
    /// Protect every page (a marker on each unpopulated one) and report
    /// the populated ones, in one atomic pass: arming a mapping that
    /// appeared after `start`.
    ArmReport,
    /// Report populated pages without protecting anything.
    Populated,
}

/// Maps a failed scan of `pid`'s pagemap to an error. `ESRCH` means the
/// address space the pagemap was opened on is gone: the process exited, or
/// it called execve and has a new one, which a tracker of the old one
/// cannot see (the caller starts over with a new tracker).
fn scan_err(pid: i32, what: String) -> impl FnOnce(Errno) -> DirtyError {
    move |errno| match errno {
        Errno::ESRCH => DirtyError::ProcessGone { pid },
        errno => sys_err(format!("{what} of process {pid}"))(errno),
    }
}

/// Runs `PAGEMAP_SCAN` of `kind` over `[start, end)`, appending the
/// reported `[start, end)` ranges to `out`, continuing from `walk_end`
/// while the buffer fills up.
fn scan(
    pagemap: &File,
    buf: &mut [PageRegion],
    start: u64,
    end: u64,
    kind: ScanKind,
    out: &mut Vec<(u64, u64)>,
) -> nix::Result<()> {
    let populated = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
    let wp = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
    let (flags, mask, anyof, ret) = match kind {
        ScanKind::Written => (wp, PAGE_IS_WRITTEN, 0, PAGE_IS_WRITTEN),
        // Matches every page; the categories say which were populated.
        ScanKind::ArmReport => (wp, 0, 0, populated),
        ScanKind::Populated => (0, 0, populated, populated),
    };
    let mut cur = start;
    while cur < end {
        let mut arg = PmScanArg {
            flags,
            start: cur,
            end,
            category_mask: mask,
            category_anyof_mask: anyof,
            return_mask: ret,
            ..Default::default()
        };
        let n = sys::pagemap_scan(pagemap, &mut arg, buf)?;
        out.extend(
            buf[..n]
                .iter()
                .filter(|r| r.categories & ret != 0)
                .map(|r| (r.start, r.end)),
        );
        if arg.walk_end <= cur {
            // No progress: should not happen; never loop forever.
            return Err(Errno::EAGAIN);
        }
        cur = arg.walk_end;
    }
    Ok(())
}

/// Splits `set` at the boundaries of the mappings in `maps` (pieces
/// outside every mapping are dropped).
fn pieces_by_mapping(set: &RangeSet, maps: &ProcessMaps) -> Vec<(u64, u64)> {
    let ranges: Vec<(u64, u64)> = set.iter().collect();
    let mut out = Vec::new();
    for m in maps.entries() {
        let i = ranges.partition_point(|&(_, e)| e <= m.start);
        for &(s, e) in ranges[i..].iter().take_while(|&&(s, _)| s < m.end) {
            out.push((s.max(m.start), e.min(m.end)));
        }
    }
    out
}

/// The private, non-special mappings: where anything tracked can live.
fn private_ranges(maps: &ProcessMaps) -> RangeSet {
    RangeSet::from_unsorted(
        maps.entries()
            .iter()
            .filter(|m| m.is_private() && !m.is_special())
            .map(|m| (m.start, m.end)),
    )
}

/// Tracks a process's writes with userfaultfd write protection; see the
/// [module documentation](self).
pub struct UffdWpTracker {
    pid: i32,
    page_size: u64,
    remove_events: RemoveEvents,
    features: u64,
    uffd: Option<Arc<OwnedFd>>,
    pagemap: File,
    registered: RangeSet,
    unregistrable: RangeSet,
    started: bool,
    reader: Option<RemoveReader>,
    removed_before: Vec<(u64, u64)>,
    buf: Vec<PageRegion>,
}

impl UffdWpTracker {
    /// Opens a tracker of `pid`: probes the kernel, then creates the
    /// userfaultfd inside the target (see the module docs). Not started.
    pub fn open(pid: i32) -> Result<Self> {
        Self::open_with(pid, RemoveEvents::Auto)
    }

    /// [`open`](Self::open) with a choice of how zapped pages are seen.
    pub fn open_with(pid: i32, remove_events: RemoveEvents) -> Result<Self> {
        probe()?;
        let path = format!("/proc/{pid}/pagemap");
        let pagemap = File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DirtyError::ProcessGone { pid }
            } else {
                io_err(format!("open {path}"))(e)
            }
        })?;
        let mut t = UffdWpTracker {
            pid,
            page_size: sys::page_size(),
            remove_events,
            features: 0,
            uffd: None,
            pagemap,
            registered: RangeSet::new(),
            unregistrable: RangeSet::new(),
            started: false,
            reader: None,
            removed_before: Vec::new(),
            buf: vec![PageRegion::default(); SCAN_BUFFER],
        };
        t.acquire()?;
        Ok(t)
    }

    /// The userfaultfd features enabled on the tracker's userfaultfd (0
    /// while it holds none).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether `UFFD_EVENT_REMOVE` messages are being read (while started).
    pub fn listens_for_remove_events(&self) -> bool {
        self.reader.is_some()
    }

    /// The address ranges currently registered for write protection.
    pub fn registered_ranges(&self) -> Vec<(u64, u64)> {
        self.registered.iter().collect()
    }

    /// Creates the userfaultfd in the target and takes it over.
    fn acquire(&mut self) -> Result<()> {
        let support = probe()?;
        let pid = self.pid;
        let fd = with_injector(pid, move |inj| {
            let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
            // Whatever is created must be closed again: check both first.
            inj.check_allowed(libc::SYS_close, [0; 6])?;
            let mut r = inj.syscall(
                libc::SYS_userfaultfd,
                [flags | UFFD_USER_MODE_ONLY, 0, 0, 0, 0, 0],
            )?;
            if r == -(libc::EINVAL as i64) {
                // Kernels before 5.11 know no UFFD_USER_MODE_ONLY.
                r = inj.syscall(libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0])?;
            }
            if r < 0 {
                return Err(DirtyError::Injection {
                    pid,
                    reason: format!(
                        "userfaultfd in the target failed: {}",
                        Errno::from_raw(-r as i32)
                    ),
                });
            }
            let target_fd = r as i32;
            let copied = sys::pidfd_open(pid).and_then(|pidfd| sys::pidfd_getfd(&pidfd, target_fd));
            let closed = inj.syscall(libc::SYS_close, [target_fd as u64, 0, 0, 0, 0, 0])?;
            if closed != 0 {
                tracing::warn!(
                    pid,
                    fd = target_fd,
                    result = closed,
                    "closing the injected userfaultfd failed"
                );
            }
            copied.map_err(sys_err(format!(
                "pidfd_getfd of fd {target_fd} of process {pid}"
            )))
        })?;
        let listen = match self.remove_events {
            RemoveEvents::Auto => !support.zapped_pages_reported,
            RemoveEvents::On => true,
            RemoveEvents::Off => false,
        } && support.features & UFFD_FEATURE_EVENT_REMOVE != 0;
        let want = REQUIRED | if listen { UFFD_FEATURE_EVENT_REMOVE } else { 0 };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: want,
            ioctls: 0,
        };
        sys::uffdio_api(fd.as_raw_fd(), &mut api)
            .map_err(sys_err("UFFDIO_API on the target's userfaultfd"))?;
        self.features = want;
        self.uffd = Some(Arc::new(fd));
        Ok(())
    }

    fn uffd_raw(&self) -> Result<RawFd> {
        self.uffd
            .as_ref()
            .map(|f| f.as_raw_fd())
            .ok_or(DirtyError::NotStarted {
                backend: NAME,
                pid: self.pid,
            })
    }

    /// Registers and arms a range found after `start`, reporting its
    /// populated pages; a range that cannot be registered is remembered
    /// and its populated pages are reported in every collect.
    fn add_range(
        &mut self,
        uffd: RawFd,
        start: u64,
        end: u64,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<()> {
        if let Err(e) = register(uffd, start, end) {
            tracing::debug!(pid = self.pid, start, end, error = %e, "cannot register, reporting populated pages");
            self.unregistrable.insert(start, end);
            return self.scan_populated(start, end, out);
        }
        self.registered.insert(start, end);
        // One atomic pass: whatever is populated is reported, everything
        // is protected, unpopulated pages with a marker so that they do not
        // count as written next time. (A separate UFFDIO_WRITEPROTECT
        // after a look would lose a write made in between.)
        match scan(
            &self.pagemap,
            &mut self.buf,
            start,
            end,
            ScanKind::ArmReport,
            out,
        ) {
            Ok(()) => Ok(()),
            Err(Errno::EPERM) => {
                // Replaced again while we looked: all of it.
                self.registered.remove(start, end);
                out.push((start, end));
                Ok(())
            }
            Err(e) => Err(scan_err(self.pid, format!("scan {start:#x}-{end:#x}"))(e)),
        }
    }

    fn scan_populated(&mut self, start: u64, end: u64, out: &mut Vec<(u64, u64)>) -> Result<()> {
        scan(
            &self.pagemap,
            &mut self.buf,
            start,
            end,
            ScanKind::Populated,
            out,
        )
        .map_err(scan_err(self.pid, format!("scan {start:#x}-{end:#x}")))
    }

    /// Stops the event thread, unregisters everything and closes the
    /// userfaultfd.
    fn teardown(&mut self) -> Result<()> {
        let mut first_error = None;
        if let Some(uffd) = self.uffd.as_ref().map(|f| f.as_raw_fd()) {
            for (s, e) in self.registered.iter() {
                match unregister(uffd, s, e) {
                    // Gone or replaced mappings are not ours anymore.
                    Ok(()) | Err(Errno::EINVAL | Errno::ENOMEM | Errno::ENOENT) => {}
                    Err(err) => {
                        first_error.get_or_insert(sys_err(format!(
                            "UFFDIO_UNREGISTER {s:#x}-{e:#x} of process {}",
                            self.pid
                        ))(err));
                    }
                }
            }
        }
        if let Some(reader) = self.reader.take() {
            reader.stop();
        }
        self.uffd = None;
        self.features = 0;
        self.registered = RangeSet::new();
        self.unregistrable = RangeSet::new();
        self.removed_before.clear();
        self.started = false;
        first_error.map_or(Ok(()), Err)
    }
}

impl DirtyTracker for UffdWpTracker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn pid(&self) -> i32 {
        self.pid
    }

    fn start(&mut self) -> Result<()> {
        if self.started {
            return Err(DirtyError::AlreadyStarted {
                backend: NAME,
                pid: self.pid,
            });
        }
        if self.uffd.is_none() {
            self.acquire()?;
        }
        let uffd = self.uffd_raw()?;
        let maps = ProcessMaps::read(self.pid)?;
        let mut to_arm = Vec::new();
        for m in maps.trackable() {
            match register(uffd, m.start, m.end) {
                Ok(()) => {
                    self.registered.insert(m.start, m.end);
                    to_arm.push((m.start, m.end));
                }
                Err(e) => {
                    tracing::debug!(pid = self.pid, start = m.start, end = m.end, path = %m.path, error = %e,
                        "cannot register, its populated pages will be reported in every collect");
                    self.unregistrable.insert(m.start, m.end);
                }
            }
        }
        for (s, e) in to_arm {
            if let Err(err) = writeprotect(uffd, s, e) {
                // The mapping changed under us. Unarmed pages count as
                // written, and a replaced mapping makes the next scan fail:
                // the next collect sorts it out either way.
                tracing::debug!(pid = self.pid, start = s, end = e, error = %err, "arming failed");
            }
        }
        if self.features & UFFD_FEATURE_EVENT_REMOVE != 0 {
            if let Some(fd) = self.uffd.clone() {
                self.reader = Some(RemoveReader::spawn(fd)?);
            }
        }
        self.started = true;
        Ok(())
    }

    fn collect(&mut self) -> Result<DirtySet> {
        if !self.started {
            return Err(DirtyError::NotStarted {
                backend: NAME,
                pid: self.pid,
            });
        }
        let uffd = self.uffd_raw()?;
        let maps = ProcessMaps::read(self.pid)?;
        let private = private_ranges(&maps);
        self.registered = self.registered.intersect(&private);
        self.unregistrable = self.unregistrable.intersect(&private);
        let mut dirty = Vec::new();

        // Written pages of the registered mappings.
        for (s, e) in pieces_by_mapping(&self.registered, &maps) {
            match scan(
                &self.pagemap,
                &mut self.buf,
                s,
                e,
                ScanKind::Written,
                &mut dirty,
            ) {
                Ok(()) => {}
                Err(Errno::EPERM) => {
                    // Replaced by a mapping we never registered (munmap and
                    // mmap, or mmap over it): every page may differ from
                    // what was sent, populated or not, and from the maps
                    // alone the replacement can look like nothing happened.
                    self.registered.remove(s, e);
                    dirty.push((s, e));
                }
                Err(err) => {
                    return Err(scan_err(self.pid, format!("PAGEMAP_SCAN {s:#x}-{e:#x}"))(
                        err,
                    ))
                }
            }
        }

        // Pages zeroed by madvise, reported twice (the zap follows the
        // event, possibly after this collect's readers copied the page).
        if let Some(reader) = &self.reader {
            let removed = reader.drain()?;
            let both =
                RangeSet::from_unsorted(removed.iter().chain(self.removed_before.iter()).copied());
            dirty.extend(both.intersect(&private).iter());
            self.removed_before = removed;
        }

        // Mappings that appeared since the last look.
        let trackable = RangeSet::from_unsorted(maps.trackable().map(|m| (m.start, m.end)));
        let new = trackable
            .subtract(&self.registered)
            .subtract(&self.unregistrable);
        for (s, e) in pieces_by_mapping(&new, &maps) {
            self.add_range(uffd, s, e, &mut dirty)?;
        }

        // Mappings that cannot be registered: all populated pages.
        let unregistrable = self.unregistrable.subtract(&new);
        for (s, e) in pieces_by_mapping(&unregistrable, &maps) {
            self.scan_populated(s, e, &mut dirty)?;
        }

        Ok(DirtySet::from_byte_ranges(self.pid, self.page_size, dirty))
    }

    fn stop(&mut self) -> Result<()> {
        self.teardown()
    }
}

impl Drop for UffdWpTracker {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!(pid = self.pid, error = %e, "tearing down uffd-wp tracking failed");
        }
    }
}

/// What the event thread saw.
#[derive(Debug, Default)]
struct RemoveLog {
    ranges: Vec<(u64, u64)>,
    error: Option<String>,
}

/// The thread reading `UFFD_EVENT_REMOVE` messages from the userfaultfd.
struct RemoveReader {
    wake: Arc<OwnedFd>,
    log: Arc<Mutex<RemoveLog>>,
    handle: Option<JoinHandle<()>>,
}

impl RemoveReader {
    fn spawn(uffd: Arc<OwnedFd>) -> Result<Self> {
        // SAFETY: eventfd takes two integers and returns a new fd.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        let raw = Errno::result(raw).map_err(sys_err("eventfd"))?;
        // SAFETY: eventfd succeeded; the descriptor is new and ours.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let log = Arc::new(Mutex::new(RemoveLog::default()));
        let (w, l) = (wake.clone(), log.clone());
        let handle = std::thread::Builder::new()
            .name("migrun-uffd-events".into())
            .spawn(move || read_events(&uffd, &w, &l))
            .map_err(io_err("spawn userfaultfd event thread"))?;
        Ok(RemoveReader {
            wake,
            log,
            handle: Some(handle),
        })
    }

    /// The ranges removed since the last drain.
    fn drain(&self) -> Result<Vec<(u64, u64)>> {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = log.error.take() {
            return Err(DirtyError::Io {
                context: "reading userfaultfd events".into(),
                source: std::io::Error::other(e),
            });
        }
        Ok(std::mem::take(&mut log.ranges))
    }

    fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = nix::unistd::write(&*self.wake, &1u64.to_ne_bytes());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for RemoveReader {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The event thread: answers every message at once (the kernel holds the
/// `madvise` caller until its message is read) until woken through `wake`.
fn read_events(uffd: &OwnedFd, wake: &OwnedFd, log: &Mutex<RemoveLog>) {
    let mut buf = [0u8; 32 * 64];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structures.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if Errno::last() != Errno::EINTR {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            continue;
        }
        // Always drain before leaving, so no madvise stays blocked.
        loop {
            match nix::unistd::read(uffd.as_raw_fd(), &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    for msg in buf[..n].chunks_exact(32) {
                        if msg[0] == UFFD_EVENT_REMOVE {
                            let word = |i: usize| {
                                let mut b = [0u8; 8];
                                b.copy_from_slice(&msg[i..i + 8]);
                                u64::from_ne_bytes(b)
                            };
                            log.ranges.push((word(8), word(16)));
                        }
                    }
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    log.error
                        .get_or_insert_with(|| format!("read userfaultfd: {e}"));
                    break;
                }
            }
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_on_this_kernel() {
        // Linux 6.7+ with CONFIG_USERFAULTFD and CONFIG_PTE_MARKER_UFFD_WP:
        // the probe must succeed and report both required features.
        let s = probe().expect("uffd-wp probe");
        assert_eq!(s.features & REQUIRED, REQUIRED);
        assert!(s.features & UFFD_FEATURE_EVENT_REMOVE != 0);
    }

    #[test]
    fn pieces_split_at_mappings() {
        let maps = ProcessMaps::parse(
            "1000-3000 rw-p 00000000 00:00 0 \n\
             3000-5000 rw-p 00000000 00:00 0 \n\
             8000-9000 rw-p 00000000 00:00 0 \n",
        )
        .expect("parse");
        let set = RangeSet::from_unsorted([(0x0, 0x2000), (0x2800, 0x9000)]);
        assert_eq!(
            pieces_by_mapping(&set, &maps),
            vec![
                (0x1000, 0x2000),
                (0x2800, 0x3000),
                (0x3000, 0x5000),
                (0x8000, 0x9000)
            ]
        );
    }

    use crate::dirty::sys::PAGE_IS_WPALLOWED;

    /// Categories of each page of `[s, e)` in page units, straight from
    /// the kernel.
    fn categories(pm: &File, s: u64, e: u64) -> Vec<(u64, u64, u64)> {
        let ps = sys::page_size();
        let mut buf = vec![PageRegion::default(); 64];
        let mut arg = PmScanArg {
            start: s,
            end: e,
            category_anyof_mask: 0xff,
            return_mask: 0xff,
            ..Default::default()
        };
        let n = sys::pagemap_scan(pm, &mut arg, &mut buf).expect("PAGEMAP_SCAN");
        buf[..n]
            .iter()
            .map(|r| ((r.start - s) / ps, (r.end - s) / ps, r.categories))
            .collect()
    }

    /// Pins down the kernel behaviour the tracker relies on (see
    /// `ScanKind`), on a scratch mapping of this process registered after
    /// some of its pages were populated, as a new mapping is.
    #[test]
    fn scan_kinds_on_scratch_memory() {
        let ps = sys::page_size();
        let uffd = new_local_uffd().expect("userfaultfd");
        let fd = uffd.as_raw_fd();
        let mut api = UffdioApi {
            api: UFFD_API,
            features: REQUIRED,
            ioctls: 0,
        };
        sys::uffdio_api(fd, &mut api).expect("UFFDIO_API");
        let m = sys::ScratchMapping::new(8).expect("mmap");
        m.write(1, 1);
        m.write(2, 1);
        let (s, e) = (m.addr(), m.addr() + 8 * ps);
        let pm = File::open("/proc/self/pagemap").expect("pagemap");
        let mut buf = vec![PageRegion::default(); 2];
        let rel = |v: &[(u64, u64)]| -> Vec<(u64, u64)> {
            v.iter()
                .map(|&(a, b)| ((a - s) / ps, (b - s) / ps))
                .collect()
        };

        // Not registered: the protecting scans refuse, the others work.
        let mut out = Vec::new();
        assert_eq!(
            scan(&pm, &mut buf, s, e, ScanKind::Written, &mut out),
            Err(Errno::EPERM)
        );
        scan(&pm, &mut buf, s, e, ScanKind::Populated, &mut out).expect("populated");
        assert_eq!(rel(&out), [(1, 3)]);

        register(fd, s, e).expect("register");
        const W: u64 = PAGE_IS_WPALLOWED | PAGE_IS_WRITTEN;
        // Unpopulated pages in the page table count as written.
        assert_eq!(
            categories(&pm, s, e),
            [(0, 1, W), (1, 3, W | PAGE_IS_PRESENT), (3, 8, W)]
        );

        // Arming reports exactly the populated pages (a 2-entry buffer
        // forces continuing from walk_end) and leaves markers behind.
        out.clear();
        scan(&pm, &mut buf, s, e, ScanKind::ArmReport, &mut out).expect("arm");
        assert_eq!(rel(&out), [(1, 3)]);
        const M: u64 = PAGE_IS_WPALLOWED | PAGE_IS_SWAPPED;
        assert_eq!(
            categories(&pm, s, e),
            [
                (0, 1, M),
                (1, 3, PAGE_IS_WPALLOWED | PAGE_IS_PRESENT),
                (3, 8, M)
            ]
        );
        out.clear();
        scan(&pm, &mut buf, s, e, ScanKind::Written, &mut out).expect("scan");
        assert!(out.is_empty(), "{:?}", rel(&out));

        // Writes to populated and to unpopulated pages are both seen.
        m.write(2, 2);
        m.write(5, 2);
        scan(&pm, &mut buf, s, e, ScanKind::Written, &mut out).expect("scan");
        assert_eq!(rel(&out), [(2, 3), (5, 6)]);
        out.clear();
        // A zapped page is unprotected again, so it counts as written.
        // SAFETY: page 2 of the scratch mapping, not referenced by Rust.
        let rc = unsafe {
            libc::madvise(
                (s + 2 * ps) as *mut libc::c_void,
                ps as usize,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(rc, 0);
        scan(&pm, &mut buf, s, e, ScanKind::Written, &mut out).expect("scan");
        assert_eq!(rel(&out), [(2, 3)]);
        unregister(fd, s, e).expect("unregister");
    }
}

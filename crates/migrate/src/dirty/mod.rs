//! Dirty-page tracking: which pages of a process were written since the
//! previous round of a live migration.
//!
//! A [`DirtyTracker`] follows one process. [`DirtyTracker::start`] begins
//! tracking; every [`DirtyTracker::collect`] returns the pages written since
//! the previous `start`/`collect` as a [`DirtySet`] and re-arms tracking so
//! that no write is lost between two collects; [`DirtyTracker::stop`] tears
//! tracking down.
//!
//! Three backends exist, tried in this order by [`open_best`]:
//!
//! - [`soft_dirty`]: `/proc/PID/clear_refs` and bit 55 of
//!   `/proc/PID/pagemap` (needs `CONFIG_MEM_SOFT_DIRTY`).
//! - [`uffd_wp`]: asynchronous userfaultfd write protection of the target's
//!   memory, read back and re-armed atomically with the `PAGEMAP_SCAN` ioctl
//!   (Linux 6.7+). The userfaultfd is created inside the target by syscall
//!   injection ([`inject`]).
//! - [`hash`]: a 64-bit hash of every page, compared between rounds. Slow,
//!   but needs nothing from the kernel beyond `process_vm_readv`.
//!
//! Which memory is tracked: private writable mappings, anonymous or
//! file-backed, except the kernel's special mappings (see
//! [`MapEntry::is_trackable`]). A mapping that stops being writable after
//! tracking started stays tracked while it is mapped, so writes made just
//! before an `mprotect` are not lost. Mappings created after `start` are
//! picked up by the next `collect`, which reports all their populated pages
//! (none of them was ever sent).

pub mod hash;
pub mod inject;
mod maps;
pub(crate) mod ranges;
pub mod soft_dirty;
pub(crate) mod sys;
pub mod uffd_wp;

pub use maps::{MapEntry, ProcessMaps};

use nix::errno::Errno;
use ranges::RangeSet;

/// Errors of dirty-page tracking, each one line naming what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The backend cannot work on this kernel or for this process.
    #[error("{backend} dirty tracking is unavailable: {reason}")]
    Unsupported {
        /// The backend ([`DirtyTracker::name`]).
        backend: &'static str,
        /// Why.
        reason: String,
    },
    /// A system call failed.
    #[error("{context}: {errno}")]
    Sys {
        /// What was being done.
        context: String,
        /// The error number.
        #[source]
        errno: Errno,
    },
    /// An I/O error, e.g. reading a file under /proc.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file under /proc had an unexpected format.
    #[error("cannot parse {what}: {reason}")]
    Parse {
        /// The file, e.g. `/proc/42/maps`.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Running a system call inside the target with ptrace failed.
    #[error("syscall injection into process {pid} failed: {reason}")]
    Injection {
        /// The target.
        pid: i32,
        /// Why.
        reason: String,
    },
    /// The target's seccomp filter would not let the injected system call
    /// through (it would fail, or kill the target), so it was not run.
    #[error("seccomp filter of process {pid} does not allow syscall {nr} (action {action:#010x})")]
    SeccompDenied {
        /// The target.
        pid: i32,
        /// The system call number.
        nr: i64,
        /// The filter's verdict, a `SECCOMP_RET_*` value.
        action: u32,
    },
    /// The target exited (or was killed) while being worked on.
    #[error("process {pid} exited")]
    ProcessGone {
        /// The target.
        pid: i32,
    },
    /// The target did not reach a ptrace stop in time, e.g. because it is
    /// in an uninterruptible sleep or in a frozen cgroup.
    #[error("process {pid} did not stop within {waited_ms} ms")]
    Timeout {
        /// The target.
        pid: i32,
        /// How long was waited.
        waited_ms: u64,
    },
    /// `collect` was called on a tracker that is not started.
    #[error("{backend} tracker of process {pid} is not started")]
    NotStarted {
        /// The backend.
        backend: &'static str,
        /// The target.
        pid: i32,
    },
    /// `start` was called on a tracker that is already started.
    #[error("{backend} tracker of process {pid} is already started")]
    AlreadyStarted {
        /// The backend.
        backend: &'static str,
        /// The target.
        pid: i32,
    },
}

/// Result type of dirty-page tracking.
pub type Result<T> = std::result::Result<T, DirtyError>;

/// Builds a closure mapping an errno to [`DirtyError::Sys`] with a context.
pub(crate) fn sys_err(context: impl Into<String>) -> impl FnOnce(Errno) -> DirtyError {
    let context = context.into();
    move |errno| DirtyError::Sys { context, errno }
}

/// Builds a closure mapping an I/O error to [`DirtyError::Io`] with a context.
pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DirtyError {
    let context = context.into();
    move |source| DirtyError::Io { context, source }
}

/// Tracks which pages of one process are written.
///
/// The contract every backend keeps:
///
/// - after [`start`](Self::start) returns, every page written by the target
///   (by user code or by the kernel on its behalf, e.g. `read(2)` into a
///   buffer) is reported by a later [`collect`](Self::collect);
/// - `collect` reports the pages written since the previous `start` or
///   `collect` and re-arms tracking per page atomically: a write that races
///   with `collect` is reported by this collect or by the next one, never
///   lost;
/// - reporting a page that was not written is allowed (it costs a useless
///   copy), missing one is a bug;
/// - [`stop`](Self::stop) leaves the process as it was before `start`.
///
/// The trait is object safe: [`open_best`] returns a `Box<dyn DirtyTracker>`.
pub trait DirtyTracker: Send {
    /// The backend name used in statistics: `"soft-dirty"`, `"uffd-wp"` or
    /// `"hash"`.
    fn name(&self) -> &'static str;

    /// The tracked process.
    fn pid(&self) -> i32;

    /// Begins tracking: after this call, [`collect`](Self::collect) reports
    /// only pages written after it.
    fn start(&mut self) -> Result<()>;

    /// The pages written since the previous `start` or `collect`; re-arms
    /// tracking so that no write is lost.
    fn collect(&mut self) -> Result<DirtySet>;

    /// Tears tracking down, leaving the process exactly as before `start`.
    /// A stopped tracker can be started again.
    fn stop(&mut self) -> Result<()>;

    /// Tells the tracker which content of the page at `addr` was actually
    /// sent to the destination.
    ///
    /// Backends that detect writes by comparing contents ([`hash`]) compare
    /// against what was sent instead of what was seen at the last
    /// `collect`; without this, a page that changes after `collect` and
    /// changes back before the next one (A→B→A, e.g. a lock word) would be
    /// missed although the destination got B. Backends that see the writes
    /// themselves ignore it.
    fn record_sent(&mut self, addr: u64, data: &[u8]) {
        let _ = (addr, data);
    }
}

/// The dirty-tracking backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Soft-dirty bits: [`soft_dirty::SoftDirtyTracker`].
    SoftDirty,
    /// Userfaultfd write protection and `PAGEMAP_SCAN`:
    /// [`uffd_wp::UffdWpTracker`].
    UffdWp,
    /// Page hashing: [`hash::HashTracker`].
    Hash,
}

impl Backend {
    /// The name the backend's trackers report in [`DirtyTracker::name`].
    pub fn name(self) -> &'static str {
        match self {
            Backend::SoftDirty => soft_dirty::NAME,
            Backend::UffdWp => uffd_wp::NAME,
            Backend::Hash => hash::NAME,
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = DirtyError;

    /// A backend by its [name](Backend::name).
    fn from_str(s: &str) -> Result<Self> {
        [Backend::SoftDirty, Backend::UffdWp, Backend::Hash]
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| DirtyError::Parse {
                what: BACKEND_ENV.into(),
                reason: format!("unknown backend {s:?} (soft-dirty, uffd-wp or hash)"),
            })
    }
}

/// The environment variable that makes [`open_configured`] use one
/// backend instead of the best one: `soft-dirty`, `uffd-wp` or `hash`.
/// For tests and comparisons (e.g. the hash backend, which Docker
/// containers get, on a machine where uffd-wp works).
pub const BACKEND_ENV: &str = "MIGRUN_DIRTY_BACKEND";

/// Opens the tracker a migration uses for `pid` (not started yet): the
/// backend named by [`BACKEND_ENV`] if it is set (failing if that backend
/// cannot work here or cannot track `pid`), else [`open_best`].
pub fn open_configured(pid: i32) -> Result<Box<dyn DirtyTracker>> {
    let backend: Backend = match std::env::var(BACKEND_ENV) {
        Ok(name) if !name.is_empty() => name.parse()?,
        _ => return open_best(pid),
    };
    // Probed as open_best does: a kernel without soft-dirty bits would
    // report no write at all.
    match backend {
        Backend::SoftDirty => soft_dirty::probe()?,
        Backend::UffdWp => uffd_wp::probe().map(|_| ())?,
        Backend::Hash => {}
    }
    open(pid, backend)
}

/// Opens a tracker of `pid` with the given backend (not started yet).
///
/// For [`Backend::UffdWp`] this already injects the userfaultfd into the
/// target, so a target on which that is impossible (seccomp, ptrace denied)
/// fails here rather than in `start`.
pub fn open(pid: i32, backend: Backend) -> Result<Box<dyn DirtyTracker>> {
    Ok(match backend {
        Backend::SoftDirty => Box::new(soft_dirty::SoftDirtyTracker::open(pid)?),
        Backend::UffdWp => Box::new(uffd_wp::UffdWpTracker::open(pid)?),
        Backend::Hash => Box::new(hash::HashTracker::open(pid)?),
    })
}

/// Opens the best tracker this kernel offers for `pid` (not started yet).
///
/// Probes at run time, in order: soft-dirty (the kernel must have
/// `CONFIG_MEM_SOFT_DIRTY`; probed on a scratch mapping of this process),
/// then uffd-wp with `PAGEMAP_SCAN` (probed the same way, then the
/// userfaultfd is injected into the target, which can still fail, e.g.
/// because the target's seccomp filter forbids `userfaultfd`), then page
/// hashing, which always works.
pub fn open_best(pid: i32) -> Result<Box<dyn DirtyTracker>> {
    let mut reasons = Vec::new();
    match soft_dirty::probe() {
        Ok(()) => match soft_dirty::SoftDirtyTracker::open(pid) {
            Ok(t) => return Ok(Box::new(t)),
            Err(e) => reasons.push(e.to_string()),
        },
        Err(e) => reasons.push(e.to_string()),
    }
    match uffd_wp::probe() {
        Ok(_) => match uffd_wp::UffdWpTracker::open(pid) {
            Ok(t) => return Ok(Box::new(t)),
            Err(e) => reasons.push(e.to_string()),
        },
        Err(e) => reasons.push(e.to_string()),
    }
    tracing::info!(
        pid,
        reasons = %reasons.join("; "),
        "dirty tracking falls back to page hashing"
    );
    Ok(Box::new(hash::HashTracker::open(pid)?))
}

/// A run of consecutive pages: `pages` pages from address `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRange {
    /// Address of the first page (page aligned).
    pub start: u64,
    /// Number of pages, at least 1.
    pub pages: u64,
}

/// The pages of one process found dirty by one `collect`: sorted, merged,
/// non-overlapping page ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtySet {
    pid: i32,
    page_size: u64,
    ranges: Vec<PageRange>,
}

impl DirtySet {
    /// An empty set.
    pub fn empty(pid: i32, page_size: u64) -> Self {
        DirtySet {
            pid,
            page_size,
            ranges: Vec::new(),
        }
    }

    /// Builds a set from `[start, end)` byte ranges in any order, possibly
    /// overlapping; each range is widened to page boundaries, and an empty
    /// one (`end <= start`) is dropped.
    pub fn from_byte_ranges(
        pid: i32,
        page_size: u64,
        ranges: impl IntoIterator<Item = (u64, u64)>,
    ) -> Self {
        let ps = page_size.max(1);
        let set =
            RangeSet::from_unsorted(ranges.into_iter().filter(|(s, e)| s < e).map(|(s, e)| {
                let s = s - s % ps;
                let e = e.div_ceil(ps).saturating_mul(ps);
                (s, e)
            }));
        Self::from_range_set(pid, ps, &set)
    }

    pub(crate) fn from_range_set(pid: i32, page_size: u64, set: &RangeSet) -> Self {
        DirtySet {
            pid,
            page_size,
            ranges: set
                .iter()
                .map(|(s, e)| PageRange {
                    start: s,
                    pages: (e - s) / page_size,
                })
                .filter(|r| r.pages > 0)
                .collect(),
        }
    }

    /// The process these pages belong to.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The page size the ranges are counted in.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The ranges, sorted by address, merged, non-overlapping.
    pub fn ranges(&self) -> &[PageRange] {
        &self.ranges
    }

    /// Whether no page is dirty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The number of dirty pages.
    pub fn page_count(&self) -> u64 {
        self.ranges.iter().map(|r| r.pages).sum()
    }

    /// The address of every dirty page, in increasing order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        let ps = self.page_size;
        self.ranges
            .iter()
            .flat_map(move |r| (0..r.pages).map(move |i| r.start + i * ps))
    }

    /// Whether the page containing `addr` is dirty.
    pub fn contains(&self, addr: u64) -> bool {
        let ps = self.page_size;
        let i = self
            .ranges
            .partition_point(|r| r.start + r.pages * ps <= addr);
        self.ranges.get(i).is_some_and(|r| r.start <= addr)
    }

    /// The part of this set inside `[start, end)`.
    pub fn within(&self, start: u64, end: u64) -> DirtySet {
        let ps = self.page_size;
        let window = RangeSet::from_unsorted([(start, end)]);
        let mine = RangeSet::from_unsorted(
            self.ranges
                .iter()
                .map(|r| (r.start, r.start + r.pages * ps)),
        );
        Self::from_range_set(self.pid, ps, &mine.intersect(&window))
    }

    /// The union of two sets of the same process.
    pub fn union(&self, other: &DirtySet) -> DirtySet {
        let ps = self.page_size;
        let all = self
            .ranges
            .iter()
            .chain(other.ranges.iter())
            .map(|r| (r.start, r.start + r.pages * ps));
        Self::from_range_set(self.pid, ps, &RangeSet::from_unsorted(all))
    }
}

/// The system page size.
pub fn page_size() -> u64 {
    sys::page_size()
}

/// The address ranges a backend tracks now: the trackable mappings, plus
/// what was tracked before and is still mapped privately (a mapping made
/// read-only after being written must still be scanned once).
pub(crate) fn tracked_ranges(maps: &ProcessMaps, previous: &RangeSet) -> RangeSet {
    let trackable = RangeSet::from_unsorted(maps.trackable().map(|m| (m.start, m.end)));
    let private = RangeSet::from_unsorted(
        maps.entries()
            .iter()
            .filter(|m| m.is_private() && !m.is_special())
            .map(|m| (m.start, m.end)),
    );
    trackable.union(&previous.intersect(&private))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_parse_from_their_names() {
        for b in [Backend::SoftDirty, Backend::UffdWp, Backend::Hash] {
            assert_eq!(b.name().parse::<Backend>().ok(), Some(b));
        }
        let err = "uffd".parse::<Backend>().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("cannot parse MIGRUN_DIRTY_BACKEND: unknown backend \"uffd\" (soft-dirty, uffd-wp or hash)")
        );
    }

    #[test]
    fn dirty_set_sorts_merges_and_aligns() {
        let s = DirtySet::from_byte_ranges(
            1,
            4096,
            [
                (0x5000, 0x6000),
                (0x1000, 0x3000),
                (0x2fff, 0x4001),
                (0x9000, 0x9000),
                // Empty, so no page, though not on page boundaries.
                (0x9800, 0x9800),
                (0xb800, 0xa800),
            ],
        );
        assert_eq!(
            s.ranges(),
            &[PageRange {
                start: 0x1000,
                pages: 5
            }]
        );
        assert_eq!(s.page_count(), 5);
        assert_eq!(
            s.pages().collect::<Vec<_>>(),
            vec![0x1000, 0x2000, 0x3000, 0x4000, 0x5000]
        );
        assert!(s.contains(0x1000));
        assert!(s.contains(0x5fff));
        assert!(!s.contains(0x6000));
        assert!(!s.contains(0xfff));
        let w = s.within(0x2000, 0x4000);
        assert_eq!(w.pages().collect::<Vec<_>>(), vec![0x2000, 0x3000]);
        let u = w.union(&DirtySet::from_byte_ranges(1, 4096, [(0x8000, 0x9000)]));
        assert_eq!(u.pages().collect::<Vec<_>>(), vec![0x2000, 0x3000, 0x8000]);
        assert!(DirtySet::empty(1, 4096).is_empty());
    }

    #[test]
    fn tracked_ranges_keep_previously_tracked_private_mappings() {
        let maps = ProcessMaps::parse(
            "1000-3000 rw-p 00000000 00:00 0 \n\
             3000-4000 r--p 00000000 00:00 0 \n\
             5000-6000 rw-s 00000000 00:05 7 /dev/shm/x\n\
             7000-8000 r--p 00000000 00:00 0 \n",
        )
        .expect("parse");
        let prev = RangeSet::from_unsorted([(0x3000, 0x4000), (0x5000, 0x6000)]);
        let t = tracked_ranges(&maps, &prev);
        assert_eq!(t.iter().collect::<Vec<_>>(), vec![(0x1000, 0x4000)]);
    }

    /// Property tests against a model: the set of page numbers.
    mod props {
        use std::collections::BTreeSet;

        use proptest::prelude::*;

        use super::*;

        /// Byte ranges lie in `base..base + PAGES * page size`.
        const PAGES: u64 = 48;

        /// A page size and a page-aligned base: at zero, in the middle, or
        /// high up (below the last page, which a half-open range of u64
        /// cannot end after).
        fn space() -> impl Strategy<Value = (u64, u64)> {
            (prop_oneof![Just(4096u64), Just(16384)], 0..3u8).prop_map(|(ps, at)| {
                let base = match at {
                    0 => 0,
                    1 => 1 << 47,
                    _ => (u64::MAX / ps - PAGES - 1) * ps,
                };
                (ps, base)
            })
        }

        fn byte_ranges(ps: u64, base: u64) -> impl Strategy<Value = Vec<(u64, u64)>> {
            let span = PAGES * ps;
            prop::collection::vec((0..=span, 0..=span), 0..6)
                .prop_map(move |v| v.into_iter().map(|(s, e)| (base + s, base + e)).collect())
        }

        /// The pages (as page numbers) that the byte ranges touch.
        fn model(ps: u64, ranges: &[(u64, u64)]) -> BTreeSet<u64> {
            ranges
                .iter()
                .filter(|(s, e)| s < e)
                .flat_map(|&(s, e)| s / ps..=(e - 1) / ps)
                .collect()
        }

        fn check(
            set: &DirtySet,
            ps: u64,
            want: &BTreeSet<u64>,
        ) -> std::result::Result<(), TestCaseError> {
            let r = set.ranges();
            for x in r {
                prop_assert!(x.pages > 0 && x.start % ps == 0, "bad range in {r:?}");
            }
            for w in r.windows(2) {
                prop_assert!(
                    w[0].start + w[0].pages * ps < w[1].start,
                    "unsorted, overlapping or adjacent: {r:?}"
                );
            }
            let pages: Vec<u64> = set.pages().collect();
            let expected: Vec<u64> = want.iter().map(|p| p * ps).collect();
            prop_assert_eq!(pages, expected);
            prop_assert_eq!(set.page_count(), want.len() as u64);
            prop_assert_eq!(set.is_empty(), want.is_empty());
            Ok(())
        }

        type Ranges = Vec<(u64, u64)>;

        /// A page size, two sets of byte ranges, and addresses to look up.
        fn case() -> impl Strategy<Value = (u64, Ranges, Ranges, Vec<u64>)> {
            space().prop_flat_map(|(ps, base)| {
                let addr = (0..PAGES * ps + 2 * ps).prop_map(move |a| base + a);
                (
                    Just(ps),
                    byte_ranges(ps, base),
                    byte_ranges(ps, base),
                    prop::collection::vec(addr, 0..16),
                )
            })
        }

        proptest! {
            #[test]
            fn dirty_sets_match_the_model((ps, a, b, addrs) in case()) {
                let (sa, sb) = (
                    DirtySet::from_byte_ranges(1, ps, a.clone()),
                    DirtySet::from_byte_ranges(1, ps, b.clone()),
                );
                let (ma, mb) = (model(ps, &a), model(ps, &b));
                check(&sa, ps, &ma)?;
                check(&sb, ps, &mb)?;
                check(&sa.union(&sb), ps, &(&ma | &mb))?;
                for &addr in &addrs {
                    prop_assert_eq!(sa.contains(addr), ma.contains(&(addr / ps)), "{:#x}", addr);
                }
                // A page-aligned window from two of the addresses.
                if let [x, y, ..] = addrs[..] {
                    let (lo, hi) = (x.min(y) / ps * ps, x.max(y) / ps * ps);
                    let inside = ma.range(lo / ps..hi / ps).copied().collect();
                    check(&sa.within(lo, hi), ps, &inside)?;
                }
                prop_assert_eq!(sa.pid(), 1);
                prop_assert_eq!(sa.page_size(), ps);
            }
        }
    }
}

//! Dirty tracking with soft-dirty bits: writing `4` to
//! `/proc/PID/clear_refs` clears them (and write-protects every page), the
//! kernel sets bit 55 of a page's `/proc/PID/pagemap` entry on its next
//! write.
//!
//! Needs a kernel built with `CONFIG_MEM_SOFT_DIRTY`; [`probe`] checks on a
//! scratch mapping of this process and returns
//! [`DirtyError::Unsupported`] elsewhere.
//!
//! Reading the bits and clearing them are two steps, so `collect` freezes
//! the target's threads with ptrace ([`with_frozen`]) for the duration:
//! otherwise a write between reading a page's bit and clearing it would be
//! lost. Pages that were populated and are not any more (zapped by
//! `madvise(MADV_DONTNEED)`, which does not set the bit) are reported too.
//! `stop` has nothing to undo, but the soft-dirty bits were cleared and
//! stay so.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::OnceLock;

use super::inject::with_frozen;
use super::ranges::RangeSet;
use super::sys::{self, pagemap_populated, read_pagemap, PM_SOFT_DIRTY};
use super::{io_err, tracked_ranges, DirtyError, DirtySet, DirtyTracker, ProcessMaps, Result};

/// The backend name.
pub const NAME: &str = "soft-dirty";

/// Checks that soft-dirty bits work on this kernel, on a scratch mapping
/// of this process. The result is cached.
pub fn probe() -> Result<()> {
    static PROBE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(probe_uncached)
        .clone()
        .map_err(|reason| DirtyError::Unsupported {
            backend: NAME,
            reason,
        })
}

fn probe_uncached() -> std::result::Result<(), String> {
    let ps = sys::page_size();
    let scratch = sys::ScratchMapping::new(1).map_err(|e| format!("mmap: {e}"))?;
    let pagemap = File::open("/proc/self/pagemap").map_err(|e| format!("open pagemap: {e}"))?;
    let bit = |what: &str| -> std::result::Result<bool, String> {
        let e = read_pagemap(&pagemap, scratch.addr(), scratch.addr() + ps, ps)
            .map_err(|e| format!("read pagemap ({what}): {e}"))?;
        Ok(e.first().is_some_and(|&v| v & PM_SOFT_DIRTY != 0))
    };
    scratch.write(0, 1);
    if !bit("after the first write")? {
        return Err(
            "a freshly written page is not soft-dirty (kernel without CONFIG_MEM_SOFT_DIRTY)"
                .into(),
        );
    }
    clear_refs(std::process::id() as i32).map_err(|e| e.to_string())?;
    if bit("after clear_refs")? {
        return Err("clear_refs did not clear the soft-dirty bit".into());
    }
    scratch.write(0, 2);
    if !bit("after the second write")? {
        return Err("a write after clear_refs did not set the soft-dirty bit".into());
    }
    Ok(())
}

/// Writes `4` to `/proc/PID/clear_refs`: clears all soft-dirty bits.
fn clear_refs(pid: i32) -> Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(b"4"))
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DirtyError::ProcessGone { pid }
            } else {
                io_err(format!("write {path}"))(e)
            }
        })
}

/// Which pages of one tracked piece were populated at the last look.
#[derive(Debug, Clone)]
struct Segment {
    start: u64,
    end: u64,
    populated: Vec<bool>,
}

/// Reads the pagemap entries of `ranges` split at mapping boundaries.
fn read_entries(
    pid: i32,
    pagemap: &File,
    maps: &ProcessMaps,
    ranges: &RangeSet,
    ps: u64,
) -> Result<Vec<(u64, u64, Vec<u64>)>> {
    let mut out = Vec::new();
    for m in maps.entries() {
        for (s, e) in ranges.iter().filter(|&(s, e)| s < m.end && e > m.start) {
            let (s, e) = (s.max(m.start), e.min(m.end));
            let entries = read_pagemap(pagemap, s, e, ps).map_err(|err| {
                if err.raw_os_error() == Some(libc::ESRCH) {
                    DirtyError::ProcessGone { pid }
                } else {
                    io_err(format!("read /proc/{pid}/pagemap"))(err)
                }
            })?;
            out.push((s, e, entries));
        }
    }
    Ok(out)
}

/// Tracks a process's writes with soft-dirty bits; see the
/// [module documentation](self).
pub struct SoftDirtyTracker {
    pid: i32,
    page_size: u64,
    pagemap: File,
    segments: Vec<Segment>,
    started: bool,
}

impl SoftDirtyTracker {
    /// Opens a tracker of `pid` (not started). Fails with
    /// [`DirtyError::Unsupported`] where [`probe`] does.
    pub fn open(pid: i32) -> Result<Self> {
        probe()?;
        let path = format!("/proc/{pid}/pagemap");
        let pagemap = File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DirtyError::ProcessGone { pid }
            } else {
                io_err(format!("open {path}"))(e)
            }
        })?;
        Ok(SoftDirtyTracker {
            pid,
            page_size: sys::page_size(),
            pagemap,
            segments: Vec::new(),
            started: false,
        })
    }
}

impl DirtyTracker for SoftDirtyTracker {
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
        let (pid, ps, pagemap) = (self.pid, self.page_size, &self.pagemap);
        let segments = with_frozen(pid, move || {
            clear_refs(pid)?;
            let maps = ProcessMaps::read(pid)?;
            let ranges = tracked_ranges(&maps, &RangeSet::new());
            Ok(read_entries(pid, pagemap, &maps, &ranges, ps)?
                .into_iter()
                .map(|(start, end, e)| Segment {
                    start,
                    end,
                    populated: e.into_iter().map(pagemap_populated).collect(),
                })
                .collect::<Vec<_>>())
        })?;
        self.segments = segments;
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
        let (pid, ps, pagemap) = (self.pid, self.page_size, &self.pagemap);
        let old = std::mem::take(&mut self.segments);
        let previous = RangeSet::from_unsorted(old.iter().map(|s| (s.start, s.end)));
        let (segments, dirty) = with_frozen(pid, move || {
            let maps = ProcessMaps::read(pid)?;
            let ranges = tracked_ranges(&maps, &previous);
            let entries = read_entries(pid, pagemap, &maps, &ranges, ps)?;
            clear_refs(pid)?;
            let mut dirty = Vec::new();
            let mut segments = Vec::new();
            let mut cursor = 0;
            for (start, end, e) in entries {
                for (i, &v) in e.iter().enumerate() {
                    let addr = start + i as u64 * ps;
                    while cursor < old.len() && old[cursor].end <= addr {
                        cursor += 1;
                    }
                    let was = old
                        .get(cursor)
                        .filter(|o| o.start <= addr)
                        .map(|o| o.populated[((addr - o.start) / ps) as usize]);
                    let now = pagemap_populated(v);
                    let is_dirty = match was {
                        None => now,
                        Some(was) => v & PM_SOFT_DIRTY != 0 || (was && !now),
                    };
                    if is_dirty {
                        dirty.push((addr, addr + ps));
                    }
                }
                segments.push(Segment {
                    start,
                    end,
                    populated: e.into_iter().map(pagemap_populated).collect(),
                });
            }
            Ok((segments, dirty))
        })?;
        self.segments = segments;
        Ok(DirtySet::from_byte_ranges(self.pid, ps, dirty))
    }

    fn stop(&mut self) -> Result<()> {
        self.segments = Vec::new();
        self.started = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's build configuration says whether soft-dirty exists;
    /// the probe must agree (on this machine: it does not exist).
    #[test]
    fn probe_agrees_with_kernel_config() {
        let out = std::process::Command::new("sh")
            .args([
                "-c",
                "zcat /proc/config.gz 2>/dev/null | grep -E '^CONFIG_MEM_SOFT_DIRTY=y$'",
            ])
            .output();
        let Ok(out) = out else {
            return;
        };
        let configured = out.status.success();
        let have_config = std::path::Path::new("/proc/config.gz").exists();
        match probe() {
            Ok(()) => assert!(!have_config || configured),
            Err(DirtyError::Unsupported { backend, .. }) => {
                assert_eq!(backend, NAME);
                assert!(!configured);
            }
            Err(e) => panic!("unexpected probe error: {e}"),
        }
    }
}

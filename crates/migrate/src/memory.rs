//! Reading a live process's memory on the source.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::dirty::ProcessMaps;
use crate::{MigrateError, Result};

/// Page size.
pub const PAGE: u64 = 4096;

/// A process of the container: its pid on this host and in the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Proc {
    /// Pid on the host (what /proc and ptrace use).
    pub host: i32,
    /// Pid in the container's pid namespace (what CRIU's images use).
    pub ns: u32,
}

/// The pid of `host` in its innermost pid namespace (`NSpid`'s last value).
pub fn ns_pid(host: i32) -> Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{host}/status"))
        .map_err(|e| MigrateError::Source(format!("read /proc/{host}/status: {e}")))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| MigrateError::Source(format!("no NSpid for process {host}")))
}

/// Addresses of the pages of `pid`'s trackable mappings that are present in
/// memory or swapped out: what round 0 sends.
pub fn populated_pages(pid: i32) -> Result<Vec<u64>> {
    let maps = ProcessMaps::read(pid).map_err(|e| MigrateError::Source(e.to_string()))?;
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))
        .map_err(|e| MigrateError::Source(format!("open pagemap of {pid}: {e}")))?;
    let mut pages = Vec::new();
    let mut buf = Vec::new();
    for vma in maps.trackable() {
        let first = vma.start / PAGE;
        let count = ((vma.end - vma.start) / PAGE) as usize;
        buf.resize(count * 8, 0);
        let n = pagemap.read_at(&mut buf, first * 8).unwrap_or(0);
        for (i, entry) in buf[..n - n % 8].chunks_exact(8).enumerate() {
            let bits = u64::from_le_bytes(entry.try_into().unwrap_or([0; 8]));
            // Bit 63: present; bit 62: swapped.
            if bits & (3 << 62) != 0 {
                pages.push((first + i as u64) * PAGE);
            }
        }
    }
    Ok(pages)
}

/// Groups sorted page addresses into runs of consecutive pages of at most `max` pages.
pub fn runs(pages: &[u64], max: usize) -> Vec<(u64, usize)> {
    let mut out: Vec<(u64, usize)> = Vec::new();
    for &addr in pages {
        match out.last_mut() {
            Some((start, n)) if *start + (*n as u64) * PAGE == addr && *n < max => *n += 1,
            _ => out.push((addr, 1)),
        }
    }
    out
}

/// Reads process memory through /proc/PID/mem.
pub struct MemReader {
    mem: File,
}

impl MemReader {
    /// Opens `pid`'s memory.
    pub fn open(pid: i32) -> Result<Self> {
        let mem = File::open(format!("/proc/{pid}/mem"))
            .map_err(|e| MigrateError::Source(format!("open memory of {pid}: {e}")))?;
        Ok(Self { mem })
    }

    /// Reads `pages` pages from `addr` into `buf`; a range that is no longer
    /// mapped reads as `None`.
    pub fn read<'a>(&self, addr: u64, pages: usize, buf: &'a mut Vec<u8>) -> Option<&'a [u8]> {
        buf.resize(pages * PAGE as usize, 0);
        match self.mem.read_exact_at(buf, addr) {
            Ok(()) => Some(&buf[..]),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_on_gaps_and_size() {
        let pages = [0x1000, 0x2000, 0x3000, 0x5000, 0x6000];
        assert_eq!(runs(&pages, 8), vec![(0x1000, 3), (0x5000, 2)]);
        assert_eq!(runs(&pages, 2), vec![(0x1000, 2), (0x3000, 1), (0x5000, 2)]);
    }

    #[test]
    fn reads_own_memory() {
        let data = vec![7u8; 3 * 4096];
        let pid = std::process::id() as i32;
        let pages = populated_pages(pid).expect("pages");
        assert!(!pages.is_empty());
        let addr = data.as_ptr() as u64 / PAGE * PAGE + PAGE;
        let reader = MemReader::open(pid).expect("open");
        let mut buf = Vec::new();
        let got = reader.read(addr, 1, &mut buf).expect("read");
        assert!(got.iter().all(|b| *b == 7));
        assert!(ns_pid(pid).is_ok());
    }
}

//! Dirty tracking by hashing: the last resort, needing nothing from the
//! kernel beyond `/proc/PID/pagemap` and `process_vm_readv`.
//!
//! The tracker keeps a 64-bit hash (XXH64) of every populated page of the
//! tracked mappings and reports the pages whose hash changed. Unpopulated
//! pages are not read (reading would populate them): for anonymous memory
//! they count as zero-filled, so a page zapped by `madvise(MADV_DONTNEED)`
//! is reported if it held anything; for file-backed memory they count as
//! "unknown" and are reported once they become populated.
//!
//! Every `collect` reads all tracked memory, so it costs about as much as
//! copying it; it also cannot see a page that changes and changes back
//! between two collects (A→B→A): if the page was copied while it held B,
//! the destination is wrong. Callers avoid that by reporting what they sent
//! with [`DirtyTracker::record_sent`], which this backend compares against.
//! A page that is being written while it is hashed gets a hash of a mix of
//! old and new content, which differs from its final content, so it is
//! reported again by the next collect.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::ranges::RangeSet;
use super::sys::{self, pagemap_populated, read_pagemap};
use super::{io_err, tracked_ranges, DirtyError, DirtySet, DirtyTracker, ProcessMaps, Result};

/// The backend name.
pub const NAME: &str = "hash";

/// Hash of a page that could not be read: never equal to anything.
const UNREADABLE: u64 = 1;
/// Hash of an unpopulated page of a file-backed mapping (content unknown).
const UNPOPULATED_FILE: u64 = 2;
/// Real hashes below this are moved up so they never equal a sentinel.
const SENTINELS: u64 = 8;

/// Pages read per `process_vm_readv`.
const READ_CHUNK_PAGES: u64 = 256;
/// Pagemap entries read at once.
const PAGEMAP_CHUNK_PAGES: u64 = 1 << 16;

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn read_u32(b: &[u8]) -> u64 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a) as u64
}

fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn merge(acc: u64, val: u64) -> u64 {
    (acc ^ round(0, val)).wrapping_mul(P1).wrapping_add(P4)
}

/// XXH64 of `data` with `seed`: a fast non-cryptographic 64-bit hash
/// (Yann Collet's xxHash, 64-bit variant).
pub fn xxh64(data: &[u8], seed: u64) -> u64 {
    let len = data.len() as u64;
    let mut rest = data;
    let mut h = if data.len() >= 32 {
        let mut v = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        let mut stripes = data.chunks_exact(32);
        for s in &mut stripes {
            v[0] = round(v[0], read_u64(&s[0..]));
            v[1] = round(v[1], read_u64(&s[8..]));
            v[2] = round(v[2], read_u64(&s[16..]));
            v[3] = round(v[3], read_u64(&s[24..]));
        }
        rest = stripes.remainder();
        let mut h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for lane in v {
            h = merge(h, lane);
        }
        h
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(len);
    let mut words = rest.chunks_exact(8);
    for w in &mut words {
        h ^= round(0, read_u64(w));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
    }
    let mut rest = words.remainder();
    if rest.len() >= 4 {
        h ^= read_u32(rest).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = &rest[4..];
    }
    for &b in rest {
        h ^= (b as u64).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^= h >> 32;
    h
}

/// The stored hash of page content: XXH64, kept clear of the sentinels.
fn page_hash(data: &[u8]) -> u64 {
    let h = xxh64(data, 0);
    if h < SENTINELS {
        h + SENTINELS
    } else {
        h
    }
}

/// The hashes of one tracked piece of one mapping.
#[derive(Debug, Clone)]
struct Segment {
    start: u64,
    end: u64,
    hashes: Vec<u64>,
}

/// Tracks a process's writes by hashing its pages; see the
/// [module documentation](self).
pub struct HashTracker {
    pid: i32,
    page_size: u64,
    zero_hash: u64,
    pagemap: File,
    mem: File,
    segments: Vec<Segment>,
    /// Hashes of what was sent of pages outside `segments` (mapped after
    /// the last snapshot), until the next collect compares with them.
    sent_untracked: HashMap<u64, u64>,
    started: bool,
    buf: Vec<u8>,
}

impl HashTracker {
    /// Opens a tracker of `pid` (not started).
    pub fn open(pid: i32) -> Result<Self> {
        let open = |name: &str| {
            let path = format!("/proc/{pid}/{name}");
            File::open(&path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    DirtyError::ProcessGone { pid }
                } else {
                    io_err(format!("open {path}"))(e)
                }
            })
        };
        let page_size = sys::page_size();
        Ok(HashTracker {
            pid,
            page_size,
            zero_hash: page_hash(&vec![0u8; page_size as usize]),
            pagemap: open("pagemap")?,
            mem: open("mem")?,
            segments: Vec::new(),
            sent_untracked: HashMap::new(),
            started: false,
            buf: vec![0u8; (READ_CHUNK_PAGES * page_size) as usize],
        })
    }

    /// Hashes every page of `ranges` (split at mapping boundaries).
    fn snapshot(&mut self, maps: &ProcessMaps, ranges: &RangeSet) -> Result<Vec<Segment>> {
        let ps = self.page_size;
        let mut segments = Vec::new();
        for m in maps.entries() {
            for (s, e) in ranges.iter().filter(|&(s, e)| s < m.end && e > m.start) {
                let (s, e) = (s.max(m.start), e.min(m.end));
                let unpopulated = if m.is_anonymous() {
                    self.zero_hash
                } else {
                    UNPOPULATED_FILE
                };
                let mut hashes = vec![unpopulated; ((e - s) / ps) as usize];
                let mut at = s;
                while at < e {
                    let chunk_end = e.min(at + PAGEMAP_CHUNK_PAGES * ps);
                    let entries = match read_pagemap(&self.pagemap, at, chunk_end, ps) {
                        Ok(v) => v,
                        Err(err) if err.raw_os_error() == Some(libc::ESRCH) => {
                            return Err(DirtyError::ProcessGone { pid: self.pid })
                        }
                        Err(err) => {
                            return Err(io_err(format!("read /proc/{}/pagemap", self.pid))(err))
                        }
                    };
                    // Runs of populated pages, read in chunks.
                    let mut i = 0;
                    while i < entries.len() {
                        if !pagemap_populated(entries[i]) {
                            i += 1;
                            continue;
                        }
                        let mut j = i;
                        while j < entries.len()
                            && pagemap_populated(entries[j])
                            && ((j - i) as u64) < READ_CHUNK_PAGES
                        {
                            j += 1;
                        }
                        let first = ((at - s) / ps) as usize + i;
                        self.hash_run(
                            at + i as u64 * ps,
                            j - i,
                            &mut hashes[first..first + (j - i)],
                        );
                        i = j;
                    }
                    at = chunk_end;
                }
                segments.push(Segment {
                    start: s,
                    end: e,
                    hashes,
                });
            }
        }
        Ok(segments)
    }

    /// Hashes `n` pages from `addr` into `out`.
    fn hash_run(&mut self, addr: u64, n: usize, out: &mut [u64]) {
        let ps = self.page_size as usize;
        let buf = &mut self.buf[..n * ps];
        let got = sys::read_remote(self.pid, addr, buf).unwrap_or(0) / ps;
        for (k, h) in out.iter_mut().enumerate().take(got) {
            *h = page_hash(&buf[k * ps..(k + 1) * ps]);
        }
        // Pages process_vm_readv could not read (e.g. made PROT_NONE):
        // /proc/PID/mem reads them anyway.
        for (k, h) in out.iter_mut().enumerate().skip(got) {
            let page = &mut buf[k * ps..(k + 1) * ps];
            *h = match self.mem.read_exact_at(page, addr + (k * ps) as u64) {
                Ok(()) => page_hash(page),
                Err(_) => UNREADABLE,
            };
        }
    }

    fn maps(&self) -> Result<ProcessMaps> {
        ProcessMaps::read(self.pid)
    }

    fn tracked(&self) -> RangeSet {
        RangeSet::from_unsorted(self.segments.iter().map(|s| (s.start, s.end)))
    }
}

impl DirtyTracker for HashTracker {
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
        let maps = self.maps()?;
        let ranges = tracked_ranges(&maps, &RangeSet::new());
        self.segments = self.snapshot(&maps, &ranges)?;
        self.sent_untracked.clear();
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
        let ps = self.page_size;
        let maps = self.maps()?;
        let ranges = tracked_ranges(&maps, &self.tracked());
        let new = self.snapshot(&maps, &ranges)?;
        let old = std::mem::take(&mut self.segments);
        let sent_untracked = std::mem::take(&mut self.sent_untracked);
        let mut dirty = Vec::new();
        let mut cursor = 0;
        for seg in &new {
            for (i, &h) in seg.hashes.iter().enumerate() {
                let addr = seg.start + i as u64 * ps;
                while cursor < old.len() && old[cursor].end <= addr {
                    cursor += 1;
                }
                let before = old
                    .get(cursor)
                    .filter(|o| o.start <= addr)
                    .map(|o| o.hashes[((addr - o.start) / ps) as usize]);
                let changed = match before.or_else(|| sent_untracked.get(&addr).copied()) {
                    // Never seen nor sent: populated pages are new content.
                    None => h != self.zero_hash && h != UNPOPULATED_FILE,
                    Some(b) => b != h || h == UNREADABLE,
                };
                if changed {
                    dirty.push((addr, addr + ps));
                }
            }
        }
        self.segments = new;
        Ok(DirtySet::from_byte_ranges(self.pid, ps, dirty))
    }

    fn stop(&mut self) -> Result<()> {
        self.segments = Vec::new();
        self.sent_untracked = HashMap::new();
        self.started = false;
        Ok(())
    }

    fn record_sent(&mut self, addr: u64, data: &[u8]) {
        let ps = self.page_size;
        if data.len() as u64 != ps || !addr.is_multiple_of(ps) {
            return;
        }
        let i = self.segments.partition_point(|s| s.end <= addr);
        match self.segments.get_mut(i).filter(|s| s.start <= addr) {
            Some(seg) => seg.hashes[((addr - seg.start) / ps) as usize] = page_hash(data),
            // Sent from a mapping made after the last snapshot: the next
            // collect compares with it too (a page sent as B and zeroed
            // since must be sent again, although zero is no new content).
            None if self.started => {
                self.sent_untracked.insert(addr, page_hash(data));
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xxh64_reference_vectors() {
        assert_eq!(xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxh64(b"a", 0), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(xxh64(b"abc", 0), 0x44BC_2CF5_AD77_0999);
        assert_eq!(
            xxh64(b"Nobody inspects the spammish repetition", 0),
            0xFBCE_A83C_8A37_8BF1
        );
    }

    #[test]
    fn page_hash_sees_single_bit_flips() {
        let mut page = vec![0u8; 4096];
        let base = page_hash(&page);
        let mut seen = std::collections::HashSet::new();
        for byte in [0usize, 1, 7, 8, 31, 32, 2048, 4095] {
            for bit in 0..8 {
                page[byte] ^= 1 << bit;
                let h = page_hash(&page);
                assert_ne!(h, base);
                assert!(h >= SENTINELS);
                seen.insert(h);
                page[byte] ^= 1 << bit;
            }
        }
        assert_eq!(seen.len(), 64);
    }
}

//! The target's page store: the latest content of every page received.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes page addresses: one multiplication (Fibonacci hashing) instead
/// of SipHash, whose resistance to chosen keys buys nothing for addresses
/// the kernel hands out and costs a third of a lookup. A GiB is 262144
/// pages, each inserted in every round and looked up again in the downtime.
#[derive(Default)]
struct PageAddrHasher(u64);

impl Hasher for PageAddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, addr: u64) {
        // Page-aligned: the low 12 bits say nothing; the high bits of the
        // product are the well-mixed ones.
        self.0 = (addr >> 12)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(32);
    }
}

/// One process's pages by address; `None` is a zero page.
type ProcessPages = HashMap<u64, Option<Box<[u8]>>, BuildHasherDefault<PageAddrHasher>>;

/// Pages by (process, address).
#[derive(Default)]
pub struct PageStore {
    pages: HashMap<u32, ProcessPages>,
    bytes: u64,
}

impl PageStore {
    /// Records the content of page `addr` of process `pid` (`None`: all zero).
    pub fn insert(&mut self, pid: u32, addr: u64, data: Option<&[u8]>) {
        let slot = self.pages.entry(pid).or_default();
        let new = data.map(|d| d.to_vec().into_boxed_slice());
        if new.is_some() {
            self.bytes += 4096;
        }
        if let Some(Some(_)) = slot.insert(addr, new) {
            self.bytes -= 4096;
        }
    }

    /// The page at `addr` of `pid`: `None` if it never arrived,
    /// `Some(None)` for a zero page.
    pub fn get(&self, pid: u32, addr: u64) -> Option<Option<&[u8]>> {
        self.pages.get(&pid)?.get(&addr).map(|p| p.as_deref())
    }

    /// The first of the `count` pages from `start` of `pid` that never
    /// arrived, if any.
    pub fn first_missing(&self, pid: u32, start: u64, count: u64) -> Option<u64> {
        let pages = self.pages.get(&pid);
        (0..count)
            .map(|i| start + i * 4096)
            .find(|addr| pages.is_none_or(|p| !p.contains_key(addr)))
    }

    /// Number of pages held.
    pub fn len(&self) -> usize {
        self.pages.values().map(HashMap::len).sum()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of page data held (zero pages take none).
    pub fn data_bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_found_and_the_first_missing_one_named() {
        let mut store = PageStore::default();
        for i in 0..1000u64 {
            store.insert(7, 0x7f00_0000_0000 + i * 4096, Some(&[i as u8; 4096]));
        }
        store.insert(7, 0x7f00_0000_0000 + 1001 * 4096, None);
        assert_eq!(store.len(), 1001);
        assert_eq!(store.data_bytes(), 1000 * 4096);
        assert_eq!(
            store
                .get(7, 0x7f00_0000_0000 + 5 * 4096)
                .flatten()
                .map(|p| p[0]),
            Some(5)
        );
        assert_eq!(store.get(7, 0x7f00_0000_0000 + 1001 * 4096), Some(None));
        assert_eq!(store.first_missing(7, 0x7f00_0000_0000, 1000), None);
        assert_eq!(
            store.first_missing(7, 0x7f00_0000_0000, 1002),
            Some(0x7f00_0000_0000 + 1000 * 4096)
        );
        assert_eq!(store.first_missing(8, 0x1000, 1), Some(0x1000));
        // Replacing a page keeps the byte count right.
        store.insert(7, 0x7f00_0000_0000, None);
        assert_eq!(store.data_bytes(), 999 * 4096);
    }

    /// Property tests against a model: a map from (process, address) to
    /// the page's content.
    mod props {
        use std::collections::HashMap;

        use proptest::prelude::*;

        use super::*;

        /// Pages are at `base + 0..PAGES` pages, of processes 0..PIDS.
        const PAGES: u64 = 24;
        const PIDS: u32 = 3;

        fn base() -> impl Strategy<Value = u64> {
            prop_oneof![
                Just(0),
                Just(0x7f00_0000_0000),
                Just(u64::MAX - PAGES * 4096 + 1)
            ]
        }

        /// Inserts: process, page index, and the content (`None`: a zero
        /// page; else a page filled with that byte).
        fn ops() -> impl Strategy<Value = Vec<(u32, u64, Option<u8>)>> {
            prop::collection::vec((0..PIDS, 0..PAGES, any::<Option<u8>>()), 0..64)
        }

        proptest! {
            #[test]
            fn the_store_matches_the_model(base in base(), ops in ops(), probes in prop::collection::vec((0..PIDS + 1, 0..PAGES, 0..=PAGES), 0..16)) {
                let mut store = PageStore::default();
                let mut model: HashMap<(u32, u64), Option<u8>> = HashMap::new();
                for (pid, page, fill) in ops {
                    let addr = base + page * 4096;
                    store.insert(pid, addr, fill.map(|b| [b; 4096]).as_ref().map(|p| &p[..]));
                    model.insert((pid, addr), fill);
                    prop_assert_eq!(store.len(), model.len());
                    prop_assert_eq!(store.is_empty(), model.is_empty());
                    let data = model.values().filter(|v| v.is_some()).count() as u64 * 4096;
                    prop_assert_eq!(store.data_bytes(), data);
                }
                for pid in 0..PIDS + 1 {
                    for page in 0..PAGES {
                        let addr = base + page * 4096;
                        let got = store.get(pid, addr).map(|d| d.map(|p| (p.len(), p[0], p.iter().all(|b| *b == p[0]))));
                        let want = model.get(&(pid, addr)).map(|f| f.map(|b| (4096, b, true)));
                        prop_assert_eq!(got, want, "process {} page {:#x}", pid, addr);
                    }
                }
                for (pid, first, count) in probes {
                    let count = count.min(PAGES - first);
                    let start = base + first * 4096;
                    let want = (0..count)
                        .map(|i| start + i * 4096)
                        .find(|a| !model.contains_key(&(pid, *a)));
                    prop_assert_eq!(store.first_missing(pid, start, count), want);
                }
            }
        }
    }
}

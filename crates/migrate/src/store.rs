//! The target's page store: the latest content of every page received.

use std::collections::HashMap;

/// One process's pages by address; `None` is a zero page.
type ProcessPages = HashMap<u64, Option<Box<[u8]>>>;

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

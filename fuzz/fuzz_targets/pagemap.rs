//! `Pagemap::parse` on any pagemap image (the source's CRIU wrote it; it
//! crossed the wire in `CriuImages` messages), then the target's use of
//! the entries: looking each run up in a page store, as
//! `lazy::check_complete` does before a restore.
//!
//! Checks: no panic; errors are one line; a parsed image encodes and
//! parses back to the same pagemap.

#![no_main]

use libfuzzer_sys::fuzz_target;
use migrun_migrate::images::Pagemap;
use migrun_migrate::store::PageStore;

/// Pages of each run put in the store before the look-up, so that it
/// walks into the run.
const PRESENT: u64 = 4;

fuzz_target!(|data: &[u8]| {
    let map = match Pagemap::parse(data) {
        Ok(map) => map,
        Err(e) => {
            let line = e.to_string();
            assert!(
                !line.contains('\n'),
                "error of more than one line: {line:?}"
            );
            return;
        }
    };
    match Pagemap::parse(&map.encode()) {
        Ok(back) => assert_eq!(back, map),
        Err(e) => panic!("re-encoded {map:?} does not parse: {e}"),
    }
    let mut store = PageStore::default();
    for e in map.entries.iter().take(64) {
        for i in 0..PRESENT.min(e.nr_pages) {
            if let Some(addr) = e.vaddr.checked_add(i * 4096) {
                store.insert(1, addr, None);
            }
        }
    }
    for e in map.entries.iter().take(64) {
        let _ = store.first_missing(1, e.vaddr, e.nr_pages);
    }
});

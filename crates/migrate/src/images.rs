//! The two CRIU image files the target rewrites: `pagemap-N.img` and `pages-N.img`.
//!
//! The source dumps with `--lazy-pages`, so CRIU copies no anonymous memory:
//! its pagemap marks those runs `LAZY` and `pages-N.img` holds only the few
//! non-lazy pages. The target already has every page from pre-copy, so it
//! rewrites the pagemap with the runs marked `PRESENT` and writes a complete
//! `pages-N.img` from its page store, and CRIU restores an ordinary image.
//!
//! Image layout: two little-endian u32 magics (common, then pagemap), then
//! entries, each a u32 length and a protobuf message: first `pagemap_head
//! { pages_id = 1 }`, then `pagemap_entry { vaddr = 1; nr_pages = 2 (32-bit,
//! legacy); in_parent = 3; flags = 4; nr_pages = 5 (64-bit) }`.

use std::fs;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use crate::store::PageStore;
use crate::{MigrateError, Result};

/// CRIU's magic at the start of every non-inventory image.
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// CRIU's magic of pagemap images.
const PAGEMAP_MAGIC: u32 = 0x5608_4025;
/// Pages of the run are in the parent image.
pub const PE_PARENT: u32 = 1 << 0;
/// Pages of the run are served lazily.
pub const PE_LAZY: u32 = 1 << 1;
/// Pages of the run are in `pages-N.img`.
pub const PE_PRESENT: u32 = 1 << 2;
/// Page size of the images.
const PAGE: u64 = 4096;

/// One run of a pagemap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagemapEntry {
    /// Address of the first page.
    pub vaddr: u64,
    /// Number of pages.
    pub nr_pages: u64,
    /// PE_* flags.
    pub flags: u32,
}

/// A parsed pagemap image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pagemap {
    /// Id of the pages image (`pages-<id>.img`).
    pub pages_id: u32,
    /// The runs, in image order.
    pub entries: Vec<PagemapEntry>,
}

fn bad(msg: impl Into<String>) -> MigrateError {
    MigrateError::Images(msg.into())
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf
            .get(*pos)
            .ok_or_else(|| bad("truncated varint in pagemap"))?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Ok(value);
        }
    }
    Err(bad("varint too long in pagemap"))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Fields (number, varint value) of one protobuf message of varint fields.
fn fields(msg: &[u8]) -> Result<Vec<(u64, u64)>> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < msg.len() {
        let key = varint(msg, &mut pos)?;
        if key & 7 != 0 {
            return Err(bad(format!("unexpected wire type {} in pagemap", key & 7)));
        }
        out.push((key >> 3, varint(msg, &mut pos)?));
    }
    Ok(out)
}

impl Pagemap {
    /// Parses a pagemap image.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let u32_at = |pos: usize| -> Result<u32> {
            bytes
                .get(pos..pos + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .ok_or_else(|| bad("truncated pagemap image"))
        };
        if u32_at(0)? != IMG_COMMON_MAGIC || u32_at(4)? != PAGEMAP_MAGIC {
            return Err(bad("not a pagemap image (bad magic)"));
        }
        let mut pos = 8;
        let mut messages = Vec::new();
        while pos < bytes.len() {
            let len = u32_at(pos)? as usize;
            pos += 4;
            let msg = bytes
                .get(pos..pos + len)
                .ok_or_else(|| bad("truncated pagemap entry"))?;
            messages.push(msg);
            pos += len;
        }
        let (head, rest) = messages
            .split_first()
            .ok_or_else(|| bad("empty pagemap image"))?;
        let pages_id = fields(head)?
            .into_iter()
            .find(|(n, _)| *n == 1)
            .map(|(_, v)| v as u32)
            .ok_or_else(|| bad("pagemap head without pages_id"))?;
        let mut entries = Vec::with_capacity(rest.len());
        for msg in rest {
            let (mut vaddr, mut nr32, mut nr64, mut flags) = (None, 0u64, None, 0u32);
            for (n, v) in fields(msg)? {
                match n {
                    1 => vaddr = Some(v),
                    2 => nr32 = v,
                    4 => flags = v as u32,
                    5 => nr64 = Some(v),
                    _ => {}
                }
            }
            let vaddr = vaddr.ok_or_else(|| bad("pagemap entry without vaddr"))?;
            let nr_pages = nr64.unwrap_or(nr32);
            // Every page's address must exist: the target walks the runs
            // page by page.
            let last = nr_pages.saturating_sub(1).checked_mul(PAGE);
            if last.and_then(|l| vaddr.checked_add(l)).is_none() {
                return Err(bad(format!(
                    "pagemap entry of {nr_pages} pages at {vaddr:#x} runs past the end of the address space"
                )));
            }
            entries.push(PagemapEntry {
                vaddr,
                nr_pages,
                flags,
            });
        }
        Ok(Self { pages_id, entries })
    }

    /// Encodes the image.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
        out.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
        let mut push = |msg: Vec<u8>| {
            out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
            out.extend_from_slice(&msg);
        };
        let mut head = Vec::new();
        put_varint(&mut head, 1 << 3);
        put_varint(&mut head, u64::from(self.pages_id));
        push(head);
        for e in &self.entries {
            let mut m = Vec::new();
            put_varint(&mut m, 1 << 3);
            put_varint(&mut m, e.vaddr);
            put_varint(&mut m, 2 << 3);
            put_varint(&mut m, 0);
            put_varint(&mut m, 4 << 3);
            put_varint(&mut m, u64::from(e.flags));
            put_varint(&mut m, 5 << 3);
            put_varint(&mut m, e.nr_pages);
            push(m);
        }
        out
    }
}

/// Completes the images of process `pid` in `dir`: every lazy run of
/// `pagemap-<pid>.img` is filled from `store` and marked present.
/// Returns the number of pages filled in.
pub fn complete_process_images(dir: &Path, pid: u32, store: &PageStore) -> Result<u64> {
    let pagemap_path = dir.join(format!("pagemap-{pid}.img"));
    let bytes = fs::read(&pagemap_path)
        .map_err(|e| bad(format!("read {}: {e}", pagemap_path.display())))?;
    let mut map = Pagemap::parse(&bytes)?;
    if !map.entries.iter().any(|e| e.flags & PE_LAZY != 0) {
        return Ok(0);
    }
    let pages_path = dir.join(format!("pages-{}.img", map.pages_id));
    let mut old = match fs::File::open(&pages_path) {
        Ok(f) => Some(std::io::BufReader::new(f)),
        Err(_) => None,
    };
    let new_path = dir.join(format!("pages-{}.img.new", map.pages_id));
    let file = fs::File::create(&new_path)
        .map_err(|e| bad(format!("create {}: {e}", new_path.display())))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut filled = 0;
    let mut page = vec![0u8; PAGE as usize];
    let zero = vec![0u8; PAGE as usize];
    let io = |e: std::io::Error| bad(format!("write {}: {e}", new_path.display()));
    for entry in &mut map.entries {
        if entry.flags & PE_LAZY != 0 {
            for i in 0..entry.nr_pages {
                let addr = entry.vaddr + i * PAGE;
                let data = store
                    .get(pid, addr)
                    .ok_or_else(|| bad(format!("page {addr:#x} of process {pid} never arrived")))?;
                out.write_all(data.unwrap_or(&zero)).map_err(io)?;
                filled += 1;
            }
            entry.flags = (entry.flags & !PE_LAZY) | PE_PRESENT;
        } else if entry.flags & PE_PRESENT != 0 {
            let src = old
                .as_mut()
                .ok_or_else(|| bad(format!("{} is missing", pages_path.display())))?;
            for _ in 0..entry.nr_pages {
                src.read_exact(&mut page)
                    .map_err(|e| bad(format!("read {}: {e}", pages_path.display())))?;
                out.write_all(&page).map_err(io)?;
            }
        }
    }
    out.flush().map_err(io)?;
    drop(out);
    fs::rename(&new_path, &pages_path)
        .map_err(|e| bad(format!("rename {}: {e}", new_path.display())))?;
    fs::write(&pagemap_path, map.encode())
        .map_err(|e| bad(format!("write {}: {e}", pagemap_path.display())))?;
    Ok(filled)
}

/// The N of every `pagemap-N.img` in `dir`: the processes of the images.
pub fn pagemap_pids(dir: &Path) -> Result<Vec<u32>> {
    let entries = fs::read_dir(dir).map_err(|e| bad(format!("read {}: {e}", dir.display())))?;
    Ok(entries
        .flatten()
        .filter_map(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .strip_prefix("pagemap-")
                .and_then(|r| r.strip_suffix(".img"))
                .and_then(|p| p.parse::<u32>().ok())
        })
        .collect())
}

/// Completes the images of every process in `dir` (each `pagemap-N.img`).
pub fn complete_images(dir: &Path, store: &PageStore) -> Result<u64> {
    let mut total = 0;
    for pid in pagemap_pids(dir)? {
        total += complete_process_images(dir, pid, store)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_round_trip() {
        let map = Pagemap {
            pages_id: 3,
            entries: vec![
                PagemapEntry {
                    vaddr: 0x40_1000,
                    nr_pages: 2,
                    flags: PE_PRESENT,
                },
                PagemapEntry {
                    vaddr: 0x7f00_0000_0000,
                    nr_pages: 300,
                    flags: PE_LAZY,
                },
            ],
        };
        assert_eq!(Pagemap::parse(&map.encode()).expect("parse"), map);
        assert!(Pagemap::parse(b"junkjunkjunk").is_err());
    }

    #[test]
    fn runs_past_the_end_of_the_address_space_are_refused() {
        let image = |vaddr, nr_pages| {
            Pagemap {
                pages_id: 1,
                entries: vec![PagemapEntry {
                    vaddr,
                    nr_pages,
                    flags: PE_LAZY,
                }],
            }
            .encode()
        };
        // Found by the pagemap fuzz target: the page store's look-up of
        // such a run overflowed (a panic in debug builds).
        assert!(Pagemap::parse(&image(u64::MAX - 4095, 2)).is_err());
        assert!(Pagemap::parse(&image(0x1000, 1 << 52)).is_err());
        assert!(Pagemap::parse(&image(0, u64::MAX)).is_err());
        // The whole address space, its last page, nothing at its end.
        assert!(Pagemap::parse(&image(0, 1 << 52)).is_ok());
        assert!(Pagemap::parse(&image(u64::MAX - 4095, 1)).is_ok());
        assert!(Pagemap::parse(&image(u64::MAX, 0)).is_ok());
    }

    #[test]
    fn lazy_runs_are_filled_from_the_store_in_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let map = Pagemap {
            pages_id: 1,
            entries: vec![
                PagemapEntry {
                    vaddr: 0x1000,
                    nr_pages: 1,
                    flags: PE_PRESENT,
                },
                PagemapEntry {
                    vaddr: 0x10000,
                    nr_pages: 2,
                    flags: PE_LAZY,
                },
                PagemapEntry {
                    vaddr: 0x20000,
                    nr_pages: 1,
                    flags: PE_PRESENT,
                },
            ],
        };
        fs::write(dir.path().join("pagemap-1.img"), map.encode()).expect("w");
        let mut old = vec![1u8; 4096];
        old.extend(vec![4u8; 4096]);
        fs::write(dir.path().join("pages-1.img"), &old).expect("w");
        let mut store = PageStore::default();
        store.insert(1, 0x10000, Some(&[2u8; 4096]));
        store.insert(1, 0x11000, None);
        assert_eq!(complete_images(dir.path(), &store).expect("complete"), 2);
        let pages = fs::read(dir.path().join("pages-1.img")).expect("r");
        assert_eq!(pages.len(), 4 * 4096);
        assert!(pages[..4096].iter().all(|b| *b == 1));
        assert!(pages[4096..8192].iter().all(|b| *b == 2));
        assert!(pages[8192..12288].iter().all(|b| *b == 0));
        assert!(pages[12288..].iter().all(|b| *b == 4));
        let map =
            Pagemap::parse(&fs::read(dir.path().join("pagemap-1.img")).expect("r")).expect("p");
        assert!(map.entries.iter().all(|e| e.flags == PE_PRESENT));
        // A page that never arrived is an error, not silent zeroes.
        let mut partial = PageStore::default();
        partial.insert(2, 0x10000, None);
        fs::write(
            dir.path().join("pagemap-2.img"),
            Pagemap {
                pages_id: 2,
                entries: vec![PagemapEntry {
                    vaddr: 0x10000,
                    nr_pages: 2,
                    flags: PE_LAZY,
                }],
            }
            .encode(),
        )
        .expect("w");
        assert!(complete_process_images(dir.path(), 2, &partial).is_err());
    }
}

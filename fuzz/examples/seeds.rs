//! Writes the seed inputs of the fuzz targets into `corpus/<target>/`
//! (`seed-*` files; existing ones are overwritten): one of each message,
//! the same sealed in frames, pagemap images and page-server requests.
//! Run from `fuzz/`: `cargo run --example seeds`, then minimise the
//! corpus (README.md).

use std::fs;
use std::path::Path;

use migrun_migrate::images::{Pagemap, PagemapEntry, PE_LAZY, PE_PRESENT};
use migrun_wire::{Bytes, MemoryTotals, Message, PageRun, RoundStats, TreeId, PAGE_SIZE};

type Error = Box<dyn std::error::Error>;

fn messages() -> Vec<(&'static str, Message)> {
    let mut page = vec![0u8; PAGE_SIZE];
    page[17] = 5;
    vec![
        (
            "hello",
            Message::Hello {
                agent: "migrun 0.1.0".into(),
            },
        ),
        (
            "start",
            Message::Start {
                container_id: "c1".into(),
                spec_json: r#"{"ociVersion":"1.0.2"}"#.into(),
                memory: MemoryTotals {
                    processes: 2,
                    mapped_bytes: 1 << 20,
                    resident_pages: 64,
                },
            },
        ),
        (
            "pages",
            Message::Pages(PageRun {
                pid: 7,
                addr: 0x7f00_0000_0000,
                zero_pages: vec![0, 2],
                data: Bytes::from(page),
            }),
        ),
        (
            "file-chunk",
            Message::FileChunk {
                path: "etc/hosts".into(),
                offset: 4096,
                data: Bytes::from_static(b"127.0.0.1 localhost\n"),
            },
        ),
        (
            "file-begin",
            Message::FileBegin {
                tree: TreeId::Rootfs,
                path: "etc/hosts".into(),
                size: 4116,
            },
        ),
        (
            "file-begin-layer",
            Message::FileBegin {
                tree: TreeId::Layer(format!("sha256:{}", "ab".repeat(32))),
                path: "bin/sh".into(),
                size: 1 << 20,
            },
        ),
        (
            "manifest",
            Message::Manifest {
                tree: TreeId::Rootfs,
                data: Bytes::from_static(br#"{"etc":{"kind":"Dir","mode":493,"uid":0,"gid":0,"size":0,"mtime":[1,0],"ino":2}}"#),
                last: true,
            },
        ),
        (
            "image-chunk",
            Message::ImageChunk {
                offset: 0,
                data: Bytes::from_static(b"manifest.json"),
            },
        ),
        ("image-done", Message::ImageDone { size: 13 }),
        ("frozen", Message::Frozen),
        (
            "round-done",
            Message::RoundDone {
                round: 3,
                stats: RoundStats {
                    pages_sent: 10,
                    zero_pages: 2,
                    bytes_sent: 40960,
                    dirty_pages: 1,
                    duration_ms: 12,
                },
            },
        ),
        (
            "criu-images",
            Message::CriuImages {
                name: "core-1.img".into(),
                offset: 0,
                data: Bytes::from_static(b"\x19\x43\x56\x54"),
            },
        ),
        ("commit", Message::Commit),
        ("ack", Message::Ack),
        (
            "abort",
            Message::Abort {
                reason: "operator".into(),
            },
        ),
        (
            "error",
            Message::Error {
                message: "restore failed".into(),
            },
        ),
        ("done", Message::Done),
        (
            "layers-wanted",
            Message::LayersWanted {
                digests: vec!["sha256:ab".into(), "sha256:cd".into()],
            },
        ),
    ]
}

fn encode(msg: &Message) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    msg.encode(&mut out)?;
    Ok(out)
}

/// A `frame` script item: a regular frame carrying `plain`.
fn frame_item(plain: &[u8]) -> Vec<u8> {
    let mut item = vec![0u8];
    item.extend_from_slice(&(plain.len() as u16).to_le_bytes());
    item.extend_from_slice(plain);
    item
}

/// A page-server request (`struct page_server_iov`, x86-64 layout).
fn iov(cmd: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> Vec<u8> {
    let mut b = vec![0u8; 32];
    b[0..4].copy_from_slice(&cmd.to_le_bytes());
    b[8..16].copy_from_slice(&nr_pages.to_le_bytes());
    b[16..24].copy_from_slice(&vaddr.to_le_bytes());
    b[24..32].copy_from_slice(&dst_id.to_le_bytes());
    b
}

fn write(target: &str, name: &str, bytes: &[u8]) -> Result<(), Error> {
    let dir = Path::new("corpus").join(target);
    fs::create_dir_all(&dir)?;
    fs::write(dir.join(format!("seed-{name}")), bytes)?;
    Ok(())
}

fn main() -> Result<(), Error> {
    if !Path::new("fuzz_targets").is_dir() {
        return Err("run this from the fuzz/ directory".into());
    }
    let mut all_chacha = vec![2u8];
    for (name, msg) in messages() {
        let plain = encode(&msg)?;
        write("message", name, &plain)?;
        // Sealed, with ChaCha20-Poly1305 and with AES-256-GCM.
        let item = frame_item(&plain);
        write(
            "frame",
            &format!("sealed-{name}"),
            &[&[3u8][..], &item].concat(),
        )?;
        all_chacha.extend_from_slice(&item);
    }
    write("frame", "sealed-all", &all_chacha)?;
    // Sealed, then: an unknown type, a forged length, a dropped frame, a
    // flipped byte, garbage.
    let ack = encode(&Message::Ack)?;
    let mut odd = vec![2u8];
    odd.extend(frame_item(&[200, 1, 2]));
    odd.extend(frame_item(&ack));
    odd.extend([1u8, 0, 0, 0, 0x20, 1, 0, ack[0]]);
    odd.extend([3u8, 1, 0, ack[0]]);
    odd.extend([4u8, 1, 0, ack[0], 3, 0]);
    odd.extend([2u8, 3, 0, 0, 0]);
    write("frame", "sealed-odd", &odd)?;
    // Raw streams: too large, too short, cut short, unauthentic.
    write("frame", "raw-too-large", &[0, 0xff, 0xff, 0xff, 0xff])?;
    write("frame", "raw-too-short", &[0, 0, 0, 0, 16])?;
    write("frame", "raw-cut-short", &[0, 0, 0, 0, 40, 1, 2, 3])?;
    write(
        "frame",
        "raw-unauthentic",
        &[[1u8, 0, 0, 0, 17].as_slice(), &[7; 17]].concat(),
    )?;

    let entry = |vaddr, nr_pages, flags| PagemapEntry {
        vaddr,
        nr_pages,
        flags,
    };
    let maps = [
        (
            "lazy-and-present",
            Pagemap {
                pages_id: 3,
                entries: vec![
                    entry(0x40_1000, 2, PE_PRESENT),
                    entry(0x7f00_0000_0000, 300, PE_LAZY),
                ],
            },
        ),
        (
            "empty",
            Pagemap {
                pages_id: 1,
                entries: vec![],
            },
        ),
    ];
    for (name, map) in maps {
        write("pagemap", name, &map.encode())?;
    }

    write(
        "lazy_request",
        "get-close",
        &[iov(7, 2, 0x1000, 1), iov(0x1023, 0, 0, 0)].concat(),
    )?;
    write(
        "lazy_request",
        "get-force-close",
        &[
            iov(7 | 2 << 16, 1, 0x7fff_ffff_f000, 2),
            iov(0x1024, 0, 0, 0),
        ]
        .concat(),
    )?;
    write("lazy_request", "unknown", &iov(6, 1, 0x1000, 1))?;
    Ok(())
}

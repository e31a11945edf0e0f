//! Helpers for the integration tests: a man in the middle on 127.0.0.1.

#![allow(dead_code, missing_docs)]

use std::net::SocketAddr;

use migrun_wire::{Bytes, MemoryTotals, Message, PageRun, RoundStats, TreeId, PAGE_SIZE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes the client sends during the handshake: hello (with its ephemeral
/// X25519 key) and proof.
pub const CLIENT_HANDSHAKE_LEN: usize = 74 + 32;

/// What the man in the middle does to the client-to-server byte stream.
#[derive(Clone, Debug)]
pub enum Mitm {
    /// Forwards everything unchanged.
    Nothing,
    /// Flips the lowest bit of the byte at this offset.
    FlipByte(usize),
    /// Overwrites the bytes from this offset.
    Overwrite(usize, Vec<u8>),
    /// Forwards this many bytes, then closes both connections.
    CutAfter(usize),
    /// After forwarding up to `end`, sends the bytes `start..end` again.
    Replay { start: usize, end: usize },
}

/// Listens on 127.0.0.1 and relays one connection to `server`, applying `mitm`.
pub async fn proxy(server: SocketAddr, mitm: Mitm) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let Ok((client, _)) = listener.accept().await else {
            return;
        };
        let Ok(upstream) = TcpStream::connect(server).await else {
            return;
        };
        let (mut cr, mut cw) = client.into_split();
        let (mut ur, mut uw) = upstream.into_split();
        let back = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut ur, &mut cw).await;
            let _ = cw.shutdown().await;
            cw
        });
        let mut seen: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 4096];
        'relay: loop {
            let n = match cr.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut out = Vec::with_capacity(n);
            for &b in &chunk[..n] {
                let at = seen.len();
                let mut b = b;
                match &mitm {
                    Mitm::FlipByte(i) if *i == at => b ^= 1,
                    Mitm::Overwrite(i, bytes) if at >= *i && at < i + bytes.len() => {
                        b = bytes[at - i];
                    }
                    _ => {}
                }
                seen.push(b);
                out.push(b);
                match &mitm {
                    Mitm::CutAfter(limit) if seen.len() == *limit => {
                        let _ = uw.write_all(&out).await;
                        break 'relay;
                    }
                    Mitm::Replay { start, end } if seen.len() == *end => {
                        out.extend_from_slice(&seen[*start..*end]);
                    }
                    _ => {}
                }
            }
            if uw.write_all(&out).await.is_err() {
                break;
            }
        }
        if let Mitm::CutAfter(_) = mitm {
            // Close both connections at once, as a crashed host would.
            back.abort();
            drop(uw);
            drop(cr);
        } else {
            let _ = uw.shutdown().await;
            let _ = back.await;
        }
    });
    Ok(addr)
}

/// One of every message, with payloads.
pub fn all_messages() -> Vec<Message> {
    let mut data = Vec::with_capacity(3 * PAGE_SIZE);
    for i in 0..3 * PAGE_SIZE {
        data.push((i % 251) as u8 | 1);
    }
    let msgs = vec![
        Message::Hello {
            agent: "migrun 0.1.0 (test)".into(),
        },
        Message::Start {
            container_id: "web-1".into(),
            spec_json: r#"{"ociVersion":"1.2.0","process":{"args":["sh"]}}"#.into(),
            memory: MemoryTotals {
                processes: 3,
                mapped_bytes: 1 << 33,
                resident_pages: 12345,
            },
        },
        Message::Pages(PageRun {
            pid: 42,
            addr: 0x7fff_0000_0000,
            zero_pages: vec![1, 4],
            data: Bytes::from(data.clone()),
        }),
        Message::FileChunk {
            path: "upper/etc/hostname".into(),
            offset: 1 << 40,
            data: Bytes::from(vec![0xee; 256 << 10]),
        },
        Message::FileBegin {
            tree: TreeId::Rootfs,
            path: "etc/hostname".into(),
            size: 9,
        },
        Message::FileBegin {
            tree: TreeId::Layer(format!("sha256:{}", "cd".repeat(32))),
            path: "bin/sh".into(),
            size: 1 << 40,
        },
        Message::Manifest {
            tree: TreeId::Rootfs,
            data: Bytes::from_static(b"{}"),
            last: true,
        },
        Message::ImageChunk {
            offset: 3,
            data: Bytes::from_static(b"tar"),
        },
        Message::ImageDone { size: 6 },
        Message::Frozen,
        Message::RoundDone {
            round: 7,
            stats: RoundStats {
                pages_sent: 1,
                zero_pages: 2,
                bytes_sent: 3,
                dirty_pages: 4,
                duration_ms: 5,
            },
        },
        Message::CriuImages {
            name: "core-1.img".into(),
            offset: 0,
            data: Bytes::from(data),
        },
        Message::Commit,
        Message::Ack,
        Message::Abort {
            reason: "operator pressed ^C".into(),
        },
        Message::Error {
            message: "restore failed: ünïcödé".into(),
        },
        Message::Done,
        Message::LayersWanted {
            digests: vec![format!("sha256:{}", "ab".repeat(32)), "sha256:00".into()],
        },
        Message::LayersWanted { digests: vec![] },
        Message::Heartbeat,
        Message::Recover {
            container: "c1".into(),
            step: "acknowledged".into(),
            whole: true,
        },
        Message::Pages(PageRun::default()),
        Message::FileChunk {
            path: String::new(),
            offset: 0,
            data: Bytes::new(),
        },
    ];
    // Fails to compile when a message is added, so this list gets it too.
    let mut seen = [false; 19];
    for m in &msgs {
        let i = match m {
            Message::Hello { .. } => 0,
            Message::Start { .. } => 1,
            Message::Pages(_) => 2,
            Message::FileChunk { .. } => 3,
            Message::FileBegin { .. } => 4,
            Message::Manifest { .. } => 5,
            Message::ImageChunk { .. } => 14,
            Message::ImageDone { .. } => 15,
            Message::Frozen => 16,
            Message::RoundDone { .. } => 6,
            Message::CriuImages { .. } => 7,
            Message::Commit => 8,
            Message::Ack => 9,
            Message::Abort { .. } => 10,
            Message::Error { .. } => 11,
            Message::Done => 12,
            Message::LayersWanted { .. } => 13,
            Message::Heartbeat => 17,
            Message::Recover { .. } => 18,
        };
        seen[i] = true;
    }
    assert!(
        seen.iter().all(|&s| s),
        "all_messages misses a message type"
    );
    msgs
}

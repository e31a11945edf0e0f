//! The protocol over real TCP connections on 127.0.0.1.

#![allow(missing_docs)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{all_messages, proxy, Mitm, CLIENT_HANDSHAKE_LEN};
use migrun_wire::{
    accept_with, connect, connect_with, establish, pair, pair_with, Bytes, Channel, Cipher, Config,
    Key, Message, Role, WireError, PAGE_SIZE, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Every test is bounded, so a hang fails instead of blocking CI.
const LIMIT: Duration = Duration::from_secs(30);

async fn server(
    key: Key,
    config: Config,
) -> std::io::Result<(SocketAddr, JoinHandle<migrun_wire::Result<Channel>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move { accept_with(&listener, &key, &config).await });
    Ok((addr, task))
}

fn key(b: u8) -> Key {
    Key::from_bytes([b; 32])
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("test hung for {LIMIT:?}"),
    }
}

#[tokio::test]
async fn every_message_round_trips_over_tcp() -> TestResult {
    for cipher in [Cipher::ChaCha20Poly1305, Cipher::Aes256Gcm] {
        let config = Config::default().with_cipher(Some(cipher));
        let (addr, server) = server(key(1), config.clone()).await?;
        let mut client = bounded(connect_with(addr, &key(1), &config)).await?;
        let mut server = bounded(server).await??;
        assert_eq!(client.info().cipher, cipher);
        assert_eq!(server.info().cipher, cipher);
        assert_eq!(client.info().role, Role::Client);
        assert_eq!(server.info().role, Role::Server);
        assert!(server.info().peer_addr.is_some());

        let msgs = all_messages();
        let to_send = msgs.clone();
        let sending = tokio::spawn(async move {
            for m in &to_send {
                client.send(m).await?;
            }
            Ok::<_, WireError>(client)
        });
        for m in &msgs {
            let got = bounded(server.recv()).await?;
            assert_eq!(&got, m, "{} did not round-trip", m.kind());
        }
        let mut client = sending.await??;
        // And back the other way.
        for m in &msgs {
            server.send(m).await?;
            assert_eq!(&bounded(client.recv()).await?, m);
        }
        // Both sides count the same bytes, more than the payloads.
        let payload: usize = msgs.iter().map(Message::payload_len).sum();
        let (c, s) = (client.traffic(), server.traffic());
        assert_eq!(c.bytes_sent(), s.bytes_received());
        assert_eq!(s.bytes_sent(), c.bytes_received());
        assert!(c.bytes_sent() > payload as u64);
        assert_eq!(c.frames_sent(), msgs.len() as u64);
        assert_eq!(s.frames_received(), msgs.len() as u64);
        assert_eq!(c.bytes_total(), c.bytes_sent() + c.bytes_received());

        // A clean close is reported as such.
        client.shutdown().await?;
        assert!(matches!(
            bounded(server.recv()).await,
            Err(WireError::Closed)
        ));
    }
    Ok(())
}

#[tokio::test]
async fn raw_pages_arrive_with_zero_markers() -> TestResult {
    let (mut a, mut b) = pair(&key(2)).await?;
    let mut raw = vec![0u8; 8 * PAGE_SIZE];
    raw[3 * PAGE_SIZE] = 1;
    raw[7 * PAGE_SIZE + 4095] = 2;
    let sum = a.send_pages(9, 0x10_0000, &raw).await?;
    assert_eq!((sum.data_pages, sum.zero_pages), (2, 6));
    let Message::Pages(run) = bounded(b.recv()).await? else {
        panic!("expected pages");
    };
    assert_eq!((run.pid, run.addr, run.page_count()), (9, 0x10_0000, 8));
    assert_eq!(run.zero_pages, vec![0, 1, 2, 4, 5, 6]);
    let rebuilt: Vec<u8> = run
        .pages()
        .flat_map(|(_, d)| d.map_or_else(|| vec![0u8; PAGE_SIZE], <[u8]>::to_vec))
        .collect();
    assert_eq!(rebuilt, raw);
    // Misaligned input is refused and leaves the channel usable.
    assert!(matches!(
        a.send_pages(9, 0x10_0001, &raw).await,
        Err(WireError::InvalidMessage(_))
    ));
    assert!(matches!(
        a.send_pages(9, 0x10_0000, &raw[..100]).await,
        Err(WireError::InvalidMessage(_))
    ));
    a.send(&Message::Ack).await?;
    assert_eq!(bounded(b.recv()).await?, Message::Ack);
    Ok(())
}

#[tokio::test]
async fn wrong_key_fails_on_both_sides() -> TestResult {
    let (addr, server) = server(key(1), Config::default()).await?;
    let client = bounded(connect(addr, &key(2))).await;
    let server = bounded(server).await?;
    for (side, result) in [("client", client), ("server", server)] {
        match result {
            Err(e @ WireError::AuthFailed) => {
                assert_eq!(e.to_string(), "peer failed authentication: wrong key?");
                assert!(e.is_auth_failure());
            }
            other => panic!("{side}: expected an authentication error, got {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn tampered_handshake_fails_authentication() -> TestResult {
    // Flip a bit of the client's nonce, or of its ephemeral public key, on
    // the way: the transcripts (and the X25519 results) differ.
    for at in [20, 50] {
        let (addr, server) = server(key(1), Config::default()).await?;
        let via = proxy(addr, Mitm::FlipByte(at)).await?;
        let client = bounded(connect(via, &key(1))).await;
        let server = bounded(server).await?;
        assert!(matches!(client, Err(WireError::AuthFailed)), "{client:?}");
        assert!(matches!(server, Err(WireError::AuthFailed)), "{server:?}");
    }
    Ok(())
}

#[tokio::test]
async fn version_mismatch_is_reported_on_both_sides() -> TestResult {
    let (addr, server) = server(key(1), Config::default()).await?;
    let mut newer = Config::default();
    let (ours, theirs) = (PROTOCOL_VERSION + 1, PROTOCOL_VERSION);
    newer.protocol_version = ours;
    let client = bounded(connect_with(addr, &key(1), &newer)).await;
    let server = bounded(server).await?;
    match client {
        Err(e @ WireError::VersionMismatch { .. }) => {
            assert!(e.to_string().starts_with(&format!(
                "protocol version mismatch: we speak version {ours}, peer speaks version {theirs}"
            )));
        }
        other => panic!("client: {other:?}"),
    }
    assert!(
        matches!(
            server,
            Err(WireError::VersionMismatch { ours: o, theirs: t }) if o == theirs && t == ours
        ),
        "server: {server:?}"
    );
    Ok(())
}

#[tokio::test]
async fn version_2_peer_gets_a_version_mismatch() -> TestResult {
    // A peer of protocol version 2 (hello without an ephemeral key, 42
    // bytes) reads our version first, and we read its version first.
    const { assert!(PROTOCOL_VERSION >= 3) };
    let (addr, server) = server(key(1), Config::default()).await?;
    let mut old = tokio::net::TcpStream::connect(addr).await?;
    let mut hello = b"MIGRUN".to_vec();
    hello.extend_from_slice(&2u16.to_be_bytes());
    hello.extend_from_slice(&[1, 1]);
    hello.extend_from_slice(&[9; 32]);
    old.write_all(&hello).await?;
    let mut start = [0u8; 8];
    bounded(old.read_exact(&mut start)).await?;
    assert_eq!(&start[..6], b"MIGRUN");
    assert_eq!(u16::from_be_bytes([start[6], start[7]]), PROTOCOL_VERSION);
    let got = bounded(server).await?;
    assert!(
        matches!(
            got,
            Err(WireError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: 2
            })
        ),
        "{got:?}"
    );
    Ok(())
}

#[tokio::test]
async fn not_a_migrun_peer_is_refused() -> TestResult {
    let (addr, server) = server(key(1), Config::default()).await?;
    let mut raw = tokio::net::TcpStream::connect(addr).await?;
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let result = bounded(server).await?;
    assert!(matches!(result, Err(WireError::BadMagic)), "{result:?}");
    Ok(())
}

#[tokio::test]
async fn same_roles_are_refused() -> TestResult {
    let (a, b) = tokio::io::duplex(4096);
    let config = Config::default();
    let k = key(1);
    let (x, y) = tokio::join!(
        establish(a, Role::Client, &k, &config),
        establish(b, Role::Client, &k, &config)
    );
    assert!(matches!(x, Err(WireError::SameRole(_))), "{x:?}");
    assert!(matches!(y, Err(WireError::SameRole(_))), "{y:?}");
    Ok(())
}

#[tokio::test]
async fn tampered_frame_is_an_error() -> TestResult {
    // One bit inside the first frame's ciphertext.
    let (addr, server) = server(key(1), Config::default()).await?;
    let via = proxy(addr, Mitm::FlipByte(CLIENT_HANDSHAKE_LEN + 4 + 3)).await?;
    let mut client = bounded(connect(via, &key(1))).await?;
    let mut server = bounded(server).await??;
    client
        .send(&Message::Abort {
            reason: "nothing".into(),
        })
        .await?;
    let got = bounded(server.recv()).await;
    assert!(matches!(got, Err(WireError::Decrypt)), "{got:?}");
    // The connection stays failed.
    assert!(matches!(
        bounded(server.recv()).await,
        Err(WireError::Broken)
    ));
    Ok(())
}

#[tokio::test]
async fn tampered_tag_and_length_are_errors() -> TestResult {
    // The last byte of the first frame (its tag).
    let frame = 4 + 1 + TAG;
    let (addr, server) = server(key(1), Config::default()).await?;
    let via = proxy(addr, Mitm::FlipByte(CLIENT_HANDSHAKE_LEN + frame - 1)).await?;
    let mut client = bounded(connect(via, &key(1))).await?;
    let mut server = bounded(server).await??;
    client.send(&Message::Ack).await?;
    assert!(matches!(
        bounded(server.recv()).await,
        Err(WireError::Decrypt)
    ));

    // A length prefix one longer: the frame no longer authenticates.
    let (addr, server) = server_pair().await?;
    let via = proxy(addr, Mitm::FlipByte(CLIENT_HANDSHAKE_LEN + 3)).await?;
    let mut client = bounded(connect(via, &key(1))).await?;
    let mut server = bounded(server).await??;
    let abort = Message::Abort { reason: "x".into() };
    // 1 + 4 + 1 bytes of message and the tag: 22, which the flip makes 23.
    client.send(&abort).await?;
    client.send(&abort).await?;
    assert!(matches!(
        bounded(server.recv()).await,
        Err(WireError::Decrypt)
    ));
    Ok(())
}

const TAG: usize = migrun_wire::TAG_LEN;

async fn server_pair() -> std::io::Result<(SocketAddr, JoinHandle<migrun_wire::Result<Channel>>)> {
    server(key(1), Config::default()).await
}

#[tokio::test]
async fn replayed_frame_is_an_error() -> TestResult {
    let frame = 4 + 1 + TAG; // an Ack
    let start = CLIENT_HANDSHAKE_LEN;
    let (addr, server) = server_pair().await?;
    let via = proxy(
        addr,
        Mitm::Replay {
            start,
            end: start + frame,
        },
    )
    .await?;
    let mut client = bounded(connect(via, &key(1))).await?;
    let mut server = bounded(server).await??;
    client.send(&Message::Ack).await?;
    assert_eq!(bounded(server.recv()).await?, Message::Ack);
    let replayed = bounded(server.recv()).await;
    assert!(matches!(replayed, Err(WireError::Decrypt)), "{replayed:?}");
    Ok(())
}

#[tokio::test]
async fn peer_disconnecting_mid_frame_is_a_clear_error() -> TestResult {
    let (addr, server) = server_pair().await?;
    let via = proxy(addr, Mitm::CutAfter(CLIENT_HANDSHAKE_LEN + 4 + 1000)).await?;
    let mut client = bounded(connect(via, &key(1))).await?;
    let mut server = bounded(server).await??;
    // Wait for ever, so only the disconnect can end the receive.
    server.set_recv_timeout(None);
    let receiving = tokio::spawn(async move { server.recv().await });
    let _ = client
        .send(&Message::FileChunk {
            path: "big".into(),
            offset: 0,
            data: Bytes::from(vec![7u8; 64 << 10]),
        })
        .await;
    let got = bounded(receiving).await?;
    match got {
        Err(e @ WireError::Truncated("frame")) => {
            assert_eq!(e.to_string(), "peer disconnected in the middle of a frame");
        }
        other => panic!("expected a truncated frame, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn peer_disconnecting_mid_handshake_is_a_clear_error() -> TestResult {
    let (addr, server) = server_pair().await?;
    let mut raw = tokio::net::TcpStream::connect(addr).await?;
    let mut hello = b"MIGRUN".to_vec();
    hello.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    hello.push(1);
    raw.write_all(&hello).await?;
    drop(raw);
    let got = bounded(server).await?;
    assert!(
        matches!(got, Err(WireError::Truncated("handshake"))),
        "{got:?}"
    );
    Ok(())
}

#[tokio::test]
async fn silent_peer_hits_the_handshake_timeout() -> TestResult {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let silent = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
        Ok::<_, std::io::Error>(())
    });
    let config = Config::default().with_handshake_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let got = bounded(connect_with(addr, &key(1), &config)).await;
    assert!(
        matches!(got, Err(WireError::HandshakeTimeout(_))),
        "{got:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    silent.abort();
    Ok(())
}

#[tokio::test]
async fn silent_peer_hits_the_receive_timeout() -> TestResult {
    let config = Config::default().with_recv_timeout(Some(Duration::from_millis(200)));
    let (_a, mut b) = pair_with(&key(1), &config).await?;
    let start = Instant::now();
    let got = bounded(b.recv()).await;
    match got {
        Err(e @ WireError::RecvTimeout(_)) => {
            assert!(e.to_string().contains("receive time-out"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(start.elapsed() >= Duration::from_millis(190));
    Ok(())
}

#[tokio::test]
async fn connection_refused_is_a_clear_error() -> TestResult {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    drop(listener);
    let got = bounded(connect(addr, &key(1))).await;
    match got {
        Err(e @ WireError::Connect { .. }) => {
            assert!(e
                .to_string()
                .starts_with(&format!("cannot connect to {addr}")))
        }
        other => panic!("{other:?}"),
    }
    Ok(())
}

/// Sends `frames` file chunks of `size` bytes from `tx` to `rx` and returns
/// how long it took until the last arrived.
async fn timed_transfer(
    mut tx: Channel,
    mut rx: Channel,
    frames: u64,
    size: usize,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let chunk = Bytes::from(vec![1u8; size]);
    let receiving = tokio::spawn(async move {
        for _ in 0..frames {
            rx.recv().await?;
        }
        Ok::<_, WireError>(rx)
    });
    let start = Instant::now();
    for i in 0..frames {
        tx.send(&Message::FileChunk {
            path: "f".into(),
            offset: i * size as u64,
            data: chunk.clone(),
        })
        .await?;
    }
    bounded(receiving).await??;
    Ok(start.elapsed())
}

#[tokio::test]
async fn bandwidth_cap_limits_throughput() -> TestResult {
    // Small enough that unoptimised (debug) crypto takes well under the
    // 0.41 s the cap imposes: 200 KiB at 4 Mbit/s (500 kB/s).
    let (tx, rx) = pair(&key(3)).await?;
    // Set at run time, through the handle.
    let cap = tx.bandwidth();
    cap.set_mbit(Some(4));
    assert_eq!(cap.bits_per_sec(), Some(4_000_000));
    let took = timed_transfer(tx, rx, 4, 50 << 10).await?;
    assert!(took >= Duration::from_millis(350), "took only {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    Ok(())
}

/// The numbers; 4 MiB of crypto is too slow to tell in a debug build.
#[tokio::test]
#[cfg_attr(debug_assertions, ignore = "needs a release build")]
async fn bandwidth_cap_of_80_mbit_over_tcp() -> TestResult {
    let config = Config::default().with_bandwidth_mbit(Some(80));
    let (addr, server) = server(key(3), Config::default()).await?;
    let tx = bounded(connect_with(addr, &key(3), &config)).await?;
    let rx = bounded(server).await??;
    // 4 MiB at 10 MB/s is 0.42 s.
    let took = timed_transfer(tx, rx, 4, 1 << 20).await?;
    assert!(took >= Duration::from_millis(350), "took only {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    Ok(())
}

#[tokio::test]
async fn bandwidth_cap_can_be_lifted_while_sending() -> TestResult {
    let (tx, mut rx) = pair(&key(3)).await?;
    let (mut tx, _own_rx) = tx.split();
    let cap = tx.bandwidth();
    cap.set_bits_per_sec(Some(100_000));
    let traffic = tx.traffic();
    let before = traffic.bytes_sent();
    let start = Instant::now();
    let sending = tokio::spawn(async move {
        // 200 KiB at 100 kbit/s would take 16 s.
        tx.send(&Message::CriuImages {
            name: "pages-1.img".into(),
            offset: 0,
            data: Bytes::from(vec![3u8; 200 << 10]),
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Held back by the cap so far.
    assert_eq!(traffic.bytes_sent(), before);
    cap.set_mbit(None);
    assert!(matches!(
        bounded(rx.recv()).await?,
        Message::CriuImages { .. }
    ));
    bounded(sending).await??;
    let took = start.elapsed();
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(traffic.bytes_sent() > before + (200 << 10));
    Ok(())
}

#[tokio::test]
async fn halves_work_concurrently() -> TestResult {
    let (client, server) = pair(&key(4)).await?;
    let (mut ctx, mut crx) = client.split();
    let (mut stx, mut srx) = server.split();
    const N: u32 = 200;
    // Both directions at once: the server echoes rounds back as acks.
    let echo = tokio::spawn(async move {
        for _ in 0..N {
            match srx.recv().await? {
                Message::RoundDone { round, .. } => {
                    stx.send(&Message::Error {
                        message: round.to_string(),
                    })
                    .await?
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        Ok::<_, WireError>(())
    });
    let send = tokio::spawn(async move {
        for round in 0..N {
            ctx.send(&Message::RoundDone {
                round,
                stats: Default::default(),
            })
            .await?;
        }
        Ok::<_, WireError>(ctx)
    });
    for round in 0..N {
        assert_eq!(
            bounded(crx.recv()).await?,
            Message::Error {
                message: round.to_string()
            }
        );
    }
    bounded(echo).await??;
    let ctx = bounded(send).await??;
    assert_eq!(ctx.traffic().frames_sent(), u64::from(N));
    Ok(())
}

#[tokio::test]
async fn ciphers_are_negotiated() -> TestResult {
    let aes = Config::default().with_cipher(Some(Cipher::Aes256Gcm));
    let chacha = Config::default().with_cipher(Some(Cipher::ChaCha20Poly1305));
    let (a, b) = tokio::io::duplex(1 << 16);
    let k = key(5);
    let (x, y) = tokio::join!(
        establish(a, Role::Client, &k, &aes),
        establish(b, Role::Server, &k, &chacha)
    );
    let (mut x, mut y) = (x?, y?);
    assert_eq!(x.info().cipher, Cipher::ChaCha20Poly1305);
    assert_eq!(y.info().cipher, Cipher::ChaCha20Poly1305);
    x.send(&Message::Done).await?;
    assert_eq!(bounded(y.recv()).await?, Message::Done);
    Ok(())
}

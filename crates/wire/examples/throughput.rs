//! Measures sealing throughput and end-to-end channel throughput.
//!
//! `cargo run --release -p migrun-wire --example throughput [MiB]`

use std::time::{Duration, Instant};

use migrun_wire::{
    accept_with, connect_with, measure_cipher, pair_with, Bytes, Cipher, Config, Key, Message,
    WireError,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: usize = match std::env::args().nth(1) {
        Some(a) => a.parse()?,
        None => 1024,
    };
    println!("preferred cipher on this machine: {}", Cipher::preferred());
    for cipher in [Cipher::ChaCha20Poly1305, Cipher::Aes256Gcm] {
        let r = measure_cipher(cipher, 1 << 20, mib)?;
        println!(
            "{cipher:>18}: seal {:6.0} MB/s, open {:6.0} MB/s, seal+open {:6.0} MB/s (1 MiB frames, one core)",
            r.seal_mb_s, r.open_mb_s, r.both_mb_s
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        for cipher in [Cipher::ChaCha20Poly1305, Cipher::Aes256Gcm] {
            let config = Config::default().with_cipher(Some(cipher));
            let key = Key::generate()?;
            let (a, b) = pair_with(&key, &config).await?;
            let mb = stream(a, b, mib).await?;
            println!("{cipher:>18}: in-memory channel {mb:6.0} MB/s");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let (k2, c2) = (key.clone(), config.clone());
            let server = tokio::spawn(async move { accept_with(&listener, &k2, &c2).await });
            let a = connect_with(addr, &key, &config).await?;
            let b = server.await??;
            let mb = stream(a, b, mib).await?;
            println!("{cipher:>18}: tcp 127.0.0.1 channel {mb:6.0} MB/s");
        }
        let key = Key::generate()?;
        let (a, b) = migrun_wire::pair(&key).await?;
        let mb = stream_pages(a, b, mib).await?;
        println!(
            "{:>18}: in-memory send_pages (1 MiB runs, 1/4 zero pages) {mb:6.0} MB/s of memory",
            Cipher::preferred()
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    Ok(())
}

async fn stream(
    mut a: migrun_wire::Channel,
    mut b: migrun_wire::Channel,
    mib: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    b.set_recv_timeout(Some(Duration::from_secs(30)));
    let rx = tokio::spawn(async move {
        let mut n = 0usize;
        loop {
            match b.recv().await? {
                Message::FileChunk { data, .. } => n += data.len(),
                Message::Done => return Ok::<_, WireError>(n),
                other => panic!("unexpected {other:?}"),
            }
        }
    });
    let chunk = Bytes::from(vec![0x5au8; 1 << 20]);
    let start = Instant::now();
    for i in 0..mib {
        a.send(&Message::FileChunk {
            path: "x".into(),
            offset: (i as u64) << 20,
            data: chunk.clone(),
        })
        .await?;
    }
    a.send(&Message::Done).await?;
    let n = rx.await??;
    Ok(n as f64 / 1e6 / start.elapsed().as_secs_f64())
}

async fn stream_pages(
    mut a: migrun_wire::Channel,
    mut b: migrun_wire::Channel,
    mib: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let rx = tokio::spawn(async move {
        let mut pages = 0usize;
        loop {
            match b.recv().await? {
                Message::Pages(run) => pages += run.page_count(),
                Message::Done => return Ok::<_, WireError>(pages),
                other => panic!("unexpected {other:?}"),
            }
        }
    });
    let mut raw = vec![0x11u8; 1 << 20];
    for page in raw.chunks_mut(migrun_wire::PAGE_SIZE).step_by(4) {
        page.fill(0);
    }
    let start = Instant::now();
    for i in 0..mib {
        a.send_pages(1, (i as u64) << 20, &raw).await?;
    }
    a.send(&Message::Done).await?;
    let pages = rx.await??;
    Ok((pages * migrun_wire::PAGE_SIZE) as f64 / 1e6 / start.elapsed().as_secs_f64())
}

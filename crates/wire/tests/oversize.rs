//! An oversized length prefix is refused before anything is allocated for it.
//!
//! Own test binary, so its allocator can watch every allocation.

#![allow(missing_docs)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{proxy, Mitm, CLIENT_HANDSHAKE_LEN};
use migrun_wire::{accept, connect, Key, Message, WireError, MAX_FRAME};
use tokio::net::TcpListener;

/// The system allocator, remembering the largest allocation since a reset.
struct Watching;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call unchanged to the system allocator.
unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract, which we pass on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: the caller upholds `realloc`'s contract, which we pass on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Watching = Watching;

#[tokio::test]
async fn oversized_length_prefix_is_refused_without_allocating(
) -> Result<(), Box<dyn std::error::Error>> {
    let key = Key::from_bytes([8; 32]);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server_key = key.clone();
    let server = tokio::spawn(async move { accept(&listener, &server_key).await });
    // The first frame's length prefix becomes 0xfffffff0 (4 GiB).
    let via = proxy(
        addr,
        Mitm::Overwrite(CLIENT_HANDSHAKE_LEN, vec![0xff, 0xff, 0xff, 0xf0]),
    )
    .await?;
    let mut client = connect(via, &key).await?;
    let mut server = server.await??;
    LARGEST.store(0, Ordering::Relaxed);
    client.send(&Message::Ack).await?;
    let got = tokio::time::timeout(Duration::from_secs(30), server.recv()).await?;
    match got {
        Err(
            e @ WireError::FrameTooLarge {
                len: 0xffff_fff0, ..
            },
        ) => {
            assert_eq!(
                e.to_string(),
                format!("peer sent a frame of 4294967280 bytes, over the limit of {MAX_FRAME}")
            );
        }
        other => panic!("expected a too-large frame, got {other:?}"),
    }
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest < 1 << 20, "allocated {largest} bytes");

    // Just over the limit is refused too; exactly the limit would be read.
    assert!(MAX_FRAME < u32::MAX as usize);
    Ok(())
}

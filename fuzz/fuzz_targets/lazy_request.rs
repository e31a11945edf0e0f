//! The page server of `lazy` (CRIU's page-server protocol as its
//! lazy-pages daemon speaks it) on any byte stream from the daemon.
//!
//! The daemon's end is in memory: it sends the input, and takes at most
//! `WINDOW` bytes of answers before it stops reading (a write error, as a
//! closed socket gives). Checks: no panic; errors are one line; on success
//! the answers are exactly what the requests asked for.

#![no_main]

use std::io::{Cursor, Read, Write};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use migrun_migrate::lazy::{parse_request, serve_conn, Request, REQUEST_LEN};
use migrun_migrate::store::PageStore;

/// Bytes of answers the daemon's end takes.
const WINDOW: usize = 1 << 20;

struct Daemon {
    input: Cursor<Vec<u8>>,
    written: usize,
}

impl Read for Daemon {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Daemon {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() > WINDOW {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        self.written += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A few pages of two processes, data and zero pages, low and high.
fn store() -> &'static PageStore {
    static STORE: OnceLock<PageStore> = OnceLock::new();
    STORE.get_or_init(|| {
        let mut s = PageStore::default();
        for (pid, addr, fill) in [
            (1, 0x1000, Some(1u8)),
            (1, 0x2000, None),
            (1, 0x3000, Some(3)),
            (2, 0x7fff_ffff_f000, Some(4)),
            (2, 0xffff_ffff_ffff_f000, Some(5)),
        ] {
            s.insert(pid, addr, fill.map(|b| [b; 4096]).as_ref().map(|p| &p[..]));
        }
        s
    })
}

fuzz_target!(|data: &[u8]| {
    let mut daemon = Daemon {
        input: Cursor::new(data.to_vec()),
        written: 0,
    };
    let result = serve_conn(&mut daemon, store());
    // What the requests asked for, up to the first bad one or the close.
    let (mut pages, mut bytes, mut valid) = (0u64, 0usize, true);
    for chunk in data.chunks_exact(REQUEST_LEN) {
        let mut head = [0u8; REQUEST_LEN];
        head.copy_from_slice(chunk);
        match parse_request(&head) {
            Ok(Request::Get { nr_pages, .. }) => {
                pages += nr_pages;
                bytes += REQUEST_LEN + nr_pages as usize * 4096;
            }
            Ok(Request::Close) => {
                bytes += 4;
                break;
            }
            Err(_) => {
                valid = false;
                break;
            }
        }
    }
    match result {
        Ok(served) => {
            assert!(valid, "a bad request was served");
            assert_eq!(served, pages);
            assert_eq!(daemon.written, bytes);
        }
        Err(e) => {
            let line = e.to_string();
            assert!(
                !line.contains('\n'),
                "error of more than one line: {line:?}"
            );
            assert!(
                !valid || bytes > WINDOW,
                "good requests within the window failed: {line}"
            );
        }
    }
});

//! Post-copy from the target's own page store: CRIU restores the processes
//! without their memory (`--lazy-pages`) and its lazy-pages daemon fills it
//! in through userfaultfd, fetching every page from a page server that
//! migrun runs here, on loopback, out of the page store.
//!
//! All pages already crossed the wire during pre-copy, so nothing is fetched
//! from the source: the daemon's "remote" is local memory. The downtime then
//! holds CRIU's restore of the process state only, not the copy of the
//! memory into the new processes (about 0.5 s per GiB here), which happens
//! while the container already runs: a page it touches first is served at
//! once, the rest in the background.
//!
//! The page server speaks CRIU's page-server protocol (criu/page-xfer.c):
//! requests are a `page_server_iov { u32 cmd; u64 nr_pages; u64 vaddr;
//! u64 dst_id }` in native (x86-64: little-endian, `nr_pages` aligned to 8,
//! 32 bytes) layout; `PS_IOV_GET` asks for
//! `nr_pages` pages at `vaddr` of process `dst_id` (its pid in the images)
//! and is answered with the same header, `cmd = PS_IOV_ADD_F | PE_PRESENT
//! << 16`, followed by the pages; `PS_IOV_CLOSE`/`PS_IOV_FORCE_CLOSE` end
//! the session and are answered with an `i32` status 0.

use std::io::{BufWriter, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::images::{self, Pagemap, PE_LAZY, PE_PRESENT};
use crate::store::PageStore;
use crate::{MigrateError, Result};

/// `PS_IOV_ADD_F`: pages follow, with flags in the upper 16 bits of `cmd`.
const PS_IOV_ADD_F: u32 = 6;
/// `PS_IOV_GET`: the daemon asks for pages.
const PS_IOV_GET: u32 = 7;
/// `PS_IOV_CLOSE`: the daemon is done.
const PS_IOV_CLOSE: u32 = 0x1023;
/// `PS_IOV_FORCE_CLOSE`: the daemon is done (inherited socket variant).
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
/// Bits of `cmd` holding the command.
const PS_CMD_MASK: u32 = 0xffff;
/// Page size of the images.
const PAGE: usize = 4096;
/// How long the daemon may take to get ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks that every lazy page of every process in `dir` is in `store`,
/// before the restore that would otherwise fault on a missing one.
/// Returns the number of lazy pages.
pub fn check_complete(dir: &Path, store: &PageStore) -> Result<u64> {
    let mut total = 0;
    for (pid, map) in pagemaps(dir)? {
        for e in map.entries.iter().filter(|e| e.flags & PE_LAZY != 0) {
            if let Some(addr) = store.first_missing(pid, e.vaddr, e.nr_pages) {
                return Err(MigrateError::Images(format!(
                    "page {addr:#x} of process {pid} never arrived"
                )));
            }
            total += e.nr_pages;
        }
    }
    Ok(total)
}

/// Every `pagemap-N.img` of `dir`, parsed, with its N.
fn pagemaps(dir: &Path) -> Result<Vec<(u32, Pagemap)>> {
    let mut out = Vec::new();
    for pid in images::pagemap_pids(dir)? {
        let path = dir.join(format!("pagemap-{pid}.img"));
        let bytes = std::fs::read(&path)
            .map_err(|e| MigrateError::Images(format!("read {}: {e}", path.display())))?;
        out.push((pid, Pagemap::parse(&bytes)?));
    }
    Ok(out)
}

/// util-linux's setpriv, where installed.
fn setpriv() -> Option<&'static Path> {
    ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
}

/// CRIU's lazy-pages daemon and the page server feeding it.
pub struct LazyPages {
    daemon: Child,
    server: Option<JoinHandle<Result<u64>>>,
    port: u16,
    log: PathBuf,
    started: Instant,
}

impl LazyPages {
    /// Starts the page server over `store` and `criu lazy-pages` on the
    /// images in `dir` (also its work directory, where the restore finds
    /// the daemon's socket); returns once the daemon is ready for the
    /// restore.
    pub fn start(criu: &Path, dir: &Path, store: Arc<PageStore>) -> Result<Self> {
        let io = |what: &str, e: std::io::Error| MigrateError::Target(format!("{what}: {e}"));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| io("page server: bind 127.0.0.1", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| io("page server: address", e))?
            .port();
        let (ready_r, ready_w) = nix::unistd::pipe()
            .map_err(|e| MigrateError::Target(format!("lazy-pages: pipe: {e}")))?;
        // The write end goes to CRIU (without close-on-exec); ours closes
        // once spawned, so a daemon that dies unready gives EOF.
        let status_fd = nix::unistd::dup(ready_w.as_raw_fd())
            .map_err(|e| MigrateError::Target(format!("lazy-pages: dup: {e}")))?;
        drop(ready_w);
        let log = dir.join("lazy-pages.log");
        // The daemon is useless without our page server: it goes when we
        // go (a killed migrate-in must not leave it waiting forever).
        let mut cmd = match setpriv() {
            // setpriv sets the parent-death signal and execs CRIU: no
            // pre_exec, so the spawn is a posix_spawn (vfork) instead of a
            // fork, which copies the page tables of the page store (a GiB
            // of pages costs ~30 ms in the downtime).
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "KILL", "--"]).arg(criu);
                c
            }
            None => {
                let mut c = Command::new(criu);
                // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and
                // touches nothing of the parent's state.
                unsafe {
                    std::os::unix::process::CommandExt::pre_exec(&mut c, || {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == 0 {
                            Ok(())
                        } else {
                            Err(std::io::Error::last_os_error())
                        }
                    });
                }
                c
            }
        };
        let spawned = cmd
            .arg("lazy-pages")
            .arg("--page-server")
            .args(["--address", "127.0.0.1", "--port", &port.to_string()])
            .arg("-D")
            .arg(dir)
            .arg("-W")
            .arg(dir)
            .args(["-o", "lazy-pages.log", "-v4", "--status-fd"])
            .arg(status_fd.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let _ = nix::unistd::close(status_fd);
        let daemon = spawned.map_err(|e| io(&format!("run {} lazy-pages", criu.display()), e))?;
        let server = std::thread::spawn(move || serve(&listener, &store));
        let mut ready = std::fs::File::from(ready_r);
        let mut byte = [0u8; 1];
        let ok = wait_readable(&ready, READY_TIMEOUT) && matches!(ready.read(&mut byte), Ok(1));
        let mut lazy = Self {
            daemon,
            server: Some(server),
            port,
            log,
            started: Instant::now(),
        };
        if !ok {
            let detail = migrun_criu::images::first_error_line(&lazy.log).unwrap_or_default();
            lazy.abort();
            return Err(MigrateError::Target(format!(
                "criu lazy-pages did not get ready: {detail}"
            )));
        }
        Ok(lazy)
    }

    /// Waits until the daemon has put every page in place and ended;
    /// returns the pages served and the time since the start.
    pub fn finish(mut self) -> Result<(u64, Duration)> {
        let status = self
            .daemon
            .wait()
            .map_err(|e| MigrateError::Target(format!("wait for criu lazy-pages: {e}")))?;
        let served = match self.server.take().map(JoinHandle::join) {
            Some(Ok(r)) => r?,
            _ => return Err(MigrateError::Target("page server thread failed".into())),
        };
        if !status.success() {
            let detail = migrun_criu::images::first_error_line(&self.log).unwrap_or_default();
            return Err(MigrateError::Target(format!(
                "criu lazy-pages failed ({status}): {detail} (log: {})",
                self.log.display()
            )));
        }
        Ok((served, self.started.elapsed()))
    }

    /// Stops the daemon (a restore that failed, or was undone) and the
    /// page server.
    pub fn abort(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        if let Some(server) = self.server.take() {
            // A server still waiting for the daemon's connection gets one
            // that closes at once, and ends.
            let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
            let _ = server.join();
        }
    }
}

impl Drop for LazyPages {
    fn drop(&mut self) {
        if self.server.is_some() {
            self.abort();
        }
    }
}

/// Whether `f` gets readable within `timeout`.
fn wait_readable(f: &std::fs::File, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n == 1
}

/// One request header of the page-server protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Iov {
    cmd: u32,
    nr_pages: u64,
    vaddr: u64,
    dst_id: u64,
}

impl Iov {
    /// `sizeof(struct page_server_iov)`: 4 bytes of padding after `cmd`.
    const SIZE: usize = 32;

    fn parse(b: &[u8; Self::SIZE]) -> Self {
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        Self {
            cmd: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            nr_pages: u64_at(8),
            vaddr: u64_at(16),
            dst_id: u64_at(24),
        }
    }

    fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.cmd.to_le_bytes());
        b[8..16].copy_from_slice(&self.nr_pages.to_le_bytes());
        b[16..24].copy_from_slice(&self.vaddr.to_le_bytes());
        b[24..32].copy_from_slice(&self.dst_id.to_le_bytes());
        b
    }
}

/// Most pages one request may ask for (a daemon asking for more is broken).
const MAX_REQUEST_PAGES: u64 = 1 << 20;

/// Length of one request of the page-server protocol
/// (`sizeof(struct page_server_iov)`).
pub const REQUEST_LEN: usize = Iov::SIZE;

/// One request of CRIU's lazy-pages daemon to the page server, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `PS_IOV_GET`: the daemon wants `nr_pages` pages from `vaddr` of
    /// process `pid` (its pid in the images).
    Get {
        /// The process.
        pid: u32,
        /// Address of the first page.
        vaddr: u64,
        /// Number of pages, at most 2^20.
        nr_pages: u64,
    },
    /// `PS_IOV_CLOSE` or `PS_IOV_FORCE_CLOSE`: the daemon is done.
    Close,
}

/// Parses one request of the page-server protocol; a command other than
/// get and close, a process id over 32 bits, too many pages at once or
/// pages past the end of the address space is an error naming it.
pub fn parse_request(head: &[u8; REQUEST_LEN]) -> Result<Request> {
    let iov = Iov::parse(head);
    match iov.cmd & PS_CMD_MASK {
        PS_IOV_GET => {
            let pid = u32::try_from(iov.dst_id).map_err(|_| {
                MigrateError::Protocol(format!("lazy-pages asked for process {}", iov.dst_id))
            })?;
            if iov.nr_pages > MAX_REQUEST_PAGES {
                return Err(MigrateError::Protocol(format!(
                    "lazy-pages asked for {} pages at once",
                    iov.nr_pages
                )));
            }
            // The last page's address must exist (nr_pages * PAGE fits: the
            // count is at most 2^20).
            let last = iov.nr_pages.saturating_sub(1) * PAGE as u64;
            if iov.vaddr.checked_add(last).is_none() {
                return Err(MigrateError::Protocol(format!(
                    "lazy-pages asked for {} pages at {:#x}, past the end of the address space",
                    iov.nr_pages, iov.vaddr
                )));
            }
            Ok(Request::Get {
                pid,
                vaddr: iov.vaddr,
                nr_pages: iov.nr_pages,
            })
        }
        PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => Ok(Request::Close),
        other => Err(MigrateError::Protocol(format!(
            "lazy-pages sent page-server command {other:#x}"
        ))),
    }
}

/// Serves one daemon connection from `store`; returns the pages served.
fn serve(listener: &TcpListener, store: &PageStore) -> Result<u64> {
    let err = |e: std::io::Error| MigrateError::Target(format!("page server: {e}"));
    let (conn, _) = listener.accept().map_err(err)?;
    let _ = conn.set_nodelay(true);
    serve_conn(conn, store)
}

/// The page server's request loop on any byte stream (the daemon's TCP
/// connection in [`LazyPages`]): answers each request from `store` until
/// the daemon closes the session or the stream ends; returns the pages
/// served. A page not in `store` is served as zeroes.
pub fn serve_conn<S: Read + Write>(mut conn: S, store: &PageStore) -> Result<u64> {
    let err = |e: std::io::Error| MigrateError::Target(format!("page server: {e}"));
    let zero = [0u8; PAGE];
    let mut served = 0u64;
    let mut head = [0u8; REQUEST_LEN];
    loop {
        match conn.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(served),
            Err(e) => return Err(err(e)),
        }
        match parse_request(&head)? {
            Request::Get {
                pid,
                vaddr,
                nr_pages,
            } => {
                let reply = Iov {
                    cmd: PS_IOV_ADD_F | (PE_PRESENT << 16),
                    nr_pages,
                    vaddr,
                    dst_id: u64::from(pid),
                };
                let mut out = BufWriter::with_capacity(1 << 20, &mut conn);
                out.write_all(&reply.encode()).map_err(err)?;
                for i in 0..nr_pages {
                    let addr = vaddr + i * PAGE as u64;
                    // check_complete() made sure every lazy page is here; a
                    // page outside the lazy runs was never populated: zero.
                    let page = store.get(pid, addr).flatten().unwrap_or(&zero);
                    out.write_all(page).map_err(err)?;
                }
                out.flush().map_err(err)?;
                served += nr_pages;
            }
            Request::Close => {
                conn.write_all(&0i32.to_le_bytes()).map_err(err)?;
                conn.flush().map_err(err)?;
                return Ok(served);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte stream: reads from `input`, collects what is written.
    struct Duplex {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn get_is_answered_with_the_pages_and_close_with_status_zero() {
        let mut store = PageStore::default();
        store.insert(1, 0x10000, Some(&[7u8; PAGE]));
        store.insert(1, 0x11000, None);
        let mut input = Iov {
            cmd: PS_IOV_GET,
            nr_pages: 2,
            vaddr: 0x10000,
            dst_id: 1,
        }
        .encode()
        .to_vec();
        input.extend(
            Iov {
                cmd: PS_IOV_CLOSE,
                nr_pages: 0,
                vaddr: 0,
                dst_id: 0,
            }
            .encode(),
        );
        let mut conn = Duplex {
            input: std::io::Cursor::new(input),
            output: Vec::new(),
        };
        assert_eq!(serve_conn(&mut conn, &store).expect("serve"), 2);
        let out = conn.output;
        assert_eq!(out.len(), Iov::SIZE + 2 * PAGE + 4);
        let mut head = [0u8; Iov::SIZE];
        head.copy_from_slice(&out[..Iov::SIZE]);
        let reply = Iov::parse(&head);
        assert_eq!(reply.cmd, PS_IOV_ADD_F | (PE_PRESENT << 16));
        assert_eq!((reply.nr_pages, reply.vaddr, reply.dst_id), (2, 0x10000, 1));
        assert!(out[Iov::SIZE..Iov::SIZE + PAGE].iter().all(|b| *b == 7));
        assert!(out[Iov::SIZE + PAGE..Iov::SIZE + 2 * PAGE]
            .iter()
            .all(|b| *b == 0));
        assert_eq!(&out[Iov::SIZE + 2 * PAGE..], &0i32.to_le_bytes());
    }

    #[test]
    fn an_unknown_command_is_an_error() {
        let input = Iov {
            cmd: 3,
            nr_pages: 0,
            vaddr: 0,
            dst_id: 0,
        }
        .encode()
        .to_vec();
        let mut conn = Duplex {
            input: std::io::Cursor::new(input),
            output: Vec::new(),
        };
        assert!(serve_conn(&mut conn, &PageStore::default()).is_err());
    }

    #[test]
    fn requests_are_parsed_and_checked() {
        let req = |cmd, nr_pages, vaddr, dst_id| {
            parse_request(
                &Iov {
                    cmd,
                    nr_pages,
                    vaddr,
                    dst_id,
                }
                .encode(),
            )
        };
        assert_eq!(
            req(PS_IOV_GET | (PE_LAZY << 16), 3, 0x1000, 9).expect("get"),
            Request::Get {
                pid: 9,
                vaddr: 0x1000,
                nr_pages: 3
            }
        );
        assert_eq!(
            req(PS_IOV_FORCE_CLOSE, 0, 0, 0).expect("close"),
            Request::Close
        );
        assert!(req(PS_IOV_GET, 1, 0, 1 << 32).is_err());
        assert!(req(PS_IOV_GET, MAX_REQUEST_PAGES + 1, 0, 1).is_err());
        assert!(req(PS_IOV_ADD_F, 1, 0, 1).is_err());
        // Found by the fuzz target: the page after the last one of the
        // address space overflowed (a panic in debug builds).
        assert!(req(PS_IOV_GET, 2, u64::MAX, 0).is_err());
        assert!(req(PS_IOV_GET, 2, u64::MAX - 4095, 0).is_err());
        assert!(req(PS_IOV_GET, 1, u64::MAX - 4095, 0).is_ok());
        assert!(req(PS_IOV_GET, 0, u64::MAX, 0).is_ok());
    }

    #[test]
    fn a_missing_lazy_page_is_found_before_the_restore() {
        let dir = tempfile::tempdir().expect("tmp");
        let map = Pagemap {
            pages_id: 1,
            entries: vec![crate::images::PagemapEntry {
                vaddr: 0x10000,
                nr_pages: 2,
                flags: PE_LAZY,
            }],
        };
        std::fs::write(dir.path().join("pagemap-1.img"), map.encode()).expect("w");
        let mut store = PageStore::default();
        store.insert(1, 0x10000, Some(&[1u8; PAGE]));
        assert!(check_complete(dir.path(), &store).is_err());
        store.insert(1, 0x11000, None);
        assert_eq!(check_complete(dir.path(), &store).expect("complete"), 2);
    }
}

//! A container process's stdio as containerd gives it: FIFO paths (any may
//! be empty), or a terminal.
//!
//! Without a terminal the process gets pipes (never the FIFOs themselves:
//! CRIU cannot checkpoint a host FIFO, and the process must not block on a
//! FIFO nobody reads) and one relay thread per process copies between the
//! pipes and the FIFOs. With a terminal the pty master arrives over a
//! console socket and the relay copies between it and the FIFOs. All
//! descriptors are non-blocking and the relay polls them, so a process that
//! does not read its stdin never stops its stdout from flowing.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use migrun_runtime::lifecycle::Stdio;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use crate::error::{Context, Result, ShimError};

/// The stdio containerd asked for, as it reports it back in `State`.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    /// FIFO for stdin ("" for none).
    pub stdin: String,
    /// FIFO for stdout ("" for none).
    pub stdout: String,
    /// FIFO for stderr ("" for none).
    pub stderr: String,
    /// Whether the process has a terminal.
    pub terminal: bool,
}

/// Opens a FIFO without blocking, whether or not the other side is there yet.
fn open_fifo(path: &str, write: bool) -> Result<File> {
    let mut opts = OpenOptions::new();
    // A writer opens read-write: open never blocks and writes never fail
    // with EPIPE while the client is away (as containerd's Go shims do).
    opts.read(true).write(write);
    opts.custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC);
    opts.open(path).ctx(|| format!("open fifo {path}"))
}

/// A pipe, both ends close-on-exec.
fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).ctx(|| "create pipe".to_string())
}

/// Sets O_NONBLOCK on `fd`.
fn set_nonblocking(fd: &impl AsRawFd) -> Result<()> {
    let raw = fd.as_raw_fd();
    let flags = fcntl(raw, FcntlArg::F_GETFL).ctx(|| "read descriptor flags".to_string())?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(raw, FcntlArg::F_SETFL(flags)).ctx(|| "set O_NONBLOCK".to_string())?;
    Ok(())
}

/// Clears FD_CLOEXEC, so that a child (CRIU) inherits `fd`.
pub fn inheritable(fd: RawFd) -> Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))
        .map(|_| ())
        .ctx(|| "clear FD_CLOEXEC".to_string())
}

/// `/dev/null`, for a stream containerd did not ask for.
fn dev_null(write: bool) -> Result<OwnedFd> {
    let file = OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/null")
        .ctx(|| "open /dev/null".to_string())?;
    Ok(file.into())
}

/// One direction of copying: `src` to `dst`.
struct Channel {
    src: File,
    /// `None` once the destination failed: data is then discarded.
    dst: Option<File>,
    buf: Vec<u8>,
    pos: usize,
    eof: bool,
    /// Whether this channel feeds the process's stdin.
    stdin: bool,
}

impl Channel {
    fn new(src: impl Into<OwnedFd>, dst: impl Into<OwnedFd>, stdin: bool) -> Result<Self> {
        let src = File::from(src.into());
        let dst = File::from(dst.into());
        set_nonblocking(&src)?;
        set_nonblocking(&dst)?;
        Ok(Self {
            src,
            dst: Some(dst),
            buf: Vec::new(),
            pos: 0,
            eof: false,
            stdin,
        })
    }

    fn pending(&self) -> bool {
        self.pos < self.buf.len()
    }

    fn done(&self) -> bool {
        self.eof && !self.pending()
    }

    fn read(&mut self) {
        let mut chunk = [0u8; 32 * 1024];
        match self.src.read(&mut chunk) {
            Ok(0) => self.eof = true,
            Ok(n) => {
                self.buf.clear();
                self.buf.extend_from_slice(&chunk[..n]);
                self.pos = 0;
                if self.dst.is_none() {
                    self.pos = self.buf.len();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // EIO: the last slave side of a pty closed.
            Err(_) => self.eof = true,
        }
    }

    fn write(&mut self) {
        let Some(dst) = self.dst.as_mut() else {
            self.pos = self.buf.len();
            return;
        };
        match dst.write(&self.buf[self.pos..]) {
            Ok(n) => self.pos += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                self.dst = None;
                self.pos = self.buf.len();
            }
        }
    }
}

/// The set of channels of one process, before its relay runs.
#[derive(Default)]
pub struct Plumbing {
    channels: Vec<Channel>,
}

/// What the process's side gets, and the shim's side of it.
pub struct Prepared {
    /// Descriptors for the process.
    pub stdio: Stdio,
    /// The shim's ends.
    pub plumbing: Plumbing,
}

/// Pipes between a process without a terminal and containerd's FIFOs.
pub fn pipes(paths: &StdioPaths) -> Result<Prepared> {
    let mut plumbing = Plumbing::default();
    let stdin = if paths.stdin.is_empty() {
        dev_null(false)?
    } else {
        let fifo = open_fifo(&paths.stdin, false)?;
        let (r, w) = pipe()?;
        plumbing.channels.push(Channel::new(fifo, w, true)?);
        r
    };
    let mut out = |path: &str| -> Result<OwnedFd> {
        if path.is_empty() {
            return dev_null(true);
        }
        let fifo = open_fifo(path, true)?;
        let (r, w) = pipe()?;
        plumbing.channels.push(Channel::new(r, fifo, false)?);
        Ok(w)
    };
    let stdout = out(&paths.stdout)?;
    let stderr = out(&paths.stderr)?;
    Ok(Prepared {
        stdio: Stdio {
            stdin: Some(stdin),
            stdout: Some(stdout),
            stderr: Some(stderr),
        },
        plumbing,
    })
}

/// Channels between a pty master and containerd's FIFOs; returns them and
/// a descriptor of the master kept for resizing.
pub fn console(master: OwnedFd, paths: &StdioPaths) -> Result<(Plumbing, File)> {
    let mut plumbing = Plumbing::default();
    set_nonblocking(&master)?;
    let dup = |fd: &OwnedFd| fd.try_clone().ctx(|| "duplicate pty master".to_string());
    if !paths.stdin.is_empty() {
        let fifo = open_fifo(&paths.stdin, false)?;
        plumbing
            .channels
            .push(Channel::new(fifo, dup(&master)?, true)?);
    }
    if !paths.stdout.is_empty() {
        let fifo = open_fifo(&paths.stdout, true)?;
        plumbing
            .channels
            .push(Channel::new(dup(&master)?, fifo, false)?);
    }
    Ok((plumbing, File::from(master)))
}

/// A listening console socket for a process with a terminal: libcontainer
/// sends the pty master over it.
pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    /// Listens at `path` (removed again when dropped).
    pub fn bind(path: &Path) -> Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).ctx(|| format!("listen on {}", path.display()))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// The socket's path, for libcontainer.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Receives the pty master (sent before the process was reported ready).
    pub fn receive(&self, timeout: Duration) -> Result<OwnedFd> {
        self.listener
            .set_nonblocking(true)
            .ctx(|| "set console socket non-blocking".to_string())?;
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match self.listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(ShimError::Internal(
                            "no pty master arrived on the console socket".into(),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e).ctx(|| "accept on console socket".to_string()),
            }
        };
        stream
            .set_nonblocking(false)
            .ctx(|| "set console stream blocking".to_string())?;
        let _ = stream.set_read_timeout(Some(timeout));
        let mut name = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut name)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .ctx(|| "receive pty master".to_string())?;
        for cmsg in msg.cmsgs().ctx(|| "read control message".to_string())? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                if let Some(&fd) = fds.first() {
                    for &extra in &fds[1..] {
                        // SAFETY: the kernel just gave us these descriptors.
                        drop(unsafe { OwnedFd::from_raw_fd(extra) });
                    }
                    // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
                    return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        Err(ShimError::Internal(
            "the console socket message carried no descriptor".into(),
        ))
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sets the window size of a pty.
pub fn resize(master: &File, width: u32, height: u32) -> Result<()> {
    let size = libc::winsize {
        ws_row: u16::try_from(height).unwrap_or(u16::MAX),
        ws_col: u16::try_from(width).unwrap_or(u16::MAX),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer on an open descriptor.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).ctx(|| "resize pty".to_string());
    }
    Ok(())
}

/// Control bytes to a running relay.
const CLOSE_STDIN: u8 = b'c';
/// Ends the relay now.
const QUIT: u8 = b'q';

/// Set by the relay thread when it has ended (its descriptors closed).
type DoneFlag = Arc<(Mutex<bool>, Condvar)>;

/// A running relay thread of one process.
pub struct Relay {
    control: File,
    done: DoneFlag,
    /// Whether the process has outputs (stdout, stderr or a terminal).
    outputs: bool,
}

/// Waits for a relay's outputs to drain, without holding the relay.
pub struct Drained(Option<DoneFlag>);

impl Drained {
    /// Blocks until every output of the process reached end of file and
    /// all that it wrote was copied to containerd's FIFOs, which are then
    /// closed; or until `timeout` passed (a daemonised grandchild may hold
    /// a pipe open for good). Returns whether the outputs drained.
    pub fn wait(&self, timeout: Duration) -> bool {
        let Some(done) = &self.0 else {
            return true;
        };
        let (lock, cv) = &**done;
        match lock.lock() {
            Ok(guard) => cv
                .wait_timeout_while(guard, timeout, |d| !*d)
                .map(|(d, _)| *d)
                .unwrap_or(false),
            Err(_) => false,
        }
    }
}

impl Relay {
    /// Starts copying; the thread ends when every output reached end of
    /// file (or, without outputs, when stdin did), or on [`Relay::stop`].
    pub fn start(plumbing: Plumbing) -> Result<Self> {
        let outputs = plumbing.channels.iter().any(|c| !c.stdin);
        let (r, w) = pipe()?;
        let control = File::from(w);
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = Arc::clone(&done);
        let mut ctl = File::from(r);
        std::thread::Builder::new()
            .name("io".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                run(plumbing.channels, &mut ctl);
                let (lock, cv) = &*flag;
                if let Ok(mut d) = lock.lock() {
                    *d = true;
                }
                cv.notify_all();
            })
            .ctx(|| "start io thread".to_string())?;
        Ok(Self {
            control,
            done,
            outputs,
        })
    }

    /// A handle to wait for the outputs to drain (at once if there are none).
    pub fn drained(&self) -> Drained {
        Drained(self.outputs.then(|| Arc::clone(&self.done)))
    }

    /// Closes the process's stdin (containerd's CloseIO).
    pub fn close_stdin(&self) {
        let _ = (&self.control).write_all(&[CLOSE_STDIN]);
    }

    /// Waits up to `timeout` for the outputs to drain, then ends the relay.
    pub fn finish(&self, timeout: Duration) {
        let (lock, cv) = &*self.done;
        if let Ok(guard) = lock.lock() {
            let _ = cv.wait_timeout_while(guard, timeout, |d| !*d);
        }
        let _ = (&self.control).write_all(&[QUIT]);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = (&self.control).write_all(&[QUIT]);
    }
}

/// The relay loop.
fn run(mut channels: Vec<Channel>, control: &mut File) {
    let had_outputs = channels.iter().any(|c| !c.stdin);
    loop {
        channels.retain(|c| !c.done());
        let outputs = channels.iter().filter(|c| !c.stdin).count();
        if (had_outputs && outputs == 0) || channels.is_empty() {
            return;
        }
        let mut fds = vec![PollFd::new(control.as_fd(), PollFlags::POLLIN)];
        for c in &channels {
            if c.pending() {
                match &c.dst {
                    Some(dst) => fds.push(PollFd::new(dst.as_fd(), PollFlags::POLLOUT)),
                    None => fds.push(PollFd::new(c.src.as_fd(), PollFlags::empty())),
                }
            } else {
                fds.push(PollFd::new(c.src.as_fd(), PollFlags::POLLIN));
            }
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        let revents: Vec<PollFlags> = fds
            .iter()
            .map(|f| f.revents().unwrap_or(PollFlags::empty()))
            .collect();
        drop(fds);
        if !revents[0].is_empty() {
            let mut byte = [0u8; 1];
            match control.read(&mut byte) {
                Ok(1) if byte[0] == CLOSE_STDIN => channels.retain(|c| !c.stdin),
                _ => return,
            }
            continue;
        }
        for (c, ev) in channels.iter_mut().zip(&revents[1..]) {
            if ev.is_empty() {
                continue;
            }
            if c.pending() {
                c.write();
            } else {
                c.read();
            }
        }
    }
}

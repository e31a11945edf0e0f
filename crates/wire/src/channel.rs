//! An established, sealed connection and its two halves.
//!
//! Frame on the wire: `len: u32 BE | ciphertext | tag [16]`, where `len`
//! counts ciphertext and tag and is authenticated as associated data. The
//! plaintext is one encoded [`Message`].
//!
//! Debugging aid: when the environment variable [`CAPTURE_ENV`]
//! (`MIGRUN_WIRE_CAPTURE`) names a file, every [`Sender`] appends the
//! plaintext of each message it sends to that file, before sealing it, as
//! `len: u32 BE | plaintext`. The file then holds the migration *in clear*
//! (memory pages, file contents, CRIU images): use it only to debug, and
//! treat it as the container's data. It is opened with `O_APPEND|O_CREAT`
//! and, when created, mode 0600.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use crate::crypto::{Cipher, FrameCipher, TAG_LEN};
use crate::error::{Result, WireError};
use crate::limit::{Bandwidth, Traffic};
use crate::message::{encode_raw_pages, Message, PagesSummary, MAX_MESSAGE};
use crate::{read_full, Role};

/// The largest frame accepted: the largest message plus the tag.
pub const MAX_FRAME: usize = MAX_MESSAGE + TAG_LEN;

/// The environment variable naming the file that senders append the
/// plaintext of every message they send to (see the module documentation):
/// a debugging aid that writes the migration in clear.
pub const CAPTURE_ENV: &str = "MIGRUN_WIRE_CAPTURE";

/// Bytes handed to the socket at a time, so the bandwidth cap and the
/// traffic counters move smoothly even with 16 MiB frames.
const WRITE_CHUNK: usize = 256 << 10;

/// Read buffer, so small frames take one read call.
const READ_BUFFER: usize = 64 << 10;

pub(crate) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Facts about a connection, fixed at the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelInfo {
    /// Our role: `Client` if we connected, `Server` if we accepted.
    pub role: Role,
    /// The cipher sealing the frames.
    pub cipher: Cipher,
    /// The peer's address, for TCP connections.
    pub peer_addr: Option<SocketAddr>,
}

/// A migration connection after a successful handshake.
///
/// Use it directly for request/response, or [`split`](Channel::split) it
/// to send and receive from different tasks.
pub struct Channel {
    tx: Sender,
    rx: Receiver,
}

/// The sending half of a [`Channel`].
pub struct Sender {
    writer: BoxWrite,
    cipher: FrameCipher,
    buf: Vec<u8>,
    bandwidth: Bandwidth,
    traffic: Traffic,
    info: ChannelInfo,
    broken: bool,
    /// The file named by [`CAPTURE_ENV`], when set.
    capture: Option<File>,
    /// The longest a write may wait for the peer to take data.
    send_timeout: Option<Duration>,
}

/// The receiving half of a [`Channel`].
pub struct Receiver {
    reader: BufReader<BoxRead>,
    cipher: FrameCipher,
    traffic: Traffic,
    recv_timeout: Option<Duration>,
    info: ChannelInfo,
    broken: bool,
}

/// What [`crate::establish`] hands to [`Channel::assemble`].
pub(crate) struct Parts {
    pub reader: BufReader<BoxRead>,
    pub writer: BoxWrite,
    pub sealer: FrameCipher,
    pub opener: FrameCipher,
    pub traffic: Traffic,
    pub bandwidth: Bandwidth,
    pub recv_timeout: Option<Duration>,
    pub info: ChannelInfo,
}

pub(crate) fn new_reader(reader: BoxRead) -> BufReader<BoxRead> {
    BufReader::with_capacity(READ_BUFFER, reader)
}

impl Channel {
    pub(crate) fn assemble(p: Parts) -> Channel {
        Channel {
            tx: Sender {
                writer: p.writer,
                cipher: p.sealer,
                buf: Vec::new(),
                bandwidth: p.bandwidth,
                traffic: p.traffic.clone(),
                info: p.info,
                broken: false,
                capture: open_capture(),
                send_timeout: p.recv_timeout,
            },
            rx: Receiver {
                reader: p.reader,
                cipher: p.opener,
                traffic: p.traffic,
                recv_timeout: p.recv_timeout,
                info: p.info,
                broken: false,
            },
        }
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &Message) -> Result<()> {
        self.tx.send(msg).await
    }

    /// Sends the raw pages `raw` of process `pid` at `addr` as one
    /// [`Message::Pages`], with all-zero pages turned into markers.
    pub async fn send_pages(&mut self, pid: u32, addr: u64, raw: &[u8]) -> Result<PagesSummary> {
        self.tx.send_pages(pid, addr, raw).await
    }

    /// Receives one message. [`WireError::Closed`] when the peer closed.
    pub async fn recv(&mut self) -> Result<Message> {
        self.rx.recv().await
    }

    /// The sending half, for sends beside the receive loop (heartbeats).
    pub fn sender(&mut self) -> &mut Sender {
        &mut self.tx
    }

    /// Splits into halves usable from different tasks.
    pub fn split(self) -> (Sender, Receiver) {
        (self.tx, self.rx)
    }

    /// The byte counters of this connection.
    pub fn traffic(&self) -> Traffic {
        self.tx.traffic.clone()
    }

    /// The sending bandwidth cap of this connection, settable at any time.
    pub fn bandwidth(&self) -> Bandwidth {
        self.tx.bandwidth.clone()
    }

    /// Sets the receive time-out: the longest silence from the peer that
    /// [`recv`](Channel::recv) waits through. `None` waits forever.
    pub fn set_recv_timeout(&mut self, timeout: Option<Duration>) {
        self.rx.set_recv_timeout(timeout);
    }

    /// Sets the send time-out: the longest a send waits for the peer to
    /// take data (the bandwidth cap's own pauses do not count). `None`
    /// waits forever.
    pub fn set_send_timeout(&mut self, timeout: Option<Duration>) {
        self.tx.set_send_timeout(timeout);
    }

    /// Sets both time-outs (see [`set_recv_timeout`](Self::set_recv_timeout)
    /// and [`set_send_timeout`](Self::set_send_timeout)).
    pub fn set_timeouts(&mut self, timeout: Option<Duration>) {
        self.set_recv_timeout(timeout);
        self.set_send_timeout(timeout);
    }

    /// Facts about the connection.
    pub fn info(&self) -> ChannelInfo {
        self.tx.info
    }

    /// Closes our sending direction (the peer's `recv` then sees
    /// [`WireError::Closed`]) after flushing.
    pub async fn shutdown(&mut self) -> Result<()> {
        self.tx.shutdown().await
    }
}

impl Sender {
    /// Sends one message.
    ///
    /// If this future is dropped before it completes, the connection is
    /// unusable: later sends fail with [`WireError::Broken`].
    pub async fn send(&mut self, msg: &Message) -> Result<()> {
        self.check()?;
        self.begin_frame();
        msg.encode(&mut self.buf)?;
        self.seal_and_write().await
    }

    /// Sends the raw pages `raw` (whole 4 KiB pages) of process `pid` at
    /// `addr` as one [`Message::Pages`]. All-zero pages become markers;
    /// the others are copied once, straight into the frame.
    pub async fn send_pages(&mut self, pid: u32, addr: u64, raw: &[u8]) -> Result<PagesSummary> {
        self.check()?;
        self.begin_frame();
        let summary = encode_raw_pages(&mut self.buf, pid, addr, raw)?;
        self.seal_and_write().await?;
        Ok(summary)
    }

    /// The byte counters of this connection.
    pub fn traffic(&self) -> Traffic {
        self.traffic.clone()
    }

    /// Sets the send time-out (see [`Channel::set_send_timeout`]).
    pub fn set_send_timeout(&mut self, timeout: Option<Duration>) {
        self.send_timeout = timeout;
    }

    /// The sending bandwidth cap of this connection, settable at any time.
    pub fn bandwidth(&self) -> Bandwidth {
        self.bandwidth.clone()
    }

    /// Facts about the connection.
    pub fn info(&self) -> ChannelInfo {
        self.info
    }

    /// Flushes and closes our sending direction.
    pub async fn shutdown(&mut self) -> Result<()> {
        self.writer.shutdown().await?;
        Ok(())
    }

    /// Sends `plaintext` as one frame, sealed exactly as [`send`](Sender::send)
    /// seals an encoded message, whatever it holds; the length header says
    /// `claimed_len` instead of the real length when given (and is then
    /// what the frame is sealed with, as associated data). Only for tests
    /// of how a peer copes with malformed frames and unknown messages.
    #[doc(hidden)]
    pub async fn send_raw_for_tests(
        &mut self,
        plaintext: &[u8],
        claimed_len: Option<u32>,
    ) -> Result<()> {
        self.check()?;
        self.begin_frame();
        self.buf.extend_from_slice(plaintext);
        self.seal_and_write_claiming(claimed_len).await
    }

    fn check(&self) -> Result<()> {
        if self.broken {
            Err(WireError::Broken)
        } else {
            Ok(())
        }
    }

    fn begin_frame(&mut self) {
        // Keep a big buffer around only while big frames are being sent.
        if self.buf.capacity() > 4 * MAX_FRAME / 3 {
            self.buf = Vec::new();
        }
        self.buf.clear();
        self.buf.extend_from_slice(&[0u8; 4]);
    }

    async fn seal_and_write(&mut self) -> Result<()> {
        self.seal_and_write_claiming(None).await
    }

    /// Seals the message in `buf[4..]` and writes the frame; its length
    /// header is the real length, or `claimed` (tests only).
    async fn seal_and_write_claiming(&mut self, claimed: Option<u32>) -> Result<()> {
        let body = self.buf.len() - 4;
        let real = frame_header(body)?;
        self.write_capture(body);
        let header = claimed.map_or(real, u32::to_be_bytes);
        self.buf[..4].copy_from_slice(&header);
        // From here on a failure or a cancellation leaves the peer's frame
        // counter out of step with ours.
        self.broken = true;
        let tag = self.cipher.seal(&header, &mut self.buf[4..])?;
        self.buf.extend_from_slice(&tag);
        for chunk in self.buf.chunks(WRITE_CHUNK) {
            self.bandwidth.acquire(chunk.len()).await;
            within(self.send_timeout, self.writer.write_all(chunk)).await?;
            self.traffic.add_sent(chunk.len());
        }
        within(self.send_timeout, self.writer.flush()).await?;
        self.traffic.add_frame_sent();
        self.broken = false;
        Ok(())
    }

    /// Appends the plaintext in `buf[4..]` to the capture file, if any, as
    /// `len: u32 BE | plaintext` in one write. A failing write ends the
    /// capture (with a warning), never the migration.
    fn write_capture(&mut self, body: usize) {
        let Some(file) = self.capture.as_mut() else {
            return;
        };
        let mut record = Vec::with_capacity(4 + body);
        // MAX_MESSAGE fits in a u32.
        record.extend_from_slice(&(body as u32).to_be_bytes());
        record.extend_from_slice(&self.buf[4..]);
        if let Err(e) = file.write_all(&record) {
            tracing::warn!("{CAPTURE_ENV}: write failed, capture stopped: {e}");
            self.capture = None;
        }
    }
}

/// Runs a write, failing with [`WireError::SendTimeout`] if it takes longer
/// than `limit`.
async fn within(
    limit: Option<Duration>,
    write: impl std::future::Future<Output = std::io::Result<()>>,
) -> Result<()> {
    match limit {
        None => Ok(write.await?),
        Some(d) => match tokio::time::timeout(d, write).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(WireError::SendTimeout(d)),
        },
    }
}

/// Opens the file named by [`CAPTURE_ENV`] for appending (created 0600),
/// when the variable is set; `None` otherwise or if it cannot be opened
/// (with a warning: capturing is a debugging aid, not part of a migration).
fn open_capture() -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = std::env::var_os(CAPTURE_ENV).filter(|p| !p.is_empty())?;
    match std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(file) => {
            tracing::warn!(
                "{CAPTURE_ENV}: appending every message sent, in clear, to {}",
                std::path::Path::new(&path).display()
            );
            Some(file)
        }
        Err(e) => {
            tracing::warn!(
                "{CAPTURE_ENV}: cannot open {}: {e}; not capturing",
                std::path::Path::new(&path).display()
            );
            None
        }
    }
}

impl Receiver {
    /// Receives one message.
    ///
    /// [`WireError::Closed`] when the peer closed between frames;
    /// [`WireError::Truncated`] when it went away within one. After any
    /// error but a malformed or unknown message, or if this future is
    /// dropped before it completes, the connection is unusable.
    pub async fn recv(&mut self) -> Result<Message> {
        if self.broken {
            return Err(WireError::Broken);
        }
        self.broken = true;
        let plain = self.read_frame().await?;
        self.broken = false;
        self.traffic.add_frame_received();
        Message::decode(plain)
    }

    /// Sets the receive time-out: the longest silence from the peer that
    /// [`recv`](Receiver::recv) waits through. `None` waits forever.
    pub fn set_recv_timeout(&mut self, timeout: Option<Duration>) {
        self.recv_timeout = timeout;
    }

    /// The receive time-out in force.
    pub fn recv_timeout(&self) -> Option<Duration> {
        self.recv_timeout
    }

    /// The byte counters of this connection.
    pub fn traffic(&self) -> Traffic {
        self.traffic.clone()
    }

    /// Facts about the connection.
    pub fn info(&self) -> ChannelInfo {
        self.info
    }

    async fn read_frame(&mut self) -> Result<Bytes> {
        let mut header = [0u8; 4];
        let got = read_full(
            &mut self.reader,
            &mut header,
            self.recv_timeout,
            &self.traffic,
        )
        .await?;
        if got == 0 {
            return Err(WireError::Closed);
        }
        if got < header.len() {
            return Err(WireError::Truncated("frame"));
        }
        let len = frame_len(header)?;
        let mut body = vec![0u8; len];
        let got = read_full(
            &mut self.reader,
            &mut body,
            self.recv_timeout,
            &self.traffic,
        )
        .await?;
        if got < len {
            return Err(WireError::Truncated("frame"));
        }
        let (text, tag_bytes) = body.split_at_mut(len - TAG_LEN);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(tag_bytes);
        self.cipher.open(&header, text, &tag)?;
        body.truncate(len - TAG_LEN);
        Ok(Bytes::from(body))
    }
}

/// The length prefix of a frame whose message encodes to `message_len`
/// bytes; refuses a message over [`MAX_MESSAGE`].
pub(crate) fn frame_header(message_len: usize) -> Result<[u8; 4]> {
    if message_len > MAX_MESSAGE {
        return Err(WireError::MessageTooLarge {
            len: message_len as u64,
            max: MAX_MESSAGE as u64,
        });
    }
    // MAX_FRAME fits in a u32.
    Ok(((message_len + TAG_LEN) as u32).to_be_bytes())
}

/// The length (ciphertext and tag) a frame's prefix announces; refuses one
/// over [`MAX_FRAME`] before anything is allocated for it, and one too short
/// to hold a tag and a message's type byte.
pub(crate) fn frame_len(header: [u8; 4]) -> Result<usize> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(WireError::FrameTooLarge {
            len: len as u64,
            max: MAX_FRAME as u64,
        });
    }
    if len < TAG_LEN + 1 {
        return Err(WireError::FrameTooShort(len as u64));
    }
    Ok(len)
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("info", &self.tx.info)
            .field("traffic", &self.tx.traffic)
            .finish()
    }
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("info", &self.info)
            .field("broken", &self.broken)
            .finish()
    }
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("info", &self.info)
            .field("recv_timeout", &self.recv_timeout)
            .field("broken", &self.broken)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{pair, Key};

    #[tokio::test]
    async fn unknown_message_type_is_a_clear_error_and_not_fatal() -> Result<()> {
        let (a, mut b) = pair(&Key::from_bytes([1; 32])).await?;
        let (mut tx, _rx) = a.split();
        // A sealed frame with a type byte from a future protocol.
        tx.begin_frame();
        tx.buf.extend_from_slice(&[200, 1, 2, 3]);
        tx.seal_and_write().await?;
        match b.recv().await {
            Err(e @ WireError::UnknownMessage(200)) => {
                assert_eq!(
                    e.to_string(),
                    "peer sent unknown message type 200 (does it run a newer migrun?)"
                );
            }
            other => panic!("{other:?}"),
        }
        // The frame was authentic, so the stream is still in step.
        tx.send(&Message::Done).await?;
        assert_eq!(b.recv().await?, Message::Done);
        Ok(())
    }

    #[test]
    fn frame_headers_round_trip_and_bad_lengths_are_refused() -> Result<()> {
        for message_len in [1, 2, 4096, MAX_MESSAGE] {
            assert_eq!(
                frame_len(frame_header(message_len)?)?,
                message_len + TAG_LEN
            );
        }
        assert!(matches!(
            frame_header(MAX_MESSAGE + 1),
            Err(WireError::MessageTooLarge { .. })
        ));
        assert!(matches!(
            frame_len(((MAX_FRAME + 1) as u32).to_be_bytes()),
            Err(WireError::FrameTooLarge { .. })
        ));
        assert!(matches!(
            frame_len(u32::MAX.to_be_bytes()),
            Err(WireError::FrameTooLarge { .. })
        ));
        for short in [0, 1, TAG_LEN as u32] {
            assert!(matches!(
                frame_len(short.to_be_bytes()),
                Err(WireError::FrameTooShort(_))
            ));
        }
        Ok(())
    }

    #[tokio::test]
    async fn capture_file_gets_each_plaintext_with_its_length() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("capture");
        let (a, mut b) = pair(&Key::from_bytes([1; 32])).await?;
        let (mut tx, _rx) = a.split();
        // What open_capture does when the variable is set (not set here:
        // the environment is shared by the tests running in parallel).
        tx.capture = Some(
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&path)?,
        );
        let sent = [
            Message::Hello {
                agent: "capture-test".into(),
            },
            Message::Done,
        ];
        let mut expected = Vec::new();
        for m in &sent {
            tx.send(m).await?;
            assert_eq!(&b.recv().await?, m);
            let mut plain = Vec::new();
            m.encode(&mut plain)?;
            expected.extend_from_slice(&(plain.len() as u32).to_be_bytes());
            expected.extend_from_slice(&plain);
        }
        assert_eq!(std::fs::read(&path)?, expected);
        Ok(())
    }

    #[tokio::test]
    async fn raw_frames_for_tests_are_sealed_like_messages() -> Result<()> {
        let key = Key::from_bytes([1; 32]);
        let mut plain = Vec::new();
        Message::Ack.encode(&mut plain)?;
        // The true length: an ordinary message.
        let (a, mut b) = pair(&key).await?;
        let (mut tx, rx) = a.split();
        tx.send_raw_for_tests(&plain, None).await?;
        assert_eq!(b.recv().await?, Message::Ack);
        // More claimed than follows, then the sender goes away.
        let sealed = (plain.len() + TAG_LEN) as u32;
        tx.send_raw_for_tests(&plain, Some(sealed + 100)).await?;
        drop((tx, rx));
        assert!(matches!(b.recv().await, Err(WireError::Truncated(_))));
        // Fewer claimed than follow: the frame does not authenticate.
        let (a, mut b) = pair(&key).await?;
        let (mut tx, _rx) = a.split();
        tx.send_raw_for_tests(&[0; 64], Some(sealed)).await?;
        assert!(matches!(b.recv().await, Err(WireError::Decrypt)));
        // Over the limit: refused from the header alone.
        let (a, mut b) = pair(&key).await?;
        let (mut tx, _rx) = a.split();
        tx.send_raw_for_tests(&plain, Some(MAX_FRAME as u32 + 1))
            .await?;
        assert!(matches!(
            b.recv().await,
            Err(WireError::FrameTooLarge { .. })
        ));
        Ok(())
    }

    #[tokio::test]
    async fn too_large_messages_are_refused_before_sending() -> Result<()> {
        let (mut a, mut b) = pair(&Key::from_bytes([1; 32])).await?;
        let big = Message::Error {
            message: "x".repeat(MAX_MESSAGE),
        };
        assert!(matches!(
            a.send(&big).await,
            Err(WireError::MessageTooLarge { .. })
        ));
        // Nothing went out, so the channel still works.
        a.send(&Message::Ack).await?;
        assert_eq!(b.recv().await?, Message::Ack);
        Ok(())
    }
}

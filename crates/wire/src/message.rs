//! The messages of a migration and their compact binary encoding.
//!
//! The command set follows cloud-hypervisor's migration protocol (start,
//! memory, state, complete, abandon), shaped for containers: memory goes as
//! runs of pages per process, the root file system's changes as file chunks,
//! and the frozen state as CRIU image files.
//!
//! Encoding: one type byte, then the fields in order; integers are
//! little-endian, strings and byte strings are a `u32` length and the bytes.
//! Payload bytes are never copied when decoding: they are slices of the
//! received frame.

use std::fmt;

use bytes::{BufMut, Bytes};
use serde::{Deserialize, Serialize};

use crate::error::{Result, WireError};

/// Size of a memory page as carried by [`PageRun`].
pub const PAGE_SIZE: usize = 4096;

/// The largest payload (page data, file chunk, image chunk) in one message: 16 MiB.
pub const MAX_PAYLOAD: usize = 16 << 20;

/// The largest encoded message: the payload plus room for names and lists.
pub const MAX_MESSAGE: usize = MAX_PAYLOAD + (64 << 10);

/// The most pages a [`PageRun`] can describe when all are present.
pub const MAX_RUN_PAGES: usize = MAX_PAYLOAD / PAGE_SIZE;

/// One message of the migration protocol.
///
/// The order from source to target: `Hello`, `Start`; then, while setting
/// up, the image layers the target asked for (`LayersWanted`) as trees
/// (`FileBegin`/`FileChunk`/`Manifest` of [`TreeId::Layer`]) or a Docker
/// image (`ImageChunk`/`ImageDone`); then rounds of `Pages` and the root
/// filesystem's changes (`FileBegin`/`FileChunk`, then a `Manifest` of
/// [`TreeId::Rootfs`]) each closed by `RoundDone`; `Frozen`, the last pages
/// and changes, `CriuImages` of the frozen container, `Commit`; the target
/// answers `Ack` (or `Error`), and the source ends with `Done`. Either side
/// may send `Abort`. The engine's receiver takes each message only in the
/// phase where it belongs; this crate only carries them.
///
/// The enum is deliberately exhaustive, so that code matching on it is told
/// by the compiler when a message is added (which bumps
/// [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION)); a peer that receives a
/// type it does not know fails with [`WireError::UnknownMessage`].
#[derive(Clone, PartialEq, Eq)]
pub enum Message {
    /// First message after the secure handshake: who is talking, for logs.
    Hello {
        /// Software and version of the sender, e.g. `migrun 0.1.0`.
        agent: String,
    },
    /// Starts the migration of one container.
    Start {
        /// The container's id.
        container_id: String,
        /// The container's spec and bundle information, as JSON.
        spec_json: String,
        /// How much memory is about to come.
        memory: MemoryTotals,
    },
    /// A run of consecutive pages of one process.
    Pages(PageRun),
    /// A regular file of a tree starts afresh: `size` bytes, all hole
    /// until its data ([`Message::FileChunk`]s, which follow at once) fill
    /// the parts that hold data. A sparse file's holes never cross.
    FileBegin {
        /// The tree the file belongs to.
        tree: TreeId,
        /// Path of the file, relative to the tree's root.
        path: String,
        /// Its size in bytes (apparent size: data and holes).
        size: u64,
    },
    /// Data of the file of the last [`Message::FileBegin`].
    FileChunk {
        /// Path of the file (the same as in its `FileBegin`).
        path: String,
        /// Offset of `data` in the file (within its size).
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// A piece of the manifest of a tree: every path with its kind and
    /// metadata, as JSON; the target applies it once the last piece is in.
    Manifest {
        /// The tree it describes.
        tree: TreeId,
        /// The bytes of this piece.
        data: Bytes,
        /// Whether this is the last piece.
        last: bool,
    },
    /// A piece of a Docker image (`docker save` without the layers the
    /// target has), in order.
    ImageChunk {
        /// Offset of `data` in the image tarball.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// The Docker image is complete: the target loads it and answers `Ack`.
    ImageDone {
        /// The tarball's size.
        size: u64,
    },
    /// The container is frozen: the last pages and changes, then CRIU's
    /// images and `Commit`, follow.
    Frozen,
    /// A pre-copy round is complete.
    RoundDone {
        /// The round's number, from 0.
        round: u32,
        /// What the round moved.
        stats: RoundStats,
    },
    /// A piece of one of CRIU's image files of the frozen container.
    CriuImages {
        /// The image file's name, e.g. `core-1.img`.
        name: String,
        /// Offset of `data` in the image file (large images come in pieces).
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// The source has sent everything: the target should restore the container.
    Commit,
    /// The last request succeeded.
    Ack,
    /// The sender gives up the migration; the receiver should roll back.
    Abort {
        /// Why, for the operator.
        reason: String,
    },
    /// The last request failed on the sender.
    Error {
        /// What went wrong, for the operator.
        message: String,
    },
    /// The migration is over; the connection will be closed.
    Done,
    /// "Still here": sent by a side that has nothing else to say for a
    /// while (a restore, a dump), so that the peer's receive deadline
    /// tells a silent partition from a slow step. Taken in any phase.
    Heartbeat,
    /// `migrate-recover`: where this side's journal of the migration of
    /// `container` stands, for the peer to settle the hand-over with.
    Recover {
        /// The container, as the source names it.
        container: String,
        /// This side's journal step (`none` without a journal).
        step: String,
        /// Whether this side's copy is whole (the target's is not when its
        /// memory was still arriving lazily when its `migrate-in` died).
        whole: bool,
    },
    /// The target's answer to a [`Message::Start`] that offered image
    /// layers by content digest: the ones it lacks, which the source then
    /// sends (the others never cross the wire).
    LayersWanted {
        /// Digests of the layers to send, from the offer.
        digests: Vec<String>,
    },
}

/// Which file tree a [`Message::FileBegin`] or [`Message::Manifest`] is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TreeId {
    /// The container's root filesystem, or the upper directory of an
    /// overlay (or Docker) one: the tree the rounds sync.
    Rootfs,
    /// A read-only image layer the target asked for, by content digest.
    Layer(String),
}

impl fmt::Display for TreeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TreeId::Rootfs => f.write_str("root filesystem"),
            TreeId::Layer(d) => write!(f, "layer {d}"),
        }
    }
}

/// Totals announced with [`Message::Start`], for progress reporting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryTotals {
    /// Number of processes in the container.
    pub processes: u32,
    /// Bytes of mapped memory over all processes.
    pub mapped_bytes: u64,
    /// Pages present in memory over all processes (what round 0 sends).
    pub resident_pages: u64,
}

/// What one pre-copy round moved, sent with [`Message::RoundDone`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundStats {
    /// Pages sent with data.
    pub pages_sent: u64,
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Bytes of page data and file data sent.
    pub bytes_sent: u64,
    /// Pages found dirty at the end of the round (what the next round sends).
    pub dirty_pages: u64,
    /// How long the round took, in milliseconds.
    pub duration_ms: u64,
}

/// A run of consecutive pages of one process.
///
/// The run covers `page_count()` pages from `addr`. The pages listed in
/// `zero_pages` (indices within the run, strictly increasing) are all zero
/// and carry no data; `data` holds the other pages, in order. Keep runs to
/// at most [`MAX_RUN_PAGES`] pages so that a run fits into one frame.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct PageRun {
    /// Process id (in the container's PID namespace or as the engine agreed).
    pub pid: u32,
    /// Address of the run's first page; a multiple of [`PAGE_SIZE`].
    pub addr: u64,
    /// Indices of all-zero pages within the run, strictly increasing.
    pub zero_pages: Vec<u32>,
    /// The non-zero pages, concatenated; a multiple of [`PAGE_SIZE`] long.
    pub data: Bytes,
}

impl PageRun {
    /// Number of pages in the run, with and without data.
    pub fn page_count(&self) -> usize {
        self.data.len() / PAGE_SIZE + self.zero_pages.len()
    }

    /// Number of pages carried with data.
    pub fn data_pages(&self) -> usize {
        self.data.len() / PAGE_SIZE
    }

    /// Checks that the run is consistent: page-aligned address and data,
    /// increasing zero indices within the run, no address overflow.
    pub fn validate(&self) -> Result<(), String> {
        if !self.addr.is_multiple_of(PAGE_SIZE as u64) {
            return Err(format!(
                "page run address {:#x} is not page-aligned",
                self.addr
            ));
        }
        if !self.data.len().is_multiple_of(PAGE_SIZE) {
            return Err(format!(
                "page run data of {} bytes is not a whole number of pages",
                self.data.len()
            ));
        }
        let count = self.page_count();
        let mut prev: Option<u32> = None;
        for &z in &self.zero_pages {
            if prev.is_some_and(|p| z <= p) {
                return Err("zero page indices are not strictly increasing".into());
            }
            if z as usize >= count {
                return Err(format!(
                    "zero page index {z} is outside the run of {count} pages"
                ));
            }
            prev = Some(z);
        }
        let span = (count as u64).checked_mul(PAGE_SIZE as u64);
        if span.and_then(|s| self.addr.checked_add(s)).is_none() {
            return Err("page run extends past the end of the address space".into());
        }
        Ok(())
    }

    /// The run's pages in order: each page's address and its data, or
    /// `None` for a zero page.
    pub fn pages(&self) -> impl Iterator<Item = (u64, Option<&[u8]>)> + '_ {
        let mut zeros = self.zero_pages.iter().peekable();
        let mut chunks = self.data.chunks_exact(PAGE_SIZE);
        (0..self.page_count()).map_while(move |i| {
            let addr = self.addr + (i * PAGE_SIZE) as u64;
            if zeros.next_if(|&&z| z as usize == i).is_some() {
                Some((addr, None))
            } else {
                chunks.next().map(|c| (addr, Some(c)))
            }
        })
    }
}

impl fmt::Debug for PageRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageRun")
            .field("pid", &self.pid)
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("data_pages", &self.data_pages())
            .field("zero_pages", &self.zero_pages.len())
            .finish()
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Hello { agent } => f.debug_struct("Hello").field("agent", agent).finish(),
            Message::Start {
                container_id,
                spec_json,
                memory,
            } => f
                .debug_struct("Start")
                .field("container_id", container_id)
                .field("spec_json_len", &spec_json.len())
                .field("memory", memory)
                .finish(),
            Message::Pages(run) => f.debug_tuple("Pages").field(run).finish(),
            Message::FileChunk { path, offset, data } => f
                .debug_struct("FileChunk")
                .field("path", path)
                .field("offset", offset)
                .field("len", &data.len())
                .finish(),
            Message::FileBegin { tree, path, size } => f
                .debug_struct("FileBegin")
                .field("tree", tree)
                .field("path", path)
                .field("size", size)
                .finish(),
            Message::Manifest { tree, data, last } => f
                .debug_struct("Manifest")
                .field("tree", tree)
                .field("len", &data.len())
                .field("last", last)
                .finish(),
            Message::ImageChunk { offset, data } => f
                .debug_struct("ImageChunk")
                .field("offset", offset)
                .field("len", &data.len())
                .finish(),
            Message::ImageDone { size } => f.debug_struct("ImageDone").field("size", size).finish(),
            Message::Frozen => f.write_str("Frozen"),
            Message::RoundDone { round, stats } => f
                .debug_struct("RoundDone")
                .field("round", round)
                .field("stats", stats)
                .finish(),
            Message::CriuImages { name, offset, data } => f
                .debug_struct("CriuImages")
                .field("name", name)
                .field("offset", offset)
                .field("len", &data.len())
                .finish(),
            Message::Commit => f.write_str("Commit"),
            Message::Ack => f.write_str("Ack"),
            Message::Abort { reason } => f.debug_struct("Abort").field("reason", reason).finish(),
            Message::Error { message } => {
                f.debug_struct("Error").field("message", message).finish()
            }
            Message::Done => f.write_str("Done"),
            Message::Heartbeat => f.write_str("Heartbeat"),
            Message::Recover {
                container,
                step,
                whole,
            } => f
                .debug_struct("Recover")
                .field("container", container)
                .field("step", step)
                .field("whole", whole)
                .finish(),
            Message::LayersWanted { digests } => f
                .debug_struct("LayersWanted")
                .field("digests", digests)
                .finish(),
        }
    }
}

/// Type bytes on the wire. Never reuse a number.
mod tag {
    pub const HELLO: u8 = 1;
    pub const START: u8 = 2;
    pub const PAGES: u8 = 3;
    pub const FILE_CHUNK: u8 = 4;
    // 5 and 6 were FileDone and FileRemove (protocol 2).
    pub const ROUND_DONE: u8 = 7;
    pub const CRIU_IMAGES: u8 = 8;
    pub const COMMIT: u8 = 9;
    pub const ACK: u8 = 10;
    pub const ABORT: u8 = 11;
    pub const ERROR: u8 = 12;
    pub const DONE: u8 = 13;
    pub const LAYERS_WANTED: u8 = 14;
    pub const FILE_BEGIN: u8 = 15;
    pub const MANIFEST: u8 = 16;
    pub const IMAGE_CHUNK: u8 = 17;
    pub const IMAGE_DONE: u8 = 18;
    pub const FROZEN: u8 = 19;
    pub const HEARTBEAT: u8 = 20;
    pub const RECOVER: u8 = 21;
}

/// Tree bytes on the wire.
mod tree_tag {
    pub const ROOTFS: u8 = 1;
    pub const LAYER: u8 = 2;
}

impl Message {
    /// The message's name, for logs and "unexpected message" errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Start { .. } => "start",
            Message::Pages(_) => "pages",
            Message::FileChunk { .. } => "file-chunk",
            Message::FileBegin { .. } => "file-begin",
            Message::Manifest { .. } => "manifest",
            Message::ImageChunk { .. } => "image-chunk",
            Message::ImageDone { .. } => "image-done",
            Message::Frozen => "frozen",
            Message::RoundDone { .. } => "round-done",
            Message::CriuImages { .. } => "criu-images",
            Message::Commit => "commit",
            Message::Ack => "ack",
            Message::Abort { .. } => "abort",
            Message::Error { .. } => "error",
            Message::Done => "done",
            Message::Heartbeat => "heartbeat",
            Message::Recover { .. } => "recover",
            Message::LayersWanted { .. } => "layers-wanted",
        }
    }

    /// Bytes of payload (page, file or image data) the message carries.
    pub fn payload_len(&self) -> usize {
        match self {
            Message::Pages(run) => run.data.len(),
            Message::FileChunk { data, .. }
            | Message::CriuImages { data, .. }
            | Message::Manifest { data, .. }
            | Message::ImageChunk { data, .. } => data.len(),
            _ => 0,
        }
    }

    /// Appends the encoding of the message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<()> {
        if self.payload_len() > MAX_PAYLOAD {
            return Err(WireError::MessageTooLarge {
                len: self.payload_len() as u64,
                max: MAX_PAYLOAD as u64,
            });
        }
        match self {
            Message::Hello { agent } => {
                out.put_u8(tag::HELLO);
                put_str(out, agent)?;
            }
            Message::Start {
                container_id,
                spec_json,
                memory,
            } => {
                out.put_u8(tag::START);
                put_str(out, container_id)?;
                put_str(out, spec_json)?;
                out.put_u32_le(memory.processes);
                out.put_u64_le(memory.mapped_bytes);
                out.put_u64_le(memory.resident_pages);
            }
            Message::Pages(run) => {
                run.validate().map_err(WireError::InvalidMessage)?;
                out.put_u8(tag::PAGES);
                out.put_u32_le(run.pid);
                out.put_u64_le(run.addr);
                put_bytes(out, &run.data)?;
                put_len(out, run.zero_pages.len())?;
                for &z in &run.zero_pages {
                    out.put_u32_le(z);
                }
            }
            Message::FileChunk { path, offset, data } => {
                out.put_u8(tag::FILE_CHUNK);
                put_str(out, path)?;
                out.put_u64_le(*offset);
                put_bytes(out, data)?;
            }
            Message::FileBegin { tree, path, size } => {
                out.put_u8(tag::FILE_BEGIN);
                put_tree(out, tree)?;
                put_str(out, path)?;
                out.put_u64_le(*size);
            }
            Message::Manifest { tree, data, last } => {
                out.put_u8(tag::MANIFEST);
                put_tree(out, tree)?;
                put_bytes(out, data)?;
                out.put_u8(u8::from(*last));
            }
            Message::ImageChunk { offset, data } => {
                out.put_u8(tag::IMAGE_CHUNK);
                out.put_u64_le(*offset);
                put_bytes(out, data)?;
            }
            Message::ImageDone { size } => {
                out.put_u8(tag::IMAGE_DONE);
                out.put_u64_le(*size);
            }
            Message::Frozen => out.put_u8(tag::FROZEN),
            Message::RoundDone { round, stats } => {
                out.put_u8(tag::ROUND_DONE);
                out.put_u32_le(*round);
                out.put_u64_le(stats.pages_sent);
                out.put_u64_le(stats.zero_pages);
                out.put_u64_le(stats.bytes_sent);
                out.put_u64_le(stats.dirty_pages);
                out.put_u64_le(stats.duration_ms);
            }
            Message::CriuImages { name, offset, data } => {
                out.put_u8(tag::CRIU_IMAGES);
                put_str(out, name)?;
                out.put_u64_le(*offset);
                put_bytes(out, data)?;
            }
            Message::Commit => out.put_u8(tag::COMMIT),
            Message::Ack => out.put_u8(tag::ACK),
            Message::Abort { reason } => {
                out.put_u8(tag::ABORT);
                put_str(out, reason)?;
            }
            Message::Error { message } => {
                out.put_u8(tag::ERROR);
                put_str(out, message)?;
            }
            Message::Done => out.put_u8(tag::DONE),
            Message::Heartbeat => out.put_u8(tag::HEARTBEAT),
            Message::Recover {
                container,
                step,
                whole,
            } => {
                out.put_u8(tag::RECOVER);
                put_str(out, container)?;
                put_str(out, step)?;
                out.put_u8(u8::from(*whole));
            }
            Message::LayersWanted { digests } => {
                out.put_u8(tag::LAYERS_WANTED);
                // Digests are hex: one per line.
                put_str(out, &digests.join("\n"))?;
            }
        }
        Ok(())
    }

    /// Decodes one message that fills all of `buf`; payloads are slices of `buf`.
    pub fn decode(buf: Bytes) -> Result<Message> {
        let mut r = Decoder { buf, pos: 0 };
        let msg = match r.u8()? {
            tag::HELLO => Message::Hello { agent: r.string()? },
            tag::START => Message::Start {
                container_id: r.string()?,
                spec_json: r.string()?,
                memory: MemoryTotals {
                    processes: r.u32()?,
                    mapped_bytes: r.u64()?,
                    resident_pages: r.u64()?,
                },
            },
            tag::PAGES => {
                let pid = r.u32()?;
                let addr = r.u64()?;
                let data = r.bytes()?;
                let count = r.len()?;
                // Each index takes 4 bytes of input, so this allocation is
                // bounded by the frame that already arrived.
                if count > r.remaining() / 4 {
                    return Err(WireError::Malformed("zero page list is cut short".into()));
                }
                let mut zero_pages = Vec::with_capacity(count);
                for _ in 0..count {
                    zero_pages.push(r.u32()?);
                }
                let run = PageRun {
                    pid,
                    addr,
                    zero_pages,
                    data,
                };
                run.validate().map_err(WireError::Malformed)?;
                Message::Pages(run)
            }
            tag::FILE_CHUNK => Message::FileChunk {
                path: r.string()?,
                offset: r.u64()?,
                data: r.bytes()?,
            },
            tag::FILE_BEGIN => Message::FileBegin {
                tree: r.tree()?,
                path: r.string()?,
                size: r.u64()?,
            },
            tag::MANIFEST => Message::Manifest {
                tree: r.tree()?,
                data: r.bytes()?,
                last: match r.u8()? {
                    0 => false,
                    1 => true,
                    b => return Err(WireError::Malformed(format!("manifest flag {b}"))),
                },
            },
            tag::IMAGE_CHUNK => Message::ImageChunk {
                offset: r.u64()?,
                data: r.bytes()?,
            },
            tag::IMAGE_DONE => Message::ImageDone { size: r.u64()? },
            tag::FROZEN => Message::Frozen,
            tag::ROUND_DONE => Message::RoundDone {
                round: r.u32()?,
                stats: RoundStats {
                    pages_sent: r.u64()?,
                    zero_pages: r.u64()?,
                    bytes_sent: r.u64()?,
                    dirty_pages: r.u64()?,
                    duration_ms: r.u64()?,
                },
            },
            tag::CRIU_IMAGES => Message::CriuImages {
                name: r.string()?,
                offset: r.u64()?,
                data: r.bytes()?,
            },
            tag::COMMIT => Message::Commit,
            tag::ACK => Message::Ack,
            tag::ABORT => Message::Abort {
                reason: r.string()?,
            },
            tag::ERROR => Message::Error {
                message: r.string()?,
            },
            tag::DONE => Message::Done,
            tag::HEARTBEAT => Message::Heartbeat,
            tag::RECOVER => Message::Recover {
                container: r.string()?,
                step: r.string()?,
                whole: match r.u8()? {
                    0 => false,
                    1 => true,
                    b => return Err(WireError::Malformed(format!("recover flag {b}"))),
                },
            },
            tag::LAYERS_WANTED => Message::LayersWanted {
                digests: r
                    .string()?
                    .split('\n')
                    .filter(|d| !d.is_empty())
                    .map(String::from)
                    .collect(),
            },
            other => return Err(WireError::UnknownMessage(other)),
        };
        if r.remaining() != 0 {
            return Err(WireError::Malformed(format!(
                "{} trailing bytes after a {} message",
                r.remaining(),
                msg.kind()
            )));
        }
        Ok(msg)
    }
}

/// What [`Channel::send_pages`](crate::Channel::send_pages) sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagesSummary {
    /// Pages sent with data.
    pub data_pages: usize,
    /// Pages sent as zero markers.
    pub zero_pages: usize,
}

/// Appends a [`Message::Pages`] for the raw pages `raw` at `addr`, detecting
/// zero pages on the way, so page data is copied once, straight into `out`.
pub(crate) fn encode_raw_pages(
    out: &mut Vec<u8>,
    pid: u32,
    addr: u64,
    raw: &[u8],
) -> Result<PagesSummary> {
    if raw.len() > MAX_PAYLOAD {
        return Err(WireError::MessageTooLarge {
            len: raw.len() as u64,
            max: MAX_PAYLOAD as u64,
        });
    }
    if !raw.len().is_multiple_of(PAGE_SIZE) || !addr.is_multiple_of(PAGE_SIZE as u64) {
        return Err(WireError::InvalidMessage(format!(
            "raw pages must be page-aligned whole pages (addr {addr:#x}, {} bytes)",
            raw.len()
        )));
    }
    if addr.checked_add(raw.len() as u64).is_none() {
        return Err(WireError::InvalidMessage(
            "page run extends past the end of the address space".into(),
        ));
    }
    out.reserve(1 + 4 + 8 + 4 + raw.len() + 4);
    out.put_u8(tag::PAGES);
    out.put_u32_le(pid);
    out.put_u64_le(addr);
    let len_at = out.len();
    out.put_u32_le(0);
    let mut zeros: Vec<u32> = Vec::new();
    for (i, page) in raw.chunks_exact(PAGE_SIZE).enumerate() {
        if is_zero(page) {
            // i < MAX_RUN_PAGES, checked above.
            zeros.push(i as u32);
        } else {
            out.extend_from_slice(page);
        }
    }
    let data_len = raw.len() - zeros.len() * PAGE_SIZE;
    out[len_at..len_at + 4].copy_from_slice(&(data_len as u32).to_le_bytes());
    put_len(out, zeros.len())?;
    for &z in &zeros {
        out.put_u32_le(z);
    }
    Ok(PagesSummary {
        data_pages: data_len / PAGE_SIZE,
        zero_pages: zeros.len(),
    })
}

/// Whether a page is all zero; written to vectorise.
fn is_zero(page: &[u8]) -> bool {
    page.chunks(128)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

fn put_len(out: &mut Vec<u8>, len: usize) -> Result<()> {
    let len32 = u32::try_from(len).map_err(|_| WireError::MessageTooLarge {
        len: len as u64,
        max: u64::from(u32::MAX),
    })?;
    out.put_u32_le(len32);
    Ok(())
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) -> Result<()> {
    put_len(out, b.len())?;
    out.extend_from_slice(b);
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) -> Result<()> {
    put_bytes(out, s.as_bytes())
}

fn put_tree(out: &mut Vec<u8>, tree: &TreeId) -> Result<()> {
    match tree {
        TreeId::Rootfs => out.put_u8(tree_tag::ROOTFS),
        TreeId::Layer(d) => {
            out.put_u8(tree_tag::LAYER);
            put_str(out, d)?;
        }
    }
    Ok(())
}

struct Decoder {
    buf: Bytes,
    pos: usize,
}

impl Decoder {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if n > self.remaining() {
            return Err(WireError::Malformed(format!(
                "message cut short: needs {n} more bytes, {} left",
                self.remaining()
            )));
        }
        let start = self.pos;
        self.pos += n;
        Ok(&self.buf[start..self.pos])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn len(&mut self) -> Result<usize> {
        Ok(self.u32()? as usize)
    }

    fn bytes(&mut self) -> Result<Bytes> {
        let n = self.len()?;
        if n > self.remaining() {
            return Err(WireError::Malformed(format!(
                "byte string of {n} bytes but only {} left in the message",
                self.remaining()
            )));
        }
        let b = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }

    fn tree(&mut self) -> Result<TreeId> {
        match self.u8()? {
            tree_tag::ROOTFS => Ok(TreeId::Rootfs),
            tree_tag::LAYER => Ok(TreeId::Layer(self.string()?)),
            b => Err(WireError::Malformed(format!("unknown tree {b}"))),
        }
    }

    fn string(&mut self) -> Result<String> {
        let n = self.len()?;
        let raw = self.take(n)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| WireError::Malformed("string is not valid utf-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(msg: &Message) -> Result<Message> {
        let mut out = Vec::new();
        msg.encode(&mut out)?;
        Message::decode(Bytes::from(out))
    }

    #[test]
    fn pages_round_trip_and_iterate() -> Result<()> {
        let mut data = vec![1u8; PAGE_SIZE];
        data.extend(vec![2u8; PAGE_SIZE]);
        let run = PageRun {
            pid: 7,
            addr: 0x7f00_0000_0000,
            zero_pages: vec![0, 2],
            data: Bytes::from(data),
        };
        let back = round_trip(&Message::Pages(run.clone()))?;
        assert_eq!(back, Message::Pages(run.clone()));
        let pages: Vec<_> = run.pages().map(|(a, d)| (a, d.map(|d| d[0]))).collect();
        assert_eq!(
            pages,
            vec![
                (0x7f00_0000_0000, None),
                (0x7f00_0000_1000, Some(1)),
                (0x7f00_0000_2000, None),
                (0x7f00_0000_3000, Some(2)),
            ]
        );
        Ok(())
    }

    #[test]
    fn raw_pages_detect_zeros() -> Result<()> {
        let mut raw = vec![0u8; 4 * PAGE_SIZE];
        raw[PAGE_SIZE + 17] = 9;
        raw[4 * PAGE_SIZE - 1] = 3;
        let mut out = Vec::new();
        let sum = encode_raw_pages(&mut out, 3, 0x1000, &raw)?;
        assert_eq!(
            sum,
            PagesSummary {
                data_pages: 2,
                zero_pages: 2
            }
        );
        let Message::Pages(run) = Message::decode(Bytes::from(out))? else {
            panic!("not pages");
        };
        assert_eq!(run.zero_pages, vec![0, 2]);
        let rebuilt: Vec<u8> = run
            .pages()
            .flat_map(|(_, d)| d.map_or_else(|| vec![0u8; PAGE_SIZE], <[u8]>::to_vec))
            .collect();
        assert_eq!(rebuilt, raw);
        Ok(())
    }

    #[test]
    fn bad_runs_are_refused() {
        let bad = [
            PageRun {
                addr: 12,
                ..PageRun::default()
            },
            PageRun {
                data: Bytes::from(vec![0u8; 100]),
                ..PageRun::default()
            },
            PageRun {
                zero_pages: vec![1, 0],
                ..PageRun::default()
            },
            PageRun {
                zero_pages: vec![5],
                ..PageRun::default()
            },
            PageRun {
                addr: u64::MAX - 4095,
                zero_pages: vec![0, 1],
                ..PageRun::default()
            },
        ];
        for run in bad {
            assert!(
                matches!(
                    Message::Pages(run.clone()).encode(&mut Vec::new()),
                    Err(WireError::InvalidMessage(_))
                ),
                "{run:?} accepted"
            );
        }
    }

    #[test]
    fn unknown_truncated_and_trailing_are_errors() {
        assert!(matches!(
            Message::decode(Bytes::from_static(&[200])),
            Err(WireError::UnknownMessage(200))
        ));
        assert!(matches!(
            Message::decode(Bytes::new()),
            Err(WireError::Malformed(_))
        ));
        // A file chunk claiming 4 GiB of data in a 20-byte message.
        let mut out = vec![tag::FILE_CHUNK];
        out.extend(1u32.to_le_bytes());
        out.push(b'x');
        out.extend(0u64.to_le_bytes());
        out.extend(u32::MAX.to_le_bytes());
        assert!(matches!(
            Message::decode(Bytes::from(out)),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            Message::decode(Bytes::from_static(&[tag::ACK, 0])),
            Err(WireError::Malformed(_))
        ));
        // A zero-page list claiming more entries than bytes left.
        let mut out = vec![tag::PAGES];
        out.extend(1u32.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend(u32::MAX.to_le_bytes());
        assert!(matches!(
            Message::decode(Bytes::from(out)),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn oversized_payload_is_refused_on_send() {
        let msg = Message::FileChunk {
            path: "big".into(),
            offset: 0,
            data: Bytes::from(vec![0u8; MAX_PAYLOAD + 1]),
        };
        assert!(matches!(
            msg.encode(&mut Vec::new()),
            Err(WireError::MessageTooLarge { .. })
        ));
    }

    #[test]
    fn decoding_does_not_copy_payloads() -> Result<()> {
        let msg = Message::FileChunk {
            path: "f".into(),
            offset: 0,
            data: Bytes::from(vec![5u8; 8192]),
        };
        let mut out = Vec::new();
        msg.encode(&mut out)?;
        let frame = Bytes::from(out);
        let range = frame.as_ptr_range();
        let Message::FileChunk { data, .. } = Message::decode(frame.clone())? else {
            panic!("not a file chunk");
        };
        assert!(range.contains(&data.as_ptr()));
        Ok(())
    }
}

//! Errors of the wire protocol.

use std::path::PathBuf;
use std::time::Duration;

/// Result of a wire operation.
pub type Result<T, E = WireError> = std::result::Result<T, E>;

/// Everything that can go wrong on a migration connection or with its key.
///
/// Messages are one line, lower-case, and name the likely cause, since they
/// end up in front of an operator on either host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The TCP connection to the peer could not be made.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address as given by the caller.
        addr: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting to the peer took longer than the handshake time-out.
    #[error("connecting to {addr} timed out after {timeout:?}")]
    ConnectTimeout {
        /// The address as given by the caller.
        addr: String,
        /// The time-out in force.
        timeout: Duration,
    },
    /// Accepting a connection on the listener failed.
    #[error("cannot accept a connection: {0}")]
    Accept(#[source] std::io::Error),
    /// A read or write on the connection failed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection cleanly between two frames.
    #[error("peer closed the connection")]
    Closed,
    /// The peer went away in the middle of a frame or of the handshake.
    #[error("peer disconnected in the middle of a {0}")]
    Truncated(&'static str),
    /// The handshake did not complete in time.
    #[error("handshake timed out after {0:?}: is the peer a migrun endpoint, and reachable?")]
    HandshakeTimeout(Duration),
    /// Nothing arrived from the peer for the receive time-out.
    #[error("no data from peer for {0:?} (receive time-out)")]
    RecvTimeout(Duration),
    /// The peer took nothing of what we sent for the send time-out.
    #[error("peer took no data for {0:?} (send time-out)")]
    SendTimeout(Duration),
    /// The peer's hello did not start with the protocol magic.
    #[error("peer is not a migrun migration endpoint (bad protocol magic)")]
    BadMagic,
    /// The peer speaks another version of the protocol.
    #[error("protocol version mismatch: we speak version {ours}, peer speaks version {theirs}; run the same migrun version on both hosts")]
    VersionMismatch {
        /// Our protocol version.
        ours: u16,
        /// The peer's protocol version.
        theirs: u16,
    },
    /// Both ends connected, or both accepted (or the hello was reflected).
    #[error("peer has the same role as we do ({0}); one side must connect and the other accept")]
    SameRole(&'static str),
    /// The peer's hello carried a field we do not understand.
    #[error("bad hello from peer: {0}")]
    BadHello(String),
    /// The peer's ephemeral X25519 key is a low-order point, so the
    /// Diffie-Hellman result would be all zeros and known to anyone.
    #[error("peer sent a low-order ephemeral key (all-zero shared secret): not a genuine migrun peer, or the handshake was tampered with")]
    LowOrderKey,
    /// The peer could not prove knowledge of the shared key.
    #[error("peer failed authentication: wrong key?")]
    AuthFailed,
    /// A frame's length prefix is over the limit; nothing was allocated for it.
    #[error("peer sent a frame of {len} bytes, over the limit of {max}")]
    FrameTooLarge {
        /// The announced length.
        len: u64,
        /// The largest length accepted.
        max: u64,
    },
    /// A frame's length prefix is too short to hold an authentication tag.
    #[error("peer sent a frame of {0} bytes, too short to be sealed")]
    FrameTooShort(u64),
    /// A message is too large to fit into one frame.
    #[error("message of {len} bytes does not fit into a frame (limit {max}); split it")]
    MessageTooLarge {
        /// The encoded length.
        len: u64,
        /// The largest encoded length accepted.
        max: u64,
    },
    /// A frame did not authenticate: tampered, replayed, reordered or dropped data.
    #[error("frame failed authentication: data was tampered with, replayed, reordered or lost")]
    Decrypt,
    /// Sealing a frame failed (should not happen).
    #[error("cannot seal a frame")]
    Seal,
    /// The per-direction frame counter is exhausted (2^64 frames).
    #[error("frame counter exhausted; start a new connection")]
    CounterExhausted,
    /// A message did not decode.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A message to be sent is not valid (for example an inconsistent page run).
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// The peer sent a message type this version does not know.
    #[error("peer sent unknown message type {0} (does it run a newer migrun?)")]
    UnknownMessage(u8),
    /// An earlier error or a cancelled operation left the stream in an unknown state.
    #[error("connection is unusable after an earlier error")]
    Broken,
    /// A bug: a condition that cannot happen did.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// The operating system's random number generator failed.
    #[error("cannot get random bytes: {0}")]
    Random(String),
    /// The key file already exists and would be overwritten.
    #[error("key file {0} already exists; refusing to overwrite it")]
    KeyExists(PathBuf),
    /// The key file can be read or written by group or others.
    #[error(
        "key file {path} is accessible by group or others (mode {mode:04o}); run chmod 600 on it"
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold a key.
    #[error("key file {path} is malformed: {reason}")]
    KeyMalformed {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The key file could not be read or written.
    #[error("key file {path}: {source}")]
    KeyIo {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl WireError {
    /// Whether this error came from the peer failing authentication (wrong key).
    pub fn is_auth_failure(&self) -> bool {
        matches!(self, WireError::AuthFailed)
    }
}

//! The migration wire protocol: how `migrun migrate-out` (source) and
//! `migrun migrate-in` (target) talk during a live container migration.
//!
//! One TCP connection per migration. It starts with a handshake in which
//! both sides exchange a versioned hello with an ephemeral X25519 public
//! key and prove knowledge of a pre-shared key ([`Key`], from a key file);
//! a version mismatch or a wrong key is reported on both sides:
//!
//! ```text
//! both -> peer : hello = "MIGRUN" | version u16 BE | role u8 | cipher u8 | nonce [32]
//!                        | ephemeral X25519 public key [32]
//!                (each side checks magic, version and role of the other)
//! th = SHA-256(client hello | server hello)
//! dh = X25519(own ephemeral secret, peer's ephemeral public key)
//!                (refused if all zero: a low-order peer key)
//! secrets = HKDF-SHA256(salt = client nonce | server nonce, ikm = PSK | dh,
//!                       info = "migrun wire v3 <label>\0" | th)
//! both -> peer : proof = HMAC-SHA256(own auth secret, "<role> finished" | th)
//!                (each side verifies the other's proof in constant time)
//! then frames  : len u32 BE | AEAD(per-direction key, nonce = frame counter,
//!                                  aad = len, plaintext = message) | tag [16]
//! ```
//!
//! The PSK authenticates both sides: the proofs need it, and the transcript
//! hash covers both ephemeral keys, so a man in the middle without the PSK
//! cannot substitute its own. The ephemeral key pairs give forward secrecy:
//! they are made per connection and wiped during the handshake, so a
//! recorded migration cannot be decrypted later even with the key file.
//!
//! After it, every [`Message`] travels in one length-prefixed frame sealed
//! with an AEAD ([`Cipher`]) under per-direction session keys and counter
//! nonces, so tampered, replayed, reordered or dropped frames end the
//! connection.
//!
//! ```no_run
//! # async fn demo() -> migrun_wire::Result<()> {
//! use migrun_wire::{accept, connect, load_key, Message};
//! let key = load_key("/etc/migrun/migration.key")?;
//! // target
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:7300").await?;
//! let mut target = accept(&listener, &key).await?;
//! // source, on another host
//! let mut source = connect("10.0.0.2:7300", &key).await?;
//! source.send(&Message::Commit).await?;
//! assert_eq!(target.recv().await?, Message::Commit);
//! # Ok(()) }
//! ```

mod channel;
mod crypto;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod key;
mod limit;
mod message;

use std::fmt;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};

pub use bytes::Bytes;
pub use channel::{Channel, ChannelInfo, Receiver, Sender, CAPTURE_ENV, MAX_FRAME};
pub use crypto::{measure_cipher, Cipher, CipherSpeed, TAG_LEN};
pub use error::{Result, WireError};
pub use key::{generate_key_file, load_key, Key, KEY_LEN};
pub use limit::{Bandwidth, Traffic};
pub use message::{
    MemoryTotals, Message, PageRun, PagesSummary, RoundStats, TreeId, MAX_MESSAGE, MAX_PAYLOAD,
    MAX_RUN_PAGES, PAGE_SIZE,
};

/// The first bytes of every hello.
pub const MAGIC: &[u8; 6] = b"MIGRUN";

/// The protocol version this crate speaks. Peers must speak the same.
///
/// Version 3 added the ephemeral X25519 key to the hello (forward secrecy);
/// version 4 the hand-over as a two-phase commit (`Ack` after the restore,
/// `Done` as the commit, `Ack` once running and once its memory is in
/// place), `Heartbeat` and `Recover`.
pub const PROTOCOL_VERSION: u16 = 4;

/// Default time-out for connecting plus the handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default receive time-out (longest silence from the peer).
pub const DEFAULT_RECV_TIMEOUT: Duration = Duration::from_secs(120);

/// Which end of the connection we are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The side that connected (normally the source, `migrate-out`).
    Client,
    /// The side that accepted (normally the target, `migrate-in`).
    Server,
}

impl Role {
    fn to_wire(self) -> u8 {
        match self {
            Role::Client => 1,
            Role::Server => 2,
        }
    }

    fn from_wire(b: u8) -> Option<Role> {
        match b {
            1 => Some(Role::Client),
            2 => Some(Role::Server),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// Settings of a connection. Start from [`Config::default`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// Longest time for connecting and for the handshake (each).
    pub handshake_timeout: Duration,
    /// Longest silence from the peer that a receive waits through;
    /// `None` waits forever. Changeable later with `set_recv_timeout`.
    pub recv_timeout: Option<Duration>,
    /// Sending cap in megabits per second; `None` for none. Changeable
    /// later through [`Channel::bandwidth`].
    pub bandwidth_mbit: Option<u64>,
    /// The cipher we prefer; `None` picks by the CPU ([`Cipher::preferred`]).
    /// AES-256-GCM is used only if both peers prefer it.
    pub cipher: Option<Cipher>,
    /// TCP keep-alive: after this much silence the peer's host is probed,
    /// and the connection fails once it stops answering for about as
    /// long again (a dead host or network; a busy peer's kernel answers).
    /// `None`: the system's defaults (no probes). TCP connections only.
    pub keepalive: Option<Duration>,
    /// The protocol version announced; only tests change it.
    #[doc(hidden)]
    pub protocol_version: u16,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            recv_timeout: Some(DEFAULT_RECV_TIMEOUT),
            bandwidth_mbit: None,
            cipher: None,
            keepalive: None,
            protocol_version: PROTOCOL_VERSION,
        }
    }
}

impl Config {
    /// Sets [`Config::handshake_timeout`].
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Config {
        self.handshake_timeout = timeout;
        self
    }

    /// Sets [`Config::recv_timeout`].
    pub fn with_recv_timeout(mut self, timeout: Option<Duration>) -> Config {
        self.recv_timeout = timeout;
        self
    }

    /// Sets [`Config::bandwidth_mbit`].
    pub fn with_bandwidth_mbit(mut self, mbit: Option<u64>) -> Config {
        self.bandwidth_mbit = mbit;
        self
    }

    /// Sets [`Config::cipher`].
    pub fn with_cipher(mut self, cipher: Option<Cipher>) -> Config {
        self.cipher = cipher;
        self
    }

    /// Sets [`Config::keepalive`].
    pub fn with_keepalive(mut self, idle: Option<Duration>) -> Config {
        self.keepalive = idle;
        self
    }
}

/// Turns on TCP keep-alive on `stream`: probes after `idle` of silence,
/// every third of it (a second at least), three unanswered ones and the
/// connection fails. The same bound holds while data of ours waits
/// unacknowledged (when keep-alive does not probe): TCP's user time-out.
fn set_keepalive(stream: &TcpStream, idle: Duration) -> std::io::Result<()> {
    let second = Duration::from_secs(1);
    let idle = idle.max(second);
    let interval = (idle / 3).max(second);
    let sock = socket2::SockRef::from(stream);
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(interval)
            .with_retries(3),
    )?;
    sock.set_tcp_user_timeout(Some(idle + interval * 3))
}

/// Connects to a target at `addr` as the client, with default settings.
pub async fn connect<A: ToSocketAddrs + fmt::Display>(addr: A, key: &Key) -> Result<Channel> {
    connect_with(addr, key, &Config::default()).await
}

/// Connects to a target at `addr` as the client.
pub async fn connect_with<A: ToSocketAddrs + fmt::Display>(
    addr: A,
    key: &Key,
    config: &Config,
) -> Result<Channel> {
    let shown = addr.to_string();
    let stream =
        match tokio::time::timeout(config.handshake_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                return Err(WireError::Connect {
                    addr: shown,
                    source,
                })
            }
            Err(_) => {
                return Err(WireError::ConnectTimeout {
                    addr: shown,
                    timeout: config.handshake_timeout,
                })
            }
        };
    establish_tcp(stream, Role::Client, key, config).await
}

/// Accepts one connection on `listener` as the server, with default settings.
pub async fn accept(listener: &TcpListener, key: &Key) -> Result<Channel> {
    accept_with(listener, key, &Config::default()).await
}

/// Accepts one connection on `listener` as the server.
///
/// Waits for a connection as long as it takes; the handshake time-out
/// starts once one arrived. A failed handshake returns its error (the
/// caller may accept again).
pub async fn accept_with(listener: &TcpListener, key: &Key, config: &Config) -> Result<Channel> {
    let (stream, _) = listener.accept().await.map_err(WireError::Accept)?;
    establish_tcp(stream, Role::Server, key, config).await
}

/// Runs the handshake on an already accepted (or connected) TCP stream.
pub async fn establish_tcp(
    stream: TcpStream,
    role: Role,
    key: &Key,
    config: &Config,
) -> Result<Channel> {
    stream.set_nodelay(true)?;
    if let Some(idle) = config.keepalive {
        set_keepalive(&stream, idle)?;
    }
    let peer = stream.peer_addr().ok();
    let (r, w) = stream.into_split();
    let ephemeral = crypto::Ephemeral::generate()?;
    establish_parts(Box::new(r), Box::new(w), peer, role, key, config, ephemeral).await
}

/// Runs the handshake as `role` on any byte stream (a Unix socket, an
/// in-memory pipe, a test harness).
pub async fn establish<S>(stream: S, role: Role, key: &Key, config: &Config) -> Result<Channel>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    let ephemeral = crypto::Ephemeral::generate()?;
    establish_parts(Box::new(r), Box::new(w), None, role, key, config, ephemeral).await
}

/// A connected pair of channels over an in-memory pipe, for testing the
/// engine without a network. The first is the client, the second the server.
pub async fn pair(key: &Key) -> Result<(Channel, Channel)> {
    pair_with(key, &Config::default()).await
}

/// Like [`pair`], with settings for both ends.
pub async fn pair_with(key: &Key, config: &Config) -> Result<(Channel, Channel)> {
    let (a, b) = tokio::io::duplex(1 << 20);
    let (client, server) = tokio::join!(
        establish(a, Role::Client, key, config),
        establish(b, Role::Server, key, config)
    );
    Ok((client?, server?))
}

/// Like [`establish`], with our ephemeral key pair given (so a test knows
/// its secret, as an attacker who stole it would).
#[cfg(test)]
pub(crate) async fn establish_with_ephemeral<S>(
    stream: S,
    role: Role,
    key: &Key,
    config: &Config,
    ephemeral: crypto::Ephemeral,
) -> Result<Channel>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    establish_parts(Box::new(r), Box::new(w), None, role, key, config, ephemeral).await
}

async fn establish_parts(
    reader: channel::BoxRead,
    mut writer: channel::BoxWrite,
    peer_addr: Option<std::net::SocketAddr>,
    role: Role,
    key: &Key,
    config: &Config,
    ephemeral: crypto::Ephemeral,
) -> Result<Channel> {
    let traffic = Traffic::default();
    let mut reader = channel::new_reader(reader);
    let preference = config.cipher.unwrap_or_else(Cipher::preferred);
    let done = tokio::time::timeout(
        config.handshake_timeout,
        handshake::run(
            &mut reader,
            &mut writer,
            handshake::Local {
                role,
                version: config.protocol_version,
                preference,
                ephemeral,
            },
            key.as_bytes(),
            &traffic,
        ),
    )
    .await
    .map_err(|_| WireError::HandshakeTimeout(config.handshake_timeout))??;
    tracing::debug!(
        %role,
        cipher = %done.cipher,
        peer = ?peer_addr,
        "migration connection established"
    );
    Ok(Channel::assemble(channel::Parts {
        reader,
        writer,
        sealer: done.sealer,
        opener: done.opener,
        traffic,
        bandwidth: Bandwidth::new(config.bandwidth_mbit),
        recv_timeout: config.recv_timeout,
        info: ChannelInfo {
            role,
            cipher: done.cipher,
            peer_addr,
        },
    }))
}

/// Fills `buf` with random bytes from the operating system.
pub(crate) fn random_fill(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| WireError::Random(e.to_string()))
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
/// Each read may wait at most `timeout`.
pub(crate) async fn read_full<R: AsyncRead + Unpin + ?Sized>(
    reader: &mut R,
    buf: &mut [u8],
    timeout: Option<Duration>,
    traffic: &Traffic,
) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let read = reader.read(&mut buf[filled..]);
        let n = match timeout {
            Some(t) => tokio::time::timeout(t, read)
                .await
                .map_err(|_| WireError::RecvTimeout(t))??,
            None => read.await?,
        };
        if n == 0 {
            break;
        }
        traffic.add_received(n);
        filled += n;
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keepalive_probes_a_silent_peer_and_bounds_unacknowledged_data() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (server, _) = accepted.expect("accept");
        let _client = client.expect("connect");
        set_keepalive(&server, Duration::from_secs(6)).expect("keepalive");
        let sock = socket2::SockRef::from(&server);
        assert!(sock.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            sock.tcp_keepalive_time().expect("idle"),
            Duration::from_secs(6)
        );
        assert_eq!(
            sock.tcp_keepalive_interval().expect("interval"),
            Duration::from_secs(2)
        );
        assert_eq!(sock.tcp_keepalive_retries().expect("count"), 3);
        assert_eq!(
            sock.tcp_user_timeout().expect("user timeout"),
            Some(Duration::from_secs(12))
        );
        // Under a second: whole seconds, as TCP counts them.
        set_keepalive(&server, Duration::from_millis(200)).expect("keepalive");
        assert_eq!(
            sock.tcp_keepalive_time().expect("idle"),
            Duration::from_secs(1)
        );
    }
}

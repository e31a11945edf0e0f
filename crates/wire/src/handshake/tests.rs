//! Forward secrecy and authentication of the handshake, checked on the
//! bytes that real sessions put on the wire.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};

use super::{Hello, EPHEMERAL_AT, HELLO_LEN, PROOF_LEN};
use crate::crypto::{self, Cipher, Ephemeral, FrameCipher, SessionSecrets, TAG_LEN};
use crate::{
    establish, establish_with_ephemeral, Channel, Config, Key, Message, Role, WireError,
    PROTOCOL_VERSION,
};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// Every session is bounded, so a hang fails instead of blocking.
const LIMIT: Duration = Duration::from_secs(30);

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("test hung for {LIMIT:?}"),
    }
}

/// One end of an in-memory pipe that keeps a copy of everything written.
struct Tap {
    inner: DuplexStream,
    written: Arc<Mutex<Vec<u8>>>,
}

impl Tap {
    fn new(inner: DuplexStream) -> (Tap, Arc<Mutex<Vec<u8>>>) {
        let written = Arc::new(Mutex::new(Vec::new()));
        let tap = Tap {
            inner,
            written: written.clone(),
        };
        (tap, written)
    }
}

impl AsyncRead for Tap {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            this.written
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(&buf[..*n]);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

fn taken(written: &Mutex<Vec<u8>>) -> Vec<u8> {
    written
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// A session's bytes as a passive observer records them.
struct Recording {
    client: Vec<u8>,
    server: Vec<u8>,
}

/// Runs a real session over an in-memory pipe (the client's ephemeral
/// secret is `client_secret`, the server's random), sends `msg` from client
/// to server and returns what both sides wrote.
async fn record_session(
    key: &Key,
    config: &Config,
    client_secret: [u8; 32],
    msg: &Message,
) -> TestResult<Recording> {
    let (a, b) = tokio::io::duplex(1 << 16);
    let ((a, client_wrote), (b, server_wrote)) = (Tap::new(a), Tap::new(b));
    let ephemeral = Ephemeral::from_secret(client_secret);
    let (client, server) = bounded(async {
        tokio::join!(
            establish_with_ephemeral(a, Role::Client, key, config, ephemeral),
            establish(b, Role::Server, key, config)
        )
    })
    .await;
    let (mut client, mut server) = (client?, server?);
    client.send(msg).await?;
    assert_eq!(&bounded(server.recv()).await?, msg);
    Ok(Recording {
        client: taken(&client_wrote),
        server: taken(&server_wrote),
    })
}

/// What the recording shows of the handshake and of the client's first frame.
struct Observed {
    client_hello: [u8; HELLO_LEN],
    server_hello: [u8; HELLO_LEN],
    client_proof: [u8; PROOF_LEN],
    frame_len: [u8; 4],
    ciphertext: Vec<u8>,
    tag: [u8; TAG_LEN],
}

impl Observed {
    fn parse(rec: &Recording) -> TestResult<Observed> {
        let c = &rec.client;
        let frame_at = HELLO_LEN + PROOF_LEN;
        let frame_len: [u8; 4] = c[frame_at..frame_at + 4].try_into()?;
        let sealed = u32::from_be_bytes(frame_len) as usize;
        // The client wrote its hello, its proof and one frame; the server
        // its hello and its proof.
        assert_eq!(c.len(), frame_at + 4 + sealed, "client's bytes");
        assert_eq!(rec.server.len(), HELLO_LEN + PROOF_LEN, "server's bytes");
        let body = &c[frame_at + 4..];
        let (ciphertext, tag) = body.split_at(sealed - TAG_LEN);
        Ok(Observed {
            client_hello: c[..HELLO_LEN].try_into()?,
            server_hello: rec.server[..HELLO_LEN].try_into()?,
            client_proof: c[HELLO_LEN..frame_at].try_into()?,
            frame_len,
            ciphertext: ciphertext.to_vec(),
            tag: tag.try_into()?,
        })
    }

    fn transcript_hash(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.client_hello);
        hasher.update(self.server_hello);
        hasher.finalize().into()
    }

    fn client_nonce(&self) -> [u8; 32] {
        nonce_of(&self.client_hello)
    }

    fn server_nonce(&self) -> [u8; 32] {
        nonce_of(&self.server_hello)
    }

    fn server_ephemeral(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(&self.server_hello[EPHEMERAL_AT..]);
        out
    }

    fn cipher(&self) -> Cipher {
        let pick = |hello: &[u8; HELLO_LEN]| {
            Cipher::from_wire(hello[9]).unwrap_or_else(|| panic!("cipher {}", hello[9]))
        };
        Cipher::negotiate(pick(&self.client_hello), pick(&self.server_hello))
    }

    /// Opens the client's first frame with the client-to-server key of
    /// `secrets`, if that is the key it was sealed with.
    fn open_first_frame(&self, secrets: &SessionSecrets) -> Option<Message> {
        self.open_with(&secrets.client_to_server)
    }

    fn open_with(&self, key: &[u8; 32]) -> Option<Message> {
        let mut opener = FrameCipher::new(self.cipher(), key);
        let mut buf = self.ciphertext.clone();
        opener.open(&self.frame_len, &mut buf, &self.tag).ok()?;
        Message::decode(Bytes::from(buf)).ok()
    }

    /// Whether `secrets` reproduce the client's proof on the wire.
    fn proof_matches(&self, secrets: &SessionSecrets) -> TestResult<bool> {
        let proof = crypto::prove(
            &secrets.client_auth,
            b"client finished",
            &self.transcript_hash(),
        )?;
        Ok(proof == self.client_proof)
    }
}

fn nonce_of(hello: &[u8; HELLO_LEN]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(&hello[10..EPHEMERAL_AT]);
    out
}

/// The client-to-server key exactly as protocol version 2 derived it
/// (HKDF with the PSK alone, the nonces and the transcript hash).
fn version_2_client_key(psk: &[u8; 32], seen: &Observed) -> TestResult<[u8; 32]> {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(&seen.client_nonce());
    salt[32..].copy_from_slice(&seen.server_nonce());
    let hk = Hkdf::<Sha256>::new(Some(&salt), psk);
    let mut info = b"migrun wire v1 client to server key\0".to_vec();
    info.extend_from_slice(&seen.transcript_hash());
    let mut out = [0u8; 32];
    hk.expand(&info, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

fn random_secret() -> TestResult<[u8; 32]> {
    let mut out = [0u8; 32];
    crate::random_fill(&mut out)?;
    Ok(out)
}

fn secret_message() -> Message {
    Message::Abort {
        reason: "the container's secret memory".into(),
    }
}

#[tokio::test]
async fn recorded_session_does_not_open_with_the_key_alone() -> TestResult {
    for cipher in [Cipher::ChaCha20Poly1305, Cipher::Aes256Gcm] {
        let key = Key::generate()?;
        let config = Config::default().with_cipher(Some(cipher));
        let client_secret = random_secret()?;
        let msg = secret_message();
        let rec = record_session(&key, &config, client_secret, &msg).await?;
        let seen = Observed::parse(&rec)?;
        assert_eq!(seen.cipher(), cipher);
        let psk = key.as_bytes();
        let (cn, sn, th) = (
            seen.client_nonce(),
            seen.server_nonce(),
            seen.transcript_hash(),
        );

        // The attacker has the PSK and every byte, but no ephemeral secret.
        // The old derivation (PSK, nonces, transcript) does not open it, in
        // version 2's form nor with version 3's labels.
        let psk_only = crypto::derive_from_ikm(psk, &cn, &sn, &th)?;
        assert_eq!(seen.open_first_frame(&psk_only), None, "{cipher}");
        assert!(!seen.proof_matches(&psk_only)?);
        assert_eq!(seen.open_with(&version_2_client_key(psk, &seen)?), None);
        // Nor does the real derivation with a guessed (all-zero) DH result.
        let zero_dh = crypto::derive(psk, &[0u8; 32], &cn, &sn, &th)?;
        assert_eq!(seen.open_first_frame(&zero_dh), None);

        // With the client's ephemeral secret (which the client wiped) the
        // real derivation does open it and reproduces the client's proof:
        // the failures above come from the missing secret alone.
        let dh = Ephemeral::from_secret(client_secret).agree(&seen.server_ephemeral())?;
        let stolen = crypto::derive(psk, &dh, &cn, &sn, &th)?;
        assert!(seen.proof_matches(&stolen)?);
        assert_eq!(seen.open_first_frame(&stolen), Some(msg), "{cipher}");
    }
    Ok(())
}

#[tokio::test]
async fn sessions_with_the_same_key_have_different_session_keys() -> TestResult {
    let key = Key::generate()?;
    let config = Config::default().with_cipher(Some(Cipher::ChaCha20Poly1305));
    let msg = secret_message();
    let mut keys = Vec::new();
    let mut ciphertexts = Vec::new();
    for _ in 0..2 {
        let client_secret = random_secret()?;
        let rec = record_session(&key, &config, client_secret, &msg).await?;
        let seen = Observed::parse(&rec)?;
        let dh = Ephemeral::from_secret(client_secret).agree(&seen.server_ephemeral())?;
        let secrets = crypto::derive(
            key.as_bytes(),
            &dh,
            &seen.client_nonce(),
            &seen.server_nonce(),
            &seen.transcript_hash(),
        )?;
        assert_eq!(seen.open_first_frame(&secrets), Some(msg.clone()));
        keys.push((*secrets.client_to_server, *secrets.server_to_client));
        ciphertexts.push(seen.ciphertext);
    }
    assert_ne!(keys[0].0, keys[1].0);
    assert_ne!(keys[0].1, keys[1].1);
    // The same message as frame 0 of both: different keys, different bytes.
    assert_ne!(ciphertexts[0], ciphertexts[1]);
    Ok(())
}

/// Which hellos the man in the middle puts its own ephemeral key into.
#[derive(Clone, Copy, Debug)]
enum Substitute {
    Neither,
    Client,
    Server,
    Both,
}

/// A man in the middle without the PSK: relays the client's hello to the
/// server and back, with its own ephemeral public key put into the hellos
/// `substitute` says, then relays everything else (the proofs) unchanged.
async fn relay(
    mut client: DuplexStream,
    mut server: DuplexStream,
    substitute: Substitute,
    own_public: [u8; 32],
) -> io::Result<()> {
    let mut from_client = [0u8; HELLO_LEN];
    client.read_exact(&mut from_client).await?;
    let mut from_server = [0u8; HELLO_LEN];
    server.read_exact(&mut from_server).await?;
    if matches!(substitute, Substitute::Client | Substitute::Both) {
        from_client[EPHEMERAL_AT..].copy_from_slice(&own_public);
    }
    if matches!(substitute, Substitute::Server | Substitute::Both) {
        from_server[EPHEMERAL_AT..].copy_from_slice(&own_public);
    }
    server.write_all(&from_client).await?;
    client.write_all(&from_server).await?;
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}

async fn through_relay(
    key: &Key,
    substitute: Substitute,
) -> TestResult<(crate::Result<Channel>, crate::Result<Channel>)> {
    let config = Config::default();
    let (client_end, relay_client) = tokio::io::duplex(1 << 16);
    let (relay_server, server_end) = tokio::io::duplex(1 << 16);
    let mitm = Ephemeral::generate()?;
    let relaying = tokio::spawn(relay(
        relay_client,
        relay_server,
        substitute,
        *mitm.public(),
    ));
    let (client, server) = bounded(async {
        tokio::join!(
            establish(client_end, Role::Client, key, &config),
            establish(server_end, Role::Server, key, &config)
        )
    })
    .await;
    if client.is_err() || server.is_err() {
        // Both ends are gone, so the relay ends too.
        let _ = bounded(relaying).await?;
    }
    Ok((client, server))
}

#[tokio::test]
async fn substituted_ephemeral_keys_fail_authentication_on_both_sides() -> TestResult {
    let key = Key::generate()?;
    // The relay itself works: unchanged, it carries a session.
    let (client, server) = through_relay(&key, Substitute::Neither).await?;
    let (mut client, mut server) = (client?, server?);
    client.send(&Message::Commit).await?;
    assert_eq!(bounded(server.recv()).await?, Message::Commit);

    for substitute in [Substitute::Client, Substitute::Server, Substitute::Both] {
        let (client, server) = through_relay(&key, substitute).await?;
        for (side, result) in [("client", client), ("server", server)] {
            assert!(
                matches!(result, Err(WireError::AuthFailed)),
                "{substitute:?} substituted, {side}: {:?}",
                result.map(|c| c.info())
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn all_zero_ephemeral_key_in_a_hello_is_refused() -> TestResult {
    let (ours, mut theirs) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        establish(
            ours,
            Role::Server,
            &Key::from_bytes([1; 32]),
            &Config::default(),
        )
        .await
    });
    let hello = Hello {
        version: PROTOCOL_VERSION,
        role: Role::Client,
        cipher: Cipher::ChaCha20Poly1305,
        nonce: [7; 32],
        ephemeral: [0; 32],
    }
    .encode();
    theirs.write_all(&hello).await?;
    match bounded(server).await? {
        Err(e @ WireError::LowOrderKey) => {
            assert!(e.to_string().contains("low-order ephemeral key"), "{e}");
        }
        other => panic!(
            "expected a low-order key error, got {:?}",
            other.map(|c| c.info())
        ),
    }
    // Nothing but the server's hello was sent: no proof for such a peer.
    let mut sent = Vec::new();
    theirs.read_to_end(&mut sent).await?;
    assert_eq!(sent.len(), HELLO_LEN);
    Ok(())
}

//! Ephemeral key agreement, key derivation and the per-direction frame sealing.

use aes_gcm::Aes256Gcm;
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::ChaCha20Poly1305;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::error::{Result, WireError};

/// Length of the authentication tag appended to every sealed frame.
pub const TAG_LEN: usize = 16;

/// The authenticated cipher that seals the frames of a connection.
///
/// Both are 256-bit AEADs from RustCrypto. AES-256-GCM is used only when both
/// peers prefer it, which by default they do when their CPU has AES and
/// carry-less multiply instructions (it then seals about 1.5x faster than
/// ChaCha20-Poly1305); otherwise ChaCha20-Poly1305.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Cipher {
    /// ChaCha20-Poly1305 (RFC 8439): fast everywhere in software.
    ChaCha20Poly1305,
    /// AES-256-GCM: fastest with AES-NI/PCLMULQDQ (or ARMv8 crypto extensions).
    Aes256Gcm,
}

impl Cipher {
    /// The cipher this machine prefers: AES-256-GCM with hardware AES, else ChaCha20-Poly1305.
    pub fn preferred() -> Cipher {
        if hardware_aes() {
            Cipher::Aes256Gcm
        } else {
            Cipher::ChaCha20Poly1305
        }
    }

    pub(crate) fn to_wire(self) -> u8 {
        match self {
            Cipher::ChaCha20Poly1305 => 1,
            Cipher::Aes256Gcm => 2,
        }
    }

    pub(crate) fn from_wire(b: u8) -> Option<Cipher> {
        match b {
            1 => Some(Cipher::ChaCha20Poly1305),
            2 => Some(Cipher::Aes256Gcm),
            _ => None,
        }
    }

    /// The cipher two peers with these preferences use.
    pub(crate) fn negotiate(a: Cipher, b: Cipher) -> Cipher {
        if a == Cipher::Aes256Gcm && b == Cipher::Aes256Gcm {
            Cipher::Aes256Gcm
        } else {
            Cipher::ChaCha20Poly1305
        }
    }
}

impl std::fmt::Display for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Cipher::ChaCha20Poly1305 => "chacha20-poly1305",
            Cipher::Aes256Gcm => "aes-256-gcm",
        })
    }
}

#[cfg(target_arch = "x86_64")]
fn hardware_aes() -> bool {
    std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
}

#[cfg(target_arch = "aarch64")]
fn hardware_aes() -> bool {
    std::arch::is_aarch64_feature_detected!("aes")
        && std::arch::is_aarch64_feature_detected!("pmull")
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn hardware_aes() -> bool {
    false
}

/// Length of an X25519 public key (and of a shared secret).
pub(crate) const EPHEMERAL_LEN: usize = 32;

/// One side's ephemeral X25519 key pair: made fresh for each connection,
/// used for one Diffie-Hellman and wiped (zeroized on drop) right after.
///
/// x25519-dalek's `StaticSecret` holds it rather than its `EphemeralSecret`
/// because the latter can only come from an RNG whose failure panics; this
/// one comes from [`crate::random_fill`], whose failure is an error. Its use
/// is just as ephemeral: [`Ephemeral::agree`] consumes it.
pub(crate) struct Ephemeral {
    secret: StaticSecret,
    public: [u8; EPHEMERAL_LEN],
}

impl Ephemeral {
    /// A fresh key pair from the operating system's random number generator.
    pub(crate) fn generate() -> Result<Ephemeral> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        crate::random_fill(bytes.as_mut())?;
        Ok(Ephemeral::from_secret(*bytes))
    }

    /// The key pair of a given secret (clamped by X25519 itself); tests use
    /// it to know a side's secret.
    pub(crate) fn from_secret(bytes: [u8; 32]) -> Ephemeral {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret).to_bytes();
        Ephemeral { secret, public }
    }

    /// The public key, sent in the hello.
    pub(crate) fn public(&self) -> &[u8; EPHEMERAL_LEN] {
        &self.public
    }

    /// X25519 with the peer's public key; the secret is wiped on return.
    ///
    /// A low-order peer key (RFC 7748 section 6.1: the all-zero result) is
    /// refused with [`WireError::LowOrderKey`]: it would make the shared
    /// secret a constant that adds nothing to the session keys.
    pub(crate) fn agree(self, their_public: &[u8; EPHEMERAL_LEN]) -> Result<Zeroizing<[u8; 32]>> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*their_public));
        // Checked in constant time by x25519-dalek.
        if !shared.was_contributory() {
            return Err(WireError::LowOrderKey);
        }
        Ok(Zeroizing::new(shared.to_bytes()))
    }
}

/// Secrets derived for one connection from the pre-shared key and the
/// ephemeral Diffie-Hellman result.
pub(crate) struct SessionSecrets {
    /// Seals frames from client to server.
    pub client_to_server: Zeroizing<[u8; 32]>,
    /// Seals frames from server to client.
    pub server_to_client: Zeroizing<[u8; 32]>,
    /// Keys the client's proof of the PSK.
    pub client_auth: Zeroizing<[u8; 32]>,
    /// Keys the server's proof of the PSK.
    pub server_auth: Zeroizing<[u8; 32]>,
}

/// Start of every HKDF info string (with the protocol version, so keys of
/// different versions never coincide).
const INFO_PREFIX: &[u8] = b"migrun wire v3 ";

/// HKDF-SHA256 with the PSK followed by the X25519 shared secret as input
/// keying material, both nonces as salt, and a label plus the transcript
/// hash as info.
///
/// Every secret needs both the PSK and the shared secret: the PSK
/// authenticates (a man in the middle without it cannot make the proofs),
/// the shared secret gives forward secrecy (a recorded connection cannot be
/// decrypted later with the PSK alone, since the ephemeral secrets are gone).
pub(crate) fn derive(
    psk: &[u8; 32],
    shared: &[u8; 32],
    client_nonce: &[u8; 32],
    server_nonce: &[u8; 32],
    transcript_hash: &[u8; 32],
) -> Result<SessionSecrets> {
    let mut ikm = Zeroizing::new([0u8; 64]);
    ikm[..32].copy_from_slice(psk);
    ikm[32..].copy_from_slice(shared);
    derive_from_ikm(ikm.as_ref(), client_nonce, server_nonce, transcript_hash)
}

/// The HKDF of [`derive`] on any input keying material (tests feed it the
/// PSK alone, as an attacker without the ephemeral secrets would).
pub(crate) fn derive_from_ikm(
    ikm: &[u8],
    client_nonce: &[u8; 32],
    server_nonce: &[u8; 32],
    transcript_hash: &[u8; 32],
) -> Result<SessionSecrets> {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(client_nonce);
    salt[32..].copy_from_slice(server_nonce);
    let hk = Hkdf::<Sha256>::new(Some(&salt), ikm);
    let expand = |label: &str| -> Result<Zeroizing<[u8; 32]>> {
        let mut out = Zeroizing::new([0u8; 32]);
        let mut info = Vec::with_capacity(96);
        info.extend_from_slice(INFO_PREFIX);
        info.extend_from_slice(label.as_bytes());
        info.push(0);
        info.extend_from_slice(transcript_hash);
        hk.expand(&info, out.as_mut())
            .map_err(|_| WireError::Internal("hkdf output length"))?;
        Ok(out)
    };
    Ok(SessionSecrets {
        client_to_server: expand("client to server key")?,
        server_to_client: expand("server to client key")?,
        client_auth: expand("client auth")?,
        server_auth: expand("server auth")?,
    })
}

/// HMAC-SHA256 proof of the PSK over the transcript.
pub(crate) fn prove(
    auth_key: &[u8; 32],
    label: &[u8],
    transcript_hash: &[u8; 32],
) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    out.copy_from_slice(
        &finished_mac(auth_key, label, transcript_hash)?
            .finalize()
            .into_bytes(),
    );
    Ok(out)
}

/// Checks a peer's proof in constant time.
pub(crate) fn verify(
    auth_key: &[u8; 32],
    label: &[u8],
    transcript_hash: &[u8; 32],
    proof: &[u8; 32],
) -> Result<bool> {
    Ok(finished_mac(auth_key, label, transcript_hash)?
        .verify_slice(proof)
        .is_ok())
}

fn finished_mac(
    auth_key: &[u8; 32],
    label: &[u8],
    transcript_hash: &[u8; 32],
) -> Result<Hmac<Sha256>> {
    // HMAC takes keys of any length, so this does not fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(auth_key)
        .map_err(|_| WireError::Internal("hmac key length"))?;
    mac.update(label);
    mac.update(transcript_hash);
    Ok(mac)
}

enum Aead {
    ChaCha(Box<ChaCha20Poly1305>),
    Aes(Box<Aes256Gcm>),
}

/// One direction of a connection: a key and a frame counter used as nonce.
///
/// A frame sealed with counter n only opens as the n-th frame, so replayed,
/// reordered or dropped frames fail authentication.
pub(crate) struct FrameCipher {
    aead: Aead,
    counter: u64,
}

impl FrameCipher {
    pub(crate) fn new(cipher: Cipher, key: &[u8; 32]) -> FrameCipher {
        let aead = match cipher {
            Cipher::ChaCha20Poly1305 => Aead::ChaCha(Box::new(ChaCha20Poly1305::new(key.into()))),
            Cipher::Aes256Gcm => Aead::Aes(Box::new(Aes256Gcm::new(key.into()))),
        };
        FrameCipher { aead, counter: 0 }
    }

    fn next_nonce(&mut self) -> Result<[u8; 12]> {
        let n = self.counter;
        self.counter = n.checked_add(1).ok_or(WireError::CounterExhausted)?;
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        Ok(nonce)
    }

    /// Encrypts `buf` in place and returns the tag; `aad` is authenticated too.
    pub(crate) fn seal(&mut self, aad: &[u8], buf: &mut [u8]) -> Result<[u8; TAG_LEN]> {
        let nonce = self.next_nonce()?;
        let mut out = [0u8; TAG_LEN];
        match &self.aead {
            Aead::ChaCha(c) => {
                let tag = c
                    .encrypt_inout_detached(&nonce.into(), aad, buf.into())
                    .map_err(|_| WireError::Seal)?;
                out.copy_from_slice(&tag);
            }
            Aead::Aes(c) => {
                let tag = c
                    .encrypt_inout_detached(&nonce.into(), aad, buf.into())
                    .map_err(|_| WireError::Seal)?;
                out.copy_from_slice(&tag);
            }
        }
        Ok(out)
    }

    /// Decrypts `buf` in place after checking `tag`.
    pub(crate) fn open(&mut self, aad: &[u8], buf: &mut [u8], tag: &[u8; TAG_LEN]) -> Result<()> {
        let nonce = self.next_nonce()?;
        let ok = match &self.aead {
            Aead::ChaCha(c) => c
                .decrypt_inout_detached(&nonce.into(), aad, buf.into(), tag.into())
                .is_ok(),
            Aead::Aes(c) => c
                .decrypt_inout_detached(&nonce.into(), aad, buf.into(), tag.into())
                .is_ok(),
        };
        if ok {
            Ok(())
        } else {
            Err(WireError::Decrypt)
        }
    }
}

/// Sealing speed of a cipher on this machine, from [`measure_cipher`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CipherSpeed {
    /// Megabytes (10^6 bytes) sealed per second, one core.
    pub seal_mb_s: f64,
    /// Megabytes opened (checked and decrypted) per second, one core.
    pub open_mb_s: f64,
    /// Megabytes per second through seal then open on one core.
    pub both_mb_s: f64,
}

/// Measures how fast `cipher` seals and opens `frames` frames of
/// `frame_size` bytes on this machine (exactly as a connection does).
pub fn measure_cipher(cipher: Cipher, frame_size: usize, frames: usize) -> Result<CipherSpeed> {
    use std::time::{Duration, Instant};
    let mut key = [0u8; 32];
    crate::random_fill(&mut key)?;
    let mut sealer = FrameCipher::new(cipher, &key);
    let mut opener = FrameCipher::new(cipher, &key);
    let mut buf = vec![0x5au8; frame_size];
    let header = (frame_size as u32).to_be_bytes();
    let (mut sealing, mut opening) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..frames {
        let t0 = Instant::now();
        let tag = sealer.seal(&header, &mut buf)?;
        let t1 = Instant::now();
        opener.open(&header, &mut buf, &tag)?;
        let t2 = Instant::now();
        sealing += t1 - t0;
        opening += t2 - t1;
    }
    let mb = (frame_size * frames) as f64 / 1e6;
    let rate = |d: Duration| mb / d.as_secs_f64().max(1e-9);
    Ok(CipherSpeed {
        seal_mb_s: rate(sealing),
        open_mb_s: rate(opening),
        both_mb_s: rate(sealing + opening),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_both_ciphers_and_detect_tamper() -> Result<()> {
        for cipher in [Cipher::ChaCha20Poly1305, Cipher::Aes256Gcm] {
            let key = [9u8; 32];
            let mut tx = FrameCipher::new(cipher, &key);
            let mut rx = FrameCipher::new(cipher, &key);
            let mut buf = b"hello pages".to_vec();
            let tag = tx.seal(b"len", &mut buf)?;
            assert_ne!(&buf, b"hello pages");
            let mut copy = buf.clone();
            rx.open(b"len", &mut buf, &tag)?;
            assert_eq!(&buf, b"hello pages");
            // The same ciphertext again (a replay) does not open as frame 1.
            assert!(matches!(
                rx.open(b"len", &mut copy, &tag),
                Err(WireError::Decrypt)
            ));
            let mut rx2 = FrameCipher::new(cipher, &key);
            let mut flipped = tx.seal(b"len", &mut b"abc".to_vec())?;
            flipped[0] ^= 1;
            assert!(rx2.open(b"len", &mut b"abc".to_vec(), &flipped).is_err());
        }
        Ok(())
    }

    #[test]
    fn negotiation_needs_both_for_aes() {
        use Cipher::*;
        assert_eq!(Cipher::negotiate(Aes256Gcm, Aes256Gcm), Aes256Gcm);
        assert_eq!(
            Cipher::negotiate(Aes256Gcm, ChaCha20Poly1305),
            ChaCha20Poly1305
        );
        assert_eq!(
            Cipher::negotiate(ChaCha20Poly1305, Aes256Gcm),
            ChaCha20Poly1305
        );
    }

    #[test]
    fn derivation_depends_on_every_input() -> Result<()> {
        let base = derive(&[1; 32], &[5; 32], &[2; 32], &[3; 32], &[4; 32])?;
        for other in [
            derive(&[9; 32], &[5; 32], &[2; 32], &[3; 32], &[4; 32])?,
            derive(&[1; 32], &[9; 32], &[2; 32], &[3; 32], &[4; 32])?,
            derive(&[1; 32], &[5; 32], &[9; 32], &[3; 32], &[4; 32])?,
            derive(&[1; 32], &[5; 32], &[2; 32], &[9; 32], &[4; 32])?,
            derive(&[1; 32], &[5; 32], &[2; 32], &[3; 32], &[9; 32])?,
            // The PSK alone, without the shared secret (the version 2 input).
            derive_from_ikm(&[1; 32], &[2; 32], &[3; 32], &[4; 32])?,
        ] {
            assert_ne!(*base.client_to_server, *other.client_to_server);
            assert_ne!(*base.server_to_client, *other.server_to_client);
            assert_ne!(*base.client_auth, *other.client_auth);
            assert_ne!(*base.server_auth, *other.server_auth);
        }
        assert_ne!(*base.client_to_server, *base.server_to_client);
        assert_ne!(*base.client_auth, *base.server_auth);
        Ok(())
    }

    #[test]
    fn both_sides_agree_on_the_shared_secret() -> Result<()> {
        let (a, b) = (Ephemeral::generate()?, Ephemeral::generate()?);
        let (a_pub, b_pub) = (*a.public(), *b.public());
        assert_ne!(a_pub, b_pub);
        let (ab, ba) = (a.agree(&b_pub)?, b.agree(&a_pub)?);
        assert_eq!(*ab, *ba);
        assert_ne!(*ab, [0u8; 32]);
        // Fresh pairs, fresh secrets.
        let c = Ephemeral::generate()?;
        assert_ne!(*c.agree(&b_pub)?, *ab);
        Ok(())
    }

    /// RFC 7748 test vector (section 6.1), through [`Ephemeral`].
    #[test]
    fn x25519_matches_rfc_7748() -> Result<()> {
        let alice = hex32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let bob_public = hex32("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
        let alice_public =
            hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        let shared = hex32("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
        let a = Ephemeral::from_secret(alice);
        assert_eq!(*a.public(), alice_public);
        assert_eq!(*a.agree(&bob_public)?, shared);
        Ok(())
    }

    /// Every point of order 1, 2, 4 or 8 on the curve or its twist, and
    /// their non-canonical encodings: each makes the X25519 result zero.
    #[test]
    fn low_order_public_keys_are_refused() -> Result<()> {
        let mut low_order = vec![
            // 0 (order 2 with the point at infinity) and 1 (order 4 on the twist).
            [0u8; 32],
            hex32("0100000000000000000000000000000000000000000000000000000000000000"),
            // The two points of order 8.
            hex32("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
            hex32("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
            // p - 1 (order 4), p (= 0) and p + 1 (= 1).
            hex32("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
            hex32("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
            hex32("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        ];
        // The top bit is ignored (RFC 7748), so with it set they are the same points.
        for i in 0..low_order.len() {
            let mut high = low_order[i];
            high[31] |= 0x80;
            low_order.push(high);
        }
        for point in &low_order {
            let got = Ephemeral::generate()?.agree(point);
            assert!(
                matches!(got, Err(WireError::LowOrderKey)),
                "{point:02x?} was accepted"
            );
        }
        // A genuine key next to them is not.
        let peer = Ephemeral::generate()?;
        Ephemeral::generate()?.agree(peer.public())?;
        Ok(())
    }

    fn hex32(text: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap_or_else(|e| {
                panic!("bad hex in a test vector: {e}");
            });
        }
        out
    }
}

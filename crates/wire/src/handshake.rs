//! The handshake: hellos, version check, ephemeral X25519, key derivation,
//! mutual proof of the PSK.
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
//! ```
//!
//! Both sides write before they read, so a version mismatch or a wrong key
//! is reported by both; the version is checked before anything else of the
//! hello, so a peer of another version (with another hello length) gets a
//! version mismatch. Nothing but the hellos and the proofs is exchanged
//! before both proofs verified, so a peer without the key learns nothing
//! of the container and cannot send a single frame.
//!
//! Forward secrecy: the session keys need the X25519 result of two key
//! pairs made for this connection alone and wiped right after, so a
//! recorded connection cannot be decrypted later even by whoever gets the
//! key file. Authentication still rests on the PSK: the transcript hash
//! covers both ephemeral public keys and the proofs are keyed from secrets
//! that need the PSK, so a man in the middle without the PSK cannot
//! substitute its own ephemeral keys. (The proof keys need the X25519
//! result too, so a verified proof also confirms that both sides computed
//! the same one.)

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::crypto::{self, Cipher, Ephemeral, FrameCipher, EPHEMERAL_LEN};
use crate::error::{Result, WireError};
use crate::limit::Traffic;
use crate::{read_full, Role, MAGIC};

/// Length of a hello.
pub(crate) const HELLO_LEN: usize = 6 + 2 + 1 + 1 + 32 + EPHEMERAL_LEN;

/// Where the ephemeral public key starts in a hello.
const EPHEMERAL_AT: usize = HELLO_LEN - EPHEMERAL_LEN;

/// Length of a proof.
const PROOF_LEN: usize = 32;

struct Hello {
    version: u16,
    role: Role,
    cipher: Cipher,
    nonce: [u8; 32],
    ephemeral: [u8; EPHEMERAL_LEN],
}

impl Hello {
    fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[..6].copy_from_slice(MAGIC);
        out[6..8].copy_from_slice(&self.version.to_be_bytes());
        out[8] = self.role.to_wire();
        out[9] = self.cipher.to_wire();
        out[10..EPHEMERAL_AT].copy_from_slice(&self.nonce);
        out[EPHEMERAL_AT..].copy_from_slice(&self.ephemeral);
        out
    }
}

/// What a completed handshake yields.
pub(crate) struct Established {
    pub cipher: Cipher,
    pub sealer: FrameCipher,
    pub opener: FrameCipher,
}

/// Our side of a handshake.
pub(crate) struct Local {
    /// Our role.
    pub role: Role,
    /// The protocol version we announce.
    pub version: u16,
    /// The cipher we prefer.
    pub preference: Cipher,
    /// Our key pair for this connection alone.
    pub ephemeral: Ephemeral,
}

/// Runs the handshake as `local` says (without time-out; the caller adds it).
pub(crate) async fn run<R, W>(
    reader: &mut R,
    writer: &mut W,
    local: Local,
    psk: &[u8; 32],
    traffic: &Traffic,
) -> Result<Established>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Local {
        role,
        version,
        preference,
        ephemeral,
    } = local;
    let mut nonce = [0u8; 32];
    crate::random_fill(&mut nonce)?;
    let ours = Hello {
        version,
        role,
        cipher: preference,
        nonce,
        ephemeral: *ephemeral.public(),
    }
    .encode();
    writer.write_all(&ours).await?;
    writer.flush().await?;
    traffic.add_sent(ours.len());

    let mut theirs = [0u8; HELLO_LEN];
    read_exact_hs(reader, &mut theirs[..8], traffic).await?;
    if &theirs[..6] != MAGIC {
        return Err(WireError::BadMagic);
    }
    let their_version = u16::from_be_bytes([theirs[6], theirs[7]]);
    if their_version != version {
        return Err(WireError::VersionMismatch {
            ours: version,
            theirs: their_version,
        });
    }
    read_exact_hs(reader, &mut theirs[8..], traffic).await?;
    let their_role = Role::from_wire(theirs[8])
        .ok_or_else(|| WireError::BadHello(format!("unknown role {}", theirs[8])))?;
    if their_role == role {
        return Err(WireError::SameRole(role.name()));
    }
    let their_cipher = Cipher::from_wire(theirs[9])
        .ok_or_else(|| WireError::BadHello(format!("unknown cipher {}", theirs[9])))?;
    let mut their_nonce = [0u8; 32];
    their_nonce.copy_from_slice(&theirs[10..EPHEMERAL_AT]);
    let mut their_ephemeral = [0u8; EPHEMERAL_LEN];
    their_ephemeral.copy_from_slice(&theirs[EPHEMERAL_AT..]);
    if their_nonce == nonce {
        return Err(WireError::BadHello("our own nonce came back".into()));
    }

    let (client_hello, server_hello, client_nonce, server_nonce) = match role {
        Role::Client => (&ours, &theirs, &nonce, &their_nonce),
        Role::Server => (&theirs, &ours, &their_nonce, &nonce),
    };
    let mut hasher = Sha256::new();
    hasher.update(client_hello);
    hasher.update(server_hello);
    let mut th = [0u8; 32];
    th.copy_from_slice(&hasher.finalize());

    // Consumes (wipes) our ephemeral secret; refuses a low-order peer key.
    let shared = ephemeral.agree(&their_ephemeral)?;
    let secrets = crypto::derive(psk, &shared, client_nonce, server_nonce, &th)?;
    drop(shared);
    let (own_auth, peer_auth, own_label, peer_label): (_, _, &[u8], &[u8]) = match role {
        Role::Client => (
            &secrets.client_auth,
            &secrets.server_auth,
            b"client finished",
            b"server finished",
        ),
        Role::Server => (
            &secrets.server_auth,
            &secrets.client_auth,
            b"server finished",
            b"client finished",
        ),
    };
    let proof = crypto::prove(own_auth, own_label, &th)?;
    writer.write_all(&proof).await?;
    writer.flush().await?;
    traffic.add_sent(proof.len());

    let mut their_proof = [0u8; PROOF_LEN];
    read_exact_hs(reader, &mut their_proof, traffic).await?;
    if !crypto::verify(peer_auth, peer_label, &th, &their_proof)? {
        return Err(WireError::AuthFailed);
    }

    let cipher = Cipher::negotiate(preference, their_cipher);
    let (send_key, recv_key) = match role {
        Role::Client => (&secrets.client_to_server, &secrets.server_to_client),
        Role::Server => (&secrets.server_to_client, &secrets.client_to_server),
    };
    Ok(Established {
        cipher,
        sealer: FrameCipher::new(cipher, send_key),
        opener: FrameCipher::new(cipher, recv_key),
    })
}

async fn read_exact_hs<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
    traffic: &Traffic,
) -> Result<()> {
    let got = read_full(reader, buf, None, traffic).await?;
    if got < buf.len() {
        return Err(WireError::Truncated("handshake"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;

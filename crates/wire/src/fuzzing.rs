//! Entry points for the fuzz targets in `fuzz/` of the repository, built
//! only with the `fuzzing` feature and not part of the API: a receiving
//! half reading a byte stream from memory as the frames after a handshake,
//! and frames sealed under the same session key as a peer would seal them,
//! so that a fuzzer gets behind the authentication to the decoder.

use crate::channel::{self, Channel, ChannelInfo, Parts, Receiver};
use crate::crypto::{Cipher, FrameCipher};
use crate::error::Result;
use crate::limit::{Bandwidth, Traffic};
use crate::Role;

/// A receiving half that reads `stream` as everything the peer sent after
/// the handshake, opening frames with `key` under `cipher` (frame counter
/// from 0), with no receive time-out.
pub fn receiver(cipher: Cipher, key: &[u8; 32], stream: Vec<u8>) -> Receiver {
    let reader = channel::new_reader(Box::new(std::io::Cursor::new(stream)));
    let channel = Channel::assemble(Parts {
        reader,
        writer: Box::new(tokio::io::sink()),
        sealer: FrameCipher::new(cipher, key),
        opener: FrameCipher::new(cipher, key),
        traffic: Traffic::default(),
        bandwidth: Bandwidth::new(None),
        recv_timeout: None,
        info: ChannelInfo {
            role: Role::Server,
            cipher,
            peer_addr: None,
        },
    });
    channel.split().1
}

/// Seals frames as the peer's sending half does, frame counter from 0.
pub struct FrameSealer {
    cipher: FrameCipher,
}

impl FrameSealer {
    /// A sealer for frames to a [`receiver`] made with the same `cipher` and `key`.
    pub fn new(cipher: Cipher, key: &[u8; 32]) -> FrameSealer {
        FrameSealer {
            cipher: FrameCipher::new(cipher, key),
        }
    }

    /// Appends to `out` the next frame carrying `plaintext` (an encoded
    /// message, or any bytes): the length prefix, `plaintext` sealed with
    /// the prefix as associated data, and the tag. `header` replaces the
    /// prefix a sender computes, on the wire and in the associated data,
    /// as a broken or hostile peer that holds the key could do.
    pub fn seal(
        &mut self,
        plaintext: &[u8],
        header: Option<[u8; 4]>,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let header = match header {
            Some(h) => h,
            None => channel::frame_header(plaintext.len())?,
        };
        let mut body = plaintext.to_vec();
        let tag = self.cipher.seal(&header, &mut body)?;
        out.extend_from_slice(&header);
        out.extend_from_slice(&body);
        out.extend_from_slice(&tag);
        Ok(())
    }
}

/// The length a frame's prefix announces, checked as the receiver checks it.
pub fn frame_len(header: [u8; 4]) -> Result<usize> {
    channel::frame_len(header)
}

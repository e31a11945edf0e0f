//! The receiving half of a connection after the handshake: the frame
//! decoder (`Receiver::recv`: length prefix, authentication, then
//! `Message::decode` of the plaintext).
//!
//! The first input byte picks the cipher (bit 0) and the mode (bit 1):
//!
//! - raw: the rest is the byte stream from the peer as it is (length
//!   prefixes, truncation, frames too long or too short, ciphertext that
//!   does not authenticate);
//! - sealed: the rest is a script of items, each an op byte and its
//!   operands, turned into the stream by sealing with the session key, so
//!   that the decoder behind the authentication is reached:
//!   - op & 3 == 0: a frame, `u16 LE` length and that many plaintext bytes;
//!   - op & 3 == 1: the same with a `[u8; 4]` length prefix of the
//!     script's choosing before the length (authenticated as a peer with
//!     the key could);
//!   - op & 3 == 2: raw bytes, `u8` length and the bytes, as they are;
//!   - op & 3 == 3: a frame sealed and dropped (the frame counter moves on);
//!   - op & 4 (frames): one byte of the sealed frame flipped, at the
//!     position of the next `u16 LE` operand modulo the frame's length.
//!
//! Checks: no panic; errors are one line; until the first irregular item
//! each frame is received as `Message::decode` of its plaintext (the same
//! message, or the same error), a malformed or unknown message does not
//! end the connection, and the end of the stream is a clean close; after
//! any other error the receiver stays broken.

#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use migrun_wire::fuzzing::{receiver, FrameSealer};
use migrun_wire::{Bytes, Cipher, Message, WireError};

const KEY: [u8; 32] = [0x42; 32];

/// Receives most this many messages from one input.
const MAX_RECV: usize = 64;

/// Runs a future that never waits (the stream is in memory, with no
/// receive time-out) to completion.
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("an in-memory receive waited"),
    }
}

/// Reads operands off the script; missing bytes read as zero.
struct Script<'a>(&'a [u8]);

impl Script<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | (u16::from(self.u8()) << 8)
    }
}

/// Whether an error leaves the connection usable.
fn recoverable(e: &WireError) -> bool {
    matches!(e, WireError::Malformed(_) | WireError::UnknownMessage(_))
}

fn one_line(e: &WireError) {
    let line = e.to_string();
    assert!(
        !line.contains('\n'),
        "error of more than one line: {line:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let cipher = if mode & 1 == 0 {
        Cipher::ChaCha20Poly1305
    } else {
        Cipher::Aes256Gcm
    };
    // What the receiver must yield for each regular frame, in order.
    let mut expected: Vec<Result<Message, WireError>> = Vec::new();
    let mut regular = true;
    let stream = if mode & 2 == 0 {
        regular = false;
        rest.to_vec()
    } else {
        let mut sealer = FrameSealer::new(cipher, &KEY);
        let mut stream = Vec::new();
        let mut script = Script(rest);
        while !script.0.is_empty() {
            let op = script.u8();
            match op & 3 {
                2 => {
                    let n = usize::from(script.u8());
                    stream.extend_from_slice(script.take(n));
                    regular = false;
                    continue;
                }
                kind => {
                    let header: Option<[u8; 4]> = (kind == 1).then(|| {
                        let mut h = [0u8; 4];
                        let got = script.take(4);
                        h[..got.len()].copy_from_slice(got);
                        h
                    });
                    let len = usize::from(script.u16());
                    let plain = script.take(len).to_vec();
                    let flip = (op & 4 != 0).then(|| usize::from(script.u16()));
                    let mut frame = Vec::new();
                    if sealer.seal(&plain, header, &mut frame).is_err() {
                        // Only a message over the limit fails, which a
                        // u16 length cannot reach.
                        panic!("sealing {} bytes failed", plain.len());
                    }
                    if kind == 3 {
                        regular = false;
                        continue;
                    }
                    if let Some(at) = flip {
                        let at = at % frame.len();
                        frame[at] ^= 1;
                        regular = false;
                    }
                    if frame[..4] != (plain.len() as u32 + 16).to_be_bytes() || plain.is_empty() {
                        regular = false;
                    }
                    if regular {
                        expected.push(Message::decode(Bytes::from(plain)));
                    }
                    stream.extend_from_slice(&frame);
                }
            }
        }
        stream
    };
    let mut rx = receiver(cipher, &KEY, stream);
    let mut expected = expected.into_iter();
    for _ in 0..MAX_RECV {
        let got = now(rx.recv());
        match expected.next() {
            Some(want) => match (&want, &got) {
                (Ok(a), Ok(b)) => assert!(a == b, "sent {a:?}, received {b:?}"),
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
                _ => panic!("frame decoded to {want:?}, received {got:?}"),
            },
            None if regular => {
                // Every frame was received: the peer closed cleanly.
                assert!(
                    matches!(got, Err(WireError::Closed)),
                    "after the last frame: {got:?}"
                );
            }
            None => {}
        }
        match got {
            Ok(_) => {}
            Err(e) if recoverable(&e) => one_line(&e),
            Err(e) => {
                one_line(&e);
                assert!(
                    matches!(now(rx.recv()), Err(WireError::Broken)),
                    "receiving after {e} did not fail as broken"
                );
                break;
            }
        }
    }
});

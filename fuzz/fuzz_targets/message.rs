//! `Message::decode` on any plaintext a peer holding the key could seal.
//!
//! Checks: no panic; errors are one line; whatever decodes encodes again
//! and decodes to the same message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use migrun_wire::{Bytes, Message};

fuzz_target!(|data: &[u8]| {
    match Message::decode(Bytes::copy_from_slice(data)) {
        Ok(msg) => {
            let _ = (msg.kind(), msg.payload_len(), format!("{msg:?}"));
            let mut out = Vec::new();
            if let Err(e) = msg.encode(&mut out) {
                panic!("decoded {msg:?} does not encode again: {e}");
            }
            match Message::decode(Bytes::from(out)) {
                Ok(back) => assert!(back == msg, "{msg:?} came back as {back:?}"),
                Err(e) => panic!("re-encoded {msg:?} does not decode: {e}"),
            }
        }
        Err(e) => {
            let line = e.to_string();
            assert!(
                !line.contains('\n'),
                "error of more than one line: {line:?}"
            );
        }
    }
});
